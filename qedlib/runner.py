"""Run the pipeline: execute the numbered notebooks with papermill into outputs/<run>/.

`python -m qedlib run PARAMS [--run-name NAME] [--stages ...] [--set key=value ...]`. Each notebook
gets three papermill parameters (`params_file`, `run_dir`, `overrides`) and reads the previous
stage's artifacts from the run folder. `start_stage` is what every notebook's second cell calls.
"""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

from .config import Config, ConfigError, load_config, save_config
from .io import STAGES, read_json, stage_dir, write_json, folder_size

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
KERNEL = "qed"

# Where each training stage leaves the model the next stage starts from.
MODEL_DIRS = {"sft": "02_sft/model", "rubric_rl": "03_rubric_rl/model", "rc_rl": "04_reasoning_cache_rl/model"}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The config sections whose values produce each stage's results; a stage also redoes its work when an
# earlier stage's results change (its input data or starting model).
STAGE_KEYS = {"01_distill": ("seed", "base_model", "distill"),
              "02_sft": ("thinking", "sft"),
              "03_rubric_rl": ("rubric_rl",),
              "04_reasoning_cache_rl": ("rc_rl",),
              "05_eval": ("generation", "eval")}


# Keys that change what is kept or logged, not any stage's results.
BOOKKEEPING = {"run_name", "keep_checkpoints", "save_total_limit", "report_to", "logging_steps"}


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config trees (added and removed keys included)."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def stages_to_redo(changed: list[str], stages: list[str] | None = None) -> dict[str, str]:
    """For each stage (of `stages`) whose results change: why, naming the changed dotted keys or the earlier stage."""
    out, upstream = {}, None
    for stage in STAGES:
        own = [k for k in changed if k.split(".")[0] in STAGE_KEYS[stage]]
        why = f"changed: {', '.join(own[:8])}{' ...' if len(own) > 8 else ''}" if own else \
            (f"its input from {upstream} changes" if upstream else None)
        if why:
            upstream = upstream or stage
            if stages is None or stage in stages:
                out[stage] = why
    return out


def say_config_changes(saved: Path, cfg: Config, stages: list[str] | None = None) -> dict[str, str]:
    """Compare `cfg` with the config.yaml a previous run saved at `saved`; print which stages recompute and why."""
    import yaml
    if not saved.exists():
        return {}
    old = yaml.safe_load(saved.read_text()) or {}
    new = json.loads(json.dumps(cfg.to_dict()))
    changed = [k for k in changed_keys(old, new) if k.split(".")[-1] not in BOOKKEEPING]
    redo = stages_to_redo(changed, stages)
    for stage, why in redo.items():
        print(f"[qedlib] {stage}: results will be recomputed, not resumed ({why}; previous config {saved})", flush=True)
    return redo


def start_stage(params_file: str, run_dir: str, overrides: dict, stage: str) -> tuple[Config, Path]:
    """Validate the params, say what differs from this stage's last config, save the resolved config
    in the stage folder, seed; return (cfg, folder)."""
    cfg = load_config(params_file, overrides)
    folder = stage_dir(run_dir, stage)
    say_config_changes(folder / "config.yaml", cfg, [stage])
    save_config(cfg, folder / "config.yaml")
    seed_everything(cfg.seed)
    quiet_outputs()
    print(f"[qedlib] stage {stage}: run folder {Path(run_dir).resolve()}  params {params_file}")
    return cfg, folder


# FutureWarnings raised inside libraries we cannot change, about calls we do not make ourselves.
LIBRARY_FUTURE_WARNINGS = (
    # TRL 1.16's unwrap_model_for_generation reads model.is_gradient_checkpointing, renamed in transformers 5.23
    r"`is_gradient_checkpointing` is deprecated",
)


def quiet_outputs() -> None:
    """Clean notebook outputs: figures viewable everywhere, no library progress bars that a saved notebook
    shows stuck at 0% (transformers' weight loading / shard writing, datasets' map and save), no library
    FutureWarnings we cannot fix at their source. Our own warnings still show."""
    import warnings
    from .plots import setup_notebook_rendering
    setup_notebook_rendering()
    for message in LIBRARY_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    import datasets
    import transformers
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _is_model(path: Path) -> bool:
    """A full model folder or a LoRA adapter folder (merged on first use by models.resolve_model)."""
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


PIPELINE = ("sft", "rubric_rl", "rc_rl")  # the trained stages, in pipeline order


def checkpoint(cfg: Config, run_dir: str | Path, ref: str, stage: str | None = None) -> str:
    """Resolve a model reference that may name a stage of this run.

    "base" -> cfg.base_model; "sft" / "rubric_rl" / "rc_rl" -> that stage's saved model;
    "previous" -> the model of the stage before `stage` in the pipeline (rubric_rl: sft; rc_rl:
    rubric_rl), falling back to earlier stages and then the base model when it was not run, so that
    rerunning a stage in a finished run starts where the pipeline says, not from a later stage's
    model; anything else is a model reference (embedded name, folder or hub id).
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
        if stage not in PIPELINE:
            raise ValueError(f"model 'previous' is relative to a training stage ({', '.join(PIPELINE)}), "
                             f"got stage={stage!r}")
        before = PIPELINE[:PIPELINE.index(stage)]
        for name in reversed(before):
            path = Path(run_dir) / MODEL_DIRS[name]
            if _is_model(path):
                if name != before[-1]:
                    print(f"[qedlib] {stage}: 'previous' is {before[-1]}, which has no model in {run_dir}; "
                          f"starting from {name}")
                return str(path)
        return cfg.base_model
    return ref


def git_commit() -> str:
    """The repo's current commit (or 'unknown')."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> str:
    """A one-line description of the machine."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def _failed_cell(nb_path: Path) -> str:
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return "unknown cell"
    # Number cells as in the source notebook: skip what papermill inserted (parameters, error banners).
    cells = [c for c in nb.get("cells", []) if not {"injected-parameters", "papermill-error-cell-tag"}
             & set(c.get("metadata", {}).get("tags", []))]
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = "".join(cell.get("source", ""))[:300]
                return f"cell {i} ({out.get('ename')}: {out.get('evalue', '')[:300]})\n--- cell source ---\n{src}"
    return "unknown cell"


def run_pipeline(params_file: str, run_name: str | None = None, stages: list[str] | None = None,
                 overrides: dict | None = None, outputs: str | Path = REPO / "outputs") -> Path:
    """Execute the notebooks in order; return the run folder. Stops at the first failing stage."""
    import papermill as pm
    overrides = dict(overrides or {})
    cfg = load_config(params_file, overrides)  # fail fast on a bad params file
    run_dir = (Path(outputs) / (run_name or cfg.run_name)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    wanted = _select_stages(stages)
    say_config_changes(run_dir / "config.yaml", cfg, wanted)  # before anything runs: what will not be resumed
    save_config(cfg, run_dir / "config.yaml")
    timings = read_json(run_dir / "timings.json") if (run_dir / "timings.json").exists() else {}
    info = {"params_file": str(params_file), "overrides": overrides, "commit": git_commit(), "hardware": hardware()}
    write_json(run_dir / "run.json", {**info, "timings_s": timings})  # the report (in 05_eval) reads it
    for stage in wanted:
        src = NOTEBOOKS / f"{stage}.ipynb"
        out = stage_dir(run_dir, stage) / f"{stage}.ipynb"
        before = f" (last time {timings[stage]:.0f} s)" if stage in timings else ""
        print(f"[qedlib] running {stage}{before} -> {out}", flush=True)
        t0 = time.perf_counter()
        try:
            # papermill's bar: cells done / cells, elapsed and remaining time of this stage
            pm.execute_notebook(str(src), str(out), kernel_name=KERNEL, cwd=str(NOTEBOOKS),
                                parameters={"params_file": str(Path(params_file).resolve()),
                                            "run_dir": str(run_dir), "overrides": overrides},
                                progress_bar={"desc": f"  {stage} cells", "mininterval": 5.0, "ncols": 90},
                                log_output=False,
                                # nbclient: keep the widgets' state in the notebook's metadata, so the sample and
                                # result browsers render outside JupyterLab too (viewers with a widget manager)
                                store_widget_state=True)
        except pm.PapermillExecutionError as e:
            raise RuntimeError(f"stage {stage} failed in notebook {src.name}, {_failed_cell(out)}\n"
                               f"executed notebook with the full traceback: {out}\n({e.ename}: {e.evalue})") from None
        timings[stage] = round(time.perf_counter() - t0, 1)
        write_json(run_dir / "timings.json", timings)
        write_json(run_dir / "run.json", {**info, "timings_s": timings})
        print(f"[qedlib] {stage} done in {timings[stage]:.0f} s", flush=True)
    from . import report
    written = report.refresh(run_dir, cfg)  # now with every finished stage's metrics and wall time
    print(f"[qedlib] report: {written['md']} and {written['html']}", flush=True)
    print(f"[qedlib] run folder {run_dir}: {folder_size(run_dir) / 2**30:.2f} GiB", flush=True)
    return run_dir


def _select_stages(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    out = []
    for s in stages:
        match = [st for st in STAGES if st == s or st.split("_", 1)[1] == s or st.startswith(s)]
        if len(match) != 1:
            raise ConfigError(f"--stages {s!r}: expected one of {', '.join(STAGES)} (or their names without the number)")
        out.append(match[0])
    return out
