"""Stage 3, RL with rubric rewards: GRPO where the reward is the judge's 0-7 grade / 7.

Used by notebooks/03_rubric_rl.ipynb. `run(...)` trains in the notebook's process, or through
`accelerate launch` (qedlib.launch) when `rubric_rl.launch.num_processes > 1`; each process
calls `train`. Artifacts: 03_rubric_rl/{checkpoints, model, steps.jsonl, metrics.json}.
"""
from __future__ import annotations

import time
from pathlib import Path

from .data import load_source
from .grading import check_gradable
from .generation import release_trainer
from .io import write_json, write_jsonl
from .models import resolve_model
from .layout import MODEL, RUBRIC_RL, checkpoint, stage_dir

STAGE = RUBRIC_RL


def make_grader(rl, folder: Path):
    """The judge for the reward (None for verifiable rewards); grades cached in the stage folder."""
    if rl.reward != "judge":
        return None
    from .grading import Grader
    return Grader(rl.judge, cache_dir=folder / "judge_cache")


def load_problems(cfg) -> tuple[list, dict]:
    """The stage's problems (`rubric_rl.problems`) after the difficulty filter, and the filter's counts."""
    from .rl import filter_by_difficulty
    rl = cfg.rubric_rl
    problems = load_source(rl.problems)
    check_gradable(problems, rl.reward, rl.judge.prompt, str(rl.problems.path), "rubric_rl")  # before any training
    return filter_by_difficulty(problems, rl.min_reward_mean, rl.max_reward_mean)


def start_model(cfg, run_dir) -> str:
    """The model the policy starts from (`rubric_rl.model`: "previous" is the SFT model when stage 02 ran)."""
    return resolve_model(checkpoint(cfg, run_dir, cfg.rubric_rl.model, "rubric_rl"))


def problems_table(problems, n: int = 8):
    """The first problems as a table: id, category and the opening of the statement."""
    import pandas as pd
    return pd.DataFrame([{"id": p.id, "category": p.category, "problem": p.problem[:90]} for p in problems]).head(n)


def first_prompt(model_path: str, problems, thinking: bool) -> str:
    """The first problem's prompt exactly as the policy sees it (chat template included)."""
    from transformers import AutoTokenizer
    from .rl import problem_prompts
    return problem_prompts(AutoTokenizer.from_pretrained(model_path), problems[:1], thinking)[0]["prompt"]


def stage_metrics(result: dict, steps: list[dict], format_steps: list[dict]) -> dict:
    """metrics.json of the stage: the training result, the step rows logged, and the format run's rewards."""
    return {**result, "steps_rows": len(steps), "format_reward_steps": [r["reward"] for r in format_steps]}


def train(cfg, run_dir) -> dict:
    """Train the stage in this process (one rank under accelerate); every rank saves through the trainer,
    rank 0 writes the metrics."""
    from .rl import save_policy, summarise_steps, train_on_problems
    from .training import finish_checkpoints, weights_moved
    rl = cfg.rubric_rl
    folder = stage_dir(run_dir, STAGE)
    problems, counts = load_problems(cfg)
    model_path = start_model(cfg, run_dir)
    t0 = time.perf_counter()
    rows, trainer = train_on_problems(rl, model_path, problems, folder / "checkpoints", cfg.thinking, cfg.seed,
                                      make_grader(rl, folder), rl.resume, training_device=cfg.device)
    metrics = {**summarise_steps(rows), "problems": counts, "seconds": round(time.perf_counter() - t0, 1),
               "model_dir": str(folder / MODEL), "init_model": model_path, "loss_type": rl.loss_type,
               "loss_divisor": trainer.loss_divisor, "world_size": trainer.accelerator.num_processes}
    acc = trainer.accelerator
    write_json(folder / "ranks" / f"rank{acc.process_index}.json",
               {"rank": acc.process_index, "world_size": acc.num_processes, "steps": trainer.state.global_step})
    save_policy(trainer, folder / MODEL, rl.lora.merge)
    finish_checkpoints(folder / "checkpoints", rl.keep_checkpoints, folder / MODEL, acc.is_main_process)
    if acc.is_main_process:
        metrics["weights_changed_frac"] = weights_moved(folder / MODEL, model_path)
        write_jsonl(folder / "steps.jsonl", rows)
        write_json(folder / "train_result.json", metrics)
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


def judge_view(cfg, problems, steps: list[dict]) -> tuple[str, str, str]:
    """(problem id, its rubric, the judge prompt) for the first recorded rollout that had a proof to grade, or
    for the first rollout's text when none had one (no judge call was then made: the reward was 0)."""
    from .grading import build_prompt
    groups = [r["group"] for r in steps if r.get("group")]
    if not groups:
        raise ValueError("no step recorded a group: rerun the stage (steps.jsonl predates group records)")
    g = next((g for g in groups if any(g.get("proofs", []))), groups[0])
    proof = next((p for p in g.get("proofs", []) if p), g["completions"][0])
    by_id = {p.id: p for p in problems}
    if g["problem_id"] not in by_id:
        raise KeyError(f"problem {g['problem_id']!r} of the step records is not in rubric_rl.problems")
    prob = by_id[g["problem_id"]]
    return prob.id, prob.rubric, build_prompt(cfg.rubric_rl.judge.prompt, cfg.rubric_rl.judge.mode, prob, proof).text


def run(cfg, run_dir, params_file: str, overrides: dict) -> dict:
    """Train in-process, or launch `accelerate` with num_processes > 1; return the metrics."""
    from .training import train_or_launch
    return train_or_launch("rubric_rl", cfg.rubric_rl.launch, train, cfg, run_dir, params_file, overrides,
                           stage_dir(run_dir, STAGE) / "train_result.json")
