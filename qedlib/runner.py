"""Run the pipeline: execute the numbered notebooks with papermill into outputs/<run>/.

`python -m qedlib run PARAMS [--run-name NAME] [--stages ...] [--set key=value ...]`. Each notebook
gets three papermill parameters (`params_file`, `run_dir`, `overrides`) and reads the previous
stage's artifacts from the run folder. `start_stage` is what every notebook's second cell calls.
A rerun skips each stage whose completion record (qedlib.run_state) matches the settings; one process
writes a run folder at a time (its lock); what the stages need is checked before the first one starts.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import yaml

from .config import Config, ConfigError, load_config
from .problem_sets import load_source
from .files import read_json, folder_size
from .layout import (CONFIG_FILE, DISTILL, EVAL, MODEL_DIRS, OUTPUTS, TRAINED_STAGES, RC_RL, REPO, RUBRIC_RL, RUN_FILE,
                     SFT, STAGES, TIMINGS_FILE, PEAK_MEMORY_FILE, TRAINED, git_commit, hardware, stage_dir)
from .tools.plan import endpoints
from .run_state import (BOOKKEEPING, HOW_IT_RUNS, KERNEL_LOG, LOCK_ENV, STAGE_KEYS, acquire_lock, check_not_locked, check_record,
                        work_left_to_redo, read_record, release_lock, remove_record, stage_hash, write_json_if_changed, write_record,
                        write_text_if_changed)
from .display import tidy_outputs, trust_notebook, write_html
from .plots import setup_notebook_rendering
from .tools import report

NOTEBOOKS = REPO / "notebooks"
KERNEL = "qed"



class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; its text is the one line the command line prints (the stage, how to resume)."""


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
    if not saved.exists():
        return {}
    old = yaml.safe_load(saved.read_text()) or {}
    new = json.loads(json.dumps(cfg.to_dict()))
    changed = [k for k in changed_keys(old, new)
               if k.split(".")[-1] not in BOOKKEEPING and not HOW_IT_RUNS & set(k.split("."))]
    redo = stages_to_redo(changed, stages)
    for stage, why in redo.items():
        print(f"[qedlib] {stage}: results will be recomputed, not resumed ({why}; previous config {saved})", flush=True)
    return redo


def config_text(cfg: Config) -> str:
    """The resolved config as the YAML that CONFIG_FILE holds."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def start_stage(params_file: str, run_dir: str, overrides: dict, stage: str) -> tuple[Config, Path]:
    """Validate the params, refuse a run folder another process writes, say what differs from this stage's last
    config, save the resolved config in the stage folder, seed; return (cfg, folder)."""
    cfg = load_config(params_file, overrides)
    check_not_locked(run_dir)
    folder = stage_dir(run_dir, stage)
    say_config_changes(folder / CONFIG_FILE, cfg, [stage])
    record = read_record(run_dir, stage)
    if record and record.get("hash") != stage_hash(cfg, run_dir, stage):
        remove_record(run_dir, stage)  # its outputs are about to change: the record must not vouch for them
    write_text_if_changed(folder / CONFIG_FILE, config_text(cfg))
    from transformers import set_seed  # heavy: transformers loads torch
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
    setup_notebook_rendering()
    for message in LIBRARY_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    import datasets  # heavy: datasets loads pyarrow
    import transformers  # heavy: transformers loads torch
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
    """Execute the notebooks in order, skipping stages that finished with these settings; return the run folder.

    One writer per run folder (run_state's lock); everything a stage needs is checked before the first one
    starts; stops at the first failing stage; Ctrl-C raises Interrupted naming the stage.
    """
    overrides = dict(overrides or {})
    cfg = load_config(params_file, overrides)  # fail fast on a bad params file
    run_dir = (Path(outputs) / (run_name or cfg.run_name)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    wanted = _select_stages(stages or cfg.stages)  # --stages, else the params' `stages` (an eval-only recipe), else all
    token = acquire_lock(run_dir, f"python -m qedlib run {params_file}")
    try:
        check_before_run(cfg, run_dir, wanted)
        _run_stages(cfg, params_file, run_dir, wanted, overrides, token)
    finally:
        release_lock(run_dir, token)
    return run_dir


def _run_stages(cfg: Config, params_file: str, run_dir: Path, wanted: list[str], overrides: dict, token: str) -> None:
    """The stages of one run, each skipped when its completion record matches, then the report."""
    say_config_changes(run_dir / CONFIG_FILE, cfg, wanted)  # before anything runs: what will not be resumed
    write_text_if_changed(run_dir / CONFIG_FILE, config_text(cfg))
    timings = read_json(run_dir / TIMINGS_FILE) if (run_dir / TIMINGS_FILE).exists() else {}
    peaks = read_json(run_dir / PEAK_MEMORY_FILE) if (run_dir / PEAK_MEMORY_FILE).exists() else {}
    info = {"params_file": str(params_file), "overrides": overrides, "commit": git_commit(), "hardware": hardware()}
    ran = False
    for stage in wanted:
        done, why = check_record(cfg, run_dir, stage)
        if done:
            print(f"[qedlib] {stage}: skipped, {why}", flush=True)
            continue
        if not ran:  # the report (in the eval stage) reads it; written only when a stage runs
            write_json_if_changed(run_dir / RUN_FILE, {**info, "timings_s": timings})
        ran = True
        with PeakMemory(STAGE_KERNELS) as memory:
            timings[stage] = _execute_stage(cfg, params_file, run_dir, stage, overrides, token, why, timings.get(stage))
        STAGE_KERNELS.clear()  # the stage's kernel has ended
        write_json_if_changed(run_dir / TIMINGS_FILE, timings)
        if memory.peak_gib is not None:
            peaks[stage] = memory.peak_gib
            write_json_if_changed(run_dir / PEAK_MEMORY_FILE, peaks)
        write_json_if_changed(run_dir / RUN_FILE, {**info, "timings_s": timings})
        write_record(cfg, run_dir, stage, "stage")  # the stage's last act: a rerun with these settings skips it
        peak = f", peak memory {peaks[stage]:.1f} GiB" if stage in peaks else ""
        print(f"[qedlib] {stage} done in {timings[stage]:.0f} s{peak}", flush=True)
        if work_left_to_redo(run_dir, stage):  # its record will not count: the next run redoes exactly what failed
            print(f"[qedlib] {stage} left failed calls to redo ({work_left_to_redo(run_dir, stage)}): rerun the same command "
                  "when the endpoint is back", flush=True)
    written = report.refresh(run_dir, cfg)  # now with every finished stage's metrics and wall time
    print(f"[qedlib] report: {written['md']} and {written['html']}{'' if written.get('changed', True) else ' (unchanged)'}",
          flush=True)
    print(f"[qedlib] run folder {run_dir}: {folder_size(run_dir) / 2**30:.2f} GiB", flush=True)


def mark_interrupted(nb_path: Path) -> None:
    """After Ctrl-C: papermill saved the unrun cells as "completed"; mark them "pending" and say at the top where
    the run stopped, so the executed notebook does not look finished."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    for cell in code:
        if cell.get("execution_count") is None:
            cell.setdefault("metadata", {}).setdefault("papermill", {})["status"] = "pending"
    ran = sum(c.get("execution_count") is not None for c in code)
    banner = {"cell_type": "markdown", "id": "qedlib-interrupted", "metadata": {"tags": ["papermill-error-cell-tag"]},
              "source": [f"**Interrupted (Ctrl-C) after {ran} of {len(code)} code cells**: the cells below without "
                         "output did not run. Rerun the same `python -m qedlib run` command to resume."]}
    nb["cells"] = [banner] + [c for c in nb["cells"] if c.get("id") != "qedlib-interrupted"]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False))


def check_before_run(cfg: Config, run_dir: Path, wanted: list[str]) -> None:
    """Everything the wanted stages need that can be checked before the first starts: endpoint environment
    variables, starting models, problem files and their rubrics; one ConfigError naming every missing thing."""
    problems = (_missing_env(cfg, wanted) + _missing_models(cfg, run_dir, wanted) + _missing_data(cfg, wanted)
                + _missing_inputs(cfg, run_dir, wanted))
    if problems:
        raise ConfigError("before any stage starts:\n  " + "\n  ".join(problems))


def _missing_env(cfg: Config, wanted: list[str]) -> list[str]:
    """Unset environment variables of the endpoints the wanted stages call (plan.endpoints' list)."""
    sections = {s for st in wanted for s in STAGE_KEYS[st]} | {"generation"}
    out = []
    for where, ep in endpoints(cfg):
        if where.split(".")[0] not in sections:
            continue
        for env in (ep.base_url_env, ep.api_key_env):
            if env and not os.environ.get(env):
                out.append(f"{where}: environment variable {env} is not set (export it before the run)")
    return out


def _missing_models(cfg: Config, run_dir: Path, wanted: list[str]) -> list[str]:
    """Training stages whose starting model will not exist: 'previous' with no earlier trained stage in this run
    (no silent fallback to the base model) or a folder that is not there."""
    out = []
    for name, stage in TRAINED.items():
        if stage not in wanted:
            continue
        ref = getattr(cfg, name).model
        if ref == "previous":
            earlier = TRAINED_STAGES[:TRAINED_STAGES.index(name)]
            if not any(TRAINED[e] in wanted or (run_dir / MODEL_DIRS[e] / "config.json").exists()
                       or (run_dir / MODEL_DIRS[e] / "adapter_config.json").exists() for e in earlier):
                out.append(f"{name}.model is 'previous' but no earlier stage ({', '.join(earlier) or 'none'}) has a "
                           f"model in {run_dir} or runs now: run it first, or set {name}.model: base to start from "
                           f"base_model ({cfg.base_model})")
        elif ref in MODEL_DIRS and TRAINED[ref] not in wanted and not (run_dir / MODEL_DIRS[ref]).is_dir():
            out.append(f"{name}.model is {ref!r} but {run_dir / MODEL_DIRS[ref]} does not exist: run that stage first")
        elif ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().exists():
            out.append(f"{name}.model: folder {ref} does not exist")
    return out


def _missing_data(cfg: Config, wanted: list[str]) -> list[str]:
    """Problem files that are not there, and RL problems without the rubric their judge grades against."""
    out = []
    for name, stage in (("distill", DISTILL), ("rubric_rl", RUBRIC_RL), ("rc_rl", RC_RL)):
        if stage not in wanted:
            continue
        src = getattr(cfg, name).problems
        if src.path.startswith("hub:") or (src.path != "shipped" and not Path(src.path).suffix):
            continue  # hub datasets and named benchmarks are fetched by the stage itself
        if src.path != "shipped" and not Path(src.path).expanduser().exists():
            out.append(f"{name}.problems.path: {src.path} does not exist")
            continue
        if name == "distill" or getattr(cfg, name).reward != "judge":
            continue
        try:
            problems = load_source(src)
        except (ValueError, OSError) as e:
            out.append(f"{name}.problems: {e}")
            continue
        bare = [p.id for p in problems if not (p.rubric or "").strip()]
        if bare:
            out.append(f"{name}.problems ({src.path}): {len(bare)} of {len(problems)} problems have no rubric "
                       f"(first: {', '.join(map(str, bare[:5]))}); the judge grades against one: add a rubric "
                       "column (or map it with problems.columns), or drop those rows")
    return out


def _local_file(path: str) -> bool:
    """A path the stage reads from this machine (not hub:org/name, a named benchmark or the shipped set)."""
    return path != "shipped" and not path.startswith("hub:") and bool(Path(path).suffix)


def _missing_inputs(cfg: Config, run_dir: Path, wanted: list[str]) -> list[str]:
    """SFT's dataset and eval's benchmark files that are not there (each stage would fail only when it reads them,
    after the stages before it trained)."""
    out = []
    if SFT in wanted:
        source = cfg.sft.dataset
        distilled = run_dir / DISTILL / "dataset"
        if source == "distill" and DISTILL not in wanted and not distilled.exists():
            out.append(f"sft.dataset is 'distill' but {distilled} does not exist: run 01_distill first, or point "
                       "sft.dataset at hub:org/name or a .jsonl/.parquet file")
        elif source != "distill" and _local_file(source) and not Path(source).expanduser().exists():
            out.append(f"sft.dataset: {source} does not exist")
    if EVAL in wanted:
        for i, spec in enumerate(cfg.eval.benchmarks):
            path = str(spec.get("path", "")) if isinstance(spec, dict) else str(spec)
            if _local_file(path) and not Path(path).expanduser().exists():
                out.append(f"eval.benchmarks[{i}].path: {path} does not exist")
    return out


def _execute_stage(cfg: Config, params_file: str, run_dir: Path, stage: str, overrides: dict, token: str, why: str,
                   last_s: float | None) -> float:
    """Run one stage's notebook with papermill into its folder; return its wall time in seconds."""
    import papermill as pm  # heavy: the notebook runner loads only to run notebooks
    src = NOTEBOOKS / f"{stage}.ipynb"
    out = stage_dir(run_dir, stage) / f"{stage}.ipynb"
    record = read_record(run_dir, stage)
    if record and not check_record(cfg, run_dir, stage, need="training")[0]:
        remove_record(run_dir, stage)  # a stale record must not vouch for outputs about to change
    before = f", last time {last_s:.0f} s" if last_s else ""
    print(f"[qedlib] running {stage} ({why}{before}) -> {out}", flush=True)
    os.environ[LOCK_ENV] = token  # the kernel inherits it: its start_stage knows this run holds the lock
    t0 = time.perf_counter()
    interrupted = False

    def on_ctrl_c(signum, frame):
        nonlocal interrupted
        interrupted = True
        _on_ctrl_c(signum, frame)
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if threading.current_thread() is threading.main_thread() else None
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
                            kernel_manager_class=local_kernel_manager(out.with_name(KERNEL_LOG)))
    except (KeyboardInterrupt, Exception) as e:
        if not (interrupted or isinstance(e, KeyboardInterrupt)):
            if isinstance(e, pm.PapermillExecutionError):
                raise RuntimeError(f"stage {stage} failed in notebook {src.name}, {_failed_cell(out)}\n"
                                   f"executed notebook with the full traceback: {out}\n({e.ename}: {e.evalue})") from None
            raise
        # Ctrl-C (papermill may report the kernel it killed as a dead kernel: still an interruption)
        mark_interrupted(out)
        tidy_outputs(out)
        trust_notebook(out)
        raise Interrupted(f"interrupted in stage {stage} (its notebook so far: {out}); rerun the same command to "
                          "resume: finished stages are skipped, this one resumes from its checkpoints and logs") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    # the user's own output, saved as a front end shows it (no progress residue), trusted in JupyterLab (widgets
    # render), and an HTML page with math typeset offline; signing comes last (any later change unsigns it)
    tidy_outputs(out)
    trust_notebook(out)
    write_html(out, run_dir)
    return round(time.perf_counter() - t0, 1)


def local_kernel_manager(kernel_log: Path | None = None):
    """nbclient's kernel manager, talking to the kernel over local IPC sockets (not TCP on localhost), with a
    kernel that dies with the runner.

    ipykernel >= 7 warns at every start that a TCP kernel is unencrypted; IPC sockets are files
    that only this user can open, so there is nothing to warn about, and no port to collide on.
    jupyter_client starts the kernel in its own session, so a kill -9 of the runner's process group misses
    it and ipykernel's parent poller notices only between Python bytecodes (a kernel inside a long torch
    call went on training and saving); the kernel therefore asks Linux to SIGKILL it when its parent dies.
    With `kernel_log`, the kernel process's own stderr (ipykernel's log, not the cells' output, which goes to the
    notebook) is appended there, so a Ctrl-C of the runner prints one line, not the kernel's interrupted handler.
    """
    from jupyter_client.manager import AsyncKernelManager  # heavy: loads only to run notebooks

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**{"transport": "ipc", **kwargs})

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw = {"preexec_fn": die_with_parent(os.getpid()), **kw}
            if kernel_log is None:
                await super()._async_launch_kernel(kernel_cmd, **kw)
            else:
                with open(kernel_log, "ab") as log:  # the kernel keeps its own descriptor
                    await super()._async_launch_kernel(kernel_cmd, **{"stderr": log, **kw})
            pid = getattr(self.provisioner, "pid", None)
            if pid:
                STAGE_KERNELS.add(pid)
    return IPCKernelManager


STAGE_KERNELS: set[int] = set()  # pids of the kernels this runner started: Ctrl-C ends them first


class PeakMemory:
    """A stage's peak resident memory, in GiB: while the stage runs, a thread reads Linux's /proc every `interval`
    seconds and keeps the largest of (the kernel's own high-water mark, VmHWM) and (the resident memory of the
    kernel and of every process under it at that moment: `accelerate launch` ranks, a local judge server). A
    process tree can peak between two reads, so this is a lower bound, to within one interval. Without /proc (not
    Linux) `peak_gib` stays None and nothing is recorded."""

    def __init__(self, roots: set[int], interval: float = 1.0):
        self.roots, self.interval = roots, interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qedlib-peak-memory", daemon=True)

    @property
    def peak_gib(self) -> float | None:
        return round(self.peak_kib / 2**20, 2) if self.peak_kib else None

    def __enter__(self):
        if Path("/proc/self/status").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return False

    def _watch(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                self.sample()  # the last moment before the kernel is gone
                return

    def sample(self) -> None:
        roots = list(self.roots)
        if not roots:
            return
        children = _children_by_parent()
        total, todo, seen = 0, list(roots), set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += _status_kib(pid, "VmRSS")
            todo += children.get(pid, [])
        hwm = max((_status_kib(pid, "VmHWM") for pid in roots), default=0)
        self.peak_kib = max(self.peak_kib, total, hwm)


def _status_kib(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status in KiB (0 when the process is gone or has no such field)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children_by_parent() -> dict[int, list[int]]:
    """pid -> its child pids, from every /proc/PID/stat (the parent is the 4th field, after the ")" of the name)."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(d.name))
    return out


def _on_ctrl_c(signum, frame):
    """SIGINT during a stage: kill the stage's kernel, then raise KeyboardInterrupt.

    The kernel is in its own session, so a Ctrl-C never reaches it; killing it first means nothing the runner
    waits on (a cell's reply, the kernel's graceful shutdown) can keep the runner from ending: papermill sees a
    dead kernel at once. Safe for the same reason kill -9 is: every stage writes atomically and appends logs.
    """
    for pid in list(STAGE_KERNELS):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        STAGE_KERNELS.discard(pid)
    raise KeyboardInterrupt


def die_with_parent(parent_pid: int):
    """A Popen preexec_fn: the child gets SIGKILL when its parent exits (Linux prctl; elsewhere it does nothing)."""
    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            return  # not Linux: ipykernel's parent poller still ends the kernel, a second later
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
            os._exit(1)
    return arm


PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
