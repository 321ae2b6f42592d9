"""Stage 2, supervised fine-tuning on distilled proofs (notebook 02_sft).

The student learns to write `<think>{reasoning}</think>\\n\\n{proof}` as its assistant turn, with
loss on the assistant turn only (its end token included, so it learns to stop). The stage's
steps, each a function the notebook calls: `prepare_data` (qedlib.sft_data: load the distilled
set, FineProofs-SFT or a local file, hold out whole problems, tokenize with loss masks),
`train_or_launch` (here, or under `accelerate launch`: `train` builds the TRL SFTTrainer with
`build_trainer` - full fine-tuning or LoRA/QLoRA, packing or padding-free batches, checkpoints,
resume - and saves with `save_model`, LoRA merged when asked), `sample_before_after` (base vs
SFT generations, fraction that close `</think>`). Figures and findings are in qedlib.sft_view.

`train(cfg, run_dir)` is also what `python -m qedlib train sft --params P --run-dir R` and
`accelerate launch -m qedlib train sft ...` call (see qedlib.launch for one-GPU, many-GPU and
SLURM commands).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from . import attention
from .config import Config
from .io import write_json
from .layout import MODEL, SFT, checkpoint, stage_dir
from .models import cpu_has_bf16, pick_device, resolve_model
from .sft_data import build_tokenized, load_sft_data, split_by_problem, training_chat_template
from .training import (accumulation_args, add_master_weights_check, cast_saved_weights, check_master_weights, checkpointing_args, finish_checkpoints,
                       last_checkpoint, lora_config, save_trained, train_or_launch as _train_or_launch, weights_moved)

STAGE = SFT


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def weights_dtype(cfg: Config, device: str):
    """fp32 master weights unless asked otherwise: bf16 autocast computes in bf16 while AdamW updates fp32
    weights (updates below bf16's spacing would otherwise round away). DeepSpeed keeps its own fp32 masters."""
    import torch
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
    kwargs: dict = {"dtype": weights_dtype(cfg, choice.device), "attn_implementation": attn}
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


def trl_args(cfg: Config, output_dir: Path, device: str, has_eval: bool, **extra):
    """The TRL SFTConfig for cfg.sft (bf16 per device, packing/padding-free, checkpoints, logging)."""
    from trl import SFTConfig as TRLSFTConfig
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
    kwargs.update(accumulation_args())  # FSDP offload: each micro-batch's gradient to the host
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
                         processing_class=tok, peft_config=lora_config(cfg.sft.lora),
                         callbacks=[extras.as_callback(), *(callbacks or [])])
    trainer.qed_masters = add_master_weights_check(trainer, "sft")  # what the optimizer steps, checked at step 0
    quiet_progress(trainer)
    return trainer, extras


def save_model(trainer, cfg: Config, run_dir: str | Path) -> Path:
    """Save the trained model + tokenizer at <run>/02_sft/model (LoRA merged when lora.merge); atomic."""
    folder = stage_dir(run_dir, STAGE)
    return save_trained(trainer, folder / MODEL, cfg.sft.lora.enabled, cfg.sft.lora.merge, folder / "adapter")


@dataclass
class SFTData:
    """What training reads: the split rows, the tokenizer and template, the tokenized sets and their stats."""
    train_rows: Any  # datasets.Dataset in the SFT schema (qedlib.policy.SFT_COLUMNS)
    eval_rows: Any  # held-out problems, same schema (empty when sft.eval_fraction is 0)
    counts: dict  # rows loaded, unique problems, duplicates dropped
    model_ref: str  # the model SFT starts from (sft.model resolved)
    tokenizer: Any
    template: str  # the chat template with {% generation %} markers
    train_tok: Any  # (input_ids, labels) rows
    eval_tok: Any  # None without held-out problems
    train_stats: dict  # tokens, dropped/truncated counts (sft_data.build_tokenized)
    eval_stats: dict  # the same for the held-out rows ({} when none)


def prepare_data(cfg: Config, run_dir: str | Path) -> SFTData:
    """Load cfg.sft.dataset, hold out whole problems, tokenize both parts with loss masks."""
    from transformers import AutoTokenizer
    data, counts = load_sft_data(cfg, run_dir)
    train_rows, eval_rows = split_by_problem(data, cfg.sft.eval_fraction, cfg.seed)
    model_ref = checkpoint(cfg, run_dir, cfg.sft.model, "sft")
    tok = AutoTokenizer.from_pretrained(resolve_model(model_ref))
    template = training_chat_template(tok, cfg.sft.chat_template)
    train_tok, stats = build_tokenized(train_rows, tok, cfg.sft.max_length, cfg.sft.overlong, template)
    eval_tok, eval_stats = (build_tokenized(eval_rows, tok, cfg.sft.max_length, cfg.sft.overlong, template)
                            if len(eval_rows) else (None, {}))
    return SFTData(train_rows, eval_rows, counts, model_ref, tok, template, train_tok, eval_tok, stats, eval_stats)


def train(cfg: Config, run_dir: str | Path, callbacks: Optional[list] = None, data: Optional[SFTData] = None) -> dict:
    """Run stage 2 training in this process (or as one rank under accelerate); return its metrics.

    `data` is `prepare_data`'s result when the caller already has it (the notebook), else it is prepared here.
    """
    t0 = time.perf_counter()
    folder = stage_dir(run_dir, STAGE)
    data = data or prepare_data(cfg, run_dir)
    train_tok, eval_tok, stats, model_ref = data.train_tok, data.eval_tok, data.train_stats, data.model_ref
    ckpt_dir = folder / "checkpoints"
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
    moved = saved_dtype_moved(cfg, model_dir, model_ref) if _is_main_process() else {}
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
               **data.counts, "tokens_mean": stats["tokens_mean"],
               "tokens_max": stats["tokens_max"], "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
               "world_size": world, "lora": cfg.sft.lora.enabled, "packing": cfg.sft.packing,
               "padding_free": cfg.sft.padding_free, "model_dir": str(model_dir),
               "optimizer_dtypes": trainer.qed_masters.holds, "fsdp": trainer.qed_masters.fsdp,
               "train_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 1),
               "seconds": round(time.perf_counter() - t0, 1)}
    if _is_main_process():
        metrics.update(moved)
        write_json(folder / "log_history.json", history)
        write_json(folder / "train_metrics.json", metrics)
    from .generation import release_trainer
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


def saved_dtype_moved(cfg: Config, model_dir: Path, model_ref: str) -> dict:
    """`weights_changed_frac` of the trained (fp32) model; with `sft.save_dtype` bfloat16, round model/ to bf16
    and also measure `weights_changed_frac_saved`: how many weights still differ from the start once rounded."""
    out = {"weights_changed_frac": weights_moved(model_dir, model_ref), "save_dtype": cfg.sft.save_dtype}
    if cfg.sft.save_dtype != "float32" and not (cfg.sft.lora.enabled and not cfg.sft.lora.merge):
        cast_saved_weights(model_dir, cfg.sft.save_dtype)
        out["weights_changed_frac_saved"] = weights_moved(model_dir, model_ref)
    return out


def train_or_launch(cfg: Config, run_dir: str | Path, params_file: str, overrides: dict,
                    data: Optional[SFTData] = None) -> dict:
    """Train here with `train` (reusing `data`), or under `accelerate launch` when sft.launch asks; return the metrics."""
    return _train_or_launch("sft", cfg.sft.launch, partial(train, data=data), cfg, run_dir, params_file, overrides,
                            stage_dir(run_dir, STAGE) / "train_metrics.json")


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
