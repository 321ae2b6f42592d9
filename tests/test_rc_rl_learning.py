"""Stage 04's evidence of learning (qedlib.stages.rc_rl): group means per step, the first-vs-last gain with its
interval, the score by turn with intervals and the paired turn change, the fixed probe set, and the RC loop's record
of a closed turn's thinking and of how each summary ended."""
import asyncio
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from qedlib.config import RCRLConfig, RCSettings, Sampling
from qedlib.reasoning_cache import rc_rollout, summary_cut_rate
from qedlib.stages import rc_rl
from test_reasoning_cache import ScriptedGenerator


def test_group_means_skip_invalid_rewards_and_empty_groups():
    assert rc_rl.group_means([0.0, 1.0, None, 0.5, None, None], 2) == [0.5, 0.5]


def test_reward_function_records_each_steps_group_means(shipped_problems):
    by_id = {p.id: p for p in shipped_problems[:2]}
    fn = rc_rl.GroupMeansReward("format", by_id, True, group_size=2, max_tokens=8)
    texts = ["a</think>proof", "still thinking", "b</think>proof", "c</think>"]
    ids = [[1, 2], [1] * 8, [1, 2, 3], [1] * 8]
    pids = [shipped_problems[0].id] * 2 + [shipped_problems[1].id] * 2
    rewards = asyncio.run(fn([""] * 4, texts, ids, pids, SimpleNamespace(global_step=3)))
    assert rewards == [1.0, 0.0, 1.0, 0.5]
    assert fn.group_means == {3: [0.5, 0.75]}


def test_learning_compares_the_first_and_last_third_of_the_steps_over_groups():
    rows = [{"step": s, "group_means": m} for s, m in
            [(1, [0.0, 0.25]), (2, [0.25, 0.0]), (3, [0.5, 0.5]), (4, [0.5, 0.75]), (5, [1.0, 0.75]), (6, [1.0, 1.0])]]
    out = rc_rl.learning(rows, "format")
    assert (out["first"], out["last"], out["n_first"], out["n_last"]) == (0.125, 0.9375, 4, 4)
    assert out["steps_first"] == [1, 2] and out["steps_last"] == [5, 6]
    assert out["reward"] == "format" and 0 < out["ci_low"] <= out["gain"] <= out["ci_high"]
    flat = rc_rl.learning([dict(r, group_means=[0.5, 0.25]) for r in rows], "format")
    assert flat["gain"] == 0 and flat["ci_low"] <= 0 <= flat["ci_high"]
    one = rc_rl.learning(rows[:1], "format")  # recorded, not raised: training finished
    assert one["gain"] is None and "raise rc_rl.max_steps" in one["note"]


def test_score_by_turn_has_intervals_and_the_paired_change_of_the_last_turn():
    rows = [{"step": s, "problem_id": p, "turn": t, "score": sc, "truncated": False, "summary_tokens": 4,
             "summary_status": "ok", "summary_finish": f}
            for s in (0, 1) for p, (a, b) in zip("abc", [(3.0, 2.0), (2.0, 1.0), (4.0, 2.5)])
            for t, sc, f in [(0, a, "stop"), (1, b, "length")]]
    out = rc_rl.score_by_turn(rows)
    assert out["0"]["score_mean"] == 3.0 and out["0"]["ci_low"] <= 3.0 <= out["0"]["ci_high"]
    assert out["0"]["summary_cut_rate"] == 0.0 and out["1"]["summary_cut_rate"] == 1.0 and out["1"]["n_scored"] == 6
    change = out["change"]
    assert (change["from_turn"], change["to_turn"], change["pairs"]) == (0, 1, 6)
    assert change["mean"] == pytest.approx(-7 / 6) and change["ci_high"] < 0


def test_probe_set_is_fixed_reference_proofs_after_the_turn_0_prompt(shipped_problems, tiny_model_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts, completions = rc_rl.probe_set(list(reversed(shipped_problems)), tok, thinking=True, n=3, chars=50)
    chosen = sorted((p for p in shipped_problems if p.reference_solution), key=lambda p: p.id)[:3]
    assert len(prompts) == 3 and all(p.problem in q for p, q in zip(chosen, prompts))
    assert completions[0] == "\n</think>\n\n" + chosen[0].reference_solution[:50]
    with pytest.raises(ValueError, match="reference_solution"):
        rc_rl.probe_set([SimpleNamespace(id="x", reference_solution=None)], tok, True)


def test_a_closed_turns_thinking_is_not_its_proof_and_each_summary_records_how_it_ended(shipped_problems):
    p = shipped_problems[0]
    policy = ScriptedGenerator(["</think>the proof", "still thinking"])
    summ = ScriptedGenerator(["I wrote a proof.", "I kept thinking."])
    rc = RCSettings(turns=2, reasoning_budget=7, summary=Sampling(max_new_tokens=5))
    [traj] = rc_rollout([p], policy, summ, rc, Sampling())
    assert traj[0].reasoning == "" and traj[0].final == "the proof"  # closed at once: no thinking, the proof apart
    assert traj[1].reasoning == "still thinking"
    assert [s.summary_finish for s in traj] == ["stop", "stop"] and summary_cut_rate(["stop", "length", ""]) == 0.5


def test_check_problems_are_the_last_training_takes_and_count_those_it_trained_on(shipped_problems):
    settings = RCRLConfig(prompts_per_step=4, states_per_trajectory=2, max_steps=6, check_problems=4)
    problems = shipped_problems[:24]
    chosen, trained_on = rc_rl.check_problems(problems, settings, seed=0)
    order = list(problems)
    random.Random(0).shuffle(order)  # the order train() takes them in
    assert [p.id for p in chosen] == [p.id for p in order[-4:]] and trained_on == 0  # 6 steps x 2 problems = 12 seen
    assert rc_rl.check_problems(problems, replace(settings, max_steps=11), 0)[1] == 2  # 22 seen: 2 of the last 4
    assert rc_rl.check_problems(problems, replace(settings, max_steps=100), 0)[1] == 4
    assert rc_rl.check_problems(problems, replace(settings, check_problems=0), 0) == ([], 0)


def test_reward_check_of_a_model_against_itself_is_zero_on_every_state(tiny_model_path, shipped_problems, tmp_path):
    """The same model as start and trained, the same seeds: every state's two means agree, so the gain is exactly 0
    and no verdict claims a change; the states are each problem's cache states."""
    from qedlib.config import load_config
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parent.parent / "params" / "smoke.yaml")
    grader = rc_rl.stage_grader(cfg.rc_rl, tmp_path)  # smoke.yaml's reward is the (tiny) judge
    check = rc_rl.reward_check(cfg, tiny_model_path, tiny_model_path, shipped_problems[:2], 1, grader, seed=3)
    turns = cfg.rc_rl.rc.turns  # a turn's prompt per turn, and one more after a usable last summary
    assert 2 * turns <= check["states"] == len(check["per_state"]) <= 2 * (turns + 1)
    assert all(r["start"] == r["trained"] for r in check["per_state"])
    assert check["gain"] == 0 and check["ci_low"] == check["ci_high"] == 0 and not check["beyond_noise"]
    assert check["reward"] == cfg.rc_rl.reward and check["samples_per_state"] == cfg.rc_rl.num_generations
    assert rc_rl.reward_check(cfg, tiny_model_path, tiny_model_path, [])["states"] == 0
