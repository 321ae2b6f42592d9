"""Benchmark `rl-step`: one GRPO step of ours vs plain TRL whose reward calls the judge one completion at a time.

Ours: qedlib.rl.train_on_problems with the judge reward, i.e. our async Grader sending every
completion of the batch to the judge concurrently. Plain: TRL's GRPOTrainer with a synchronous
reward function that posts each completion to the same server with `httpx.post` and waits. Same
model, problems, group size, completion budget and judge request (the rubric prompt, filled the same
way); the judge is an llm-katan echo server with fixed latency on loopback. The echo repeats the
prompt, so no grade is valid and every reward is 0 on both sides: the bench measures the step's
wall time, not learning.
"""
from __future__ import annotations

import os
import tempfile
import time

from .bench import table

KEY_ENV = "QED_BENCH_JUDGE_KEY"  # llm-katan wants an Authorization header (any value)


def plain_judge_reward(base_url: str, problems: dict, max_tokens: int, calls: list):
    """A TRL reward function that grades one completion at a time with a blocking HTTP call."""
    import httpx
    from .grading import build_prompt, parse_score

    def judge_reward(prompts, completions, problem_id, **kw):
        rewards = []
        for text, pid in zip(completions, problem_id):
            if not text.strip():  # as ours: an empty proof scores 0 without a judge call
                rewards.append(0.0)
                continue
            gp = build_prompt("rubric", "text", problems[pid], text)
            r = httpx.post(f"{base_url}/chat/completions", timeout=30.0,
                           headers={"Authorization": f"Bearer {os.environ[KEY_ENV]}"},
                           json={"model": "echo", "max_tokens": max_tokens, "temperature": 1.0,
                                 "messages": [{"role": "user", "content": gp.text}]})
            r.raise_for_status()
            calls.append(1)
            points, _ = parse_score(r.json()["choices"][0]["message"]["content"], allowed=gp.allowed, tag=gp.tag,
                                    prompt=gp.text)
            rewards.append(0.0 if points is None else points / 7)
        return rewards
    return judge_reward


def train_seconds(trainer) -> float:
    """Seconds TRL spent in `train()` (its own `train_runtime`): the step(s), without building the trainer."""
    return float(next(h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h))


def _plain_step(rl, model_path: str, problems, base_url: str, out_dir: str) -> tuple[float, float, int]:
    """(seconds in train(), seconds inside the reward function, judge calls) for plain TRL."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from .models import pick_device
    from .rl import batch_shape, problem_prompts
    tok = AutoTokenizer.from_pretrained(model_path)
    dataset = problem_prompts(tok, problems, thinking=False)
    micro, accum = batch_shape(rl, 1)
    choice = pick_device("auto", "auto", training=True)
    calls: list = []
    reward = plain_judge_reward(base_url, {p.id: p for p in problems}, rl.judge.sampling.max_new_tokens, calls)
    spent = [0.0]

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return reward(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t
    timed.__name__ = "judge_reward"
    args = GRPOConfig(output_dir=out_dir, seed=0, max_steps=rl.max_steps, per_device_train_batch_size=micro,
                      gradient_accumulation_steps=accum, num_generations=rl.num_generations,
                      max_completion_length=rl.max_completion_length, temperature=rl.temperature,
                      learning_rate=rl.lr, bf16=choice.dtype == "bfloat16", use_cpu=choice.device == "cpu",
                      # the objective knobs TRL has, as ours (the loss then costs the same on both sides)
                      loss_type=rl.loss_type, scale_rewards=rl.scale_rewards, epsilon=rl.epsilon, beta=rl.beta,
                      entropy_coef=rl.entropy_coef, top_p=rl.top_p,
                      save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=1,
                      shuffle_dataset=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_path, reward_funcs=timed, args=args, train_dataset=dataset,
                          processing_class=tok)
    trainer.train()
    return train_seconds(trainer), spent[0], len(calls)


def run(model: str = "tiny-qwen3", prompts: int = 4, group: int = 8, max_completion_length: int = 16,
        latency_ms: int = 500, steps: int = 1) -> str:
    """Time `steps` GRPO step(s) of `prompts` problems x `group` rollouts, ours vs plain TRL, against a
    `latency_ms` echo judge; print the table and return the headline."""
    from .config import Endpoint, Judge, RLConfig, Sampling
    from .data import load_problems
    from .grading import Grader
    from .judge_server import JudgeServer, free_port, katan_echo_command
    from .models import resolve_model
    from .rl import train_on_problems
    os.environ.setdefault(KEY_ENV, "local-test-key")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    completions = prompts * group
    problems = [p for p in load_problems("shipped", split="train") if p.rubric][:prompts]
    path = resolve_model(model)
    port = free_port()
    with JudgeServer(command=katan_echo_command(port, latency_ms=latency_ms, max_concurrent=2 * completions),
                     port=port, startup_timeout_s=60) as server:
        judge = Judge(endpoint=Endpoint(model="echo", backend="openai", base_url=server.base_url, api_key_env=KEY_ENV,
                                        max_concurrency=completions, timeout_s=30.0, max_retries=2),
                      sampling=Sampling(temperature=1.0, max_new_tokens=64), invalid="zero", cache=False)
        rl = RLConfig(num_generations=group, prompts_per_step=prompts, max_steps=steps,
                      max_completion_length=max_completion_length, temperature=1.0, reward="judge", judge=judge,
                      rollout_batch_size=completions, save_steps=10_000, shuffle=False)  # one generate() call, as TRL
        with tempfile.TemporaryDirectory(prefix="qed-bench-rl-step-") as tmp:
            grader = Grader(judge, cache_dir=None)
            # Ours first: any one-time warm-up of the process counts against us.
            rows, trainer = train_on_problems(rl, path, problems, os.path.join(tmp, "ours"), thinking=False, seed=0,
                                              grader=grader)
            ours_s = train_seconds(trainer)
            ours_grading = sum(r["grading_s"] or 0.0 for r in rows)
            plain_s, plain_grading, plain_calls = _plain_step(rl, path, problems, server.base_url,
                                                              os.path.join(tmp, "plain"))
    rows_out = [["ours: train_on_problems, async batched Grader", completions * steps, grader.stats["calls"],
                 round(ours_grading, 2), round(ours_s, 2), 1.0],
                ["plain TRL GRPOTrainer, one httpx.post per completion", completions * steps, plain_calls,
                 round(plain_grading, 2), round(plain_s, 2), round(ours_s / plain_s, 2)]]
    print(f"{model}, {prompts} problems x {group} rollouts of <= {max_completion_length} tokens, {steps} step(s), "
          f"llm-katan echo judge at {latency_ms} ms latency on loopback; step s = TRL's train_runtime (no set-up)")
    print(table(["trainer", "completions", "judge calls", "grading s", "step s", "speed (ours = 1)"], rows_out))
    return (f"one GRPO step with the judge reward: ours {ours_s:.1f}s vs plain TRL {plain_s:.1f}s, "
            f"{plain_s / ours_s:.1f}x faster ({completions} completions, grading {ours_grading:.1f}s vs "
            f"{plain_grading:.1f}s at {latency_ms} ms judge latency)")
