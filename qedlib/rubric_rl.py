"""Stage 3, RL with rubric rewards: GRPO where the reward is the judge's 0-7 grade / 7.

Used by notebooks/03_rubric_rl.ipynb. `run(...)` trains in the notebook's process, or through
`accelerate launch` (qedlib.launch) when `rubric_rl.launch.num_processes > 1`; each process
calls `train`. Artifacts: 03_rubric_rl/{checkpoints, model, steps.jsonl, metrics.json}.
"""
from __future__ import annotations

import time
from pathlib import Path

from .data import load_source
from .io import stage_dir, write_json, write_jsonl
from .models import resolve_model
from .runner import checkpoint

STAGE = "03_rubric_rl"


def filter_by_difficulty(problems, min_reward_mean=None, max_reward_mean=None) -> tuple[list, dict]:
    """Drop hopeless / too-easy problems by the base model's mean reward (FineProofs-RL `reward_mean`)."""
    counts = {"loaded": len(problems), "too_easy": 0, "hopeless": 0, "no_reward_mean": 0}
    if min_reward_mean is None and max_reward_mean is None:
        return problems, {**counts, "kept": len(problems)}
    kept = []
    for p in problems:
        rm = p.extra.get("reward_mean")
        if rm is None:
            counts["no_reward_mean"] += 1
            kept.append(p)
        elif max_reward_mean is not None and rm > max_reward_mean:
            counts["too_easy"] += 1
        elif min_reward_mean is not None and rm < min_reward_mean:
            counts["hopeless"] += 1
        else:
            kept.append(p)
    return kept, {**counts, "kept": len(kept)}


def make_grader(rl, folder: Path):
    """The judge for the reward (None for verifiable rewards); grades cached in the stage folder."""
    if rl.reward != "judge":
        return None
    from .grading import Grader
    return Grader(rl.judge, cache_dir=folder / "judge_cache")


def train(cfg, run_dir) -> dict:
    """Train the stage in this process (one rank under accelerate); rank 0 saves model and metrics."""
    from .rl import save_policy, summarise_steps, train_on_problems
    rl = cfg.rubric_rl
    folder = stage_dir(run_dir, STAGE)
    problems, counts = filter_by_difficulty(load_source(rl.problems), rl.min_reward_mean, rl.max_reward_mean)
    model_path = resolve_model(checkpoint(cfg, run_dir, rl.model))
    t0 = time.perf_counter()
    rows, trainer = train_on_problems(rl, model_path, problems, folder / "checkpoints", cfg.thinking, cfg.seed,
                                      make_grader(rl, folder), rl.resume, rl.launch.num_processes)
    metrics = {**summarise_steps(rows), "problems": counts, "seconds": round(time.perf_counter() - t0, 1),
               "model_dir": str(folder / "model"), "init_model": model_path, "loss_type": rl.loss_type}
    acc = trainer.accelerator
    write_json(folder / "ranks" / f"rank{acc.process_index}.json",
               {"rank": acc.process_index, "world_size": acc.num_processes, "steps": trainer.state.global_step})
    if acc.is_main_process:
        save_policy(trainer, folder / "model", rl.lora.merge)
        write_jsonl(folder / "steps.jsonl", rows)
        write_json(folder / "train_result.json", metrics)
    return metrics


def run(cfg, run_dir, params_file: str, overrides: dict) -> dict:
    """Train in-process, or launch `accelerate` with num_processes > 1; return the metrics."""
    from .rl import train_or_launch
    return train_or_launch("rubric_rl", cfg.rubric_rl.launch, train, cfg, run_dir, params_file, overrides,
                           stage_dir(run_dir, STAGE) / "train_result.json")
