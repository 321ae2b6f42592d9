"""The format-reward run beside the judge reward: section "A reward the model can move" of notebooks 03 and 04.

The same trainer, settings and starting model with `reward: format` (a verifiable reward that depends only
on the policy's own text), trained for a few steps in a temporary folder and drawn next to the judge run.
The stage's `train` is passed in, so this module imports no stage.
"""
from __future__ import annotations

from .plots import curves
from .rl import reward_comparison, side_run


def beside_judge(train, cfg, section: str, model: str, judge_steps: list[dict], format_steps: int) -> tuple[list[dict], object, str]:
    """Train `section` on the format reward for `format_steps` steps (at most the judge run's; 0 skips it):
    (its step rows, the judge-vs-format reward figure, the comparison in words)."""
    steps = side_run(train, cfg, section, reward="format", model=model,
                     max_steps=min(format_steps, getattr(cfg, section).max_steps))[0] if format_steps else []
    rows = ([{"step": r["step"], "judge": r["reward"]} for r in judge_steps]
            + [{"step": r["step"], "format": r["reward"]} for r in steps])
    figure = curves(rows, "step", ["judge", "format"], "Mean reward per step: judge vs format reward", "reward (0-1)")
    return steps, figure, reward_comparison(judge_steps, steps)
