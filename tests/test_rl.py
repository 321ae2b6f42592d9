"""RL building blocks: rewards on literal strings, the TRL config, the objective as labelled, a learning check."""
import asyncio
from dataclasses import replace

import pytest

from qedlib.config import RLConfig
from qedlib.grpo import RewardFunction, answer_reward_value, format_reward_value, grpo_args, summarise_steps, train_on_problems


def test_format_reward_on_literal_strings():
    assert format_reward_value("I think.</think>\n\nProof: done.", True, thinking=True) == 1.0
    assert format_reward_value("I think.</think>\n\nProof: do", False, thinking=True) == 0.5
    assert format_reward_value("still thinking", True, thinking=True) == 0.0
    assert format_reward_value("Proof. Let n be odd.", True, thinking=False) == 1.0
    assert format_reward_value("**To prove** this, let", False, thinking=False) == 0.5
    assert format_reward_value("The answer is 3.", True, thinking=False) == 0.5
    assert format_reward_value("Improper start", False, thinking=False) == 0.0


def test_answer_reward_uses_check_answer():
    assert answer_reward_value("so the answer is $\\boxed{\\frac{1}{2}}$", "0.5")[0] == 1.0
    assert answer_reward_value("the answer is \\boxed{3}", "7")[0] == 0.0
    assert answer_reward_value("no boxed answer at all", "7") == (0.0, "no_answer")
    # a condition math-verify cannot decide reliably is undecided without a judge: dropped, never a guess
    assert answer_reward_value("\\boxed{n \\text{ even}}", "all odd $n$")[0] is None
    assert answer_reward_value("anything", None)[0] is None


def test_overlong_penalty_is_trls_soft_punishment_added_to_valid_rewards():
    from qedlib.problem_sets import Problem
    p = Problem(id="p", problem="x")
    fn = RewardFunction("format", {"p": p}, thinking=False, max_tokens=100, overlong_window=20)
    texts = ["Proof. ok", "Proof. ok", "Proof. ok"]
    ids = [[0] * 50, [0] * 90, [0] * 100]
    rewards = asyncio.run(fn(prompts=["x"] * 3, completions=texts, completion_ids=ids, problem_id=["p"] * 3))
    # format reward 1.0 / 1.0 / 0.5 (the last hit the budget) plus 0, -0.5, -1.0
    assert rewards == [1.0, 0.5, -0.5]


class FakeGrade:
    def __init__(self, points, valid=True, reason=None):
        self.points, self.valid, self.reason = points, valid, reason


class ScriptedGrader:
    """Returns fixed grades: this tests the reward function's bookkeeping, not a judge."""
    def __init__(self, grades):
        self.grades, self.calls = grades, []

    async def agrade(self, problems, proofs, closed):
        self.calls.append(list(zip(proofs, closed)))
        return self.grades


def test_judge_reward_no_proof_is_zero_and_invalid_reaches_trl_as_none(shipped_problems):
    p = shipped_problems[0]
    grades = [FakeGrade(7), FakeGrade(None, False, "no_tag"), FakeGrade(None, False, "unclosed_thinking"),
              FakeGrade(0), FakeGrade(None, False, "empty_proof")]
    fn = RewardFunction("judge", {p.id: p}, thinking=True, grader=ScriptedGrader(grades))
    texts = ["a</think>proof", "b</think>proof", "never closed", "c</think>wrong", "d</think>  \n"]
    rewards = asyncio.run(fn(prompts=["x"] * 5, completions=texts, problem_id=[p.id] * 5))
    # valid 1.0 and 0.0; no proof (never closed, or empty after </think>) 0.0; invalid None (TRL leaves it
    # out of the group baseline and gives it advantage 0)
    assert rewards == [1.0, None, 0.0, 0.0, 0.0]
    row = fn.stats.rows[-1]
    assert row["truncated"] == 1 and row["empty_proof"] == 1 and row["invalid_no_tag"] == 1
    assert row["invalid_rate"] == 0.2
    assert [ok for _, ok in fn.grader.calls[0]] == [True, True, False, True, False]  # no judge call without a proof
    fn.invalid = "zero"
    assert asyncio.run(fn(prompts=["x"] * 5, completions=texts, problem_id=[p.id] * 5))[1] == 0.0


def test_trl_leaves_none_rewards_out_of_the_group_baseline(trl_advantages):
    """What `invalid: drop` relies on, on TRL 1.16's own code path (one real GRPOTrainer step, scale_rewards: none):
    a None reward is left out of its group's mean and gets advantage 0; each group has its own baseline."""
    first, second = trl_advantages([[1.0, None, 0.0, 0.5], [0.2, 0.2, 0.6, None]], "none")
    assert first == pytest.approx([0.5, 0.0, -0.5, 0.0], abs=1e-6)  # baseline 0.5, not 1.5 / 4
    assert second == pytest.approx([-0.4 / 3, -0.4 / 3, 0.8 / 3, 0.0], abs=1e-6)  # baseline 1 / 3, not 0.25


def test_grpo_args_match_the_paper_switches(tmp_path):
    rl = RLConfig(num_generations=16, prompts_per_step=4, micro_batch_size=8)
    a = grpo_args(rl, tmp_path, seed=0, num_processes=1)
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.steps_per_generation) == (8, 8, 8)
    assert a.loss_type == "luspo" and a.scale_rewards == "none" and a.beta == 0.0 and a.epsilon == 4.0
    assert a.lr_scheduler_type == "constant" and a.max_grad_norm == 0.3 and a.entropy_coef == 1e-4
    assert a.importance_sampling_level == "token" and a.num_iterations == 1 and a.top_k == 0
    assert a.vllm_importance_sampling_correction is False  # TRL's default is on: never silently
    assert (a.adam_beta1, a.adam_beta2, a.weight_decay) == (0.9, 0.999, 0.01)
    with pytest.raises(ValueError, match="divisible"):
        grpo_args(RLConfig(num_generations=3, prompts_per_step=1, micro_batch_size=2), tmp_path, 0, 1)
    # the real world size, not launch.num_processes: 4 processes split 64 completions 16 each
    four = grpo_args(rl, tmp_path, 0, num_processes=4)
    assert (four.per_device_train_batch_size, four.gradient_accumulation_steps) == (8, 2)
    # off-policy lag as a labelled switch: 3 optimizer steps per generated batch
    lag = grpo_args(replace(rl, steps_per_generation=3), tmp_path, 0, 1)
    assert (lag.gradient_accumulation_steps, lag.steps_per_generation) == (8, 24)


def test_grpo_args_vllm_knobs_reach_trl(tmp_path):
    rl = RLConfig(use_vllm=True, vllm_gpu_memory_utilization=0.45, vllm_enable_sleep_mode=True,
                  vllm_server_host="10.0.0.7", vllm_server_port=8123, ratio_logprobs="trainer",
                  sampling_correction="token_truncate", sampling_correction_cap=2.0)
    a = grpo_args(rl, tmp_path, 0, 1, vllm_max_model_length=12288)
    assert (a.vllm_gpu_memory_utilization, a.vllm_max_model_length, a.vllm_enable_sleep_mode) == (0.45, 12288, True)
    assert (a.vllm_server_host, a.vllm_server_port) == ("10.0.0.7", 8123)
    assert a.vllm_importance_sampling_correction and a.vllm_importance_sampling_mode == "token_truncate"
    assert a.vllm_importance_sampling_clip_max == 2.0


def test_objective_refuses_mislabelled_settings(tmp_path):
    with pytest.raises(ValueError, match="entropy_weighting"):
        grpo_args(RLConfig(loss_type="grpo"), tmp_path, 0, 1)
    with pytest.raises(ValueError, match="sampling_correction must be none"):
        grpo_args(RLConfig(sampling_correction="sequence_mask"), tmp_path, 0, 1)
    with pytest.raises(ValueError, match="fp32 master"):
        grpo_args(RLConfig(weights_dtype="bfloat16"), tmp_path, 0, 1)


def test_vllm_context_is_prompt_plus_budget_never_the_models_own(tiny_model_path):
    from transformers import AutoTokenizer
    from qedlib.grpo import vllm_context
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rl = RLConfig(max_completion_length=8192)
    n = len(tok("word " * 300, add_special_tokens=False)["input_ids"])
    assert vllm_context(tok, ["word " * 300, "short"], rl) == -(-(n + 8192) // 1024) * 1024
    assert vllm_context(tok, ["short"], rl, extra_prompt_tokens=2304) == 11264
    assert vllm_context(tok, ["short"], replace(rl, vllm_max_model_length=40960)) == 40960


def test_grpo_learns_a_reward_the_tiny_model_can_move(shipped_problems, tmp_path):
    """The RL machinery optimises: the share of tokens from one half of the embedding space rises.

    The half is cut along one embedding coordinate, so raising it is a direction the (tied-embedding)
    tiny model can move in a few steps; a random token set would not be. The 1k-vocabulary tiny model:
    rollouts sample from the policy's whole distribution (top_k 0), which over SmolLM2's 49k tokens
    moves too slowly for a 10-step test.
    """
    from transformers import AutoModelForCausalLM
    from qedlib.models import TINY_1K, resolve_model
    tiny_model_path = resolve_model(TINY_1K)
    emb = AutoModelForCausalLM.from_pretrained(tiny_model_path).get_input_embeddings().weight[:, 0]
    good = set((emb > emb.median()).nonzero().flatten().tolist())

    def aligned(completion_ids, **kw):
        return [sum(t in good for t in ids) / max(len(ids), 1) for ids in completion_ids]

    rl = RLConfig(num_generations=8, prompts_per_step=2, max_steps=10, max_completion_length=8, lr=3e-2,
                  temperature=1.0, reward="format", save_steps=1000, entropy_coef=0.0)
    rows, _ = train_on_problems(rl, tiny_model_path, shipped_problems[:4], tmp_path, thinking=False,
                                extra_rewards=[aligned], reward_weights=[0.0, 1.0])
    s = summarise_steps(rows, tail=3)
    assert s["losses_finite"] and s["steps"] == 10
    assert s["reward_last"] > s["reward_first"] + 0.15, [r["reward"] for r in rows]


def test_consecutive_runs():
    from qedlib.grpo import consecutive_runs
    assert consecutive_runs(["a", "a", "b", "b", "b", "a"]) == [("a", 2), ("b", 3), ("a", 1)]


def test_rubric_rl_trains_on_two_cpu_processes(tmp_path):
    """The multi-process path: accelerate launch with 2 gloo ranks, both train, rank 0 saves."""
    import json

    import yaml

    from qedlib.config import Launch
    from qedlib.launch import accelerate_train
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": "tiny-qwen3", "device": "cpu", "rubric_rl": {
        "model": "base", "reward": "format", "problems": {"limit": 4}, "num_generations": 2,
        "prompts_per_step": 2, "max_steps": 2, "max_completion_length": 8, "save_steps": 2}}))
    run = tmp_path / "run"
    assert accelerate_train("rubric_rl", params, run, {}, Launch(num_processes=2)) == 0
    ranks = [json.loads(p.read_text()) for p in sorted((run / "03_rubric_rl" / "ranks").glob("rank*.json"))]
    assert [(r["rank"], r["world_size"], r["steps"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    assert (run / "03_rubric_rl" / "model" / "config.json").exists()
    assert json.loads((run / "03_rubric_rl" / "train_result.json").read_text())["steps"] == 2


def test_resume_continues_from_the_last_checkpoint(tiny_model_path, shipped_problems, tmp_path):
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=2, max_completion_length=6, reward="format",
                  save_steps=1)
    train_on_problems(rl, tiny_model_path, shipped_problems[:4], tmp_path, thinking=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    from dataclasses import replace
    rows, trainer = train_on_problems(replace(rl, max_steps=3), tiny_model_path, shipped_problems[:4], tmp_path,
                                      thinking=False, resume=True)
    assert trainer.state.global_step == 3
    assert len(trainer.generation_seconds) == 1  # only step 3 was generated and trained: no restart from zero
    assert [r["step"] for r in rows] == [1, 2, 3]  # the log history came back with the checkpoint


def test_lora_policy_is_merged_for_the_next_stage(tiny_model_path, shipped_problems, tmp_path):
    from qedlib.config import Lora
    from qedlib.grpo import save_policy
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=1, max_completion_length=6, reward="format",
                  save_steps=100, lr=1e-2, lora=Lora(enabled=True, r=4, alpha=8))
    _, trainer = train_on_problems(rl, tiny_model_path, shipped_problems[:2], tmp_path / "ckpt", thinking=False)
    assert any("lora_" in n for n, _ in trainer.model.named_parameters())
    out = save_policy(trainer, tmp_path / "model", merge=True)
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_rubric_rl_with_the_shipped_fsdp2_config_saves_the_trained_weights_and_resumes(tmp_path):
    """The shipped FSDP v2 config moved to 2 CPU processes: RL trains 2 steps, every rank saves through the
    trainer (gathered full state dict), the saved model equals the trainer's own checkpoint of the last step
    and differs from the start; resume continues the step count."""
    import json

    import yaml

    from qedlib.config import Launch
    from qedlib.launch import accelerate_config_path, accelerate_train
    from qedlib.models import SavedWeights, changed_fraction, resolve_model
    shipped = yaml.safe_load(accelerate_config_path("fsdp").read_text())
    config = tmp_path / "fsdp-cpu.yaml"
    config.write_text(yaml.safe_dump({**shipped, "use_cpu": True, "mixed_precision": "no", "num_processes": 2}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": "tiny-qwen3", "device": "cpu", "rubric_rl": {
        "model": "base", "reward": "format", "problems": {"limit": 4}, "num_generations": 2, "lr": 1.0e-3,
        "prompts_per_step": 2, "max_steps": 2, "max_completion_length": 6, "save_steps": 2}}))
    run = tmp_path / "run"
    launch = Launch(num_processes=2, accelerate_config=str(config))
    assert accelerate_train("rubric_rl", params, run, {}, launch) == 0
    folder = run / "03_rubric_rl"
    saved, ckpt = SavedWeights(folder / "model"), SavedWeights(folder / "checkpoints" / "checkpoint-2")
    assert changed_fraction(ckpt, saved) == 0.0  # what was saved is what was trained
    result = json.loads((folder / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["weights_changed_frac"] > 0.5
    assert result["weights_changed_frac"] == pytest.approx(
        changed_fraction(SavedWeights(resolve_model("tiny-qwen3")), saved), abs=1e-6)
    assert accelerate_train("rubric_rl", params, run, {"rubric_rl.resume": True, "rubric_rl.max_steps": 3}, launch) == 0
    assert json.loads((folder / "train_result.json").read_text())["steps"] == 3
