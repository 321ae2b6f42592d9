"""Stage 2 (qedlib.stages.sft): data loading, loss masks, overlong handling, padding-free, training, resume, LoRA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qedlib import proof_chat as policy

from qedlib.stages import sft

from qedlib import sft_data

from qedlib.views import sft as sft_view
from qedlib.config import load_config
from qedlib.models import TINY, resolve_model


def tiny_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(TINY))


def make_rows(n: int, long_every: int = 0) -> list[dict]:
    """n short SFT rows in the FineProofs-SFT schema; every `long_every`-th has a long proof."""
    rows = []
    for i in range(n):
        proof = f"Indeed {i} + {i} = {2 * i}." + (" And so on." * 60 if long_every and i % long_every == 0 else "")
        rows.append(policy.sft_row(f"Prove that {i} + {i} = {2 * i}.", f"Add {i} to itself.", proof, grade=7,
                                source="test", category="algebra", competition="none"))
    return rows


def make_run(tmp_path: Path, n: int = 12, **sft_keys) -> tuple[Path, Path]:
    """A run folder with a distilled dataset and a tiny-model params file; returns (run_dir, params)."""
    import datasets
    run = tmp_path / "run"
    datasets.Dataset.from_list(make_rows(n)).save_to_disk(str(run / "01_distill" / "dataset"))
    keys = {"max_length": 128, "max_steps": 4, "batch_size": 2, "save_steps": 2, "logging_steps": 1,
            "lr": 1.0e-3, "eval_fraction": 0.0}
    keys.update(sft_keys)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": TINY, "device": "cpu", "sft": keys}))
    return run, params


# ---------------------------------------------------------------- loss masks
def expected_assistant_turn(tok, messages, template=None) -> str:
    """What the model writes after the generation prompt, up to and including its end token."""
    full = tok.apply_chat_template(messages, tokenize=False, chat_template=template)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=template)
    assert full.startswith(prompt)
    return full[len(prompt):].rstrip("\n")


@pytest.mark.parametrize("template_name", ["smollm2", "qwen3-thinking"])
def test_loss_tokens_are_exactly_the_assistant_turn(template_name):
    tok = tiny_tokenizer()  # SmolLM2's tokenizer and template
    if template_name == "qwen3-thinking":
        tok.chat_template = sft_data.QWEN3_THINKING_TEMPLATE
    messages = policy.sft_messages("Prove that $n^2+n$ is even.", "n(n+1) has an even factor.",
                                "Write $n^2+n=n(n+1)$; one of two consecutive integers is even.")
    template = sft_data.training_chat_template(tok)
    ids, labels = sft_data.tokenize_example(tok, messages, template)
    got = sft_data.loss_text(tok, ids, labels)
    want = expected_assistant_turn(tok, messages)
    assert got == want
    assert got.endswith("<|im_end|>") and "</think>" in got and "Prove that" not in got
    if template_name == "qwen3-thinking":
        assert not got.startswith("<think>")  # the generation prompt already opened it
    else:
        assert got.startswith("<think>\n")
    # The loss tokens are one contiguous block at the end (plus the template's trailing newline).
    first = next(i for i, l in enumerate(labels) if l != -100)
    assert all(l != -100 for l in labels[first:first + len(got) // 8])


def test_unknown_template_is_refused_with_a_fix():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="sft.chat_template"):
        sft_data.training_chat_template(tok)


# ---------------------------------------------------------------- data
def test_load_distill_jsonl_parquet_and_fineproofs_columns(tmp_path):
    import datasets
    import pandas as pd
    run, params = make_run(tmp_path, n=6)
    cfg = load_config(params)
    ds, counts = sft_data.load_sft_data(cfg, run)
    assert len(ds) == 6 and set(policy.SFT_COLUMNS) <= set(ds.column_names)
    # FineProofs-SFT names the grade column differently and may repeat a problem: keep the best.
    rows = [{"problem": "P1", "reasoning_content": "r", "proof": "weak", "gemini-3-pro-grade": 3},
            {"problem": "P1", "reasoning_content": "r", "proof": "strong", "gemini-3-pro-grade": 7},
            {"problem": "P2", "reasoning_content": "r", "proof": "ok", "gemini-3-pro-grade": 5}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(params, {"sft.dataset": str(jsonl)})
    ds, counts = sft_data.load_sft_data(cfg, run)
    assert counts["duplicates_dropped"] == 1
    p1 = [r for r in ds.to_list() if r["problem"] == "P1"][0]
    assert p1["proof"] == "strong" and p1["messages"][1]["content"] == "<think>\nr\n</think>\n\nstrong"
    pq = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    ds, _ = sft_data.load_sft_data(load_config(params, {"sft.dataset": str(pq), "sft.one_per_problem": False}), run)
    assert len(ds) == 3
    assert isinstance(ds, datasets.Dataset)


def test_bad_rows_name_the_row_and_column(tmp_path):
    run, params = make_run(tmp_path, n=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "P", "proof": "x"}) + "\n" + json.dumps({"problem": "", "proof": "x"}) + "\n")
    with pytest.raises(sft_data.SFTDataError, match=r"row 1: column 'problem'"):
        sft_data.load_sft_data(load_config(params, {"sft.dataset": str(bad)}), run)
    with pytest.raises(FileNotFoundError, match="01_distill"):
        sft_data.load_sft_data(load_config(params), tmp_path / "empty-run")


def test_split_by_problem_holds_out_whole_problems():
    import datasets
    rows = make_rows(10) + make_rows(10)  # every problem twice
    train, evals = sft_data.split_by_problem(datasets.Dataset.from_list(rows), 0.2, seed=0)
    assert len(evals) == 4 and len(train) == 16
    assert not set(train["problem"]) & set(evals["problem"])


def test_overlong_rows_are_dropped_or_truncated_and_counted():
    import datasets
    tok = tiny_tokenizer()
    ds = datasets.Dataset.from_list(make_rows(9, long_every=3))  # rows 0, 3, 6 are long
    kept, stats = sft_data.build_tokenized(ds, tok, max_length=120, overlong="drop")
    assert stats["dropped_overlong"] == 3 and stats["truncated"] == 0 and len(kept) == 6
    cut, stats = sft_data.build_tokenized(ds, tok, max_length=120, overlong="truncate")
    assert stats["truncated"] == 3 and stats["dropped_overlong"] == 0 and len(cut) == 9
    assert max(len(x) for x in cut["input_ids"]) == 120
    with pytest.raises(sft_data.SFTDataError, match="sft.max_length"):
        sft_data.build_tokenized(ds, tok, max_length=20, overlong="drop")


def test_padding_free_batch_gives_the_same_loss_as_padded():
    """Flattened sequences with restarting position_ids must not attend across examples.

    transformers isolates packed sequences (sdpa/eager too) only without a KV cache, which is how
    SFTTrainer calls the model (use_cache=False).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    import datasets
    tok = tiny_tokenizer()
    data, _ = sft_data.build_tokenized(datasets.Dataset.from_list(make_rows(3, long_every=2)), tok, 512)
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32).eval()
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"]).loss
        lf = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                   use_cache=False).loss
        # Without position_ids the flattened row is one long sequence: a different loss, so the check can fail.
        lw = model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss
    assert abs(lp.item() - lf.item()) < 1e-4
    assert abs(lp.item() - lw.item()) > 1e-3
    # the varlen kernel with everything TRL's collator hands the model (cu_seq_lens_q, max_length_q, ...)
    from qedlib import attention
    varlen = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32,
                                                  attn_implementation=attention.register()).eval()
    with torch.no_grad():
        lv = varlen(**flat, use_cache=False).loss
    assert abs(lp.item() - lv.item()) < 1e-4


def test_varlen_attention_matches_each_example_alone_and_falls_back_when_padded():
    """qed_varlen_sdpa on a packed row gives every example the logits (and gradients) it has alone;
    a left-padded batch (mask, KV cache) decodes exactly as transformers' sdpa does."""
    import torch
    from transformers import AutoModelForCausalLM
    from qedlib import attention
    name = attention.register()
    torch.manual_seed(0)
    seqs = [torch.randint(5, 1000, (n,)) for n in (17, 64, 3, 40)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32, attn_implementation=name)
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    packed[0, :, :5].sum().backward()
    g_packed = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    alone = torch.cat([model(input_ids=s[None], use_cache=False).logits for s in seqs], dim=1)
    alone[0, :, :5].sum().backward()
    g_alone = model.model.layers[0].self_attn.q_proj.weight.grad
    assert (packed - alone).abs().max().item() < 1e-4
    assert torch.allclose(g_packed, g_alone, atol=1e-5)
    # without the boundaries the row is one sequence: the check above can fail
    whole = model(input_ids=ids, use_cache=False).logits
    assert (whole - alone).abs().max().item() > 1e-3

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(["Prove that two plus two is four", "Hi"], return_tensors="pt", padding=True)
    sdpa = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32, attn_implementation="sdpa")
    out_v = model.generate(**enc, max_new_tokens=6, do_sample=False)
    out_s = sdpa.generate(**enc, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_v, out_s)


def test_attention_choice_for_training():
    from qedlib import attention
    cfg = load_config(None)
    assert sft.attention_for(cfg, "cpu") is None  # padded batches: transformers' default
    cfg.sft.padding_free = True
    assert sft.attention_for(cfg, "cpu") == attention.NAME
    cfg.sft.attn_implementation = "eager"
    assert sft.attention_for(cfg, "cpu") == "eager"


# ---------------------------------------------------------------- training
class StopAfter:
    """A callback that kills training (an exception, like a crash) once global_step reaches `step`."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    raise KeyboardInterrupt(f"simulated interruption at step {state.global_step}")
        return _Stop()


def test_train_checkpoints_and_resume_continues(tmp_path):
    from qedlib.models import load_model
    run, params = make_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        sft.train(load_config(params), run, callbacks=[StopAfter(3)])
    ckpts = sorted(p.name for p in (run / "02_sft" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2"]
    m = sft.train(load_config(params, {"sft.resume": True}), run)
    assert m["resumed_from"] == "checkpoint-2"
    assert m["steps"] == 4 and m["steps_this_run"] == 2  # same total, no restart from zero
    history = json.loads((run / "02_sft" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert any("tokens_per_second" in h for h in history)
    assert m["examples"] == 12 and m["dropped_overlong"] == 0 and m["train_loss_last"] is not None
    tok, model = load_model(m["model_dir"], device="cpu")
    assert model.config.model_type == "qwen3" and (Path(m["model_dir"]) / "tokenizer_config.json").exists()


def test_lora_adapter_is_merged_into_the_saved_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    run, params = make_run(tmp_path, max_steps=2, lr=1.0e-2, **{"lora": {"enabled": True, "r": 4, "alpha": 8}})
    stale = run / "02_sft" / "checkpoints" / "checkpoint-99"
    stale.mkdir(parents=True)  # from an earlier run: resume is false, so it must not be picked up
    m = sft.train(load_config(params), run)
    assert m["resumed_from"] is None and m["steps"] == 2 and not stale.exists()
    out = Path(m["model_dir"])
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = sum((a - b).abs().sum().item() for a, b in zip(base.parameters(), tuned.parameters()))
    assert diff > 0  # the merged weights moved


def test_lora_adapter_without_merge_is_usable_by_later_stages(tmp_path):
    """merge: false keeps the adapter as the stage output; loading it merges once into model-merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from qedlib.models import load_model
    from qedlib.layout import named_model
    run, params = make_run(tmp_path, max_steps=2, lr=1.0e-2,
                           **{"lora": {"enabled": True, "r": 4, "alpha": 8, "merge": False}})
    cfg = load_config(params)
    m = sft.train(cfg, run)
    out = Path(m["model_dir"])
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    assert named_model(cfg, run, "previous", "rubric_rl") == str(out)
    tok, model = load_model(str(out), device="cpu", dtype="float32")
    assert (out.parent / "model-merged" / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4)
    # a newer adapter (the stage ran again) is merged again, not served stale
    first = (out.parent / "model-merged" / "config.json").stat().st_mtime
    (out / "adapter_config.json").touch()
    load_model(str(out), device="cpu", dtype="float32")
    assert (out.parent / "model-merged" / "config.json").stat().st_mtime > first


def test_padding_free_training_uses_varlen_attention_and_saves_a_plain_model(tmp_path):
    import subprocess
    import sys
    run, params = make_run(tmp_path, max_steps=2, padding_free=True, gradient_checkpointing=True)
    m = sft.train(load_config(params), run)
    assert m["steps"] == 2 and m["padding_free"]
    saved = json.loads((Path(m["model_dir"]) / "config.json").read_text())
    assert "qed_varlen" not in json.dumps(saved)
    # a fresh process that never registered the kernel loads it
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('ok')")
    r = subprocess.run([sys.executable, "-c", code, m["model_dir"]], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_packed_training_runs_through_the_stage(tmp_path):
    from qedlib import attention
    run, params = make_run(tmp_path, max_steps=2, packing=True, batch_size=1, max_length=256)
    cfg = load_config(params)
    assert sft.attention_for(cfg, "cpu") == attention.NAME
    m = sft.train(cfg, run)
    assert m["steps"] == 2 and m["packing"] and m["train_loss_last"] is not None
    # bfd packing fills 256-token rows with several ~70-token examples: more tokens per step than one example
    assert m["num_input_tokens_seen"] > 2 * m["tokens_max"]


def test_report_to_tensorboard_writes_the_training_curves(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, params = make_run(tmp_path, max_steps=2, report_to=["tensorboard"])
    sft.train(load_config(params), run)
    events = list((run / "02_sft").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file under 02_sft"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 2


def test_qlora_off_gpu_is_refused_with_the_reason(tmp_path):
    run, params = make_run(tmp_path, qlora=True, lora={"enabled": True})
    with pytest.raises(ValueError, match="CUDA"):
        sft.train(load_config(params), run)


def test_log_frame_and_curves_from_history():
    history = [{"loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_second": 100.0, "step": 1},
               {"eval_loss": 1.9, "step": 1}, {"loss": 1.5, "learning_rate": 5e-4, "grad_norm": 0.8, "step": 2}]
    df = sft_view.log_frame(history)
    assert list(df["step"]) == [1, 2] and df.loc[0, "eval_loss"] == 1.9
    fig = sft_view.training_curves(history)
    assert len(fig.data) == 5  # loss, lr, grad norm, tokens/s, eval loss


def test_bf16_trained_weights_need_deepspeeds_fp32_masters():
    from qedlib.config import Launch
    from qedlib.training import check_master_weights
    with pytest.raises(ValueError, match="fp32 master weights"):
        check_master_weights("bfloat16", Launch(), "sft")
    check_master_weights("bfloat16", Launch(accelerate_config="zero2-offload"), "sft")  # DeepSpeed keeps fp32 masters
    check_master_weights("float32", Launch(), "sft")


# ---------------------------------------------------------------- one SFT target for distill and SFT
def test_distill_counts_the_tokens_sft_trains_on():
    """01_distill's token count of a sample equals the tokens 02_sft trains on, whether SFT reads the
    dataset's messages or builds them from reasoning_content + proof (whitespace included)."""
    import datasets
    from qedlib.stages import distill
    from qedlib.problem_sets import Problem
    tok = tiny_tokenizer()
    problem = Problem(id="p1", problem="Prove that $n^2+n$ is even.")
    sample = {"key": "p1#0", "problem_id": "p1", "reasoning": "\n  n(n+1) has an even factor. \n",
              "proof": "\n\nWrite $n^2+n=n(n+1)$; one of two consecutive integers is even.  \n"}
    counted = distill.sft_token_counts([sample], [problem], tok)["p1#0"]
    row = {"status": "kept", "problem": problem.problem, "reasoning": sample["reasoning"], "proof": sample["proof"],
           "category": "", "competition": "", "points": 7, "source": "test"}
    written = distill.build_dataset([row]).to_list()
    without_messages = [{k: v for k, v in r.items() if k != "messages"} for r in written]
    for rows in (written, without_messages):
        jsonl_like = [sft_data.normalise_row(r, i, "test") for i, r in enumerate(rows)]
        tokenized, _ = sft_data.build_tokenized(datasets.Dataset.from_list(jsonl_like), tok, 4096)
        assert len(tokenized[0]["input_ids"]) == counted
    assert written[0]["messages"] == policy.sft_messages(problem.problem, sample["reasoning"], sample["proof"])


# ---------------------------------------------------------------- notebook 02 is the stage's steps
def test_notebook_02_calls_the_stage_steps_in_short_cells_without_logic():
    import nbformat
    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / "02_sft.ipynb", 4)
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    code = "\n".join(cells)
    for step in ("sft.prepare_data(cfg, run_dir)", "sft.run_stage(cfg, run_dir, params_file, overrides, data=data)",
                 "sft.sample_before_after(cfg, run_dir,"):
        assert step in code, step
    for src in cells:
        lines = [ln for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        assert len(lines) <= 10, src
        assert not any(ln.lstrip().startswith(("def ", "class ", "for ", "if ", "while ", "with ")) for ln in lines), src
    # what the notebook no longer repeats: the data steps and the launch choice live in qedlib.stages.sft
    assert "accelerate_train" not in code and "build_tokenized" not in code and "checkpoint(" not in code


def test_run_stage_in_process_trains_on_the_prepared_data_then_reuses_the_model(tmp_path):
    """The notebook's path: prepare_data once, then run_stage trains on it (the dataset is not read again); a second
    run_stage with the same settings returns the saved result without training (it could not: the data is gone)."""
    import shutil
    run, params = make_run(tmp_path, n=6, max_steps=2, eval_fraction=0.34)
    cfg = load_config(params)
    data = sft.prepare_data(cfg, run)
    assert len(data.eval_rows) == 2 and data.eval_stats["kept"] == 2 and data.train_stats["kept"] == 4
    shutil.rmtree(run / "01_distill" / "dataset")  # a second read would fail
    m = sft.run_stage(cfg, run, str(params), {}, data=data)
    assert m["steps"] == 2 and m["examples"] == 4 and m["eval_examples"] == 2 and m["eval_loss"] is not None
    assert json.loads((run / "02_sft" / "train_metrics.json").read_text())["steps"] == 2
    assert sft.run_stage(cfg, run, str(params), {}) == json.loads((run / "02_sft" / "train_metrics.json").read_text())
