"""Crash-safe files: atomic JSON writes, append-only JSONL with resume.

Every stage notebook writes through these so a crash, a timeout or a kill loses at most the
record in flight, and a rerun skips what is done.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .layout import METRICS_FILE


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to `path` for writing; on success fsync it and os.replace it onto `path`.

    Readers see the old file or the whole new one, never half of it, even after a crash or power
    loss (the fsync comes before the rename); on an exception the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(tmp: str | Path, out: str | Path, overwrite: bool = True) -> Path:
    """Move a finished temp folder to `out` with one rename (a half-written folder never looks ready).

    `overwrite=False` keeps an `out` that another process (a second rank) finished first and drops `tmp`.
    """
    tmp, out = Path(tmp), Path(out)
    if overwrite:
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        if overwrite or not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (`atomic_write`): readers never see half a file."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=_jsonable)
    return Path(path)


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming it when it is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has the stage that writes it run?")
    return json.loads(path.read_text())


# Fields that change speed, cost or where a model runs, not what it writes: left out of settings hashes.
NOT_OUTPUT_FIELDS = frozenset({"max_concurrency", "timeout_s", "max_retries", "retry_backoff_s", "batch_size", "device",
                               "static_cache", "vllm", "price_in_per_mtok", "price_out_per_mtok", "api_key_env",
                               "base_url", "base_url_env", "cache"})


def _output_settings(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses
        o = dataclasses.asdict(o)
    if isinstance(o, dict):
        return {k: _output_settings(v) for k, v in o.items() if k not in NOT_OUTPUT_FIELDS}
    if isinstance(o, (list, tuple)):
        return [_output_settings(v) for v in o]
    return o


def settings_hash(settings: Any) -> str:
    """10 hex digits of sha256 over the settings that produce a record (config dataclasses or dicts; speed/cost fields left out)."""
    blob = json.dumps(_output_settings(settings), sort_keys=True, default=_jsonable, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses
        return dataclasses.asdict(o)
    return str(o)


class JsonlLog:
    """Append-only JSONL file keyed by a record field; one write+fsync per record.

    A line cut short by a crash is ignored on reload (and trimmed), so reruns skip finished
    keys and redo only what was in flight.
    """

    def __init__(self, path: str | Path, key: str = "key"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        good = []
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn last line from a crash
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    break
                good.append(raw)
                self.records[str(rec[self.key])] = rec
        size = sum(len(r) for r in good)
        if size != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(size)

    def __contains__(self, key: str) -> bool:
        return str(key) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, rec: dict) -> None:
        """Append one record durably."""
        line = (json.dumps(rec, default=_jsonable) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[str(rec[self.key])] = rec

    def values(self) -> list[dict]:
        return list(self.records.values())


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield records of a JSONL file, naming file and line on a bad row."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write a whole JSONL file atomically (`atomic_write`)."""
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, default=_jsonable) + "\n")
    return Path(path)


def write_metrics(stage_folder: str | Path, metrics: dict) -> Path:
    """Write a stage's machine-readable metrics.json (tests and the report read it back)."""
    return write_json(Path(stage_folder) / METRICS_FILE, metrics)


def folder_size(folder: str | Path) -> int:
    """Bytes under a folder (files only, symlinks not followed, a hard-linked file counted once, as `du` does)."""
    seen, total = set(), 0
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
