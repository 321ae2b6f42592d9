"""Stage 2, supervised fine-tuning on distilled proofs (notebook 02_sft).

The student learns to write `<think>{reasoning}</think>\\n\\n{proof}` as its assistant turn, with
loss on the assistant turn only (its end token included, so it learns to stop). The stage's
steps, each a function the notebook calls: `prepare_data` (qedlib.sft_data: load the distilled
set, FineProofs-SFT or a local file, hold out whole problems, tokenize with loss masks),
`run_stage` (the saved result, or training here or under `accelerate launch`: `train` builds the TRL SFTTrainer with
`build_trainer` - full fine-tuning or LoRA/QLoRA, packing or padding-free batches, checkpoints,
resume - and saves with `save_model`, LoRA merged when asked), `sample_before_after` (base vs
SFT generations: closing `</think>`, stopping, length), `behaviour_effect` (those before vs after, each with a
bootstrap interval over problems) and `heldout_shift` (qedlib.probe.policy_shift of the SFT model vs the base on the
held-out rows: held-out loss before and after, KL). Figures and findings are in qedlib.views.sft.

`train(cfg, run_dir)` is also what `python -m qedlib train sft --params P --run-dir R` and
`accelerate launch -m qedlib train sft ...` call (see qedlib.launch for one-GPU, many-GPU and
SLURM commands).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import attention
from ..config import Config
from ..files import write_json
from ..generation import make_generator, release_trainer
from ..layout import MODEL, SFT, named_model, stage_dir
from ..models import cpu_has_bf16, pick_device, resolve_model
from ..probe import policy_shift
from ..problem_sets import load_problems
from ..sft_data import build_tokenized, load_sft_data, split_by_problem, training_chat_template
from ..stats import learning_gain
from ..training import (accumulation_args, add_master_weights_check, cast_saved_weights, check_master_weights,
                        checkpointing_args, finish_checkpoints, finish_training, last_checkpoint, lora_config,
                        saved_result, save_trained, start_training, train_elsewhere, trains_elsewhere, changed_frac_since)

STAGE = SFT


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def weights_dtype(cfg: Config, device: str):
    """fp32 master weights unless asked otherwise: bf16 autocast computes in bf16 while AdamW updates fp32
    weights (updates below bf16's spacing would otherwise round away). DeepSpeed keeps its own fp32 masters."""
    import torch  # heavy: loads only when a model is loaded for training
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
            if importlib.util.find_spec("flash_attn") is not None:
                return "flash_attention_2"
        return attention.register()
    return None if choice == "auto" else choice


def load_for_training(cfg: Config, model_ref: str):
    """(tokenizer, model, device choice) for training; QLoRA loads the base in 4-bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loads only when training starts
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
        import torch  # heavy: loads only for QLoRA
        from transformers import BitsAndBytesConfig  # heavy: loads only for QLoRA
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return tok, model, choice


def trl_args(cfg: Config, output_dir: Path, device: str, has_eval: bool, **extra):
    """The TRL SFTConfig for cfg.sft (bf16 per device, packing/padding-free, checkpoints, logging)."""
    from trl import SFTConfig as TRLSFTConfig  # heavy: TRL loads only when training is configured
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
        from transformers import TrainerCallback  # heavy: loads only when a trainer is built
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
    from transformers.trainer_callback import ProgressCallback  # heavy: loads only when a trainer is built
    from transformers.utils.notebook import NotebookProgressCallback  # heavy: loads only when a trainer is built
    from transformers.utils.notebook import NotebookTrainingTracker  # heavy: as above

    class _QuietText(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass

    class _QuietNotebook(NotebookProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass

        def on_prediction_step(self, args, state, control, **kw):
            if self.training_tracker is not None:  # eval bars only inside the training display
                super().on_prediction_step(args, state, control, **kw)

        def on_train_begin(self, args, state, control, **kw):
            super().on_train_begin(args, state, control, **kw)
            self.training_tracker = NotebookTrainingTracker(state.max_steps, None)  # a bar, no empty loss table

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
    from trl import SFTTrainer  # heavy: TRL loads only when a trainer is built
    folder = stage_dir(run_dir, STAGE)
    tok, model, choice = load_for_training(cfg, model_ref or named_model(cfg, run_dir, cfg.sft.model, "sft"))
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
    train_rows: Any  # datasets.Dataset in the SFT schema (qedlib.proof_chat.SFT_COLUMNS)
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
    """Load cfg.sft.dataset, hold out whole problems, tokenize both parts with loss masks. Notebook 02, "Data"."""
    from transformers import AutoTokenizer  # heavy: loads only when the data is tokenized
    data, counts = load_sft_data(cfg, run_dir)
    train_rows, eval_rows = split_by_problem(data, cfg.sft.eval_fraction, cfg.seed)
    model_ref = named_model(cfg, run_dir, cfg.sft.model, "sft")
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
               "epochs_run": round(float(trainer.state.epoch or 0.0), 2),
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
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


def saved_dtype_moved(cfg: Config, model_dir: Path, model_ref: str) -> dict:
    """`weights_changed_frac` of the trained (fp32) model; with `sft.save_dtype` bfloat16, round model/ to bf16
    and also measure `weights_changed_frac_saved`: how many weights still differ from the start once rounded."""
    out = {"weights_changed_frac": changed_frac_since(model_dir, model_ref), "save_dtype": cfg.sft.save_dtype}
    if cfg.sft.save_dtype != "float32" and not (cfg.sft.lora.enabled and not cfg.sft.lora.merge):
        cast_saved_weights(model_dir, cfg.sft.save_dtype)
        out["weights_changed_frac_saved"] = changed_frac_since(model_dir, model_ref)
    return out


def run_stage(cfg: Config, run_dir: str | Path, params_file: Optional[str] = None, overrides: Optional[dict] = None,
              data: Optional[SFTData] = None) -> dict:
    """The stage's training result (notebook 02, "Training"): the saved one when its model was trained with these
    settings, else train here with `train` (reusing `data`, `prepare_data`'s result), or under `accelerate launch`
    when sft.launch asks (each rank runs `python -m qedlib train sft`, i.e. `train`); returns the metrics."""
    result_file = stage_dir(run_dir, STAGE) / "train_metrics.json"
    saved = saved_result("sft", cfg, run_dir, result_file)
    if saved is not None:
        return saved
    start_training("sft", run_dir, cfg.sft.launch)
    if trains_elsewhere(cfg.sft.launch):
        result = train_elsewhere("sft", cfg.sft.launch, cfg, run_dir, params_file, overrides or {}, result_file)
    else:
        result = train(cfg, run_dir, data=data)
    finish_training("sft", cfg, run_dir)
    return result


def sample_before_after(cfg: Config, run_dir: str | Path, model_dir: str | Path, problems=None) -> tuple[list[dict], dict]:
    """Greedy-generate on held-out problems with the base and SFT models; return (rows, summary).
    Notebook 02, "Before and after"."""
    if problems is None:
        problems = load_problems("shipped", split="eval", limit=cfg.sft.sample_problems)
    prompts = [[{"role": "user", "content": p.problem}] for p in problems]
    out: dict[str, list] = {}
    for label, ref in (("base", named_model(cfg, run_dir, cfg.sft.model, "sft")), ("sft", str(model_dir))):
        endpoint = copy.deepcopy(cfg.generation)
        endpoint.backend, endpoint.model, endpoint.device = "transformers", ref, cfg.device
        gen = make_generator(endpoint)
        out[label] = [g[0] for g in gen.generate(prompts, cfg.sft.sample_sampling, thinking=True)]
        del gen
    rows = [{"problem": p.id, "base": b.text, "sft": s.text, "base_closed": b.think_closed,
             "sft_closed": s.think_closed, "base_tokens": b.completion_tokens, "sft_tokens": s.completion_tokens,
             "base_stopped": b.finish_reason != "length", "sft_stopped": s.finish_reason != "length"}
            for p, b, s in zip(problems, out["base"], out["sft"])]
    n = max(1, len(rows))
    summary = {"think_closed_before": sum(r["base_closed"] for r in rows) / n,
               "think_closed_after": sum(r["sft_closed"] for r in rows) / n,
               "gen_tokens_before": sum(r["base_tokens"] for r in rows) / n,
               "gen_tokens_after": sum(r["sft_tokens"] for r in rows) / n,
               "hit_budget_after": sum(c.finish_reason == "length" for c in out["sft"]) / n,
               "sample_max_new_tokens": cfg.sft.sample_sampling.max_new_tokens}
    return rows, summary


# (key in metrics, row column without base_/sft_, what it measures) for behaviour_effect
BEHAVIOURS = [("closes_think", "closed", "closes </think>"), ("stops", "stopped", "stops before the token budget"),
              ("tokens", "tokens", "generated tokens")]


def behaviour_effect(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """What SFT changed in the generations of `sample_before_after`, each as before (base) vs after (SFT) with a
    bootstrap interval over the problems (qedlib.stats.learning_gain): the share that closes `</think>`, the share
    that stops before the budget, the mean generated tokens. Notebook 02, "Before and after"."""
    if not rows:
        raise ValueError("behaviour_effect: no generations; raise sft.sample_problems above 0")
    out = {}
    for key, col, _ in BEHAVIOURS:
        g = learning_gain([float(r[f"base_{col}"]) for r in rows], [float(r[f"sft_{col}"]) for r in rows], n_boot, seed)
        out[key] = {"before": g["first"], "after": g["last"], "gain": g["gain"], "ci_low": g["ci_low"],
                    "ci_high": g["ci_high"], "n": len(rows)}
    return out


def probe_pairs(data: SFTData) -> tuple[list[str], list[str]]:
    """(prompt, completion) strings of the held-out rows: the chat prompt up to the assistant header, and the target
    turn as the chat template renders it (end token included), i.e. what eval loss scores."""
    tok, prompts, completions = data.tokenizer, [], []
    for msgs in data.eval_rows["messages"]:
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the conversation with a different prefix than its generation "
                             "prompt; set sft.chat_template to a template whose prompt is a prefix of the full turn")
        prompts.append(prompt)
        completions.append(full[len(prompt):])
    return prompts, completions


def heldout_shift(data: SFTData, model_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> Optional[dict]:
    """qedlib.probe.policy_shift of the SFT model vs the model SFT started from, on the held-out rows (problems never
    trained on): mean per-token log-probability of their targets before and after (minus it is the held-out loss),
    the gain with a bootstrap interval over problems, and KL(SFT || base). None without held-out rows
    (sft.eval_fraction 0, as in params/qed-nano.yaml). Notebook 02, "Before and after"."""
    if data.eval_rows is None or len(data.eval_rows) == 0:
        return None
    prompts, completions = probe_pairs(data)
    out = policy_shift(data.model_ref, str(model_dir), prompts, completions, n_boot=n_boot, seed=seed)
    out["heldout_loss_before"], out["heldout_loss_after"] = -out["logprob_start"], -out["logprob_trained"]
    return out
