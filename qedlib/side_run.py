"""A training stage run again with changed settings in a temporary run folder, deleted afterwards.

Notebooks 03 and 04 train their stage a second time on another reward (03: the judge beside the cheap opening
grader, or the other way round; 04: the format reward) and draw it beside the stage's run. Each view calls its own stage's `train` on `changed(cfg, ...)` inside
`temporary_run()` when the stage trains in the kernel, and `launched(...)` when the stage trains under
`accelerate launch` (its own config, processes and weights_dtype, so a side run on gpu-1 keeps fp32 masters).
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from .files import read_jsonl
from .launch import accelerate_train


def changed(cfg, section: str, **changes):
    """`cfg` with `changes` applied to `section` and resume off (a side run never continues another run). Pass `model`
    as a path so the temporary folder needs no earlier stage."""
    return replace(cfg, **{section: replace(getattr(cfg, section), resume=False, **changes)})


@contextmanager
def temporary_run() -> Iterator[Path]:
    """A run folder that is deleted on leaving the block."""
    with tempfile.TemporaryDirectory(prefix="qed-side-run-") as tmp:
        yield Path(tmp)


def step_rows(run_dir: str | Path) -> list[dict]:
    """The step rows a training stage wrote in `run_dir` (its only stage folder)."""
    return list(read_jsonl(next(Path(run_dir).glob("*/steps.jsonl"))))


def launched(cfg, section: str, params_file: str | Path | None, overrides: dict | None, **changes) -> list[dict]:
    """Train `section` with `changes` under the stage's own `accelerate launch` in a temporary run folder: its step
    rows. The launched processes read the params file, so a notebook must pass its `params_file` and `overrides`."""
    if params_file is None:
        raise ValueError(f"{section}.launch runs under `accelerate launch` ({getattr(cfg, section).launch}); a side run "
                         "beside it must too: pass params_file and overrides, or set the notebook's side-run steps to 0")
    sets = {**(overrides or {}), **{f"{section}.{k}": v for k, v in changes.items()}, f"{section}.resume": False}
    with temporary_run() as tmp:
        accelerate_train(section, params_file, tmp, sets, getattr(cfg, section).launch)
        return step_rows(tmp)
