"""The GRPO algorithm as QED-Nano runs it, top to bottom in the order one training step runs.

Shared by the two RL stages (qedlib.stages.rubric_rl for notebook 03, qedlib.stages.rc_rl for notebook 04). Sections:
1. problems and rollouts: the problems kept by difficulty, the prompts, the rollout function (or vLLM's context);
2. rewards: format / answer / judge, one `RewardFunction` per run that also records each step's statistics;
3. group advantages: reward - group mean, as TRL computes them (`group_advantages`, the worked example);
4. the loss as configured: `grpo_args` sets every knob of TRL's GRPOConfig explicitly;
5. the trainer: `QEDGRPOTrainer`, TRL's GRPOTrainer with the paper's ratio, entropy aggregation and gradient scale;
6. step metrics: TRL's logs joined with the reward statistics, and a run's headline numbers;
7. the training loop (`train_on_problems`) and 8. saving the policy (`save_policy`).

Importing this module imports TRL and with it torch, transformers and datasets (about 5 s on a CPU): it is the
algorithm module, loaded by the stages that train. The checks and shapes of an RL stage's settings (batch shape,
objective, vLLM mode and context) are in qedlib.rl_settings, which tools read without loading TRL.

The paper's objective maps onto TRL's GRPOTrainer as follows (each a params switch):
- advantage = reward - group mean: `scale_rewards: none` (no std scaling);
- no KL: `beta: 0.0` (no reference model is loaded);
- loss summed over tokens and divided by the number of sequences: TRL's `luspo` aggregation,
  `(per_token_loss * mask).sum(-1).mean()`, exactly that (TRL warns that LUSPO's own paper uses
  sequence-level importance ratios; we keep token-level ratios as QED-Nano does). `dr_grpo`
  differs from it only by the constant 1/max_completion_length, which AdamW mostly absorbs
  but gradient clipping at 0.3 does not;
- loose PPO clip: `epsilon: 4.0`; entropy bonus: `entropy_coef: 1.0e-4`;
- the official gradient scale (`loss_divisor`): what runs under TRL's name `luspo` is PPO-clip with
  token-level ratios, each token weighted 1 / (sequences per optimizer step), then divided by D
  as QED-Nano's trainer does (DeepSpeed divides each micro-batch loss by its accumulation steps
  and averages over ranks: D = 32 x 2 = 64 in the official rubric-RL config, 64 x 4 = 256 in RC-RL),
  so `max_grad_norm: 0.3` clips the gradient the paper's did. Not LUSPO (sequence-level ratios);
- one optimizer step per batch: the batch of prompts_per_step x num_generations completions
  is generated once and consumed in gradient-accumulation micro-batches.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

# The algorithm module loads TRL, and TRL loads torch, transformers and datasets: all four at the top here.
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer
from trl.rewards import get_soft_overlong_punishment

from .config import Endpoint, Sampling
from .generation import TransformersGenerator, render_prompt, split_thinking
from .grading import check_invalid_rate
from .models import pick_device
from .problem_sets import skipped_metrics
from .stats import learning_gain
from .proof_chat import proof_messages
from .rl_settings import (ENTROPY_AS_POLICY, batch_shape, check_objective, probe_vllm_server, vllm_context,
                          vllm_server_address, world_size)
from .training import (accumulation_args, add_master_weights_check, checkpointing_args,
                       last_checkpoint, lora_config, save_trained)
from .verdicts import check_answer


# ---------------------------------------------------------------- 1. problems and rollouts
def filter_by_difficulty(problems, min_reward_mean=None, max_reward_mean=None) -> tuple[list, dict]:
    """Drop hopeless / too-easy problems by the base model's mean reward (FineProofs-RL `reward_mean`);
    the counts include the source's skipped bad rows."""
    counts = {"loaded": len(problems), "too_easy": 0, "hopeless": 0, "no_reward_mean": 0, **skipped_metrics(problems)}
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


def problem_prompts(tokenizer, problems, thinking: bool):
    """Rendered policy prompts (proof instruction + problem) as a datasets.Dataset with problem_id."""
    return Dataset.from_list([{"prompt": render_prompt(tokenizer, proof_messages(p.problem), thinking),
                               "problem_id": p.id} for p in problems])


def consecutive_runs(items: list) -> list[tuple]:
    """[(item, count)] for runs of equal consecutive items: ["a", "a", "b"] -> [("a", 2), ("b", 1)]."""
    runs: list[list] = []
    for x in items:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    return [tuple(r) for r in runs]


class SingleTurnRollout:
    """TRL rollout_func for transformers generation: our batched generator around the model being trained.

    TRL's own transformers path was measured far slower on CPU here (about 4 vs 70 tokens/s for
    SmolLM2); with `use_vllm` TRL's vLLM path is used instead of this.
    """

    def __init__(self, rl, thinking: bool):
        self.rl, self.thinking = rl, thinking

    def __call__(self, prompts: list, trainer) -> dict:
        runs = consecutive_runs(prompts)  # TRL repeats each prompt in a row (a group may span processes)
        model = trainer.accelerator.unwrap_model(trainer.model)
        gen = TransformersGenerator(Endpoint(batch_size=self.rl.rollout_batch_size, static_cache=self.rl.static_cache),
                                    model=model, tokenizer=trainer.processing_class)
        gen.synced_gpus = sharded(trainer)
        was_training = model.training
        model.eval()
        outs: dict[int, list] = {}
        try:
            for n in sorted({c for _, c in runs}):  # one batched call per run length (usually just one)
                idx = [i for i, (_, c) in enumerate(runs) if c == n]
                sampling = Sampling(temperature=self.rl.temperature, top_p=self.rl.top_p, top_k=0,
                                    max_new_tokens=self.rl.max_completion_length, n=n)
                texts = [runs[i][0] for i in idx]
                for i, group in zip(idx, gen.generate_text(texts, sampling, self.thinking, logprobs=True)):
                    outs[i] = group
        finally:
            model.train(was_training)
        prompt_ids, completion_ids, logprobs = [], [], []
        for i, (text, _) in enumerate(runs):
            ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt_ids += [ids] * len(outs[i])
            completion_ids += [c.token_ids for c in outs[i]]
            logprobs += [c.token_logprobs for c in outs[i]]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def sharded(trainer) -> bool:
    """Whether the trained weights are sharded over processes (FSDP, ZeRO-3): generation must then run in
    lockstep on every rank (`synced_gpus`), or ranks that finish early stop answering the all-gathers."""
    acc = trainer.accelerator
    if getattr(acc, "num_processes", 1) < 2:
        return False
    if getattr(acc, "is_fsdp2", False) or acc.distributed_type.value == "FSDP":
        return True
    ds = getattr(acc.state, "deepspeed_plugin", None)
    return bool(ds and ds.zero_stage == 3)


# ---------------------------------------------------------------- 2. rewards
PROOF_OPENING = re.compile(r"^\W*(proof|to prove|we prove|we show|we will (prove|show))\b", re.IGNORECASE)


def format_reward_value(text: str, stopped: bool, thinking: bool) -> float:
    """Verifiable format reward, a signal a small model can learn (the RL learning check).

    With thinking: 0.5 for closing </think>, 0.5 more for a non-empty answer that ended on its own.
    Without: 0.5 for an answer that opens like a proof ("Proof", "To prove", "We show" ...), 0.5
    for a non-empty answer that ended before the budget.
    """
    reasoning, final, closed = split_thinking(text, thinking)
    if thinking:
        return 0.5 * closed + 0.5 * (closed and bool(final) and stopped)
    return 0.5 * bool(PROOF_OPENING.match(final)) + 0.5 * (stopped and bool(final))


def opening_reward_value(final: str, closed: bool) -> float:
    """The cheap "opening" grader: 1.0 when the thinking is closed and the proof after it opens like a proof
    ("Proof", "To prove", "We show", ...: PROOF_OPENING), else 0.0. It reads the first words only, so a policy
    can satisfy it without proving anything: the laptop's learnable reward, and a grader that shows how a cheap
    check is gamed."""
    return float(closed and bool(PROOF_OPENING.match(final)))


def answer_reward_value(final: str, answer: str | None) -> tuple[float | None, str]:
    """(1.0 / 0.0 / None, how): the final boxed answer checked against the reference by
    `verdicts.check_answer` (exact or math-verify only where reliable); None when it cannot decide
    without a judge (dropped from the group, counted as invalid with that reason)."""
    verdict, how = check_answer(answer, final)
    return (None if verdict is None else float(verdict)), how


class StepStats:
    """Per-step statistics recorded by the reward function (what TRL does not log itself)."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, step: int, scores: list, invalid: Counter, truncated: int, n: int, grading_s: float,
            empty_proof: int = 0, group: dict | None = None) -> dict:
        valid = [s for s in scores if s is not None]
        row = {"step": step, "n": n, "valid": len(valid), "truncated": truncated, "empty_proof": empty_proof,
               "truncation_rate": truncated / max(n, 1), "empty_proof_rate": empty_proof / max(n, 1),
               "invalid_rate": sum(invalid.values()) / max(n, 1),
               "score_mean": sum(valid) / len(valid) if valid else float("nan"),
               "score_hist": dict(Counter(round(s) for s in valid)), "grading_s": round(grading_s, 3),
               **{f"invalid_{k}": v for k, v in invalid.items()}}
        if group is not None:
            row["group"] = group
        self.rows.append(row)
        return row


GROUP_EXCERPT = 240  # characters of each completion kept in the step record (the notebook's worked group)


def first_group(texts: list, proofs: list, rewards: list, problem_ids: list, size: int | None) -> dict | None:
    """The batch's first GRPO group (TRL puts a group's rollouts in a row): problem, excerpts of each
    completion's opening and of its proof (the text after `</think>`, "" when none), rewards."""
    if not texts:
        return None
    n = size or next(c for _, c in consecutive_runs(list(problem_ids)))
    return {"problem_id": problem_ids[0], "completions": [t[:GROUP_EXCERPT] for t in texts[:n]],
            "proofs": [p[:GROUP_EXCERPT] for p in proofs[:n]], "rewards": list(rewards[:n])}


def group_means(rewards: list, problem_ids: list) -> list:
    """Mean reward of each GRPO group of a batch (TRL puts a group's rollouts in a row; None rewards left out; a
    group with no valid reward has mean None): the units a bootstrap over groups resamples (`learning_record`).
    Under several processes each process sees its share of the batch, so a group split across them counts as two."""
    out, i = [], 0
    for _, n in consecutive_runs(problem_ids):
        out.append(finite_mean(rewards[i:i + n]))
        i += n
    return out


class RewardFunction:
    """Reward for GRPO: the judge's score/7 (or a verifiable reward), async, whole batch at once.

    Completions are the text after the prompt; with thinking, the proof is what follows the last
    `</think>`. No proof (no `</think>`, or nothing after it) scores 0 without a judge call and is
    counted (`truncated`, `empty_proof`). An invalid grade follows `invalid`: "drop" returns None,
    which TRL 1.16 gathers across processes and leaves out of the group baseline (advantage 0);
    "zero" counts it as 0; "retry" is done inside the Grader. `overlong_window` adds TRL's soft
    overlong punishment (DAPO) to every reward that is not None.
    """

    def __init__(self, kind: str, problems: dict, thinking: bool, grader=None, invalid: str = "drop",
                 max_tokens: int | None = None, overlong_window: int | None = None, group_size: int | None = None,
                 max_invalid_rate: float = 1.0, section: str = "rubric_rl"):
        self.kind, self.problems, self.thinking = kind, problems, thinking
        self.max_invalid_rate, self.section = max_invalid_rate, section  # stop training past this invalid share
        self.group_size = group_size  # rollouts per group: the first group of each call is recorded in full
        self.grader, self.invalid, self.max_tokens = grader, invalid, max_tokens
        self.overlong = None
        if overlong_window:
            self.overlong = get_soft_overlong_punishment(max_tokens, overlong_window)
        self.stats = StepStats()
        self.__name__ = f"{kind}_reward"  # TRL logs rewards under the function's name

    async def __call__(self, prompts, completions, completion_ids=None, problem_id=None, trainer_state=None,
                       log_metric=None, **kw):
        t0 = time.perf_counter()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        stopped = [self._stopped(ids) for ids in (completion_ids or [None] * len(texts))]
        splits = [split_thinking(t, self.thinking) for t in texts]
        probs = [self.problems[pid] for pid in problem_id]
        truncated = sum(1 for _, _, closed in splits if not closed)
        has_proof = [closed and bool(final.strip()) for _, final, closed in splits]
        invalid: Counter = Counter()
        if self.kind == "judge":
            grades = await self.grader.agrade(probs, [f for _, f, _ in splits], has_proof)
            # No proof: score 0, no judge call (the grader skips it). Not an invalid grade.
            scores = [0.0 if not ok else (g.points if g.valid else None) for g, ok in zip(grades, has_proof)]
            invalid.update(g.reason for g, ok in zip(grades, has_proof) if ok and not g.valid)
            rewards = [None if s is None else s / 7 for s in scores]
            if self.invalid == "zero":
                rewards = [0.0 if r is None else r for r in rewards]
        elif self.kind == "format":
            rewards = [format_reward_value(t, s, self.thinking) for t, s in zip(texts, stopped)]
            scores = [7 * r for r in rewards]
        elif self.kind == "opening":
            rewards = [opening_reward_value(f, c) for _, f, c in splits]
            scores = [7 * r for r in rewards]
        elif self.kind == "answer":
            checked = [answer_reward_value(f, p.answer) if ok else (0.0, "no_proof")
                       for (_, f, _), ok, p in zip(splits, has_proof, probs)]
            rewards = [r for r, _ in checked]
            invalid.update(how for r, how in checked if r is None)
            scores = [None if r is None else 7 * r for r in rewards]
        else:
            raise ValueError(f"unknown reward {self.kind!r}: use judge, format, opening or answer")
        if self.overlong is not None and completion_ids is not None:
            rewards = [None if r is None else r + p for r, p in zip(rewards, self.overlong(completion_ids))]
        step = trainer_state.global_step if trainer_state is not None else len(self.stats.rows)
        empty = sum(1 for (_, _, c), ok in zip(splits, has_proof) if c and not ok)
        row = self.stats.add(step, scores, invalid, truncated, len(texts), time.perf_counter() - t0, empty,
                             first_group(texts, [f if ok else "" for (_, f, _), ok in zip(splits, has_proof)],
                                         rewards, problem_id, self.group_size))
        row["group_means"] = group_means(rewards, list(problem_id))
        if log_metric is not None:
            for k in ("truncation_rate", "empty_proof_rate", "invalid_rate", "grading_s"):
                log_metric(k, row[k])
        self._check_invalid(step, sum(invalid.values()), len(texts))
        return rewards

    def _check_invalid(self, step: int, invalid: int, n: int) -> None:
        """Stop training before this step's optimizer update (so before any save of model/ or metrics) when its
        invalid share passes `<section>.max_invalid_rate`: training on no rewards is no result."""
        endpoint = getattr(getattr(self.grader, "judge", None), "endpoint", None)  # None: no judge (answer reward)
        check_invalid_rate(f"{self.section} step {step + 1}", endpoint, invalid, n, self.max_invalid_rate,
                           f"{self.section}.max_invalid_rate")

    def _stopped(self, ids) -> bool:
        if ids is None or self.max_tokens is None:
            return True
        return len(ids) < self.max_tokens


# ---------------------------------------------------------------- 3. group advantages
def group_advantages(rewards: list, scale_rewards: str = "none", eps: float = 1.0e-4) -> list[float]:
    """One group's advantages as TRL 1.16 computes them: reward - group mean, divided by (sample std + 1e-4)
    with `scale_rewards: group`; a None reward is left out of mean and std and gets advantage 0."""
    if scale_rewards not in ("none", "group"):
        raise ValueError(f"scale_rewards {scale_rewards!r}: this worked example mirrors none and group only")
    vals = [r for r in rewards if r is not None]
    if not vals:
        return [0.0] * len(rewards)
    mean = sum(vals) / len(vals)
    # TRL's nanstd is Bessel-corrected; with one valid reward it is NaN and the advantage becomes 0.
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    out = []
    for r in rewards:
        a = 0.0 if r is None else r - mean
        if scale_rewards == "group":
            a = 0.0 if math.isnan(std) else a / (std + eps)
        out.append(a)
    return out


# ---------------------------------------------------------------- 4. the loss as configured (TRL's GRPOConfig)
def grpo_args(rl, out_dir: str | Path, seed: int, num_processes: int | None = None, training_device: str = "auto",
              vllm_max_model_length: int | None = None):
    """Translate our RLConfig into TRL's GRPOConfig, every switch the method depends on set explicitly."""
    check_objective(rl)
    choice = pick_device(training_device, "auto", training=True)
    micro, accum = batch_shape(rl, num_processes or world_size())
    server = vllm_server_address(rl) if rl.use_vllm and rl.vllm_mode == "server" else \
        (rl.vllm_server_host, rl.vllm_server_port)
    return GRPOConfig(
        output_dir=str(out_dir), seed=seed, max_steps=rl.max_steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        steps_per_generation=accum * rl.steps_per_generation, num_iterations=1,
        num_generations=rl.num_generations, max_completion_length=rl.max_completion_length,
        temperature=rl.temperature, top_p=rl.top_p, top_k=0, min_p=None, repetition_penalty=1.0,
        learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=rl.weight_decay,
        adam_beta1=rl.adam_beta1, adam_beta2=rl.adam_beta2, max_grad_norm=rl.max_grad_norm, optim="adamw_torch",
        loss_type=rl.loss_type, importance_sampling_level="token", scale_rewards=rl.scale_rewards,
        epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, beta=rl.beta, entropy_coef=rl.entropy_coef,
        mask_truncated_completions=rl.mask_truncated_completions,
        use_vllm=rl.use_vllm, vllm_mode=rl.vllm_mode, use_transformers_continuous_batching=False,
        vllm_gpu_memory_utilization=rl.vllm_gpu_memory_utilization, vllm_max_model_length=vllm_max_model_length,
        vllm_enable_sleep_mode=rl.vllm_enable_sleep_mode, vllm_tensor_parallel_size=rl.vllm_tensor_parallel_size,
        **dict(zip(("vllm_server_host", "vllm_server_port"), server)),
        vllm_server_timeout=rl.vllm_server_timeout,
        vllm_importance_sampling_correction=rl.sampling_correction != "none",
        vllm_importance_sampling_mode=rl.sampling_correction if rl.sampling_correction != "none" else "sequence_mask",
        vllm_importance_sampling_clip_max=rl.sampling_correction_cap,
        bf16=choice.dtype == "bfloat16", fp16=choice.dtype == "float16", use_cpu=choice.device == "cpu",
        **checkpointing_args(GRPOConfig, rl.gradient_checkpointing),
        **accumulation_args(),  # FSDP offload: each micro-batch's gradient to the host (training.accumulation_args)
        save_strategy="steps", save_steps=rl.save_steps, save_total_limit=2,
        logging_steps=rl.logging_steps, report_to=rl.report_to or "none", disable_tqdm=True,
        shuffle_dataset=rl.shuffle, dataloader_num_workers=0,
    )


# ---------------------------------------------------------------- 5. the trainer
class QEDGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the objective as QED-Nano runs it (`qed_rl`: the stage's RL settings; None: plain TRL).

    - ratio_logprobs: sampler: the PPO ratio is policy / sampler (the per-token logprobs the rollout
      returned), as in the paper's asynchronous trainer, instead of policy / the trainer's own
      recomputation; epsilon then bounds the sampler lag and the sampler/trainer mismatch.
    - entropy_weighting: policy: TRL subtracts coef x the *mean* token entropy; the bonus is rescaled
      per micro-batch so that it is aggregated exactly like the policy term (for luspo: token sum /
      number of sequences).
    - the loss is divided by `loss_divisor` (the official gradient scale, see the module docstring).
    - generation time is recorded per generation call.
    """

    def __init__(self, *a, qed_rl=None, **kw):
        super().__init__(*a, **kw)
        self.qed_rl = qed_rl
        self.base_entropy_coef = self.entropy_coef
        self.generation_seconds: list[float] = []
        self.ratio_stats: list[dict] = []

    def _generate(self, prompts):  # pinned trl==1.16: _generate is the generation entry point
        t0 = time.perf_counter()
        out = super()._generate(prompts)
        self.generation_seconds.append(time.perf_counter() - t0)
        return out

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.qed_rl is not None and self.qed_rl.ratio_logprobs == "sampler":
            sampler = out.get("sampling_per_token_logps")
            if sampler is None:
                raise ValueError("ratio_logprobs: sampler needs the sampler's per-token logprobs, but the rollout "
                                 "returned none (logprobs: None): return them from the rollout function")
            missing = torch.isnan(sampler) & out["completion_mask"].bool()
            out["completion_mask"] = out["completion_mask"] * (~missing).long()  # unscored tokens: no loss
            out["old_per_token_logps"] = sampler.nan_to_num(0.0)
            self._metrics["train"]["sampler/unscored_token_frac"].append(
                float(missing.sum()) / max(float(out["completion_mask"].numel()), 1.0))
        return out

    def _compute_loss(self, model, inputs):
        rl = self.qed_rl
        if rl is None:
            return super()._compute_loss(model, inputs)
        if self.base_entropy_coef and rl.entropy_weighting == "policy":
            mask = inputs["completion_mask"]
            factor = ENTROPY_AS_POLICY[rl.loss_type](float(mask.sum()), mask.size(0), self.max_completion_length)
            self.entropy_coef = self.base_entropy_coef * factor
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.entropy_coef = self.base_entropy_coef
        # TRL's luspo gives a gradient of token sum / sequences per step (its 1/accumulation and DDP's rank
        # mean cancel the split); the official trainer divides that by D as well.
        return loss / self.loss_divisor

    @property
    def loss_divisor(self) -> int:
        """D of the official gradient scale (see qedlib.grpo): 1 unless loss_type is luspo."""
        rl = self.qed_rl
        if rl is None or rl.loss_type != "luspo":
            return 1
        return rl.loss_divisor or self.args.gradient_accumulation_steps * self.accelerator.num_processes


def silence_token_level_luspo_warning() -> None:
    """TRL warns that LUSPO's own paper uses sequence-level ratios; QED-Nano's trainer uses token-level
    ratios with the luspo aggregation (token sum / sequences), which is what we run on purpose."""
    class _Filter(logging.Filter):
        def filter(self, record):
            return "importance_sampling_level` should be set to `'sequence'`" not in record.getMessage()
    log = logging.getLogger("trl.trainer.grpo_trainer")
    if not any(isinstance(f, _Filter) or type(f).__name__ == "_Filter" for f in log.filters):
        log.addFilter(_Filter())


def make_trainer(rl, model_path: str, dataset, reward_funcs: list, args, rollout_func=None):
    """A GRPOTrainer with the paper's ratio and entropy aggregation (QEDGRPOTrainer)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL's notice that rollout_func is experimental
    if rl.use_vllm and rl.vllm_mode == "server" and rl.ratio_logprobs == "sampler":
        probe_vllm_server(args.vllm_server_host, args.vllm_server_port, min(args.vllm_server_timeout, 60.0))
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # fp32 master weights: bf16 autocast computes in bf16, AdamW updates fp32 weights (an lr-1e-6 step is
    # below bf16's spacing for most weights and would round away).
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=rl.weights_dtype)
    silence_token_level_luspo_warning()
    trainer = QEDGRPOTrainer(model=model, args=args, train_dataset=dataset, reward_funcs=reward_funcs,
                             processing_class=tok, peft_config=lora_config(rl.lora), rollout_func=rollout_func,
                             qed_rl=rl)
    # disable_tqdm makes transformers print every log dict ({'loss': ...}); the step rows keep them all.
    trainer.remove_callback(PrinterCallback)
    trainer.qed_masters = add_master_weights_check(trainer, "rl")  # what the optimizer steps, checked at step 0
    return trainer


# ---------------------------------------------------------------- 6. step metrics
def step_metrics(trainer, reward_fn: RewardFunction) -> list[dict]:
    """One row per optimizer step: TRL's logs joined with our reward statistics and timings."""
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    ours = {r["step"]: r for r in reward_fn.stats.rows}
    gen = trainer.generation_seconds
    rows = []
    for i, h in enumerate(logs):
        step = int(h.get("step", i + 1))
        r = ours.get(step - 1, ours.get(step, {}))
        rows.append({"step": step, "reward": h.get("reward"), "reward_std": h.get("reward_std"),
                     "frac_zero_std": h.get("frac_reward_zero_std"), "loss": h.get("loss"),
                     "length": h.get("completions/mean_length"), "clipped_ratio": h.get("completions/clipped_ratio"),
                     "clip_ratio": h.get("clip_ratio/region_mean"), "clip_ratio_low": h.get("clip_ratio/low_mean"),
                     "clip_ratio_high": h.get("clip_ratio/high_mean"),
                     "is_ratio_mean": h.get("sampling/importance_sampling_ratio/mean"),
                     "unscored_token_frac": h.get("sampler/unscored_token_frac"),
                     "empty_proof_rate": r.get("empty_proof_rate"), "entropy": h.get("entropy"),
                     "grad_norm": h.get("grad_norm"), "clipped": clipped(h.get("grad_norm"), trainer.args.max_grad_norm),
                     "generation_s": gen[i] if i < len(gen) else None,
                     "grading_s": r.get("grading_s"), "step_s": h.get("step_time"),
                     "truncation_rate": r.get("truncation_rate"), "invalid_rate": r.get("invalid_rate"),
                     "score_mean": r.get("score_mean"), "group_means": r.get("group_means"),
                     "group": r.get("group")})
    return rows


def clipped(grad_norm, max_grad_norm) -> bool | None:
    """Whether a step's gradient was clipped: its norm before clipping (what transformers logs) exceeded
    max_grad_norm; None when no norm was logged."""
    if grad_norm is None or max_grad_norm is None or max_grad_norm <= 0:
        return None
    return bool(grad_norm > max_grad_norm)


def finite_mean(xs: list) -> float | None:
    """Mean of the values that are neither None nor NaN (TRL logs NaN for a step with no valid reward); None when
    none is."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def window(n_steps: int, k: int | None = None) -> int:
    """Steps at each end that a run's first and last rewards are taken over: `k`, by default a third of the steps,
    at least 1 and at most half (the two windows never overlap). One rule for `summarise_steps` and
    `learning_record`, so the report's stage table and "What each stage achieved" agree."""
    return max(1, min(k or n_steps // 3, n_steps // 2))


def summarise_steps(rows: list[dict], tail: int | None = None) -> dict:
    """Headline numbers of a run: first/last reward (means over `tail` steps at each end, by default a third of the
    steps, at least 1: the windows `learning_record` compares; the two never overlap), finite losses, rates."""
    rewards = [r["reward"] for r in rows if r["reward"] is not None and not math.isnan(r["reward"])]  # NaN: no valid reward
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    k = window(len(rewards), tail)
    head = rewards[:k]
    last = rewards[-k:]
    return {"steps": len(rows), "reward_first": sum(head) / len(head) if head else None,
            "reward_last": sum(last) / len(last) if last else None,
            "reward_min": min(rewards) if rewards else None, "reward_max": max(rewards) if rewards else None,
            "losses_finite": all(math.isfinite(x) for x in losses),
            "truncation_rate": finite_mean([r["truncation_rate"] for r in rows]),
            "clipped_ratio": finite_mean([r.get("clipped_ratio") for r in rows]),
            "invalid_rate": finite_mean([r["invalid_rate"] for r in rows]),
            "clip_frac": finite_mean([float(r["clipped"]) for r in rows if r.get("clipped") is not None])}


def learning_record(rows: list[dict], reward: str, k: int | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Did the trained reward rise? `learning: {reward, k, first, last, gain, ci_low, ci_high, n_first, n_last}`:
    the group-mean rewards of the first `k` steps vs the last `k` (k = a third of the steps, at least 1, when not
    given; the windows never overlap; fewer than 2 such steps: gain None), the gain last - first with a bootstrap interval over groups
    (stats.learning_gain). The gain is beyond noise when ci_low > 0."""
    steps = [r for r in rows if r.get("group_means")]
    if len(steps) < 2:  # no first and last window to compare
        return {"reward": reward, "k": 0, "first": None, "last": None, "gain": None, "ci_low": None, "ci_high": None,
                "n_first": 0, "n_last": 0}
    k = window(len(steps), k)
    pick = lambda part: [m for r in part for m in r["group_means"] if m is not None]
    first, last = pick(steps[:k]), pick(steps[-k:])
    return {"reward": reward, "k": k, **learning_gain(first, last, n_boot, seed)}


# ---------------------------------------------------------------- 7. the training loop
def train_on_problems(rl, model_path: str, problems, out_dir, thinking: bool, seed: int = 0, grader=None,
                      resume: bool = False, num_processes: int | None = None, extra_rewards: list | None = None,
                      reward_weights: list | None = None, training_device: str = "auto", save: bool = True):
    """Single-turn GRPO on problems: the rubric-RL loop. Returns (step rows, trainer).

    `extra_rewards` are more TRL reward functions (summed with `reward_weights`), e.g. a custom
    verifiable reward in a learning test. `save=False` writes no checkpoint (a side run keeps only its step rows).
    """
    tok = AutoTokenizer.from_pretrained(model_path)
    dataset = problem_prompts(tok, problems, thinking)
    context = vllm_context(tok, dataset["prompt"], rl) if rl.use_vllm else None
    args = grpo_args(rl, out_dir, seed, num_processes, training_device, context)
    args.reward_weights = reward_weights
    if not save:
        args.save_strategy = "no"  # else the Trainer saves weights and optimizer state at the last step
    reward_fn = RewardFunction(rl.reward, {p.id: p for p in problems}, thinking, grader, rl.judge.invalid,
                               rl.max_completion_length, rl.overlong_penalty, rl.num_generations, rl.max_invalid_rate,
                               "rc_rl" if hasattr(rl, "rc") else "rubric_rl")
    rollout = None if rl.use_vllm else SingleTurnRollout(rl, thinking)
    trainer = make_trainer(rl, model_path, dataset, [reward_fn] + (extra_rewards or []), args, rollout_func=rollout)
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir) if resume else None)
    return step_metrics(trainer, reward_fn), trainer


# ---------------------------------------------------------------- 8. saving
def save_policy(trainer, out_dir: str | Path, merge: bool = True) -> Path:
    """Save the trained policy for the next stage through the trainer (gathers ZeRO-3 / FSDP shards), atomically.

    Every process must call it. LoRA: the adapter is saved, then merged on the main process when `merge`.
    """
    return save_trained(trainer, out_dir, lora=hasattr(trainer.accelerator.unwrap_model(trainer.model),
                                                       "peft_config"), merge=merge)
