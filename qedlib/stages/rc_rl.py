"""Stage 4, RL with a reasoning cache: what notebook 04 computes (its problems, RC trajectories, training, metrics).

Used by notebooks/04_reasoning_cache_rl.ipynb, whose views are in qedlib.views.rc_rl. Per step and problem: build
one RC trajectory with the current policy (qedlib.reasoning_cache.rc_rollout, the same function the eval scaffold
uses), take its N+1 cache-state prompts, sample K of them, roll out G fresh completions from each, grade each against
the ORIGINAL problem and rubric, and train exactly as stage 3 (qedlib.grpo). Summaries are not trained on. This runs
inside TRL as its `rollout_func`.

Dataset layout: each problem appears K times in a row (one row per sampled state, "slot"), the sampler does not
shuffle across them, so one step's batch holds whole trajectories.

The entry is `run_stage(cfg, run_dir)`; its steps, in the notebook's order: load_problems, start_model, stage_grader,
demo_problems, rc_engines, inspect_trajectories, train (sample_states, RCRollout, GroupMeansReward, problem_slots, score_by_turn,
learning, probe_set), check_problems, reward_check, tokens_per_trajectory, stage_metrics.
"""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..config import Endpoint, Sampling
from ..files import write_json, write_jsonl
from ..generation import (THINK_CLOSE, TransformersGenerator, VLLMGenerator, close_generator, make_generator, release_trainer,
                          render_prompt, run_sync)
from ..grading import Grader, check_gradable
from ..grpo import (RewardFunction, filter_by_difficulty, finite_mean, grpo_args, learning_record, make_trainer, save_policy, sharded, step_metrics,
                    summarise_steps, vllm_context)
from ..layout import MODEL, RC_RL, named_model, stage_dir
from ..models import resolve_model
from ..probe import policy_shift
from ..problem_sets import load_source
from ..reasoning_cache import (cache_state_prompts, rc_rollout, reasoning_messages, summary_cut_rate,
                               summary_unclosed_rate)
from ..stats import bootstrap_ci, learning_gain, verdict
from ..training import (finish_checkpoints, finish_training, last_checkpoint, saved_result, start_training,
                        train_elsewhere, trains_elsewhere, changed_frac_since)

STAGE = RC_RL


# ---------------------------------------------------------------- the stage's inputs (notebook 04, first sections)
def load_problems(cfg) -> tuple[list, dict]:
    """The stage's problems (`rc_rl.problems`) after the difficulty filter, and the filter's counts."""
    settings = cfg.rc_rl
    problems = load_source(settings.problems)
    # refuse problems the reward cannot grade before any training
    check_gradable(problems, settings.reward, settings.judge.prompt, str(settings.problems.path), "rc_rl")
    return filter_by_difficulty(problems, settings.min_reward_mean, settings.max_reward_mean)


def start_model(cfg, run_dir) -> str:
    """The model the policy starts from (`rc_rl.model`: "previous" is the rubric-RL model when stage 03 ran). A
    relative folder that does not exist from here is read from the repository root, where `python -m qedlib run` is
    started (the notebook's kernel runs in notebooks/): `--set rc_rl.model=outputs/cpu/03_rubric_rl/model` starts a
    Try-it run from another run's stage 03."""
    return resolve_model(named_model(cfg, run_dir, cfg.rc_rl.model, "rc_rl"))


def stage_grader(settings, folder: Path) -> Grader:
    """The grader of this stage: the judge of `rc_rl.judge`, its grades cached in the stage folder (the reward's and
    the notebook's)."""
    return Grader(settings.judge, cache_dir=Path(folder) / "judge_cache")


def demo_problems(problems, settings) -> list:
    """The problems notebook 04 follows before and after training: one step's worth (a step's `prompts_per_step`
    cache states come from prompts_per_step / states_per_trajectory problems)."""
    return problems[: max(1, settings.prompts_per_step // settings.states_per_trajectory)]


@contextmanager
def rc_engines(cfg, model_ref: str):
    """(policy, summariser) generators for RC outside training: `model_ref` as the policy and, with
    `rc.summariser: frozen`, the frozen summariser (else the policy summarises itself). Both are closed on leaving
    the block, even on an error: on one GPU the training that follows needs the memory a vLLM engine holds (0.45 of
    the GPU in gpu-1)."""
    policy = make_generator(replace(cfg.generation, model=resolve_model(model_ref)))
    summariser = policy
    try:
        if cfg.rc_rl.rc.summariser == "frozen":
            summariser = make_generator(cfg.rc_rl.rc.summariser_endpoint)
        yield policy, summariser
    finally:
        for engine in {id(g): g for g in (policy, summariser)}.values():
            close_generator(engine)


def inspect_trajectories(cfg, model_ref: str, problems, grader=None, seed: int = 0) -> list[dict]:
    """Run RC with a model on a few problems and grade every turn: one row per (problem, turn). Notebook 04's
    "One RC trajectory, turn by turn" and "Score by turn, before and after RC-RL".

    Its engines (`rc_engines`) are closed before it returns, even on an error."""
    settings = cfg.rc_rl
    with rc_engines(cfg, model_ref) as (policy, summariser):
        sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p)
        trajs = rc_rollout(problems, policy, summariser, settings.rc, sampling, cfg.thinking, seed=seed)
    flat = [(p, s) for p, t in zip(problems, trajs) for s in t]
    grades = grader.grade([p for p, _ in flat], [s.final for _, s in flat], [s.think_closed for _, s in flat]) \
        if grader is not None else [None] * len(flat)
    return [{"problem_id": p.id, "turn": s.turn, "score": g.points if g is not None and g.valid else None,
             "truncated": not s.think_closed, "thinking": s.reasoning[:400], "proof": s.final[:400],
             "summary": s.summary_out[:400] if s.summary_status == "ok" else f"({s.summary_status or 'none'})",
             "summary_finish": s.summary_finish, "tokens": s.completion_tokens + s.summary_tokens}
            for (p, s), g in zip(flat, grades)]


# ---------------------------------------------------------------- training, in the order one step runs
def sample_states(n_states: int, k: int, rng: random.Random) -> list[int]:
    """K distinct cache-state indices out of N+1 (sorted), or all of them when K >= N+1."""
    return sorted(rng.sample(range(n_states), min(k, n_states)))


class RCRollout:
    """TRL rollout_func: RC trajectories with the current policy, then G rollouts per sampled state."""

    def __init__(self, settings, problems: dict, thinking: bool, summariser=None, grader=None, seed: int = 0):
        self.settings, self.problems, self.thinking = settings, problems, thinking
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
        ep = Endpoint(batch_size=self.settings.rollout_batch_size, static_cache=self.settings.static_cache)
        gen = TransformersGenerator(ep, model=model, tokenizer=trainer.processing_class)
        gen.synced_gpus = sharded(trainer)
        return gen

    def __call__(self, prompts: list, trainer) -> dict:
        t0 = time.perf_counter()
        G, step = self.settings.num_generations, trainer.state.global_step
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
            sampling = Sampling(temperature=self.settings.temperature, top_p=self.settings.top_p, top_k=0)
            trajs = rc_rollout(probs, policy, summariser, self.settings.rc, sampling, self.thinking,
                               seed=self.seed * 100_003 + step, final_summary=True)
            t_traj = time.perf_counter() - t0
            chosen = {}
            for pid, prob, traj in zip(pids, probs, trajs):
                states = cache_state_prompts(prob, traj)
                rng = random.Random(f"{self.seed}-{step}-{pid}")
                chosen[pid] = [states[i] for i in sample_states(len(states), self.settings.states_per_trajectory, rng)]
            slot_of: dict = {}
            texts = []
            for p in runs:
                pid = self.prompt_to_id[p]
                k = slot_of.get(pid, 0)
                slot_of[pid] = k + 1
                msgs = chosen[pid][k % len(chosen[pid])]
                texts.append(render_prompt(policy.tokenizer, msgs, self.thinking))
            outs = policy.generate_text(texts, Sampling(temperature=self.settings.temperature,
                                                        top_p=self.settings.top_p, top_k=0,
                                                        max_new_tokens=self.settings.max_completion_length, n=G),
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
                                       "summary_tokens": s.summary_tokens, "summary_status": s.summary_status,
                                       "summary_finish": s.summary_finish})
            self.trajectories.append({"problem_id": p.id, "turns": [s.to_dict() for s in t]})


def problem_slots(tokenizer, problems, k: int, thinking: bool):
    """Dataset with each problem K times in a row (prompt = its turn-0 RC prompt, for logging)."""
    from datasets import Dataset  # heavy: datasets loads only when training
    rows = []
    for p in problems:
        text = render_prompt(tokenizer, reasoning_messages(p.problem, ""), thinking)
        rows += [{"prompt": text, "problem_id": p.id}] * k
    return Dataset.from_list(rows)


class GroupMeansReward(RewardFunction):
    """The stage's reward (qedlib.grpo.RewardFunction) that also keeps, per step, the mean reward of each group (the G
    rollouts from one cache state): the units `learning` bootstraps over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_means: dict[int, list[float]] = {}

    async def __call__(self, prompts, completions, completion_ids=None, problem_id=None, trainer_state=None,
                       log_metric=None, **kw):
        rewards = await super().__call__(prompts, completions, completion_ids, problem_id, trainer_state, log_metric,
                                         **kw)
        step = trainer_state.global_step if trainer_state is not None else len(self.stats.rows) - 1
        self.group_means.setdefault(step, []).extend(group_means(rewards, self.group_size or len(rewards)))
        return rewards


def group_means(rewards: list, size: int) -> list[float]:
    """Mean reward of each run of `size` consecutive rewards (one group); None rewards are left out, a group with no
    valid reward is skipped."""
    out = []
    for i in range(0, len(rewards), size):
        vals = [r for r in rewards[i:i + size] if r is not None]
        if vals:
            out.append(sum(vals) / len(vals))
    return out


def learning(rows: list[dict], reward: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Did the training reward rise? `grpo.learning_record` (the one definition both RL stages use: the group means of
    the first third of the steps vs the last third, with a bootstrap interval), plus the steps on each side; with
    fewer than 2 steps of group rewards the numbers are None and `note` says why (recorded, not raised: the training
    itself finished and its model is saved)."""
    rec = learning_record(rows, reward, n_boot=n_boot, seed=seed)
    steps = [r["step"] for r in rows if r.get("group_means")]
    k = rec["k"]
    rec.update(steps_first=steps[:k], steps_last=steps[-k:] if k else [])
    if rec["gain"] is None:
        rec["note"] = f"{len(steps)} step(s) logged group rewards; a gain needs >= 2 (raise rc_rl.max_steps)"
    return rec


def score_by_turn(turn_rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per RC turn: mean judge score (0-7) with a 95% bootstrap interval over trajectories (one per problem and step),
    truncation rate, summary length, unclosed-summary rate; and, under "change", the paired change of the last turn
    vs turn 0 on the same trajectories with its interval (`qedlib.stats.learning_gain` of the differences)."""
    out = {}
    for t in sorted({r["turn"] for r in turn_rows}):
        rows = [r for r in turn_rows if r["turn"] == t]
        scores = [r["score"] for r in rows if r["score"] is not None]
        lo, hi = bootstrap_ci(scores, n_boot, seed)
        out[str(t)] = {"score_mean": sum(scores) / len(scores) if scores else None,
                       "ci_low": lo if scores else None, "ci_high": hi if scores else None, "n_scored": len(scores),
                       "truncation_rate": sum(r["truncated"] for r in rows) / len(rows),
                       "summary_tokens": sum(r["summary_tokens"] for r in rows) / len(rows), "n": len(rows),
                       "summary_unclosed_rate": summary_unclosed_rate(r.get("summary_status", "") for r in rows),
                       "summary_cut_rate": summary_cut_rate(r.get("summary_finish", "") for r in rows)}
    turns = sorted({r["turn"] for r in turn_rows})
    if len(turns) >= 2:
        key = lambda r: (r.get("step"), r.get("problem_id"))
        first = {key(r): r["score"] for r in turn_rows if r["turn"] == turns[0] and r["score"] is not None}
        last = {key(r): r["score"] for r in turn_rows if r["turn"] == turns[-1] and r["score"] is not None}
        diffs = [last[k] - first[k] for k in first if k in last]
        if diffs:
            g = learning_gain([0.0] * len(diffs), diffs, n_boot=n_boot, seed=seed)
            out["change"] = {"from_turn": turns[0], "to_turn": turns[-1], "mean": g["gain"], "ci_low": g["ci_low"],
                             "ci_high": g["ci_high"], "pairs": len(diffs)}
    return out


def probe_set(problems, tokenizer, thinking: bool, n: int = 8, chars: int = 600) -> tuple[list[str], list[str]]:
    """A fixed probe set for `qedlib.probe.policy_shift`: the first `n` problems (by id) with a reference solution,
    each as its turn-0 RC prompt (chat template applied) and a completion that closes the thinking and writes the
    reference proof (its first `chars` characters). The same texts whatever the run did."""
    chosen = sorted((p for p in problems if p.reference_solution), key=lambda p: p.id)[:n]
    if not chosen:
        raise ValueError("rc_rl: no problem of rc_rl.problems has a reference_solution for the probe set; map one "
                         "with rc_rl.problems.columns (reference_solution: <column>)")
    prompts = [render_prompt(tokenizer, reasoning_messages(p.problem, ""), thinking) for p in chosen]
    head = f"\n{THINK_CLOSE}\n\n" if thinking else ""
    return prompts, [head + p.reference_solution[:chars] for p in chosen]


def train(cfg, run_dir) -> dict:
    """Train RC-RL in this process (one rank under accelerate; what `python -m qedlib train rc_rl` runs); every rank
    saves through the trainer, rank 0 writes the metrics."""
    from transformers import AutoTokenizer  # heavy: transformers loads only when training
    settings = cfg.rc_rl
    folder = stage_dir(run_dir, STAGE)
    problems, counts = load_problems(cfg)
    by_id = {p.id: p for p in problems}
    model_path = start_model(cfg, run_dir)
    tok = AutoTokenizer.from_pretrained(model_path)
    # Shuffle problems ourselves (seeded); TRL must not shuffle, so a problem's K slots stay together.
    random.Random(cfg.seed).shuffle(problems)
    dataset = problem_slots(tok, problems, settings.states_per_trajectory, cfg.thinking)
    # The judge grades every RC turn's proof (score by turn) whatever the reward; it is the reward only when
    # rc_rl.reward is "judge".
    grader = stage_grader(settings, folder)
    summariser = None
    if settings.rc.summariser == "frozen":
        summariser = make_generator(settings.rc.summariser_endpoint)
    rollout = RCRollout(settings, by_id, cfg.thinking, summariser, grader, cfg.seed)
    rollout.prompt_to_id = {row["prompt"]: row["problem_id"] for row in dataset}
    reward_fn = GroupMeansReward(settings.reward, by_id, cfg.thinking, grader if settings.reward == "judge" else None,
                                 settings.judge.invalid, settings.max_completion_length, settings.overlong_penalty,
                                 settings.num_generations, settings.max_invalid_rate, "rc_rl")
    # A cache-state prompt carries one summary (all of them when accumulating) on top of the turn-0 prompt.
    grow = settings.rc.summary.max_new_tokens * (settings.rc.turns if settings.rc.accumulate else 1) + 256
    context = vllm_context(tok, dataset["prompt"], settings, grow) if settings.use_vllm else None
    args = grpo_args(replace(settings, shuffle=False), folder / "checkpoints", cfg.seed, None, cfg.device, context)
    if args.per_device_train_batch_size * args.gradient_accumulation_steps % (settings.states_per_trajectory
                                                                              * settings.num_generations):
        raise ValueError("rc_rl: prompts_per_step x num_generations must hold whole trajectories "
                         "(a multiple of states_per_trajectory x num_generations)")
    t0 = time.perf_counter()
    trainer = make_trainer(settings, model_path, dataset, [reward_fn], args, rollout_func=rollout)
    trainer.train(resume_from_checkpoint=last_checkpoint(folder / "checkpoints") if settings.resume else None)
    rows = step_metrics(trainer, reward_fn)
    for r, t in zip(rows, rollout.timing):
        r.update({k: v for k, v in t.items() if k != "step"})  # keep TRL's 1-based step; the rollout counts from 0
        r["summary_unclosed_rate"] = summary_unclosed_rate(x["summary_status"] for x in rollout.turn_rows
                                                           if x["step"] == t["step"])
        r["group_means"] = reward_fn.group_means.get(t["step"], [])
        turn_scores = [x["score"] for x in rollout.turn_rows if x["step"] == t["step"] and x["score"] is not None]
        r["judge_score_mean"] = sum(turn_scores) / len(turn_scores) if turn_scores else None  # RC turns, 0-7
    metrics = {**summarise_steps(rows), "problems": counts, "seconds": round(time.perf_counter() - t0, 1),
               "model_dir": str(folder / MODEL), "init_model": model_path, "loss_type": settings.loss_type,
               "loss_divisor": trainer.loss_divisor, "world_size": trainer.accelerator.num_processes,
               "score_by_turn": score_by_turn(rollout.turn_rows, seed=cfg.seed),
               "learning": learning(rows, settings.reward, seed=cfg.seed),
               "summary_unclosed_rate": summary_unclosed_rate(r["summary_status"] for r in rollout.turn_rows),
               "summary_cut_rate": summary_cut_rate(r["summary_finish"] for r in rollout.turn_rows),
               "summaries": sum(1 for r in rollout.turn_rows if r["summary_status"])}
    save_policy(trainer, folder / MODEL, settings.lora.merge)
    finish_checkpoints(folder / "checkpoints", settings.keep_checkpoints, folder / MODEL,
                       trainer.accelerator.is_main_process)
    if trainer.accelerator.is_main_process:
        metrics["weights_changed_frac"] = changed_frac_since(folder / MODEL, model_path)  # not evidence: see probe
        metrics["probe"] = policy_shift(model_path, str(folder / MODEL), *probe_set(problems, tok, cfg.thinking),
                                        seed=cfg.seed)
        write_jsonl(folder / "steps.jsonl", rows)
        write_jsonl(folder / "turns.jsonl", rollout.turn_rows)
        write_json(folder / "trajectories_last_step.json", rollout.trajectories)
        write_json(folder / "train_result.json", metrics)
    release_trainer(trainer)  # the notebook's next engine (vLLM, a judge) gets the memory back
    return metrics


# ---------------------------------------------------------------- the entry: notebook 04's "Train", the runner
def run_stage(cfg, run_dir, params_file=None, overrides=None) -> dict:
    """The stage's training result: the saved one when its model was trained with these settings, else train here
    (`train`) or under `accelerate launch` / as a batch job (`rc_rl.launch`). Notebook 04's "Train"."""
    result_file = stage_dir(run_dir, STAGE) / "train_result.json"
    saved = saved_result("rc_rl", cfg, run_dir, result_file)
    if saved is not None:
        return saved
    start_training("rc_rl", run_dir, cfg.rc_rl.launch)
    if trains_elsewhere(cfg.rc_rl.launch):
        result = train_elsewhere("rc_rl", cfg.rc_rl.launch, cfg, run_dir, params_file, overrides or {}, result_file)
    else:
        result = train(cfg, run_dir)
    finish_training("rc_rl", cfg, run_dir)
    return result


# ---------------------------------------------------------------- after training: the reward on fixed cache states
def check_problems(problems, settings, seed: int) -> tuple[list, int]:
    """The problems of the reward check (`rc_rl.check_problems` of them) and how many of them the run trained on.
    They are the last ones in the order training takes problems (the seeded shuffle of `train`; TRL does not shuffle
    here), so a run shorter than one pass over its problems has not trained on them."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    n = min(settings.check_problems, len(order))
    per_step = max(1, settings.prompts_per_step // settings.states_per_trajectory)
    seen = min(len(order), settings.max_steps * per_step)
    return order[len(order) - n:], max(0, n - (len(order) - seen))


def reward_check(cfg, start_ref: str, trained_ref: str, problems, trained_on: int = 0, grader=None,
                 seed: int = 0) -> dict:
    """Did the stage's reward rise, on the same cache states? Notebook 04's "The reward on fixed cache states".

    The first-vs-last-steps comparison (`learning`) sets steps that drew other problems and other trajectories
    against each other; here the starting policy's RC trajectories on `problems` fix the cache states (each turn's
    prompt, and one more after a usable last summary: what training samples from), then the starting and the trained
    policy each sample `num_generations` completions from every state at the training budget
    (`max_completion_length`), with the same seeds, scored by
    the stage's own reward function (`rc_rl.reward`; `grader` for the judge). The gain is the mean over states of
    (trained - start), with a 95% bootstrap interval over states; beyond noise by `stats.verdict` (>= MIN_VERDICT_N
    states). Returns the record metrics.json keeps as `reward_check`, with each state's two means."""
    settings = cfg.rc_rl
    if not problems:
        return {"reward": settings.reward, "problems": 0, "states": 0, "note": "rc_rl.check_problems is 0: no check"}
    sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    with rc_engines(cfg, start_ref) as (policy, summariser):
        trajs = rc_rollout(problems, policy, summariser, settings.rc, sampling, cfg.thinking, seed=seed,
                           final_summary=True)
        states = [(p, i, msgs) for p, t in zip(problems, trajs) for i, msgs in enumerate(cache_state_prompts(p, t))]
        start = _state_rewards(policy, states, settings, cfg.thinking, grader, seed)
    trained_gen = make_generator(replace(cfg.generation, model=resolve_model(trained_ref)))
    try:
        trained = _state_rewards(trained_gen, states, settings, cfg.thinking, grader, seed)
    finally:
        close_generator(trained_gen)
    pairs = [(a, b) for a, b in zip(start, trained) if a is not None and b is not None]
    diffs = [b - a for a, b in pairs]
    lo, hi = bootstrap_ci(diffs, 2000, seed) if len(diffs) >= 2 else (float("nan"), float("nan"))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    v = verdict(lo, hi, len(diffs))
    return {"reward": settings.reward, "problems": len(problems), "trained_on": trained_on, "states": len(diffs),
            "samples_per_state": settings.num_generations, "start": mean([a for a, _ in pairs]),
            "trained": mean([b for _, b in pairs]), "gain": mean(diffs), "ci_low": float(lo), "ci_high": float(hi),
            "n": len(diffs), "beyond_noise": v in ("up", "down"), "verdict": v,
            "per_state": [{"problem_id": p.id, "state": i, "start": a, "trained": b}
                          for (p, i, _), a, b in zip(states, start, trained)]}


def _state_rewards(generator, states, settings, thinking: bool, grader, seed: int) -> list[float | None]:
    """Mean reward of `num_generations` completions from each cache state (None when none got a valid reward)."""
    from transformers import set_seed  # heavy: transformers loads only when a model samples
    G = settings.num_generations
    texts = [render_prompt(generator.tokenizer, msgs, thinking) for _, _, msgs in states]
    set_seed(seed)
    outs = generator.generate_text(texts, Sampling(temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                                   max_new_tokens=settings.max_completion_length, n=G), thinking)
    problems = {p.id: p for p, _, _ in states}
    reward = RewardFunction(settings.reward, problems, thinking, grader, settings.judge.invalid,
                            settings.max_completion_length, settings.overlong_penalty, G, section="rc_rl")
    flat = [(p.id, c) for (p, _, _), group in zip(states, outs) for c in group]
    rewards = run_sync(reward([t for t in texts for _ in range(G)], [c.text for _, c in flat],
                              [c.token_ids for _, c in flat], [pid for pid, _ in flat]))
    return [finite_mean(rewards[i * G:(i + 1) * G]) for i in range(len(states))]


# ---------------------------------------------------------------- after training: metrics.json
def tokens_per_trajectory(rows: list[dict]) -> float:
    """Mean tokens per RC trajectory (every turn's reasoning and summary) over the problems of `inspect_trajectories`
    rows."""
    import pandas as pd  # heavy: pandas loads only when the notebook computes it
    return float(pd.DataFrame(rows).groupby("problem_id").tokens.sum().mean())


def stage_metrics(result: dict, turn_table, tokens: float, check: dict | None = None) -> dict:
    """metrics.json of the stage: the training result (with `learning` and `probe`), the reward on fixed cache states
    (`reward_check`), the score by turn after training (rows of the view's `turn_table`) and the tokens per
    trajectory."""
    return {**result, **({"reward_check": check} if check is not None else {}),
            "score_by_turn_after": turn_table[turn_table.model == "after"].to_dict(orient="records"),
            "tokens_per_trajectory": float(tokens)}
