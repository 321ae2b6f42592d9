"""The run layout: stage names and folders, the files a run writes, and which model a stage name means.

A building block under every stage and the orchestration (runner, report, export): a stage folder's
name is written here and nowhere else. A run folder `outputs/<run>/` holds the run's CONFIG_FILE,
RUN_FILE (commit, hardware, params, wall times), TIMINGS_FILE and the report, and one folder per
stage (STAGES, each also its notebook's name) with that stage's executed notebook, CONFIG_FILE,
METRICS_FILE and artifacts; a trained stage leaves its model in `<stage>/MODEL`.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

REPO = Path(__file__).resolve().parent.parent  # the checkout: notebooks/, params/, outputs/
OUTPUTS = REPO / "outputs"  # where `python -m qedlib run` puts run folders unless told

DISTILL, SFT, RUBRIC_RL, RC_RL, EVAL = "01_distill", "02_sft", "03_rubric_rl", "04_reasoning_cache_rl", "05_eval"
STAGES = [DISTILL, SFT, RUBRIC_RL, RC_RL, EVAL]  # pipeline order
TRAINED = {"sft": SFT, "rubric_rl": RUBRIC_RL, "rc_rl": RC_RL}  # model name of a trained stage -> its folder
TRAINED_STAGES = tuple(TRAINED)  # the trained stages, in pipeline order
CHECKPOINT_ORDER = ("base", *TRAINED_STAGES)  # the models eval can compare, in the order the stages make them
MODEL = "model"  # the subfolder where a trained stage leaves the model the next stage starts from
MODEL_DIRS = {name: f"{folder}/{MODEL}" for name, folder in TRAINED.items()}  # relative to the run folder

CONFIG_FILE = "config.yaml"  # the resolved config: in the run folder and in each stage folder
RUN_FILE = "run.json"  # params file, overrides, commit, hardware and wall times of the run
TIMINGS_FILE = "timings.json"  # wall time in seconds per finished stage
PEAK_MEMORY_FILE = "peak_memory.json"  # peak resident memory (GiB) of each stage's kernel and the processes under it
METRICS_FILE = "metrics.json"  # a stage's machine-readable results (tests and the report read it)


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """The folder of one stage inside a run folder (created)."""
    d = Path(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def _is_model(path: Path) -> bool:
    """A full model folder or a LoRA adapter folder (merged on first use by models.resolve_model)."""
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def from_repo_root(ref: str) -> str:
    """A relative path that does not exist from here but does from the repository root, as the repository-root path:
    `python -m qedlib run` is started from the root (where the README's commands and "Try it" write
    `outputs/cpu/...`), while a notebook's kernel runs in notebooks/. Anything else (absolute, existing from here,
    hub:..., a model name) is returned unchanged."""
    p = Path(ref).expanduser()
    if ref and not p.is_absolute() and not p.exists() and (REPO / p).exists():
        return str(REPO / p)
    return ref


def named_model(cfg: Config, run_dir: str | Path, ref: str, stage: str | None = None) -> str:
    """Resolve a model reference that may name a stage of this run.

    "base" -> cfg.base_model; "sft" / "rubric_rl" / "rc_rl" -> that stage's saved model;
    "previous" -> the model of the stage before `stage` in the pipeline (rubric_rl: sft; rc_rl:
    rubric_rl), falling back (with a message) to an earlier trained stage when it was not run, so that
    rerunning a stage in a finished run starts where the pipeline says, not from a later stage's
    model; never silently to the base model: with no earlier model it is an error (say `model: base`);
    anything else is a model reference (embedded name, folder or hub id; a relative folder is also read from the
    repository root: `from_repo_root`).
    """
    if ref == "base":
        return cfg.base_model
    if ref in MODEL_DIRS:
        path = Path(run_dir) / MODEL_DIRS[ref]
        if not _is_model(path):
            raise FileNotFoundError(f"checkpoint {ref!r}: {path} has no model; run that stage first "
                                    f"(python -m qedlib run PARAMS --stages ...)")
        return str(path)
    if ref == "previous":
        if stage not in TRAINED_STAGES:
            raise ValueError(f"model 'previous' is relative to a training stage ({', '.join(TRAINED_STAGES)}), "
                             f"got stage={stage!r}")
        before = TRAINED_STAGES[:TRAINED_STAGES.index(stage)]
        for name in reversed(before):
            path = Path(run_dir) / MODEL_DIRS[name]
            if _is_model(path):
                if name != before[-1]:
                    print(f"[qedlib] {stage}: 'previous' is {before[-1]}, which has no model in {run_dir}; "
                          f"starting from {name}")
                return str(path)
        raise FileNotFoundError(f"{stage}.model is 'previous' but no earlier stage ({', '.join(before) or 'none'}) "
                                f"has a model in {run_dir}: run {TRAINED[before[-1]] if before else 'it'} first, "
                                f"or set {stage}.model: base to start from base_model ({cfg.base_model})")
    return from_repo_root(ref)


def git_commit() -> str:
    """The repo's current commit (or 'unknown'), as RUN_FILE records it."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> str:
    """A one-line description of the machine, as RUN_FILE records it."""
    import torch  # heavy: torch loads only when a model runs
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}"
