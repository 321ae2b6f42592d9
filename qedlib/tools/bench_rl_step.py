"""Benchmark `rl-step`: one GRPO step of ours vs plain TRL whose reward calls the judge one completion at a time.

Ours: qedlib.grpo.train_on_problems with the judge reward, i.e. our async Grader sending every
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

from ..tables import markdown_table
from ..grading import build_prompt, Grader
from ..verdicts import parse_score
from ..models import pick_device, resolve_model
from ..grpo import problem_prompts, train_on_problems
from ..rl_settings import batch_shape
from ..config import Endpoint, Judge, RLConfig, Sampling
from ..problem_sets import load_problems
from ..judge_server import JudgeServer, free_port, katan_echo_command

KEY_ENV = "QED_BENCH_JUDGE_KEY"  # llm-katan wants an Authorization header (any value)


def plain_judge_reward(base_url: str, problems: dict, max_tokens: int, calls: list):
    """A TRL reward function that grades one completion at a time with a blocking HTTP call."""
    import httpx  # heavy: httpx (~0.1 s) loads only to call a server

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


def last_step_seconds(trainer) -> float:
    """TRL's own `step_time` of the last optimizer step: a warm step (the first one pays one-off set-up)."""
    return float(next(h["step_time"] for h in reversed(trainer.state.log_history) if "step_time" in h))


def _plain_step(rl, model_path: str, problems, base_url: str, out_dir: str) -> tuple[float, float, int]:
    """(seconds in train(), seconds inside the reward function, judge calls) for plain TRL."""
    from transformers import AutoTokenizer  # heavy: transformers loads torch
    from trl import GRPOConfig, GRPOTrainer  # heavy: TRL loads torch and transformers
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
    return last_step_seconds(trainer), spent[0] / rl.max_steps, len(calls) // rl.max_steps


def one_model(model: str, server, prompts: int, group: int, max_completion_length: int, steps: int) -> list:
    """[ours row, plain row] for one model: the last of `steps` steps, warm, on each side."""
    completions = prompts * group
    problems = [p for p in load_problems("shipped", split="train") if p.rubric][:prompts * steps]
    path = resolve_model(model)
    judge = Judge(endpoint=Endpoint(model="echo", backend="openai", base_url=server.base_url, api_key_env=KEY_ENV,
                                    max_concurrency=completions, timeout_s=30.0, max_retries=2),
                  sampling=Sampling(temperature=1.0, max_new_tokens=64), invalid="zero", cache=False)
    rl = RLConfig(num_generations=group, prompts_per_step=prompts, max_steps=steps,
                  max_completion_length=max_completion_length, temperature=1.0, reward="judge", judge=judge,
                  rollout_batch_size=completions, save_steps=10_000, shuffle=False,  # one generate() call, as TRL
                  max_invalid_rate=1.0)  # the echo judge writes no score tag by design: every grade is invalid
    with tempfile.TemporaryDirectory(prefix="qed-bench-rl-step-") as tmp:
        grader = Grader(judge, cache_dir=None)
        rows, trainer = train_on_problems(rl, path, problems, os.path.join(tmp, "ours"), thinking=False, seed=0,
                                          grader=grader)
        ours_s, ours_grading = last_step_seconds(trainer), rows[-1]["grading_s"] or 0.0
        plain_s, plain_grading, plain_calls = _plain_step(rl, path, problems, server.base_url,
                                                          os.path.join(tmp, "plain"))
    return [[model, "ours: async batched Grader", completions, grader.stats["calls"] // steps,
             round(ours_grading, 2), round(ours_s, 2), 1.0],
            [model, "plain TRL, one httpx.post per completion", completions, plain_calls,
             round(plain_grading, 2), round(plain_s, 2), round(plain_s / ours_s, 2)]]


def run(models: tuple = ("tiny-qwen3-1k", "tiny-qwen3"), prompts: int = 4, group: int = 8,
        max_completion_length: int = 16, latency_ms: int = 500, steps: int = 2) -> str:
    """Time a warm GRPO step (the last of `steps`) of `prompts` problems x `group` rollouts, ours vs plain TRL,
    against a `latency_ms` echo judge, for each model; print the table and return the headline (first model).

    `tiny-qwen3-1k` (1,024-token vocabulary) costs almost nothing per completion, so its row shows the
    regime of a real run, where a judge call (seconds) dwarfs a completion's share of the step;
    `tiny-qwen3` (SmolLM2's 49k vocabulary) shows how a CPU-bound model's own compute dilutes the gain.
    """
    os.environ.setdefault(KEY_ENV, "local-test-key")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    port = free_port()
    rows = []
    with JudgeServer(command=katan_echo_command(port, latency_ms=latency_ms, max_concurrent=2 * prompts * group),
                     port=port, startup_timeout_s=60) as server:
        for model in models:
            rows += one_model(model, server, prompts, group, max_completion_length, steps)
    print(f"{prompts} problems x {group} rollouts of <= {max_completion_length} tokens; llm-katan echo judge at "
          f"{latency_ms} ms on loopback; step s = TRL's step_time of step {steps} of {steps} (warm)")
    print(markdown_table(["model", "trainer", "completions", "judge calls", "grading s", "step s", "plain / ours"], rows))
    ours, plain = rows[0], rows[1]
    return (f"one warm GRPO step with the judge reward ({ours[0]}, {ours[2]} completions, {latency_ms} ms judge): "
            f"ours {ours[5]:.1f}s vs plain TRL {plain[5]:.1f}s, {plain[6]:.1f}x faster "
            f"(grading {ours[4]:.1f}s vs {plain[4]:.1f}s)"
            + "".join(f"; {rows[i][0]}: {rows[i + 1][6]:.1f}x" for i in range(2, len(rows), 2)))
