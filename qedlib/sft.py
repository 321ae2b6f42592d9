"""Stage 2, supervised fine-tuning on distilled proofs (notebook 02_sft).

The student learns to write `<think>{reasoning}</think>\\n\\n{proof}` as its assistant turn, with
loss on the assistant turn only (its end token included, so it learns to stop). Steps, each a
function the notebook calls: `load_sft_data` (distilled set, FineProofs-SFT from the hub, or a
local file, one schema), `split_by_problem` (held-out problems for eval loss),
`build_tokenized` (chat template with generation markers, overlong rows dropped or truncated and
counted), `build_trainer` (TRL SFTTrainer: full fine-tuning or LoRA/QLoRA, packing or
padding-free batches, checkpoints, resume), `save_model` (LoRA merged when asked),
`sample_before_after` (base vs SFT generations, fraction that close `</think>`).

`train(cfg, run_dir)` runs the whole training in-process; it is also what
`python -m qedlib train sft --params P --run-dir R` and `accelerate launch -m qedlib train sft ...`
call (see qedlib.launch for one-GPU, many-GPU and SLURM commands).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from . import attention
from .config import Config
from .display import NOT_IN_PAPER
from .io import read_json, write_json
from .layout import DISTILL, SFT, checkpoint, stage_dir
from .models import CHATML_TRAINING_TEMPLATE, pick_device, resolve_model

STAGE = SFT
SFT_COLUMNS = ["problem", "reasoning_content", "proof", "category", "competition", "grade", "source", "messages"]
# Column names used by the public FineProofs-SFT release for our fields.
FINEPROOFS_ALIASES = {"gemini-3-pro-grade": "grade"}
THINK_CLOSE = "</think>"

# A Qwen3 "thinking" chat template (the shape of Qwen3-4B-Thinking-2507's: the generation prompt
# already opens <think>, the last assistant turn is rendered as reasoning + </think> + answer),
# without tools. The {% generation %} markers start after the opening <think> because the model
# never generates it: the loss covers exactly what the model writes after the generation prompt.
QWEN3_THINKING_TRAINING_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is defined and m['reasoning_content'] else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<think>\n' -}}{% generation %}{{- reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}"
    "{% generation %}{{- content.lstrip('\n') + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}"
)
# The same template as a model would ship it (no markers): renders identically.
QWEN3_THINKING_TEMPLATE = QWEN3_THINKING_TRAINING_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", "")

PROBE_MESSAGES = [{"role": "user", "content": "Prove that 1 + 1 = 2."},
                  {"role": "assistant", "content": "<think>\nCount.\n</think>\n\nBy definition, 1 + 1 = 2."}]


class SFTDataError(ValueError):
    """An SFT dataset row is wrong; the message names the source, the row and the column."""


# ---------------------------------------------------------------- data
def assistant_text(reasoning: str, proof: str) -> str:
    """The SFT target: `<think>\\n{reasoning}\\n</think>\\n\\n{proof}`."""
    return f"<think>\n{(reasoning or '').strip()}\n</think>\n\n{(proof or '').strip()}"


def sft_messages(problem: str, reasoning: str, proof: str) -> list[dict]:
    """The two-turn conversation one SFT row trains on."""
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": assistant_text(reasoning, proof)}]


def sft_row(problem: str, reasoning: str, proof: str, **extra) -> dict:
    """One row in the FineProofs-SFT schema (what stage 1 writes)."""
    row = {"problem": problem, "reasoning_content": reasoning, "proof": proof, "category": "",
           "competition": "", "grade": None, "source": ""}
    row.update(extra)
    row["messages"] = sft_messages(problem, reasoning, proof)
    return row


def _read_rows(source: str, cfg_sft, run_dir: str | Path) -> tuple[list[dict], str]:
    from .data import DataError, read_records
    if source == "distill":
        path = Path(run_dir) / DISTILL / "dataset"
        if not path.exists():
            raise FileNotFoundError(f"sft.dataset = 'distill' but {path} does not exist: run 01_distill first "
                                    "(python -m qedlib run PARAMS --stages 01_distill), or point sft.dataset at "
                                    "hub:org/name or a .jsonl/.parquet file")
        source = str(path)
    try:
        return read_records(source, cfg_sft.dataset_config, cfg_sft.dataset_split)
    except DataError as e:
        raise SFTDataError(f"sft.dataset: {e}") from None


def normalise_row(row: dict, i: int, where: str) -> dict:
    """Check one row and bring it to the SFT schema (messages built from reasoning/proof when missing)."""
    row = {FINEPROOFS_ALIASES.get(k, k): v for k, v in row.items()}
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise SFTDataError(f"{where}: row {i}: column 'problem' is missing or empty; every row needs the problem text")
    msgs = row.get("messages")
    if not msgs:
        if not isinstance(row.get("proof"), str) or not row["proof"].strip():
            raise SFTDataError(f"{where}: row {i}: no 'messages' and no 'proof' column: give either the chat "
                               "messages or reasoning_content + proof")
        msgs = sft_messages(problem, row.get("reasoning_content") or "", row["proof"])
    if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs)
            or msgs[-1].get("role") != "assistant" or not any(m.get("role") == "user" for m in msgs)):
        raise SFTDataError(f"{where}: row {i}: 'messages' must be a list of {{role, content}} ending with an "
                           f"assistant turn after a user turn, got roles {[m.get('role') for m in msgs if isinstance(m, dict)]}")
    out = {c: row.get(c) for c in SFT_COLUMNS if c != "messages"}
    out["messages"] = [{"role": m["role"], "content": m.get("content") or ""} for m in msgs]
    return out


def load_sft_data(cfg: Config, run_dir: str | Path) -> tuple[Any, dict]:
    """Load cfg.sft.dataset as a `datasets.Dataset` in the SFT schema; return (dataset, counts)."""
    import datasets
    raw, where = _read_rows(cfg.sft.dataset, cfg.sft, run_dir)
    if not raw:
        raise SFTDataError(f"{where}: the dataset is empty")
    rows = [normalise_row(r, i, where) for i, r in enumerate(raw)]
    counts = {"rows_loaded": len(rows), "unique_problems": len({r["problem"].strip() for r in rows})}
    if cfg.sft.one_per_problem:
        rows = one_per_problem(rows)
    counts["duplicates_dropped"] = counts["rows_loaded"] - len(rows)
    print(f"[qedlib] SFT data: {len(rows)} rows from {where} ({counts['duplicates_dropped']} duplicates of a problem dropped)")
    return datasets.Dataset.from_list(rows), counts


def one_per_problem(rows: list[dict]) -> list[dict]:
    """Keep one row per unique problem: the highest grade, the first on ties."""
    best: dict[str, dict] = {}
    score = lambda r: r["grade"] if isinstance(r.get("grade"), (int, float)) else -math.inf
    for r in rows:
        key = " ".join(r["problem"].split())
        if key not in best or score(r) > score(best[key]):
            best[key] = r
    return list(best.values())


def split_by_problem(ds, eval_fraction: float, seed: int = 0):
    """Split into (train, eval) by unique problem, so eval problems are never trained on."""
    problems = sorted({" ".join(p.split()) for p in ds["problem"]})
    random.Random(seed).shuffle(problems)
    n_eval = 0 if eval_fraction <= 0 or len(problems) < 2 else max(1, round(eval_fraction * len(problems)))
    held = set(problems[:n_eval])
    is_eval = [" ".join(p.split()) in held for p in ds["problem"]]
    train = ds.select([i for i, e in enumerate(is_eval) if not e])
    evals = ds.select([i for i, e in enumerate(is_eval) if e])
    return train, evals


# ---------------------------------------------------------------- templates and tokens
def _renders_like(tokenizer, template: str, original: Optional[str]) -> bool:
    try:
        a = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, chat_template=original)
        b = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, chat_template=template)
        mask = tokenizer.apply_chat_template(PROBE_MESSAGES, chat_template=template, tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    except Exception:  # a template that fails to render is simply not a match
        return False
    return a == b and 1 in mask


def training_chat_template(tokenizer, override_file: Optional[str] = None) -> str:
    """A chat template with {% generation %} markers that renders exactly like the tokenizer's own.

    Tried in order: sft.chat_template (a file), the tokenizer's template if it has markers, the
    SmolLM2/ChatML training template, the Qwen3 thinking template, TRL's patched templates.
    """
    if override_file:
        text = Path(override_file).read_text()
        if "{% generation %}" not in text:
            raise ValueError(f"sft.chat_template {override_file}: no {{% generation %}} markers, so the assistant "
                             "turn cannot be found; wrap the assistant content and its end token in them")
        return text
    own = tokenizer.chat_template
    if own and "{% generation %}" in own:
        return own
    candidates = [CHATML_TRAINING_TEMPLATE, QWEN3_THINKING_TRAINING_TEMPLATE]
    try:
        from trl.chat_template_utils import get_training_chat_template
        candidates.append(get_training_chat_template(tokenizer))
    except Exception:  # TRL does not know this template
        pass
    for tmpl in candidates:
        if tmpl and _renders_like(tokenizer, tmpl, own):
            return tmpl
    raise ValueError(
        f"no training chat template matches the tokenizer of {getattr(tokenizer, 'name_or_path', '?')}: write its "
        "template with {% generation %}…{% endgeneration %} around each assistant turn (end token included) and "
        "set sft.chat_template to that file")


def tokenize_example(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside the assistant turn."""
    enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def build_tokenized(ds, tokenizer, max_length: int, overlong: str = "drop", template: Optional[str] = None):
    """Tokenize the SFT rows; drop or truncate rows over max_length; return (dataset, stats)."""
    import datasets
    import numpy as np
    template = template or training_chat_template(tokenizer)
    out, lengths, loss_tokens = [], [], []
    dropped = truncated = no_loss = 0
    for msgs in ds["messages"]:
        ids, labels = tokenize_example(tokenizer, msgs, template)
        lengths.append(len(ids))
        if len(ids) > max_length:
            if overlong == "drop":
                dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        n_loss = sum(1 for t in labels if t != -100)
        if n_loss == 0:
            no_loss += 1  # the prompt alone filled max_length: nothing to learn from
            continue
        loss_tokens.append(n_loss)
        out.append({"input_ids": ids, "labels": labels})
    arr = np.array(lengths or [0])
    stats = {"rows": len(lengths), "kept": len(out), "dropped_overlong": dropped + no_loss, "truncated": truncated,
             "tokens_mean": float(arr.mean()), "tokens_p50": float(np.median(arr)),
             "tokens_p95": float(np.percentile(arr, 95)), "tokens_max": int(arr.max()),
             "loss_tokens_mean": float(np.mean(loss_tokens)) if loss_tokens else 0.0,
             "think_closed_in_data": float(np.mean([THINK_CLOSE in m[-1]["content"] for m in ds["messages"]]))
             if len(ds) else 0.0}
    if not out:
        raise SFTDataError(f"all {len(lengths)} SFT rows are over sft.max_length={max_length} tokens (longest "
                           f"{stats['tokens_max']}): raise sft.max_length or set sft.overlong: truncate")
    return datasets.Dataset.from_list(out), stats


def loss_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode the tokens that carry loss (what the model is trained to write)."""
    return tokenizer.decode([t for t, l in zip(input_ids, labels) if l != -100])


def loss_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[dict]:
    """The example as runs of tokens that do / do not carry loss: [{loss, tokens, text}], in order."""
    runs: list[dict] = []
    for t, lab in zip(input_ids, labels):
        trained = lab != -100
        if not runs or runs[-1]["loss"] != trained:
            runs.append({"loss": trained, "ids": []})
        runs[-1]["ids"].append(t)
    return [{"loss": r["loss"], "tokens": len(r["ids"]), "text": tokenizer.decode(r["ids"])} for r in runs]


def render_loss_segments(segments: list[dict]) -> str:
    """HTML of the whole example: trained tokens green, read-only tokens grey, with the token counts."""
    import html
    style = {True: "background:#c8f7c5", False: "background:#e6e6e6;color:#555"}
    body = "".join(f"<span style='{style[s['loss']]}'>{html.escape(s['text'])}</span>" for s in segments)
    n_loss = sum(s["tokens"] for s in segments if s["loss"])
    n_read = sum(s["tokens"] for s in segments if not s["loss"])
    return (f"<p><span style='{style[False]}'>read only, label -100: {n_read} tokens</span> · "
            f"<span style='{style[True]}'>trained (loss): {n_loss} tokens</span></p>"
            f"<pre style='white-space:pre-wrap'>{body}</pre>")


# ---------------------------------------------------------------- training
def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _weights_dtype(cfg: Config, device: str):
    """fp32 master weights unless asked otherwise: bf16 autocast computes in bf16 while AdamW updates fp32
    weights (updates below bf16's spacing would otherwise round away). DeepSpeed keeps its own fp32 masters."""
    import torch
    from .training import check_master_weights
    check_master_weights(cfg.sft.weights_dtype, cfg.sft.launch, "sft")
    if cfg.sft.weights_dtype != "auto":
        return getattr(torch, cfg.sft.weights_dtype)
    return torch.float32


def attention_for(cfg: Config, device: str) -> Optional[str]:
    """The attention kernel for training: sft.attn_implementation, where "auto" picks a varlen kernel for
    padding-free/packed rows (flash-attn when installed on CUDA, else qedlib's per-example sdpa) and
    transformers' default otherwise."""
    choice = cfg.sft.attn_implementation
    if choice == attention.NAME or (choice == "auto" and (cfg.sft.packing or cfg.sft.padding_free)):
        if choice == "auto" and device == "cuda":
            import importlib.util
            if importlib.util.find_spec("flash_attn") is not None:
                return "flash_attention_2"
        return attention.register()
    return None if choice == "auto" else choice


def load_for_training(cfg: Config, model_ref: str):
    """(tokenizer, model, device choice) for training; QLoRA loads the base in 4-bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(model_ref)
    choice = pick_device(cfg.device, "auto", training=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    attn = attention_for(cfg, choice.device)
    if _is_main_process():
        print(f"[qedlib] attention: {attn or 'transformers default'}"
              + (" (varlen: one causal attention per example in a row)" if attn in (attention.NAME, "flash_attention_2")
                 else ""))
    kwargs: dict = {"dtype": _weights_dtype(cfg, choice.device), "attn_implementation": attn}
    if cfg.sft.qlora:
        if not cfg.sft.lora.enabled or choice.device != "cuda":
            raise ValueError("sft.qlora needs sft.lora.enabled: true and a CUDA GPU (bitsandbytes 4-bit)")
        import torch
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return tok, model, choice


def _lora_config(cfg: Config):
    if not cfg.sft.lora.enabled:
        return None
    from peft import LoraConfig
    lo = cfg.sft.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                      task_type="CAUSAL_LM")


def trl_args(cfg: Config, output_dir: Path, device: str, has_eval: bool, **extra):
    """The TRL SFTConfig for cfg.sft (bf16 per device, packing/padding-free, checkpoints, logging)."""
    from trl import SFTConfig as TRLSFTConfig
    from .models import cpu_has_bf16
    from .training import checkpointing_args
    s = cfg.sft
    bf16 = device == "cuda" or (device == "cpu" and cpu_has_bf16())
    eval_steps = s.eval_steps or s.save_steps
    kwargs = dict(
        output_dir=str(output_dir), seed=cfg.seed, learning_rate=s.lr, lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay, num_train_epochs=s.epochs, max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, max_grad_norm=s.max_grad_norm,
        ddp_find_unused_parameters=False, bf16=bf16, use_cpu=device == "cpu",
        logging_steps=s.logging_steps, save_strategy="steps", save_steps=s.save_steps,
        save_total_limit=s.save_total_limit, eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None, report_to=list(s.report_to) or "none",
        max_length=s.max_length if (s.packing or not s.padding_free) else None,
        packing=s.packing, packing_strategy="bfd", padding_free=s.padding_free,
        include_num_input_tokens_seen="non_padding", disable_tqdm=os.environ.get("QED_LAUNCHED") == "1",
        dataloader_num_workers=0, save_only_model=False,
    )
    kwargs.update(checkpointing_args(TRLSFTConfig, s.gradient_checkpointing))
    kwargs.update(extra)
    return TRLSFTConfig(**kwargs)


class LogExtras:
    """Trainer callback: add tokens/s to each log entry and count this process's optimizer steps."""

    def __init__(self):
        from transformers import TrainerCallback
        self._base = TrainerCallback
        self.steps_this_run = 0
        self._last = None  # (time, tokens) at the previous log

    def as_callback(self):
        """A transformers TrainerCallback bound to this object."""
        outer = self

        class _CB(self._base):
            def on_train_begin(self, args, state, control, **kw):
                outer._last = (time.perf_counter(), state.num_input_tokens_seen)

            def on_step_end(self, args, state, control, **kw):
                outer.steps_this_run += 1

            def on_log(self, args, state, control, logs=None, **kw):
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                if outer._last and state.log_history and "loss" in state.log_history[-1]:
                    dt = now - outer._last[0]
                    if dt > 0:
                        state.log_history[-1]["tokens_per_second"] = (tokens - outer._last[1]) / dt
                    outer._last = (now, tokens)
        return _CB()


def quiet_progress(trainer) -> None:
    """One progress display that finishes, no log lines: drop the `{'loss': ...}` dicts (terminal) and the
    per-log table rows and post-training eval table (notebook); the numbers are in log_history.json and the curves."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    class _QuietText(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass

    class _QuietNotebook(NotebookProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass

        def on_prediction_step(self, args, state, control, **kw):
            if self.training_tracker is not None:  # eval bars only inside the training display
                super().on_prediction_step(args, state, control, **kw)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.training_tracker is not None and self.training_tracker.child_bar is not None:
                self.training_tracker.remove_child()
            self.prediction_bar = None
    for old, new in ((NotebookProgressCallback, _QuietNotebook), (ProgressCallback, _QuietText)):
        if trainer.pop_callback(old) is not None:
            trainer.add_callback(new())

def build_trainer(cfg: Config, run_dir: str | Path, train_ds, eval_ds=None, callbacks: Optional[list] = None,
                  model_ref: Optional[str] = None):
    """The TRL SFTTrainer for cfg.sft on pre-tokenized (input_ids, labels) datasets; returns (trainer, extras)."""
    from trl import SFTTrainer
    folder = stage_dir(run_dir, STAGE)
    tok, model, choice = load_for_training(cfg, model_ref or checkpoint(cfg, run_dir, cfg.sft.model, "sft"))
    has_eval = eval_ds is not None and len(eval_ds) > 0
    args = trl_args(cfg, folder / "checkpoints", choice.device, has_eval)
    extras = LogExtras()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if has_eval else None,
                         processing_class=tok, peft_config=_lora_config(cfg),
                         callbacks=[extras.as_callback(), *(callbacks or [])])
    quiet_progress(trainer)
    return trainer, extras


def save_model(trainer, cfg: Config, run_dir: str | Path) -> Path:
    """Save the trained model + tokenizer at <run>/02_sft/model (LoRA merged when lora.merge); atomic."""
    from .training import save_trained
    folder = stage_dir(run_dir, STAGE)
    return save_trained(trainer, folder / "model", cfg.sft.lora.enabled, cfg.sft.lora.merge, folder / "adapter",
                        save_dtype=cfg.sft.save_dtype)


def train(cfg: Config, run_dir: str | Path, callbacks: Optional[list] = None) -> dict:
    """Run stage 2 training in this process (or as one rank under accelerate); return its metrics."""
    t0 = time.perf_counter()
    folder = stage_dir(run_dir, STAGE)
    data, counts = load_sft_data(cfg, run_dir)
    train_rows, eval_rows = split_by_problem(data, cfg.sft.eval_fraction, cfg.seed)
    model_ref = checkpoint(cfg, run_dir, cfg.sft.model, "sft")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model(model_ref))
    template = training_chat_template(tok, cfg.sft.chat_template)
    train_tok, stats = build_tokenized(train_rows, tok, cfg.sft.max_length, cfg.sft.overlong, template)
    eval_tok = build_tokenized(eval_rows, tok, cfg.sft.max_length, cfg.sft.overlong, template)[0] if len(eval_rows) else None
    ckpt_dir = folder / "checkpoints"
    from .training import finish_checkpoints, last_checkpoint
    resume_from = last_checkpoint(ckpt_dir) if cfg.sft.resume else None
    if cfg.sft.resume and not resume_from:
        print(f"[qedlib] sft.resume: no checkpoint in {ckpt_dir}, starting from step 0")
    if not cfg.sft.resume and ckpt_dir.exists() and _is_main_process():
        print(f"[qedlib] sft.resume is false: removing old checkpoints in {ckpt_dir}")
        shutil.rmtree(ckpt_dir)
    trainer, extras = build_trainer(cfg, run_dir, train_tok, eval_tok, callbacks, model_ref)
    if resume_from:
        print(f"[qedlib] resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_tok is not None else None
    model_dir = save_model(trainer, cfg, run_dir)
    finish_checkpoints(ckpt_dir, cfg.sft.keep_checkpoints, model_dir, _is_main_process())
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    write_json(folder / "ranks" / f"rank{rank}.json", {
        "rank": rank, "world_size": world, "global_step": trainer.state.global_step,
        "steps_this_run": extras.steps_this_run, "train_loss": result.training_loss})
    metrics = {"steps": trainer.state.global_step, "steps_this_run": extras.steps_this_run,
               "resumed_from": Path(resume_from).name if resume_from else None,
               "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
               "eval_loss": eval_loss, "examples": stats["kept"], "eval_examples": len(eval_tok) if eval_tok else 0,
               "dropped_overlong": stats["dropped_overlong"], "truncated": stats["truncated"],
               **{k: v for k, v in counts.items()}, "tokens_mean": stats["tokens_mean"],
               "tokens_max": stats["tokens_max"], "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
               "world_size": world, "lora": cfg.sft.lora.enabled, "packing": cfg.sft.packing,
               "padding_free": cfg.sft.padding_free, "model_dir": str(model_dir),
               "train_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 1),
               "seconds": round(time.perf_counter() - t0, 1)}
    if _is_main_process():
        from .training import weights_moved
        metrics["weights_changed_frac"] = weights_moved(model_dir, model_ref)
        write_json(folder / "log_history.json", history)
        write_json(folder / "train_metrics.json", metrics)
    from .generation import release_trainer
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


# ---------------------------------------------------------------- after training
def log_frame(log_history: list[dict]):
    """The trainer's log history as a DataFrame (step, loss, eval_loss, learning_rate, grad_norm, tokens/s)."""
    import pandas as pd
    df = pd.DataFrame(log_history)
    keep = [c for c in ["step", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"] if c in df]
    return df[keep].groupby("step", as_index=False).first() if "step" in df else df


def training_curves(log_history: list[dict], title: str = "SFT"):
    """Plotly figure: train/eval loss, learning rate, grad norm and tokens/s against step."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go
    df = log_frame(log_history)
    panels = [("loss", "train loss"), ("learning_rate", "learning rate"), ("grad_norm", "grad norm"),
              ("tokens_per_second", "tokens/s")]
    fig = make_subplots(rows=1, cols=4, subplot_titles=[p[1] for p in panels])
    for col, (key, name) in enumerate(panels, 1):
        if key in df:
            d = df.dropna(subset=[key])
            fig.add_trace(go.Scatter(x=d["step"], y=d[key], mode="lines+markers", name=name), row=1, col=col)
    if "eval_loss" in df:
        d = df.dropna(subset=["eval_loss"])
        fig.add_trace(go.Scatter(x=d["step"], y=d["eval_loss"], mode="lines+markers", name="eval loss"), row=1, col=1)
    fig.update_layout(title=title, height=320, width=1200)
    return fig


def sample_before_after(cfg: Config, run_dir: str | Path, model_dir: str | Path, problems=None) -> tuple[list[dict], dict]:
    """Greedy-generate on held-out problems with the base and SFT models; return (rows, summary)."""
    import copy
    from .data import load_problems
    from .generation import make_generator
    if problems is None:
        problems = load_problems("shipped", split="eval", limit=cfg.sft.sample_problems)
    prompts = [[{"role": "user", "content": p.problem}] for p in problems]
    out: dict[str, list] = {}
    for label, ref in (("base", checkpoint(cfg, run_dir, cfg.sft.model, "sft")), ("sft", str(model_dir))):
        endpoint = copy.deepcopy(cfg.generation)
        endpoint.backend, endpoint.model, endpoint.device = "transformers", ref, cfg.device
        gen = make_generator(endpoint)
        out[label] = [g[0] for g in gen.generate(prompts, cfg.sft.sample_sampling, thinking=True)]
        del gen
    rows = [{"problem": p.id, "base": b.text, "sft": s.text, "base_closed": b.think_closed,
             "sft_closed": s.think_closed, "base_tokens": b.completion_tokens, "sft_tokens": s.completion_tokens}
            for p, b, s in zip(problems, out["base"], out["sft"])]
    n = max(1, len(rows))
    summary = {"think_closed_before": sum(r["base_closed"] for r in rows) / n,
               "think_closed_after": sum(r["sft_closed"] for r in rows) / n,
               "gen_tokens_before": sum(r["base_tokens"] for r in rows) / n,
               "gen_tokens_after": sum(r["sft_tokens"] for r in rows) / n,
               "hit_budget_after": sum(c.finish_reason == "length" for c in out["sft"]) / n,
               "sample_max_new_tokens": cfg.sft.sample_sampling.max_new_tokens}
    return rows, summary


def think_tokens(text: str, tokenizer) -> Optional[int]:
    """Tokens inside the think block of a generation that started after `<think>`; None when never closed."""
    if THINK_CLOSE not in text:
        return None
    inside = text.split(THINK_CLOSE)[0].replace("<think>", "").strip()
    return len(tokenizer(inside, add_special_tokens=False)["input_ids"]) if inside else 0


def think_block_stats(rows: list[dict], tokenizer) -> dict:
    """Think-block length before/after SFT: mean tokens over generations that closed it, share empty (of all)."""
    out = {}
    for label, when in (("base", "before"), ("sft", "after")):
        counts = [think_tokens(r[label], tokenizer) for r in rows]
        closed = [c for c in counts if c is not None]
        out[f"think_tokens_{when}"] = sum(closed) / len(closed) if closed else None
        out[f"empty_think_{when}"] = sum(c == 0 for c in closed) / max(1, len(rows))
    return out


def empty_reasoning_share(ds) -> float:
    """Share of SFT rows whose reasoning (the think block the student imitates) is empty."""
    msgs = ds["messages"]
    empty = [not m[-1]["content"].split(THINK_CLOSE)[0].replace("<think>", "").strip() for m in msgs]
    return sum(empty) / max(1, len(empty))


def _eval_trend(history: list[dict]) -> Optional[str]:
    evals = [(h["step"], h["eval_loss"]) for h in history or [] if "eval_loss" in h]
    if len(evals) < 2:
        return None
    best = min(evals, key=lambda e: e[1])
    if evals[-1][1] > best[1] + 0.01:
        return (f"Eval loss rose from its lowest {best[1]:.3f} (step {best[0]}) to {evals[-1][1]:.3f}: the model is "
                "overfitting its few training examples (memorising them, not generalising to held-out problems).")
    return f"Eval loss went {evals[0][1]:.3f} -> {evals[-1][1]:.3f} over {len(evals)} evaluations: no sign of overfitting."


def training_findings(metrics: dict, history: Optional[list[dict]] = None) -> str:
    """What the training numbers say: the loss, eval loss rising = overfitting, whether the weights moved."""
    m, out = metrics, []
    if m.get("train_loss_first") is not None:
        out.append(f"Train loss went {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f} over {m['steps']} "
                   f"steps on {m['examples']} examples.")
    trend = _eval_trend(history)
    if trend:
        out.append(trend)
    moved = m.get("weights_changed_frac")
    if moved is not None:
        out.append(f"{moved:.1%} of the weights changed" + (": training barely touched the model." if moved < 0.01
                                                             else " (fp32 master weights, so small updates count)."))
    return " ".join(out)


def think_findings(m: dict) -> str:
    """What the before/after generations say: the `</think>` rate and the think block's real length."""
    out = [f"Generations that close `</think>`: {m['think_closed_before']:.0%} before SFT, "
           f"{m['think_closed_after']:.0%} after."]
    if m.get("think_tokens_after") is not None:
        before = ("" if m.get("think_tokens_before") is None
                  else f"{m['think_tokens_before']:.1f} tokens before SFT and ")
        out.append(f"A closed think block holds on average {before}{m['think_tokens_after']:.1f} tokens after SFT; "
                   f"{m['empty_think_after']:.0%} of the SFT model's generations close an empty one.")
        if m["empty_think_after"] >= 0.5:
            why = (f" ({m['targets_empty_think']:.0%} of the training targets have an empty think block, "
                   "so that is what it imitates)") if m.get("targets_empty_think") else ""
            out.append(f"So the model learned the *format* (close the tag, then answer), not to reason first{why}.")
    return " ".join(out)


# Key settings shown beside the paper's (qedlib.display.settings_table).
SETTINGS = [("base model", "base_model", "Qwen3-4B-Thinking-2507"),
            ("data", "sft.dataset", "FineProofs-SFT"),
            ("one sample per problem", "sft.one_per_problem", True),
            ("learning rate", "sft.lr", 3.0e-5),
            ("optimizer steps (-1: by epochs)", "sft.max_steps", "~620"),
            ("epochs", "sft.epochs", NOT_IN_PAPER),
            ("batch size per device", "sft.batch_size", NOT_IN_PAPER),
            ("gradient accumulation", "sft.grad_accum", NOT_IN_PAPER),
            ("lr schedule", "sft.lr_scheduler", NOT_IN_PAPER),
            ("warmup ratio", "sft.warmup_ratio", NOT_IN_PAPER),
            ("max tokens per example", "sft.max_length", NOT_IN_PAPER),
            ("LoRA", "sft.lora.enabled", NOT_IN_PAPER),
            ("padding-free batches", "sft.padding_free", NOT_IN_PAPER),
            ("held-out problems (fraction)", "sft.eval_fraction", NOT_IN_PAPER)]

# Final metrics shown as one small table (qedlib.display.metrics_table).
METRICS = [("optimizer steps", "steps"), ("train examples", "examples"), ("train loss, first log", "train_loss_first"),
           ("train loss, last log", "train_loss_last"), ("eval loss", "eval_loss"),
           ("weights changed (fraction)", "weights_changed_frac"), ("rows dropped as overlong", "dropped_overlong"),
           ("tokens seen", "num_input_tokens_seen"), ("train seconds", "train_seconds"),
           ("closes </think>, before", "think_closed_before"), ("closes </think>, after", "think_closed_after"),
           ("think-block tokens, before", "think_tokens_before"), ("think-block tokens, after", "think_tokens_after"),
           ("empty think block, after", "empty_think_after")]

# "Try it" experiments (notebook 02's last section): params overrides on params/cpu.yaml, minutes on a laptop.
EXPERIMENTS = [
    {"name": "lora", "overrides": {"sft.lora.enabled": True, "sft.lr": 1.0e-3},
     "look_for": "LoRA instead of full fine-tuning (10x the lr, as adapters need): the weights-changed fraction "
                 "(the merged adapter touches only the targeted matrices), the loss curve and train seconds beside "
                 "this run's."},
    {"name": "padded", "overrides": {"sft.padding_free": False},
     "look_for": "padded batches instead of padding-free: the tokens/s panel of the curves drops (pad tokens cost "
                 "compute); the loss curve should match this run's closely."},
    {"name": "overfit", "overrides": {"sft.epochs": 10.0, "sft.max_steps": 60, "sft.eval_steps": 5},
     "look_for": "three times the steps on the same few examples, eval loss every 5 steps: train loss falls "
                 "towards 0 while eval loss turns up, and the findings say 'overfitting'."},
    {"name": "low-lr", "overrides": {"sft.lr": 3.0e-5},
     "look_for": "the paper's lr on the 135M model: a slower loss fall in 20 steps and a smaller weights-changed "
                 "fraction; does the model still learn to close `</think>`?"},
]


def try_it(params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section, built from EXPERIMENTS (one source, tested)."""
    from .display import experiments_markdown
    return experiments_markdown(EXPERIMENTS, params_file, f"{DISTILL} {SFT}")


# ---------------------------------------------------------------- benchmark
def shipped_sft_dataset():
    """SFT rows built from the shipped problems' reference solutions and calibration proofs (bench data)."""
    import datasets
    from .data import load_problems, shipped_path
    from .io import read_jsonl
    problems = {p.id: p for p in load_problems("shipped")}
    rows = [sft_row(p.problem, f"Plan: {p.category or 'proof'}. Check the statement, then write the argument.",
                    p.reference_solution) for p in problems.values() if p.reference_solution]
    for r in read_jsonl(shipped_path("calibration.jsonl")):
        p = problems.get(r.get("problem_id"))
        if p and r.get("proof"):
            rows.append(sft_row(p.problem, r.get("note") or "", r["proof"], grade=r.get("reference_grade")))
    return datasets.Dataset.from_list(rows)


def _bench_cpu(model_ref: str, steps: int, batch_size: int) -> list[list]:
    import tempfile
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer
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
        from .training import StepTimer
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as out:
            args = trl_args(cfg, Path(out), device, False, max_steps=steps + 1, save_strategy="no",
                            logging_steps=1000, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True,
                            **{"packing_strategy": "bfd", **kw})
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_weights_dtype(cfg, device),
                                                         attn_implementation=attn)
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                       callbacks=[timer.callback]).train()
        rows.append([name, device, bs, steps, round(timer.tokens_per_second(), 1)])
        print(f"  {name}: {rows[-1][-1]:.1f} tokens/s", flush=True)
    return rows


def _bench_gpu(steps: int = 8, seq: int = 4096) -> list:
    """tokens/s and MFU of padding-free training of a Qwen3-0.6B-shaped model (random weights), bf16."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.gradient_checkpointing_enable()
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
    from .training import peak_flops
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    mfu = 6 * n_params * tps / peak if peak else None
    return [f"Qwen3-0.6B shape, seq {seq}, grad ckpt", name, 1, steps, round(tps, 1),
            f"{100 * mfu:.1f}%" if mfu else "peak unknown"]


def bench_packing(model: str = "smollm2-135m", steps: int = 4, batch_size: int = 8) -> str:
    """SFT tokens/s on the shipped data: padding-free and packed vs padded batches (+ GPU MFU when CUDA)."""
    import torch
    from .tables import markdown_table as table
    rows = _bench_cpu(model, steps, batch_size)
    base = rows[0][-1]
    body = [r + [f"{r[-1] / base:.2f}x", "n/a (CPU)"] for r in rows]
    if torch.cuda.is_available():
        g = _bench_gpu()
        body.append(g[:5] + ["-", g[5]])
    else:
        body.append(["Qwen3-0.6B shape (GPU)", "skipped: no GPU", "-", "-", "-", "-", "-"])
    print(table(["batching", "device", "batch", "timed steps", "tokens/s", "vs padded", "MFU"], body))
    best = max(rows[1:], key=lambda r: r[-1])
    return (f"{best[0]} {best[-1] / base:.2f}x tokens/s vs padded ({best[-1]:.0f} vs {base:.0f} tok/s, {model}, "
            f"batch {batch_size}, {rows[0][1]})")
