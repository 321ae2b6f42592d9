"""Stage 4, RL with a reasoning cache: GRPO on single-turn groups rolled out from RC cache states.

Used by notebooks/04_reasoning_cache_rl.ipynb. Per step and problem: build one RC trajectory
with the current policy (qedlib.reasoning_cache.rc_rollout, the same function the eval
scaffold uses), take its N+1 cache-state prompts, sample K of them, roll out G fresh completions
from each, grade each against the ORIGINAL problem and rubric, and train exactly as stage 3
(qedlib.rl). Summaries are not trained on. This runs inside TRL as its `rollout_func`.

Dataset layout: each problem appears K times in a row (one row per sampled state, "slot"), the
sampler does not shuffle across them, so one step's batch holds whole trajectories.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

from .config import Endpoint, Sampling
from .data import load_source
from .grading import check_gradable
from .generation import (TransformersGenerator, VLLMGenerator, close_generator, make_generator, release_trainer,
                         render_prompt, run_sync)
from .io import write_json, write_jsonl
from .models import resolve_model
from .reasoning_cache import cache_state_prompts, rc_rollout, summary_unclosed_rate
from .rl import sharded
from .layout import MODEL, RC_RL, checkpoint, stage_dir

STAGE = RC_RL


def sample_states(n_states: int, k: int, rng: random.Random) -> list[int]:
    """K distinct cache-state indices out of N+1 (sorted), or all of them when K >= N+1."""
    return sorted(rng.sample(range(n_states), min(k, n_states)))


class RCRollout:
    """TRL rollout_func: RC trajectories with the current policy, then G rollouts per sampled state."""

    def __init__(self, rl, problems: dict, thinking: bool, summariser=None, grader=None, seed: int = 0):
        self.rl, self.problems, self.thinking = rl, problems, thinking
        self.summariser, self.grader, self.seed = summariser, grader, seed
        self.turn_rows: list[dict] = []  # per step and turn: score, truncation, summary length
        self.trajectories: list[dict] = []  # the latest step's trajectories, for the notebook
        self.timing: list[dict] = []

    def policy_generator(self, trainer):
        """The current policy as a generator: TRL's colocated vLLM engine when `use_vllm` (TRL syncs the
        trained weights into it before each rollout), else our transformers generator around the
        model being trained (no copy)."""
        if getattr(trainer, "use_vllm", False):
            vg = trainer.vllm_generation
            if vg.mode != "colocate":
                raise ValueError("rc_rl with rl.use_vllm needs rl.vllm_mode: colocate: the RC loop makes several "
                                 "calls per step with their own token budgets, which TRL's vllm-serve client "
                                 "does not offer here; use colocate, or use_vllm: false")
            if getattr(vg, "enable_sleep_mode", False):
                raise ValueError("rc_rl with rl.use_vllm does not support vLLM sleep mode (the engine's weights "
                                 "are discarded between steps); set vllm_enable_sleep_mode off")
            return VLLMGenerator(Endpoint(backend="vllm", model="policy"), llm=vg.llm,
                                 tokenizer=trainer.processing_class)
        model = trainer.accelerator.unwrap_model(trainer.model)
        ep = Endpoint(batch_size=self.rl.rollout_batch_size, static_cache=self.rl.static_cache)
        gen = TransformersGenerator(ep, model=model, tokenizer=trainer.processing_class)
        gen.synced_gpus = sharded(trainer)
        return gen

    def __call__(self, prompts: list, trainer) -> dict:
        t0 = time.perf_counter()
        G, step = self.rl.num_generations, trainer.state.global_step
        runs = [prompts[i] for i in range(0, len(prompts), G)]  # one run of G identical prompts per slot
        order = list(dict.fromkeys(runs))  # unique problems, in batch order
        pids = [self.prompt_to_id[p] for p in order]
        probs = [self.problems[pid] for pid in pids]
        policy = self.policy_generator(trainer)
        model = getattr(policy, "model", None)  # None for vLLM: the trained model is not used to generate
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            summariser = self.summariser or policy
            sampling = Sampling(temperature=self.rl.temperature, top_p=self.rl.top_p, top_k=0)
            trajs = rc_rollout(probs, policy, summariser, self.rl.rc, sampling, self.thinking,
                               seed=self.seed * 100_003 + step, final_summary=True)
            t_traj = time.perf_counter() - t0
            chosen = {}
            for pid, prob, traj in zip(pids, probs, trajs):
                states = cache_state_prompts(prob, traj)
                rng = random.Random(f"{self.seed}-{step}-{pid}")
                chosen[pid] = [states[i] for i in sample_states(len(states), self.rl.states_per_trajectory, rng)]
            slot_of: dict = {}
            texts = []
            for p in runs:
                pid = self.prompt_to_id[p]
                k = slot_of.get(pid, 0)
                slot_of[pid] = k + 1
                msgs = chosen[pid][k % len(chosen[pid])]
                texts.append(render_prompt(policy.tokenizer, msgs, self.thinking))
            outs = policy.generate_text(texts, Sampling(temperature=self.rl.temperature, top_p=self.rl.top_p, top_k=0,
                                                        max_new_tokens=self.rl.max_completion_length, n=G),
                                        self.thinking, logprobs=True)
        finally:
            if model is not None:
                model.train(was_training)
        self._record(step, probs, trajs)
        tok = policy.tokenizer
        prompt_ids, completion_ids, logprobs = [], [], []
        for text, group in zip(texts, outs):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for c in group:
                prompt_ids.append(ids)
                completion_ids.append(c.token_ids)
                logprobs.append(c.token_logprobs)  # the sampler's, for the PPO ratio (rl.ratio_logprobs: sampler)
        self.timing.append({"step": step, "trajectory_s": round(t_traj, 2),
                            "rollout_s": round(time.perf_counter() - t0 - t_traj, 2)})
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    def _record(self, step: int, probs, trajs) -> None:
        finals = [[s.final for s in t] for t in trajs]
        closed = [[s.think_closed for s in t] for t in trajs]
        grades = None
        if self.grader is not None:
            flat_p = [p for p, t in zip(probs, trajs) for _ in t]
            grades = run_sync(self.grader.agrade(flat_p, [f for fs in finals for f in fs],
                                                 [c for cs in closed for c in cs]))
        i = 0
        self.trajectories = []
        for p, t in zip(probs, trajs):
            for s in t:
                g = grades[i] if grades else None
                i += 1
                self.turn_rows.append({"step": step, "problem_id": p.id, "turn": s.turn,
                                       "score": g.points if g is not None and g.valid else None,
                                       "truncated": not s.think_closed, "reasoning_tokens": s.completion_tokens,
                                       "summary_tokens": s.summary_tokens, "summary_status": s.summary_status})
            self.trajectories.append({"problem_id": p.id, "turns": [s.to_dict() for s in t]})


def problem_slots(tokenizer, problems, k: int, thinking: bool):
    """Dataset with each problem K times in a row (prompt = its turn-0 RC prompt, for logging)."""
    from datasets import Dataset
    from .reasoning_cache import reasoning_messages
    rows = []
    for p in problems:
        text = render_prompt(tokenizer, reasoning_messages(p.problem, ""), thinking)
        rows += [{"prompt": text, "problem_id": p.id}] * k
    return Dataset.from_list(rows)


def load_problems(cfg) -> tuple[list, dict]:
    """The stage's problems (`rc_rl.problems`) after the difficulty filter, and the filter's counts."""
    from .rl import filter_by_difficulty
    rl = cfg.rc_rl
    problems = load_source(rl.problems)
    check_gradable(problems, rl.reward, rl.judge.prompt, str(rl.problems.path), "rc_rl")  # before any training
    return filter_by_difficulty(problems, rl.min_reward_mean, rl.max_reward_mean)


def start_model(cfg, run_dir) -> str:
    """The model the policy starts from (`rc_rl.model`: "previous" is the rubric-RL model when stage 03 ran)."""
    return resolve_model(checkpoint(cfg, run_dir, cfg.rc_rl.model, "rc_rl"))


def judge_grader(rl, folder: Path):
    """The judge of `rc_rl.judge`, its grades cached in the stage folder (the reward's and the notebook's)."""
    from .grading import Grader
    return Grader(rl.judge, cache_dir=Path(folder) / "judge_cache")


def train(cfg, run_dir) -> dict:
    """Train RC-RL in this process (one rank under accelerate); every rank saves through the trainer,
    rank 0 writes the metrics."""
    from transformers import AutoTokenizer
    from .rl import RewardFunction, grpo_args, make_trainer, save_policy, step_metrics, summarise_steps, vllm_context
    from .training import finish_checkpoints, last_checkpoint, weights_moved
    rl = cfg.rc_rl
    folder = stage_dir(run_dir, STAGE)
    problems, counts = load_problems(cfg)
    by_id = {p.id: p for p in problems}
    model_path = start_model(cfg, run_dir)
    tok = AutoTokenizer.from_pretrained(model_path)
    # Shuffle problems ourselves (seeded); TRL must not shuffle, so a problem's K slots stay together.
    random.Random(cfg.seed).shuffle(problems)
    dataset = problem_slots(tok, problems, rl.states_per_trajectory, cfg.thinking)
    grader = judge_grader(rl, folder) if rl.reward == "judge" else None
    summariser = None
    if rl.rc.summariser == "frozen":
        summariser = make_generator(rl.rc.summariser_endpoint)
    rollout = RCRollout(rl, by_id, cfg.thinking, summariser, grader, cfg.seed)
    rollout.prompt_to_id = {row["prompt"]: row["problem_id"] for row in dataset}
    reward_fn = RewardFunction(rl.reward, by_id, cfg.thinking, grader, rl.judge.invalid,
                               rl.max_completion_length, rl.overlong_penalty, rl.num_generations, rl.max_invalid_rate,
                               "rc_rl")
    # A cache-state prompt carries one summary (all of them when accumulating) on top of the turn-0 prompt.
    grow = rl.rc.summary.max_new_tokens * (rl.rc.turns if rl.rc.accumulate else 1) + 256
    context = vllm_context(tok, dataset["prompt"], rl, grow) if rl.use_vllm else None
    args = grpo_args(replace(rl, shuffle=False), folder / "checkpoints", cfg.seed, None, cfg.device, context)
    if args.per_device_train_batch_size * args.gradient_accumulation_steps % (rl.states_per_trajectory * rl.num_generations):
        raise ValueError("rc_rl: prompts_per_step x num_generations must hold whole trajectories "
                         "(a multiple of states_per_trajectory x num_generations)")
    t0 = time.perf_counter()
    trainer = make_trainer(rl, model_path, dataset, [reward_fn], args, rollout_func=rollout)
    trainer.train(resume_from_checkpoint=last_checkpoint(folder / "checkpoints") if rl.resume else None)
    rows = step_metrics(trainer, reward_fn)
    for r, t in zip(rows, rollout.timing):
        r.update({k: v for k, v in t.items() if k != "step"})  # keep TRL's 1-based step; the rollout counts from 0
        r["summary_unclosed_rate"] = summary_unclosed_rate(x["summary_status"] for x in rollout.turn_rows
                                                           if x["step"] == t["step"])
    metrics = {**summarise_steps(rows), "problems": counts, "seconds": round(time.perf_counter() - t0, 1),
               "model_dir": str(folder / MODEL), "init_model": model_path, "loss_type": rl.loss_type,
               "loss_divisor": trainer.loss_divisor, "world_size": trainer.accelerator.num_processes,
               "score_by_turn": score_by_turn(rollout.turn_rows),
               "summary_unclosed_rate": summary_unclosed_rate(r["summary_status"] for r in rollout.turn_rows)}
    save_policy(trainer, folder / MODEL, rl.lora.merge)
    finish_checkpoints(folder / "checkpoints", rl.keep_checkpoints, folder / MODEL, trainer.accelerator.is_main_process)
    if trainer.accelerator.is_main_process:
        metrics["weights_changed_frac"] = weights_moved(folder / MODEL, model_path)
        write_jsonl(folder / "steps.jsonl", rows)
        write_jsonl(folder / "turns.jsonl", rollout.turn_rows)
        write_json(folder / "trajectories_last_step.json", rollout.trajectories)
        write_json(folder / "train_result.json", metrics)
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


def score_by_turn(turn_rows: list[dict]) -> dict:
    """Mean judge score, truncation rate and summary length per RC turn."""
    out = {}
    for t in sorted({r["turn"] for r in turn_rows}):
        rows = [r for r in turn_rows if r["turn"] == t]
        scores = [r["score"] for r in rows if r["score"] is not None]
        out[str(t)] = {"score_mean": sum(scores) / len(scores) if scores else None,
                       "truncation_rate": sum(r["truncated"] for r in rows) / len(rows),
                       "summary_tokens": sum(r["summary_tokens"] for r in rows) / len(rows), "n": len(rows),
                       "summary_unclosed_rate": summary_unclosed_rate(r.get("summary_status", "") for r in rows)}
    return out


def state_view(trajectories: list[dict], problems, tokenizer, thinking: bool) -> dict:
    """One worked RC example from the last step's trajectories: the full rendered prompt of the first cache
    state that carries a summary (else turn 0's), and the summariser's prompt and summary of the turn before it."""
    from types import SimpleNamespace
    from .reasoning_cache import _attempt_text, reasoning_messages, summary_messages
    if not trajectories:
        raise ValueError("no trajectories recorded (trajectories_last_step.json is empty): rerun the stage")
    by_id = {p.id: p for p in problems}
    with_summary = [(tr, t) for tr in trajectories for t in tr["turns"] if t["summary_out"]]
    traj, src = with_summary[0] if with_summary else (trajectories[0], trajectories[0]["turns"][0])
    prob = by_id[traj["problem_id"]]
    state = reasoning_messages(prob.problem, src["summary_out"])
    attempt = _attempt_text(SimpleNamespace(**src, text=src["reasoning"]))
    caption = (f"Turn {src['turn']} of `{prob.id}`: its summary (status {src['summary_status']}) is the cache "
               f"state above:\n\n> {src['summary_out']}" if src["summary_out"] else
               f"No summary of the last step was usable (turn {src['turn']} of `{prob.id}`: status "
               f"{src['summary_status'] or 'none'}), so every cache state is the first prompt again.")
    return {"problem_id": prob.id, "turn": src["turn"], "summary_status": src["summary_status"],
            "state_prompt": render_prompt(tokenizer, state, thinking), "caption": caption,
            "summariser_prompt": summary_messages(prob.problem, src["summary_in"], attempt)[0]["content"],
            "summary": src["summary_out"]}


def findings(steps: list[dict], metrics: dict, rl) -> str:
    """Stage 3's findings for this run (qedlib.rl.findings) plus the reasoning cache's own: unclosed summaries
    and the score per turn."""
    from .rl import findings as rl_findings
    out = [rl_findings(steps, metrics, rl)]
    rate = metrics.get("summary_unclosed_rate")
    if rate is not None:
        out.append(f"- **Summaries.** {rate:.0%} of summaries never closed their thinking within "
                   f"{rl.rc.summary.max_new_tokens:,} tokens; such a summary is not used and the previous cache "
                   "state is kept, so those turns restart from the same prompt.")
    by_turn = {t: v for t, v in (metrics.get("score_by_turn") or {}).items() if v.get("score_mean") is not None}
    if by_turn:
        scores = ", ".join(f"turn {t}: {v['score_mean']:.2f}" for t, v in by_turn.items())
        out.append(f"- **By turn** (judge score 0-7 during training): {scores}. RC helps when a later turn, starting "
                   "from the summary, scores higher than the first.")
    return "\n".join(out)


def run(cfg, run_dir, params_file: str, overrides: dict) -> dict:
    """Train in-process, or launch `accelerate` with num_processes > 1; return the metrics."""
    from .training import train_or_launch
    return train_or_launch("rc_rl", cfg.rc_rl.launch, train, cfg, run_dir, params_file, overrides,
                           stage_dir(run_dir, STAGE) / "train_result.json")


def inspect_trajectories(cfg, model_ref: str, problems, grader=None, seed: int = 0) -> list[dict]:
    """Run RC with a model on a few problems and grade every turn: one row per (problem, turn).

    Its engines (policy, frozen summariser) are closed before it returns, even on an error: on one GPU the
    training that follows needs the memory a vLLM engine holds (0.45 of the GPU in gpu-1)."""
    rl = cfg.rc_rl
    policy = make_generator(replace(cfg.generation, model=resolve_model(model_ref)))
    summariser = policy
    try:
        if rl.rc.summariser == "frozen":
            summariser = make_generator(rl.rc.summariser_endpoint)
        sampling = Sampling(temperature=rl.temperature, top_p=rl.top_p)
        trajs = rc_rollout(problems, policy, summariser, rl.rc, sampling, cfg.thinking, seed=seed)
    finally:
        for engine in {id(g): g for g in (policy, summariser)}.values():
            close_generator(engine)
    flat = [(p, s) for p, t in zip(problems, trajs) for s in t]
    grades = grader.grade([p for p, _ in flat], [s.final for _, s in flat], [s.think_closed for _, s in flat]) \
        if grader is not None else [None] * len(flat)
    return [{"problem_id": p.id, "turn": s.turn, "score": g.points if g is not None and g.valid else None,
             "truncated": not s.think_closed, "reasoning": s.reasoning[:400], "proof": s.final[:400],
             "summary": s.summary_out[:400], "tokens": s.completion_tokens + s.summary_tokens}
            for (p, s), g in zip(flat, grades)]


def demo_problems(problems, rl) -> list:
    """The problems the notebook follows before and after training: one step's worth (`prompts_per_step`)."""
    return problems[: rl.prompts_per_step]


def worked_state(cfg, stage_folder, problems, model_path: str) -> dict:
    """`state_view` of the last training step's trajectories (trajectories_last_step.json), rendered with the
    chat template of the model the policy started from."""
    from transformers import AutoTokenizer
    from .io import read_json
    trajectories = read_json(Path(stage_folder) / "trajectories_last_step.json")
    return state_view(trajectories, problems, AutoTokenizer.from_pretrained(model_path), cfg.thinking)


def turn_table(before: list[dict], after: list[dict]):
    """Mean score, truncation and tokens per (model, turn) of `inspect_trajectories` rows before and after
    training; a turn with no valid grade has score None (JSON has no NaN)."""
    import pandas as pd
    table = (pd.concat([pd.DataFrame(before).assign(model="before"), pd.DataFrame(after).assign(model="after")])
             .groupby(["model", "turn"]).agg(score=("score", "mean"), truncated=("truncated", "mean"),
                                             tokens=("tokens", "mean")).reset_index().astype(object))
    return table.where(table.notna(), None)


def turn_figure(table):
    """Bars of the mean score (0-7) per model and turn of `turn_table`."""
    from .plots import bars
    return bars([f"{m} t{t}" for m, t in zip(table.model, table.turn)], list(table.score), "Mean score (0-7) by turn")


def tokens_per_trajectory(rows: list[dict]) -> float:
    """Mean tokens per RC trajectory (every turn's reasoning and summary) over the problems of `rows`."""
    import pandas as pd
    return float(pd.DataFrame(rows).groupby("problem_id").tokens.sum().mean())


def tokens_finding(tokens: float, rl) -> str:
    """The tokens of one RC trajectory against one single pass with the same per-turn budget, in words."""
    return (f"Tokens per RC trajectory: {tokens:.0f}, against at most {rl.rc.reasoning_budget} for one single pass "
            "with the same per-turn budget: RC spends more tokens in bounded pieces.")


def stage_metrics(result: dict, table, tokens: float, format_steps: list[dict]) -> dict:
    """metrics.json of the stage: the training result, the score by turn after training, the tokens per
    trajectory and the format run's rewards."""
    return {**result, "score_by_turn_after": table[table.model == "after"].to_dict(orient="records"),
            "tokens_per_trajectory": float(tokens), "format_reward_steps": [r["reward"] for r in format_steps]}
