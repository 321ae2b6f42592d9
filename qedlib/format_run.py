"""The format-reward run beside the judge reward: section "A reward the model can move" of notebooks 03 and 04.

The same trainer, settings and starting model with `reward: format` (a verifiable reward that depends only
on the policy's own text), trained for a few steps in a temporary folder and drawn next to the judge run.
It runs the way the stage runs: in the kernel when the stage does, else under the stage's own
`accelerate launch` (its config, processes and weights_dtype), so a side run on gpu-1 keeps fp32 masters.
The stage's `train` is passed in, so this module imports no stage.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from .io import read_jsonl
from .launch import accelerate_train
from .plots import curves
from .rl import reward_comparison, side_run


def needs_launch(launch) -> bool:
    """Whether a stage with this Launch trains under `accelerate launch` (training.train_or_launch's rule)."""
    return launch.num_processes > 1 or bool(launch.accelerate_config)


def launched_side_run(cfg, section: str, params_file: str | Path, overrides: dict, **changes) -> list[dict]:
    """Train `section` with `changes` under the stage's own `accelerate launch` in a temporary run folder: its step rows."""
    sets = {**overrides, **{f"{section}.{k}": v for k, v in changes.items()}, f"{section}.resume": False}
    with tempfile.TemporaryDirectory(prefix="qed-side-run-") as tmp:
        accelerate_train(section, params_file, tmp, sets, getattr(cfg, section).launch)
        return list(read_jsonl(next(Path(tmp).glob("*/steps.jsonl"))))


def format_steps_run(train, cfg, section: str, model: str, max_steps: int, params_file: Optional[str | Path],
                     overrides: Optional[dict]) -> list[dict]:
    """The format-reward run's step rows, trained where the stage trains; refuses a launched stage without its params."""
    changes = {"reward": "format", "model": model, "max_steps": max_steps}
    if not needs_launch(getattr(cfg, section).launch):
        return side_run(train, cfg, section, **changes)[0]
    if params_file is None:
        raise ValueError(f"{section}.launch runs under `accelerate launch` ({getattr(cfg, section).launch}); the format "
                         "run beside it must too: pass params_file and overrides to format_run.beside_judge, or set "
                         "format_steps = 0")
    return launched_side_run(cfg, section, params_file, overrides or {}, **changes)


def beside_judge(train, cfg, section: str, model: str, judge_steps: list[dict], format_steps: int,
                 params_file: Optional[str | Path] = None, overrides: Optional[dict] = None
                 ) -> tuple[list[dict], object, str]:
    """Train `section` on the format reward for `format_steps` steps (at most the judge run's; 0 skips it), the way
    the stage trains: (its step rows, the judge-vs-format reward figure, the comparison in words)."""
    steps = format_steps_run(train, cfg, section, model, min(format_steps, getattr(cfg, section).max_steps),
                             params_file, overrides) if format_steps else []
    rows = ([{"step": r["step"], "judge": r["reward"]} for r in judge_steps]
            + [{"step": r["step"], "format": r["reward"]} for r in steps])
    figure = curves(rows, "step", ["judge", "format"], "Mean reward per step: judge vs format reward", "reward (0-1)")
    return steps, figure, reward_comparison(judge_steps, steps)
