"""Run the pipeline: execute the numbered notebooks with papermill into outputs/<run>/.

`python -m qedlib run PARAMS [--run-name NAME] [--stages ...] [--set key=value ...]`. Each notebook
gets three papermill parameters (`params_file`, `run_dir`, `overrides`) and reads the previous
stage's artifacts from the run folder. `start_stage` is what every notebook's second cell calls.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import Config, ConfigError, load_config, save_config
from .io import read_json, write_json, folder_size
from .layout import (CONFIG_FILE, DISTILL, EVAL, OUTPUTS, RC_RL, REPO, RUBRIC_RL, RUN_FILE, SFT, STAGES, TIMINGS_FILE,
                     git_commit, hardware, stage_dir)

NOTEBOOKS = REPO / "notebooks"
KERNEL = "qed"


# The config sections whose values produce each stage's results; a stage also redoes its work when an
# earlier stage's results change (its input data or starting model).
STAGE_KEYS = {DISTILL: ("seed", "base_model", "distill"),
              SFT: ("thinking", "sft"),
              RUBRIC_RL: ("rubric_rl",),
              RC_RL: ("rc_rl",),
              EVAL: ("generation", "eval")}


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
    say_config_changes(folder / CONFIG_FILE, cfg, [stage])
    save_config(cfg, folder / CONFIG_FILE)
    from transformers import set_seed
    set_seed(cfg.seed)  # python, numpy, torch (and CUDA when present)
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
                 overrides: dict | None = None, outputs: str | Path = OUTPUTS) -> Path:
    """Execute the notebooks in order; return the run folder. Stops at the first failing stage."""
    import papermill as pm
    overrides = dict(overrides or {})
    cfg = load_config(params_file, overrides)  # fail fast on a bad params file
    run_dir = (Path(outputs) / (run_name or cfg.run_name)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    wanted = _select_stages(stages or cfg.stages)  # --stages, else the params' `stages` (an eval-only recipe), else all
    say_config_changes(run_dir / CONFIG_FILE, cfg, wanted)  # before anything runs: what will not be resumed
    save_config(cfg, run_dir / CONFIG_FILE)
    timings = read_json(run_dir / TIMINGS_FILE) if (run_dir / TIMINGS_FILE).exists() else {}
    info = {"params_file": str(params_file), "overrides": overrides, "commit": git_commit(), "hardware": hardware()}
    write_json(run_dir / RUN_FILE, {**info, "timings_s": timings})  # the report (in the eval stage) reads it
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
                                store_widget_state=True,
                                kernel_manager_class=local_kernel_manager())
        except pm.PapermillExecutionError as e:
            raise RuntimeError(f"stage {stage} failed in notebook {src.name}, {_failed_cell(out)}\n"
                               f"executed notebook with the full traceback: {out}\n({e.ename}: {e.evalue})") from None
        timings[stage] = round(time.perf_counter() - t0, 1)
        write_json(run_dir / TIMINGS_FILE, timings)
        write_json(run_dir / RUN_FILE, {**info, "timings_s": timings})
        print(f"[qedlib] {stage} done in {timings[stage]:.0f} s", flush=True)
    from . import report  # here, not at the top: a notebook's start_stage need not import the eval stack
    written = report.refresh(run_dir, cfg)  # now with every finished stage's metrics and wall time
    print(f"[qedlib] report: {written['md']} and {written['html']}", flush=True)
    print(f"[qedlib] run folder {run_dir}: {folder_size(run_dir) / 2**30:.2f} GiB", flush=True)
    return run_dir


def local_kernel_manager():
    """nbclient's kernel manager, talking to the kernel over local IPC sockets (not TCP on localhost).

    ipykernel >= 7 warns at every start that a TCP kernel is unencrypted; IPC sockets are files
    that only this user can open, so there is nothing to warn about, and no port to collide on.
    """
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**{"transport": "ipc", **kwargs})
    return IPCKernelManager


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
