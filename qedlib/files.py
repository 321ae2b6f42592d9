"""Crash-safe files: atomic JSON writes, append-only JSONL with resume.

Every stage notebook writes through these so a crash, a timeout or a kill loses at most the
record in flight, and a rerun skips what is done.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional

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


def read_json_or_none(path: str | Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (files written whole or not at all)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# Fields that change speed, cost or where a model runs, not what it writes: left out of settings hashes.
NOT_OUTPUT_FIELDS = frozenset({"max_concurrency", "timeout_s", "max_retries", "retry_backoff_s", "batch_size", "device",
                               "deadline_s", "static_cache", "vllm", "price_in_per_mtok", "price_out_per_mtok", "api_key_env",
                               "base_url", "base_url_env", "cache"})


def _output_settings(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
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
        return dataclasses.asdict(o)
    return str(o)


class CorruptLineWarning(UserWarning):
    """A JSONL file holds lines that are not records; the records around them are kept."""


@dataclass
class JsonlScan:
    """What a JSONL file holds: its records (with their line numbers), its bad lines, and a torn tail."""
    records: list = field(default_factory=list)  # (line number, record) of every valid line
    bad: list = field(default_factory=list)  # (line number, why) of every complete line that is not a record
    tail_at: Optional[int] = None  # byte offset of a last line with no newline (an append in progress or a crash)
    tail_record: Optional[dict] = None  # that last line, when it is nonetheless a whole record


def _parse_record(raw: bytes, key: Optional[str]) -> tuple[Optional[dict], Optional[str]]:
    """(record, None) for a valid line, (None, why) for a bad one."""
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(rec, dict):
        return None, f"a JSON {type(rec).__name__}, not an object"
    if key is not None and key not in rec:
        return None, f"no {key!r} field"
    return rec, None


def scan_jsonl(path: str | Path, key: Optional[str] = None) -> JsonlScan:
    """Read every line of a JSONL file without changing it: valid records, bad lines, and a torn last line."""
    scan, offset = JsonlScan(), 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            torn = not raw.endswith(b"\n")
            if raw.strip():
                rec, why = _parse_record(raw, key)
                if torn:  # a writer may be mid-append: never a bad line, and only that writer trims it
                    scan.tail_at, scan.tail_record = offset, rec
                elif why is None:
                    scan.records.append((i, rec))
                else:
                    scan.bad.append((i, why))
            offset += len(raw)
    return scan


def warn_bad_lines(path: str | Path, scan: JsonlScan) -> None:
    """One warning naming every bad line of a scanned file (file:line and why) and what was kept."""
    if not scan.bad:
        return
    shown = "; ".join(f"{path}:{i}: {why}" for i, why in scan.bad[:10])
    more = f"; and {len(scan.bad) - 10} more" if len(scan.bad) > 10 else ""
    warnings.warn(f"{path}: {len(scan.bad)} corrupt line(s) left out, {len(scan.records)} valid record(s) kept "
                  f"({shown}{more}); the file is not changed: fix or delete those lines by hand",
                  CorruptLineWarning, stacklevel=3)


class JsonlLog:
    """Append-only JSONL file keyed by a record field; one write+fsync per record.

    Reading never changes the file: a corrupt line is left out with a warning naming file:line and
    every record around it is kept. A last line with no newline (an append cut short by a crash, or
    one in progress in another process) is not a record until complete; this log trims it, or ends it
    with its newline when it is a whole record, only when it appends itself. So reruns skip finished
    keys and redo only what was in flight, and read-only commands never write.
    """

    def __init__(self, path: str | Path, key: str = "key"):
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict] = {}
        self.bad_lines: list[tuple[int, str]] = []  # (line number, why) of corrupt lines left out
        self._tail_at: Optional[int] = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        scan = scan_jsonl(self.path, self.key)
        for _, rec in scan.records:
            self.records[str(rec[self.key])] = rec
        if scan.tail_record is not None:  # a whole record whose newline was not written yet
            self.records[str(scan.tail_record[self.key])] = scan.tail_record
        self.bad_lines, self._tail_at = scan.bad, scan.tail_at
        warn_bad_lines(self.path, scan)

    def __contains__(self, key: str) -> bool:
        return str(key) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def _mend_tail(self, f) -> None:
        """Before our first append: trim a torn last line, or end a whole-record one with its newline."""
        at, self._tail_at = self._tail_at, None
        if at is None:
            return
        f.seek(at)
        raw = f.read()
        if not raw or raw.endswith(b"\n"):
            return  # another writer finished its line since we read the file
        if _parse_record(raw, self.key)[0] is None:
            f.truncate(at)
        else:
            f.write(b"\n")  # the file is opened to append: this lands at its end

    def append(self, rec: dict) -> None:
        """Append one record durably."""
        line = (json.dumps(rec, default=_jsonable) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            self._mend_tail(f)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[str(rec[self.key])] = rec

    def values(self) -> list[dict]:
        return list(self.records.values())


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield the records of a JSONL file; a corrupt line is left out with one warning naming file:line, and a
    torn last line (an append in progress) is not a record yet. The file is never changed."""
    scan = scan_jsonl(path)
    warn_bad_lines(path, scan)
    for _, rec in scan.records:
        yield rec
    if scan.tail_record is not None:
        yield scan.tail_record


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
