"""Pieces every training stage shares (SFT and both RL stages): LoRA settings, run here or under accelerate,
checkpoints, saving, did the weights move.

A building block below the stage modules (qedlib.stages.sft, qedlib.stages.rubric_rl, qedlib.stages.rc_rl): it imports
no stage.
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

from .files import read_json, replace_folder, folder_size
from .launch import accelerate_config_path, accelerate_train, launch_command
from .layout import MODEL, TRAINED
from .run_state import check_record, remove_record, write_record
from .models import resolve_model, weights_changed_frac

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16 FLOP/s, datasheets


def last_checkpoint(folder: str | Path) -> Optional[str]:
    """The newest complete checkpoint-N folder under `folder`, or None.

    A checkpoint without trainer_state.json (the Trainer writes it last) was cut short by a kill during the save:
    it is skipped with a message and the one before it is used, instead of failing every resume.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"[qedlib] skipping {path}: incomplete (no trainer_state.json; a kill during the save?)", flush=True)
    return None


def lora_config(lora):
    """A peft LoraConfig from a stage's `lora` settings (config.Lora), or None when disabled."""
    if not lora.enabled:
        return None
    from peft import LoraConfig  # heavy: PEFT loads torch
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def saved_result(stage: str, cfg, run_dir, result_file) -> Optional[dict]:
    """The stage's saved training result when its model was trained with these settings (by an earlier run or a
    batch job), else None; a stage's `run_stage` calls this first and trains only on None."""
    done, why = check_record(cfg, run_dir, TRAINED[stage], need="training")
    if done and Path(result_file).exists():
        print(f"[qedlib] {stage}: not training again, {Path(run_dir) / TRAINED[stage] / MODEL} was trained with these "
              f"settings ({why}); showing its saved results", flush=True)
        return read_json(result_file)
    return None


def launched_by_accelerate(launch) -> bool:
    """Whether a stage with this Launch trains under `accelerate launch` (num_processes > 1 or an accelerate config)."""
    return launch.num_processes > 1 or bool(launch.accelerate_config)


def trains_elsewhere(launch) -> bool:
    """Whether a stage with this Launch trains outside the notebook's process: under `accelerate launch` or as a batch
    job (`mode: external`). A side run (notebooks 03/04) trains in the kernel unless `launched_by_accelerate`."""
    return launch.mode == "external" or launched_by_accelerate(launch)


def train_elsewhere(stage: str, launch, cfg, run_dir, params_file: str, overrides: dict, result_file) -> dict:
    """Train the stage under `accelerate launch` and read its result; with `launch.mode: external`, wait for a
    batch job instead (`launch.wait_s`). Each rank runs `python -m qedlib train STAGE` (the stage's `train`)."""
    if launch.mode == "external":
        done, why = check_record(cfg, run_dir, TRAINED[stage], need="training")
        return wait_for_batch_job(stage, launch, cfg, run_dir, params_file, overrides, result_file, why)
    accelerate_train(stage, params_file, run_dir, overrides, launch)
    return read_json(result_file)


def start_training(stage: str, run_dir, launch) -> None:
    """Remove the stage's completion record: its model is about to change. Not with `launch.mode: external`, where a
    batch job trains and writes the record itself (the notebook only waits for it)."""
    if launch.mode != "external":
        remove_record(run_dir, TRAINED[stage])


def finish_training(stage: str, cfg, run_dir) -> None:
    """Write the stage's completion record, training's last act (on the main process only), so that a rerun with
    these settings reuses the model."""
    if os.environ.get("RANK", "0") == "0":  # accelerate sets RANK on every process; rank 0 saved the model
        write_record(cfg, run_dir, TRAINED[stage], "training")


def wait_for_batch_job(stage: str, launch, cfg, run_dir, params_file: str, overrides: dict, result_file,
                       why: str) -> dict:
    """`launch.mode: external`: poll for a batch job's completion record with these settings for up to
    `launch.wait_s` seconds; return its result, or refuse with the command that trains the stage."""
    command = shlex.join(["accelerate", "launch"] + launch_command(stage, params_file, run_dir, overrides, launch)[3:])
    deadline = time.monotonic() + launch.wait_s
    if launch.wait_s > 0:
        print(f"[qedlib] {stage}: launch.mode external: waiting up to {launch.wait_s:.0f} s for a batch job's "
              f"completion record ({why}); the job runs:\n  {command}", flush=True)
    while time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        done, _ = check_record(cfg, run_dir, TRAINED[stage], need="training")
        if done and Path(result_file).exists():
            print(f"[qedlib] {stage}: the batch job finished; showing its saved results", flush=True)
            return read_json(result_file)
    raise RuntimeError(f"{stage}: launch.mode is external and no model trained with these settings is in "
                       f"{Path(run_dir) / TRAINED[stage]} ({why}) after {launch.wait_s:.0f} s "
                       f"(launch.wait_s); train it as a batch job, then rerun this cell:\n  {command}")


WAIT_POLL_S = 2.0  # how often an external-mode notebook looks for the batch job's record


def checkpointing_args(args_cls, on: bool) -> dict:
    """The activation-checkpointing switch under the name this transformers' TrainingArguments (`args_cls`) knows.

    transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old
    name, which TRL's configs set by default (True); the GPU set (5.17, held by vLLM) knows only the old name.
    """
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(args_cls)}:
        return {"activation_checkpointing": on}
    return {"gradient_checkpointing": on}


def accumulation_args() -> dict:
    """TrainingArguments under FSDP parameter offload (what `accelerate launch` with fsdp-offload exports as
    FSDP_OFFLOAD_PARAMS): reduce every micro-batch's gradient to the host, not only the last one's.

    transformers skips the gradient sync on all but the last micro-batch of an accumulation (`no_sync`), and FSDP2
    then keeps an unsharded gradient in the reduce dtype (fp32 here) on the GPU: ~16 GiB for a 4B model, which the
    offload exists to avoid. With sync_each_batch each micro-batch's gradient goes to the host as it is made.
    """
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true":
        return {"accelerator_config": {"gradient_accumulation_kwargs": {"sync_each_batch": True}}}
    return {}


def launch_layout(launch) -> dict:
    """What a Launch's accelerate config says about precision: distributed_type, mixed_precision, FSDP offload."""
    if not launch.accelerate_config:
        return {"distributed_type": "NO", "mixed_precision": "no", "offload": False}
    acc = yaml.safe_load(accelerate_config_path(launch.accelerate_config).read_text()) or {}
    return {"distributed_type": str(acc.get("distributed_type", "NO")),
            "mixed_precision": str(acc.get("mixed_precision", "no")),
            "offload": bool((acc.get("fsdp_config") or {}).get("fsdp_offload_params", False))}


def check_master_weights(weights_dtype: str, launch, where: str) -> None:
    """Before training: refuse 16-bit trained weights unless the launch's accelerate config (its contents, not its
    name) gives the optimizer fp32 masters: DeepSpeed (its own fp32 copy) or FSDP with bf16 mixed precision
    (accelerate upcasts trainable parameters to fp32). Plain AdamW on bf16 weights rounds lr-1e-6 updates away."""
    if weights_dtype not in ("bfloat16", "float16"):
        return
    layout = launch_layout(launch)
    kind = layout["distributed_type"]
    if kind == "DEEPSPEED" or (kind == "FSDP" and layout["mixed_precision"] != "no"):
        return
    raise ValueError(f"{where}.weights_dtype: {weights_dtype} lets AdamW round small updates away; the launch "
                     f"({where}.launch.accelerate_config: {launch.accelerate_config}, distributed_type {kind}, "
                     f"mixed_precision {layout['mixed_precision']}) keeps no fp32 master weights. Use float32 "
                     "(bf16 autocast still computes in bf16), or a DeepSpeed / FSDP-with-bf16 config (fsdp-offload).")


def optimizer_masters(optimizer) -> dict:
    """{dtype name: elements} of the tensors the optimizer actually steps: DeepSpeed's fp32 partitions when the
    optimizer is DeepSpeed's, else its param groups (FSDP2 DTensors count their local shard)."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:  # accelerate / DeepSpeed wrappers
        inner = inner.optimizer
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
            if getattr(inner, name, None):  # ZeRO-1/2, ZeRO-3, bf16 optimizer: the fp32 copies it steps
                return _count_dtypes(list(getattr(inner, name)))
    return _count_dtypes([p for g in inner.param_groups for p in g["params"]])


def _count_dtypes(tensors) -> dict:
    """{dtype name: elements} over tensors (a DTensor's local shard)."""
    out: dict = {}
    for t in tensors:
        local = getattr(t, "_local_tensor", t)
        name = str(local.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + local.numel()
    return out


def fsdp_layout(model) -> Optional[dict]:
    """For an FSDP2 model: the offload policy and compute/reduce dtypes its first sharded group really uses; else None."""
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state else None
        if group is not None:
            mp = group.mp_policy
            return {"offload": type(group.offload_policy).__name__,
                    "param_dtype": str(mp.param_dtype).removeprefix("torch.") if mp.param_dtype else None,
                    "reduce_dtype": str(mp.reduce_dtype).removeprefix("torch.") if mp.reduce_dtype else None}
    return None


class MasterWeightsCheck:
    """Trainer callback: at the first step, read what the optimizer holds; raise if it steps 16-bit tensors
    (their lr-1e-6 updates round away). `holds` keeps {dtype: elements} for the stage's metrics."""

    def __init__(self, trainer, where: str):
        from transformers import TrainerCallback  # heavy: transformers loads torch
        outer = self
        self.holds: dict = {}
        self.fsdp: Optional[dict] = None  # fsdp_layout of the prepared model

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.fsdp = fsdp_layout(trainer.model_wrapped)
                if outer.fsdp:
                    print(f"[qedlib] {where}: FSDP2 {outer.fsdp}", flush=True)
                outer.check(trainer.optimizer, where)
        self.callback = _CB()

    def check(self, optimizer, where: str) -> None:
        """Record and check the dtypes the optimizer steps."""
        self.holds = optimizer_masters(optimizer)
        low = {k: v for k, v in self.holds.items() if k in ("bfloat16", "float16")}
        print(f"[qedlib] {where}: the optimizer steps " + ", ".join(f"{v:,} {k}" for k, v in self.holds.items())
              + " values", flush=True)
        if low:
            raise ValueError(f"{where}: the optimizer steps {', '.join(low)} tensors ({sum(low.values()):,} values): "
                             f"lr-1e-6 updates round away. Set {where}.weights_dtype: float32, or launch with a "
                             "config that keeps fp32 masters (DeepSpeed, or FSDP with mixed_precision bf16).")


def reduce_gradients_in_fp32(trainer) -> None:
    """Under FSDP with bf16 compute, reduce gradients in fp32 (MixedPrecisionPolicy reduce_dtype): accelerate sets
    reduce_dtype to the compute dtype and its config file has no key for it, so it is set here before prepare."""
    import torch  # heavy: torch loads only when a model runs
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if plugin is None or policy is None or plugin.fsdp_version != 2 or policy.param_dtype != torch.bfloat16:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy  # heavy: torch loads only when a model runs
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                         output_dtype=policy.output_dtype,
                                                         cast_forward_inputs=policy.cast_forward_inputs)


def add_master_weights_check(trainer, where: str) -> MasterWeightsCheck:
    """Make a built trainer's optimizer precision explicit: fp32 gradient reduction under FSDP, and a
    MasterWeightsCheck (returned) that reads what the optimizer holds at step 0."""
    reduce_gradients_in_fp32(trainer)
    check = MasterWeightsCheck(trainer, where)
    trainer.add_callback(check.callback)
    return check


def save_trained(trainer, out_dir: str | Path, lora: bool, merge: bool, adapter_dir: str | Path | None = None) -> Path:
    """Save a trained model for the next stage, atomically; every process must call it.

    `trainer.save_model` gathers ZeRO-3 / FSDP shards and writes on the main process only (a
    rank-0 `save_pretrained` would write ZeRO-3's empty partitions, or hang under FSDP2). A LoRA
    adapter is saved to `adapter_dir` (default `<out_dir>-adapter`) and, with `merge`, merged in
    fp32 on the main process, so updates far below bf16's spacing survive the merge.
    """
    import torch  # heavy: torch loads only when a model runs
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    adapter = Path(adapter_dir) if adapter_dir else out.with_name(out.name + "-adapter")
    acc = trainer.accelerator
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    trainer.save_model(str(adapter if lora else tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if lora and merge:
            from peft import AutoPeftModelForCausalLM  # heavy: PEFT loads torch
            merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).merge_and_unload()
            merged.save_pretrained(str(tmp))
        elif lora:
            shutil.copytree(adapter, tmp)  # an adapter folder; later stages merge it once on use
        trainer.processing_class.save_pretrained(str(tmp))
        replace_folder(tmp, out)
    acc.wait_for_everyone()
    return out


def cast_saved_weights(model_dir: str | Path, dtype: str) -> None:
    """Rewrite a saved model's floating-point safetensors (and config.json's dtype) in `dtype`, file by file.

    Each file is written beside the old one and swapped in with os.replace: a new file, so a checkpoint
    hard-linked to the old weights (`keep_checkpoints: last`) keeps them.
    """
    import torch  # heavy: torch loads only when a model runs
    from safetensors.torch import load_file, save_file  # heavy: comes with transformers, loads only to read weights
    target = getattr(torch, dtype)
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"save_dtype {dtype}: no *.safetensors in {model_dir} to cast")
    total = 0
    for f in files:
        tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in load_file(str(f)).items()}
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, f)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        meta.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(meta, indent=2))
    config = model_dir / "config.json"
    if config.exists():
        cfg = json.loads(config.read_text())
        cfg.update({k: dtype for k in ("dtype", "torch_dtype") if k in cfg} or {"dtype": dtype})
        config.write_text(json.dumps(cfg, indent=2))


# What a finished stage no longer needs in its kept checkpoint: optimizer and scheduler state (a rerun with
# resume=true finds the last step already done, so it loads weights and trainer state only).
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "optimizer.bin", "global_step*")


def prune_checkpoints(ckpt_dir: str | Path, keep: str, model_dir: str | Path | None = None) -> int:
    """After a stage finished: keep "all" checkpoints, the "last" one without optimizer state, or "none"; return bytes freed.

    With "last", a file identical to the saved model's (weights, tokenizer: the final checkpoint is the
    final model) becomes a hard link to it, so the run folder holds it once. Main process only.
    """
    ckpt_dir = Path(ckpt_dir)
    if keep == "all" or not ckpt_dir.is_dir():
        return 0
    before = folder_size(ckpt_dir.parent)  # the stage folder: a hard link frees the copy, not the file
    last = last_checkpoint(ckpt_dir) if keep == "last" else None
    for sub in ckpt_dir.glob("checkpoint-*"):  # only checkpoints: tracker logs (runs/) stay
        if last is None or sub != Path(last):
            shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
    if last is not None:
        for pattern in RESUME_ONLY:
            for f in Path(last).glob(pattern):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        for f in Path(last).iterdir():
            twin = Path(model_dir) / f.name if model_dir else None
            if f.is_file() and twin and twin.is_file() and not f.samefile(twin) and filecmp.cmp(f, twin, shallow=False):
                f.unlink()
                os.link(twin, f)
    elif not any(ckpt_dir.iterdir()):
        ckpt_dir.rmdir()
    return before - folder_size(ckpt_dir.parent)


def finish_checkpoints(ckpt_dir: str | Path, keep: str, model_dir: str | Path, is_main: bool) -> None:
    """Prune a finished stage's checkpoints (`keep_checkpoints`) on the main process and say how much was freed."""
    if is_main:
        freed = prune_checkpoints(ckpt_dir, keep, model_dir)
        if freed:
            print(f"[qedlib] keep_checkpoints: {keep}: freed {freed / 2**20:.0f} MiB in {ckpt_dir}")


def changed_frac_since(model_dir: str | Path, init_ref: str) -> Optional[float]:
    """`weights_changed_frac` of a saved stage model vs the model it started from (adapters merged first)."""
    return round(weights_changed_frac(resolve_model(str(model_dir)), resolve_model(init_ref)), 6)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, None otherwise."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


class StepTimer:
    """Trainer callback: wall time and real (non-padding) tokens at each optimizer step's end."""

    def __init__(self):
        from transformers import TrainerCallback  # heavy: transformers loads torch
        outer = self
        self.marks: list[tuple[float, int]] = []
        self.step_seconds: list[float] = []

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                outer.step_seconds.append(now - outer._t)
                outer.marks.append((now, state.num_input_tokens_seen))
        self.callback = _CB()

    def tokens_per_second(self) -> float:
        """Real tokens/s after the first (warm-up) step."""
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0)
