"""Crash-safe writes (qedlib.files): one atomic file write, one atomic folder swap, used by every writer; a JSONL log
that survives a torn last line."""
import json
from pathlib import Path

import pytest

from qedlib import files as io
from qedlib.files import JsonlLog


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(path) as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert io.read_json(path) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # the temp file is gone
    with io.atomic_write(path, "wb") as f:
        f.write(b'{"v": 3}')
    assert io.read_json(path) == {"v": 3}


def test_write_jsonl_goes_through_atomic_write(tmp_path, monkeypatch):
    synced = []
    real_fsync = io.os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    io.write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"a": 2}])
    assert list(io.read_jsonl(tmp_path / "r.jsonl")) == [{"a": 1}, {"a": 2}] and len(synced) == 1
    log = io.JsonlLog(tmp_path / "log.jsonl")
    log.append({"key": "k1"})
    assert len(synced) == 2  # every appended record is fsynced too


def test_replace_folder_swaps_or_keeps_what_another_rank_finished(tmp_path):
    out, tmp = tmp_path / "model", tmp_path / "model.tmp"
    out.mkdir()
    (out / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    io.replace_folder(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["new"] and not tmp.exists()
    tmp.mkdir()
    (tmp / "late").write_text("late")
    io.replace_folder(tmp, out, overwrite=False)  # a second rank's copy: dropped, the first one kept
    assert sorted(p.name for p in out.iterdir()) == ["new"] and not tmp.exists()
    with pytest.raises(OSError):
        io.replace_folder(tmp_path / "missing", tmp_path / "elsewhere")


def test_jsonl_log_survives_a_torn_line(tmp_path):
    log = JsonlLog(tmp_path / "x.jsonl")
    log.append({"key": "a", "v": 1})
    log.append({"key": "b", "v": 2})
    with open(tmp_path / "x.jsonl", "ab") as f:
        f.write(b'{"key": "c", "v"')  # a crash mid-write
    again = JsonlLog(tmp_path / "x.jsonl")
    assert len(again) == 2 and "c" not in again
    again.append({"key": "c", "v": 3})
    assert [json.loads(l)["key"] for l in open(tmp_path / "x.jsonl")] == ["a", "b", "c"]
