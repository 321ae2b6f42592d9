"""Benchmark `sft-packing` (python -m qedlib bench sft-packing): SFT tokens/s of padded, padding-free and
packed batches on the shipped data, plus the MFU of padding-free training of a Qwen3-0.6B shape on a GPU.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import attention
from ..tables import markdown_table as table
from ..config import Config
from ..files import read_jsonl
from ..models import pick_device, resolve_model
from ..proof_chat import sft_row
from ..stages.sft import trl_args, weights_dtype
from ..sft_data import build_tokenized
from ..training import StepTimer, peak_flops
from ..problem_sets import load_problems, shipped_path


def shipped_sft_dataset():
    """SFT rows built from the shipped problems' reference solutions and calibration proofs (bench data)."""
    import datasets  # heavy: datasets loads pyarrow
    problems = {p.id: p for p in load_problems("shipped")}
    rows = [sft_row(p.problem, f"Plan: {p.category or 'proof'}. Check the statement, then write the argument.",
                    p.reference_solution) for p in problems.values() if p.reference_solution]
    for r in read_jsonl(shipped_path("calibration.jsonl")):
        p = problems.get(r.get("problem_id"))
        if p and r.get("proof"):
            rows.append(sft_row(p.problem, r.get("note") or "", r["proof"], grade=r.get("reference_grade")))
    return datasets.Dataset.from_list(rows)


def cpu_rows(model_ref: str, steps: int, batch_size: int) -> list[list]:
    """One row per batching variant: [name, device, batch, timed steps, tokens/s] of SFTTrainer on the shipped data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads torch
    from trl import SFTTrainer  # heavy: TRL loads torch and transformers
    path = resolve_model(model_ref)
    tok = AutoTokenizer.from_pretrained(path)
    data, stats = build_tokenized(shipped_sft_dataset(), tok, 4096, "drop")
    data = data.shuffle(seed=0)
    pack_len = int(batch_size * stats["tokens_mean"])
    varlen = attention.register()
    variants = [("padded", dict(packing=False, padding_free=False, max_length=None), batch_size, "sdpa"),
                ("padding-free, sdpa block mask", dict(packing=False, padding_free=True, max_length=None),
                 batch_size, "sdpa"),
                ("padding-free, varlen sdpa", dict(packing=False, padding_free=True, max_length=None),
                 batch_size, varlen),
                (f"packed bfd ({pack_len} tok rows), varlen sdpa", dict(packing=True, max_length=pack_len), 1, varlen)]
    rows, device = [], pick_device("cpu", "auto", training=True, verbose=False).device
    for name, kw, bs, attn in variants:
        cfg = Config()
        cfg.sft.batch_size, cfg.sft.gradient_checkpointing = bs, False
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as out:
            args = trl_args(cfg, Path(out), device, False, max_steps=steps + 1, save_strategy="no",
                            logging_steps=1000, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True,
                            **{"packing_strategy": "bfd", **kw})
            model = AutoModelForCausalLM.from_pretrained(path, dtype=weights_dtype(cfg, device),
                                                         attn_implementation=attn)
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                       callbacks=[timer.callback]).train()
        rows.append([name, device, bs, steps, round(timer.tokens_per_second(), 1)])
        print(f"  {name}: {rows[-1][-1]:.1f} tokens/s", flush=True)
    return rows


def gpu_row(steps: int = 8, seq: int = 4096) -> list:
    """tokens/s and MFU of padding-free training of a Qwen3-0.6B-shaped model (random weights), bf16."""
    import torch  # heavy: torch loads only when a model runs
    from transformers import AutoModelForCausalLM, Qwen3Config  # heavy: transformers loads torch
    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    # transformers >= 5.23 renamed it (the old name warns); the GPU set (5.17) knows only the old one
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    tps = seq * len(times) / sum(times)
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    mfu = 6 * n_params * tps / peak if peak else None
    return [f"Qwen3-0.6B shape, seq {seq}, grad ckpt", name, 1, steps, round(tps, 1),
            f"{100 * mfu:.1f}%" if mfu else "peak unknown"]


def run(model: str = "smollm2-135m", steps: int = 4, batch_size: int = 8) -> str:
    """SFT tokens/s on the shipped data: padding-free and packed vs padded batches (+ GPU MFU when CUDA)."""
    import torch  # heavy: torch loads only when a model runs
    rows = cpu_rows(model, steps, batch_size)
    base = rows[0][-1]
    body = [r + [f"{r[-1] / base:.2f}x", "n/a (CPU)"] for r in rows]
    if torch.cuda.is_available():
        g = gpu_row()
        body.append(g[:5] + ["-", g[5]])
    else:
        body.append(["Qwen3-0.6B shape (GPU)", "skipped: no GPU", "-", "-", "-", "-", "-"])
    print(table(["batching", "device", "batch", "timed steps", "tokens/s", "vs padded", "MFU"], body))
    best = max(rows[1:], key=lambda r: r[-1])
    return (f"{best[0]} {best[-1] / base:.2f}x tokens/s vs padded ({best[-1]:.0f} vs {base:.0f} tok/s, {model}, "
            f"batch {batch_size}, {rows[0][1]})")
