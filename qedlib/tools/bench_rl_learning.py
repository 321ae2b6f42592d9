"""Benchmark `rl-learning` (python -m qedlib bench rl-learning): does GRPO raise a learnable reward?

GRPO through qedlib.grpo on the verifiable format reward with the embedded model; prints the
reward curve and returns the first-5 vs last-5 steps headline.
"""
from __future__ import annotations

import tempfile
import time

from ..tables import markdown_table as table
from ..config import RLConfig
from ..problem_sets import load_problems
from ..models import resolve_model
from ..grpo import summarise_steps, train_on_problems


def run(model: str = "smollm2-135m", steps: int = 30, lr: float = 1.0e-4) -> str:
    """GRPO on the verifiable format reward with the embedded model: does the reward go up?

    Learning-check settings, not the paper's: a higher lr (1e-4) and grad clip 1.0 so that 30
    steps of 2 problems x 8 rollouts of 16 tokens can move a 135M model.
    """
    rl = RLConfig(num_generations=8, prompts_per_step=2, max_steps=steps, max_completion_length=16, lr=lr,
                  max_grad_norm=1.0, reward="format", temperature=1.0, save_steps=10_000)
    probs = load_problems("shipped", split="train")
    out = tempfile.mkdtemp(prefix="qed-rl-bench-")
    t0 = time.perf_counter()
    rows, _ = train_on_problems(rl, resolve_model(model), probs, out, thinking=False, seed=0)
    dt = time.perf_counter() - t0
    print(table(["step", "reward", "reward std", "entropy", "grad norm"],
                [[r["step"], round(r["reward"], 3), round(r["reward_std"] or 0, 3), round(r["entropy"] or 0, 3),
                  round(r["grad_norm"] or 0, 3)] for r in rows]))
    s = summarise_steps(rows, tail=5)
    return (f"format reward {s['reward_first']:.2f} (first 5 steps) -> {s['reward_last']:.2f} (last 5) "
            f"in {steps} steps, {dt / steps:.1f} s/step, {model}")
