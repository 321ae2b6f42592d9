"""Stage 3, RL with rubric rewards: GRPO where the reward is the judge's 0-7 grade / 7 (notebook 03_rubric_rl).

The stage's steps, in the notebook's order: `load_problems` (rubric_rl.problems after the difficulty filter),
`start_model` (the policy's starting model), `run_stage` (the entry: the saved result when this model was trained
with these settings, else train here or under `accelerate launch` when `rubric_rl.launch.num_processes > 1`),
`stage_metrics` (metrics.json). `train(cfg, run_dir)` is the in-process training step, what each rank of
`python -m qedlib train rubric_rl` runs; the algorithm itself is qedlib.grpo. What the notebook shows (tables, the
judge's view, the format-reward side run) is in qedlib.views.rubric_rl.
Artifacts: 03_rubric_rl/{checkpoints, model, steps.jsonl, train_result.json, metrics.json}.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..files import write_json, write_jsonl
from ..generation import release_trainer
from ..grading import Grader, check_gradable
from ..grpo import (filter_by_difficulty, learning_record, problem_prompts, save_policy, summarise_steps,
                    train_on_problems)
from ..layout import MODEL, RUBRIC_RL, named_model, stage_dir
from ..models import resolve_model
from ..probe import policy_shift
from ..problem_sets import load_source
from ..training import (finish_checkpoints, finish_training, saved_result, start_training, train_elsewhere,
                        trains_elsewhere, changed_frac_since)

STAGE = RUBRIC_RL
PROBE_ITEMS = 8  # completions of the run's first steps scored under the start and the trained policy


def stage_grader(settings, folder: Path) -> Optional[Grader]:
    """The judge that grades this stage's rollouts (None for verifiable rewards); grades cached in the stage folder.
    `settings` is cfg.rubric_rl. Used by `train`."""
    if settings.reward != "judge":
        return None
    return Grader(settings.judge, cache_dir=folder / "judge_cache")


def load_problems(cfg) -> tuple[list, dict]:
    """The stage's problems (`rubric_rl.problems`) after the difficulty filter, and the filter's counts (section
    "Problems")."""
    settings = cfg.rubric_rl
    problems = load_source(settings.problems)
    check_gradable(problems, settings.reward, settings.judge.prompt, str(settings.problems.path),
                   "rubric_rl")  # before any training
    return filter_by_difficulty(problems, settings.min_reward_mean, settings.max_reward_mean)


def start_model(cfg, run_dir) -> str:
    """The model the policy starts from (`rubric_rl.model`: "previous" is the SFT model when stage 02 ran);
    section "The prompt the policy sees"."""
    return resolve_model(named_model(cfg, run_dir, cfg.rubric_rl.model, "rubric_rl"))


def run_stage(cfg, run_dir, params_file: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """The stage's training result (section "Train"): the saved one when its model was trained with these settings,
    else train in this process (`train`) or under `accelerate launch` / as a batch job (`rubric_rl.launch`)."""
    result_file = stage_dir(run_dir, STAGE) / "train_result.json"
    saved = saved_result("rubric_rl", cfg, run_dir, result_file)
    if saved is not None:
        return saved
    start_training("rubric_rl", run_dir, cfg.rubric_rl.launch)
    if trains_elsewhere(cfg.rubric_rl.launch):
        result = train_elsewhere("rubric_rl", cfg.rubric_rl.launch, cfg, run_dir, params_file, overrides or {},
                                 result_file)
    else:
        result = train(cfg, run_dir)
    finish_training("rubric_rl", cfg, run_dir)
    return result


def train(cfg, run_dir, keep_model: bool = True) -> dict:
    """Train the stage in this process (one rank under accelerate) with qedlib.grpo.train_on_problems; every rank
    saves through the trainer, rank 0 writes the step rows and the result. `keep_model=False` (a side run in the
    kernel, which keeps only its step rows and learning record) saves no checkpoint and no model, so there is no
    probe either."""
    settings = cfg.rubric_rl
    folder = stage_dir(run_dir, STAGE)
    problems, counts = load_problems(cfg)
    model_path = start_model(cfg, run_dir)
    t0 = time.perf_counter()
    rows, trainer = train_on_problems(settings, model_path, problems, folder / "checkpoints", cfg.thinking, cfg.seed,
                                      stage_grader(settings, folder), settings.resume, training_device=cfg.device,
                                      save=keep_model)
    metrics = {**summarise_steps(rows), "problems": counts, "seconds": round(time.perf_counter() - t0, 1),
               "model_dir": str(folder / MODEL), "init_model": model_path, "loss_type": settings.loss_type,
               "loss_divisor": trainer.loss_divisor, "world_size": trainer.accelerator.num_processes}
    acc = trainer.accelerator
    write_json(folder / "ranks" / f"rank{acc.process_index}.json",
               {"rank": acc.process_index, "world_size": acc.num_processes, "steps": trainer.state.global_step})
    if keep_model:
        save_policy(trainer, folder / MODEL, settings.lora.merge)
        finish_checkpoints(folder / "checkpoints", settings.keep_checkpoints, folder / MODEL, acc.is_main_process)
    if acc.is_main_process:
        metrics["learning"] = learning_record(rows, settings.reward)
        if keep_model:
            metrics["probe"] = probe_shift(rows, problems, trainer.processing_class, cfg.thinking, model_path,
                                           folder / MODEL)
            # not evidence of learning: Adam moves every weight with any gradient by about lr, whatever the reward
            metrics["weights_changed_frac"] = changed_frac_since(folder / MODEL, model_path)
        write_jsonl(folder / "steps.jsonl", rows)
        write_json(folder / "train_result.json", metrics)
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


def probe_items(rows: list[dict], problems, tokenizer, thinking: bool, n: int = PROBE_ITEMS) -> tuple[list, list]:
    """The fixed probe set: (prompts, completions) of the first `n` recorded rollouts of the run (the first steps'
    GRPO groups, completion excerpts as recorded), each with its problem's prompt as the policy saw it."""
    by_id = {p.id: p for p in problems}
    prompts, completions = [], []
    for r in rows:
        g = r.get("group") or {}
        if g.get("problem_id") not in by_id:
            continue
        prompt = problem_prompts(tokenizer, [by_id[g["problem_id"]]], thinking)[0]["prompt"]
        for c in g["completions"]:
            if c and len(completions) < n:
                prompts.append(prompt)
                completions.append(c)
    return prompts, completions


def probe_shift(rows: list[dict], problems, tokenizer, thinking: bool, start, trained) -> dict | None:
    """`probe.policy_shift` of the trained policy vs its start on `probe_items` (None when no rollout was
    recorded): the evidence that the policy's behaviour moved, in metrics.json as `probe`."""
    prompts, completions = probe_items(rows, problems, tokenizer, thinking)
    if not completions:
        return None
    return policy_shift(str(start), str(trained), prompts, completions)


def stage_metrics(result: dict, steps: list[dict], side_steps: list[dict], side_reward: str) -> dict:
    """metrics.json of the stage (section "Metrics"): the training result (with `learning` and `probe`), the step
    rows logged, and the side run's reward per step and `learning` record (`side_run: {reward, rewards, learning}`)."""
    side = {"reward": side_reward, "rewards": [r["reward"] for r in side_steps],
            "learning": learning_record(side_steps, side_reward)} if side_steps else None
    return {**result, "steps_rows": len(steps), "side_run": side}
