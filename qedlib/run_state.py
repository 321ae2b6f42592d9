"""What a run folder says about itself: the lock of its one writer, and each stage's completion record.

A building block under the runner (`python -m qedlib run`), the notebooks' `start_stage` and the training
stages' `training.saved_result`. A stage that finishes writes `<stage>/stage.json` (RECORD_FILE) as its last
act: the hash of the settings that produce its results (runner's STAGE_KEYS sections) chained with the record of
the stage before it, and the files it left. A rerun whose record matches skips the stage; a training stage whose
record matches (written when training ended, `complete: training`) returns its saved result instead of training
again, which is how a notebook opens a stage a batch job trained. The lock (`run.lock`, with pid and host) keeps a
second writer out of the folder.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from .files import atomic_write, read_json_or_none, settings_hash, write_json
from .layout import DISTILL, EVAL, MODEL, RC_RL, RUBRIC_RL, SFT, STAGES

RECORD_FILE = "stage.json"  # a stage's completion record, in its folder
LOCK_FILE = "run.lock"  # the run folder's writer: pid, host, command
KERNEL_LOG = "kernel.log"  # a stage kernel's own stderr (a log, not a result)
LOCK_ENV = "QED_RUN_LOCK"  # the lock's token, inherited by the kernels of the run that holds it
OPEN_FILE = "open_work.json"  # calls a stage could not make (an endpoint down): its record counts once a rerun made them

# The config sections whose values produce each stage's results; a stage also redoes its work when an
# earlier stage's results change (its input data or starting model): its record chains the one before it.
# The global keys every later stage reads itself (seed: its sampling and data order; thinking: its chat template;
# base_model: `model: base` and eval's "base" checkpoint) are in its own keys too: the chain alone misses them
# when `--stages` runs a later stage without the earlier ones.
STAGE_KEYS = {DISTILL: ("seed", "base_model", "distill"),
              SFT: ("seed", "thinking", "base_model", "sft"),
              RUBRIC_RL: ("seed", "thinking", "base_model", "rubric_rl"),
              RC_RL: ("seed", "thinking", "base_model", "rc_rl"),
              EVAL: ("seed", "thinking", "base_model", "generation", "eval")}

# Keys that change what is kept or logged, not any stage's results.
BOOKKEEPING = {"run_name", "keep_checkpoints", "save_total_limit", "report_to", "logging_steps",
               "max_invalid_rate"}  # max_invalid_rate: when a stage gives up, not what it produces
# Sections that say how a stage runs (here or as a batch job, on how many processes), not what it produces: a
# notebook (`launch.mode: external`) and the cluster job that trains for it must agree on the record's hash.
HOW_IT_RUNS = {"launch"}

# What a stage leaves for the next one when it has no record (run interactively, before records existed).
OUTPUT_FOLDERS = {DISTILL: "dataset", SFT: MODEL, RUBRIC_RL: MODEL, RC_RL: MODEL}


class RunLocked(RuntimeError):
    """Another live process writes into this run folder."""


# ---------------------------------------------------------------- records
def _drop_bookkeeping(tree):
    if isinstance(tree, dict):
        return {k: _drop_bookkeeping(v) for k, v in tree.items() if k not in BOOKKEEPING | HOW_IT_RUNS}
    return tree


def stage_settings(cfg, stage: str) -> dict:
    """The config sections that produce `stage`'s results, as plain data (bookkeeping keys left out)."""
    tree = json.loads(json.dumps(cfg.to_dict()))
    return _drop_bookkeeping({k: tree[k] for k in STAGE_KEYS[stage] if k in tree})


def read_record(run_dir, stage: str) -> Optional[dict]:
    """A stage's completion record, or None (absent or unreadable: a record is written whole or not at all)."""
    path = Path(run_dir) / stage / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _folder_fingerprint(folder: Path) -> Optional[str]:
    """Names, sizes and mtimes of a folder's files, hashed; None when the folder is absent."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return settings_hash([[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def upstream(run_dir, stage: str) -> Optional[str]:
    """What `stage` reads from the stage before it: that stage's record hash, else its output's fingerprint."""
    i = STAGES.index(stage)
    if i == 0:
        return None
    before = STAGES[i - 1]
    rec = read_record(run_dir, before)
    if rec:
        return rec["hash"]
    out = OUTPUT_FOLDERS.get(before)
    return _folder_fingerprint(Path(run_dir) / before / out) if out else None


def stage_hash(cfg, run_dir, stage: str) -> str:
    """10 hex digits naming `stage`'s results: its settings chained with what it reads from the stage before it."""
    return settings_hash({"settings": stage_settings(cfg, stage), "upstream": upstream(run_dir, stage)})


def _produced(folder: Path) -> dict:
    """Relative path -> size of the files a stage left (checkpoints, pruned afterwards, and the record left out)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (RECORD_FILE, KERNEL_LOG, OPEN_FILE) and "checkpoints" not in p.relative_to(folder).parts}


def write_record(cfg, run_dir, stage: str, complete: str) -> Path:
    """Write `<stage>/stage.json` atomically: `complete` is "stage" (its notebook ran to the end) or "training"."""
    folder = Path(run_dir) / stage
    rec = {"stage": stage, "complete": complete, "hash": stage_hash(cfg, run_dir, stage),
           "upstream": upstream(run_dir, stage), "settings": stage_settings(cfg, stage), "produced": _produced(folder)}
    return write_json(folder / RECORD_FILE, rec)


def remove_record(run_dir, stage: str) -> None:
    """Forget that `stage` finished (its outputs are about to change)."""
    (Path(run_dir) / stage / RECORD_FILE).unlink(missing_ok=True)


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings trees."""
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_record(cfg, run_dir, stage: str, need: str = "stage") -> tuple[bool, str]:
    """(True, what was found) when `stage` finished with these settings (`need`: "stage", or "training" which a
    whole-stage record also satisfies) and its files are still there; else (False, why it must run)."""
    rec = read_record(run_dir, stage)
    where = Path(run_dir) / stage / RECORD_FILE
    if rec is None:
        return False, f"no completion record {where}"
    if need == "stage" and rec.get("complete") != "stage":
        return False, f"{where} records training only, not the whole notebook"
    if rec.get("hash") != stage_hash(cfg, run_dir, stage):
        keys = _changed(rec.get("settings", {}), stage_settings(cfg, stage))
        if keys:
            return False, f"settings changed: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        return False, f"its input from {STAGES[STAGES.index(stage) - 1]} changed"
    folder = Path(run_dir) / stage
    produced = rec.get("produced", {})
    if need == "training":  # the notebook rewrites its other files (the executed notebook, metrics) as it runs
        produced = {rel: size for rel, size in produced.items() if rel.startswith(MODEL + "/")}
    for rel, size in produced.items():
        f = folder / rel
        if not f.is_file() or f.stat().st_size != size:
            return False, f"{f} is missing or changed since the stage finished"
    work = work_left_to_redo(run_dir, stage) if need == "stage" else None
    if work:  # below max_invalid_rate the stage ended, but what failed is still to be done
        return False, f"its last run left failed calls to redo: {work}"
    return True, f"finished with these settings ({where})"


def note_open_work(stage_folder, part: str, what: Optional[str]) -> None:
    """Say (`what`) or clear (None) that `part` of a stage ended with failed calls a rerun must make; while any part
    is open the stage's record does not make a rerun skip it. The file is only written when its content changes."""
    path = Path(stage_folder) / OPEN_FILE
    notes = read_json_or_none(path) or {}
    if what:
        notes[part] = what
    else:
        notes.pop(part, None)
    if notes:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_if_changed(path, notes)
    else:
        path.unlink(missing_ok=True)


def work_left_to_redo(run_dir, stage: str) -> Optional[str]:
    """What `stage`'s last run left to redo (note_open_work), or None."""
    notes = read_json_or_none(Path(run_dir) / stage / OPEN_FILE)
    return "; ".join(notes.values()) if notes else None


# ---------------------------------------------------------------- the writer's lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(h: dict, path: Path) -> str:
    return (f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')} ({h.get('command', '?')}); "
            f"lock file {path}")


def _stale(h: Optional[dict]) -> bool:
    """A lock whose holder is a dead process on this host (or an unreadable, half-written lock)."""
    return h is None or (h.get("host") == socket.gethostname() and not _alive(int(h.get("pid", 0))))


def acquire_lock(run_dir, command: str) -> str:
    """Make this process the run folder's one writer; return the lock's token. Refuse when a live process holds it;
    take over (with a message) a lock left by a dead process on this host."""
    path = Path(run_dir) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": command, "token": uuid.uuid4().hex}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            h = read_json_or_none(path)
            if not _stale(h):
                raise RunLocked(f"run folder {run_dir} is in use by {_describe(h, path)}. Wait for that run to finish "
                                "or use another --run-name; if that process is gone on another host, delete the lock "
                                "file") from None
            print(f"[qedlib] taking over the stale lock of a dead process: {_describe(h or {}, path)}", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return me["token"]
    raise RunLocked(f"could not take the lock {path}: another process keeps creating it")


def release_lock(run_dir, token: str) -> None:
    """Remove the lock if this process (its `token`) still holds it."""
    path = Path(run_dir) / LOCK_FILE
    h = read_json_or_none(path)
    if h and h.get("token") == token:
        path.unlink(missing_ok=True)


def check_not_locked(run_dir) -> None:
    """Refuse (RunLocked) when another live process holds the run folder; the kernels of the run that holds it
    carry its token (LOCK_ENV) and pass."""
    path = Path(run_dir) / LOCK_FILE
    h = read_json_or_none(path) if path.exists() else None
    if not h or h.get("token") == os.environ.get(LOCK_ENV):
        return
    if _stale(h):
        print(f"[qedlib] ignoring the stale lock of a dead process: {_describe(h, path)}", flush=True)
        return
    raise RunLocked(f"run folder {run_dir} is being written by {_describe(h, path)}; wait for it to finish, "
                    "or run this notebook into another run_dir")


# ---------------------------------------------------------------- files rewritten only when they change
def write_text_if_changed(path, text: str) -> bool:
    """Write `text` atomically unless the file already holds exactly it (its mtime then stays); True if written."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_write(path) as f:
        f.write(text)
    return True


def write_json_if_changed(path, obj) -> bool:
    """`write_json`'s format, written only when the content changes."""
    return write_text_if_changed(path, json.dumps(obj, indent=2, default=str))
