"""What notebooks 03 and 04 show a reader: one GRPO group with its advantages, the judge prompt, an RC state,
findings computed from a run's own numbers, and "Try it" overrides that load."""
import asyncio
import json
import math
import re
from pathlib import Path

import pytest

from qedlib.config import RCRLConfig, RLConfig, load_config, parse_override
from qedlib.rl import RewardFunction, findings, first_group, group_advantages, reward_comparison, worked_group

ROOT = Path(__file__).resolve().parent.parent


def test_group_advantages_on_literal_numbers():
    assert group_advantages([1.0, 0.0, 0.0, 1.0], "none") == [0.5, -0.5, -0.5, 0.5]
    std = math.sqrt(1 / 3)  # sample std of 1, 0, 0, 1 (Bessel-corrected, as TRL's nanstd)
    a = 0.5 / (std + 1e-4)
    assert group_advantages([1.0, 0.0, 0.0, 1.0], "group") == pytest.approx([a, -a, -a, a])
    # a None reward (invalid grade, invalid: drop) is out of mean and std and gets advantage 0
    assert group_advantages([0.6, None, 0.2], "none") == pytest.approx([0.2, 0.0, -0.2])
    # all equal: no signal either way; std scaling divides 0 by 1e-4, still 0
    assert group_advantages([0.3, 0.3, 0.3], "group") == [0.0, 0.0, 0.0]
    # a nearly constant judge: std scaling blows 0.005 differences up to about +-0.85 (1e-4 keeps it under 0.866)
    assert group_advantages([0.30, 0.31, 0.30, 0.31], "group")[1] == pytest.approx(0.005 / (math.sqrt(0.0001 / 3) + 1e-4))
    assert group_advantages([None, None], "group") == [0.0, 0.0]
    with pytest.raises(ValueError, match="none and group"):
        group_advantages([1.0], "batch")


def test_group_advantages_match_trls_own_computation(trl_advantages):
    """The worked example's advantages (rl.group_advantages) equal those TRL's GRPOTrainer computed in one real
    step for the same rewards, with and without std scaling: an invalid (None) reward, a nearly constant judge."""
    groups = [[0.9, None, 0.1, 0.4, 0.4], [0.30, 0.31, 0.30, 0.31, 0.30]]
    for scale in ("none", "group"):
        for rewards, trl in zip(groups, trl_advantages(groups, scale)):
            assert group_advantages(rewards, scale) == pytest.approx(trl, abs=1e-4), (scale, rewards)


def test_reward_function_records_the_first_group(shipped_problems):
    p = shipped_problems[0]
    q = shipped_problems[1]
    fn = RewardFunction("format", {p.id: p, q.id: q}, thinking=True, max_tokens=100, group_size=2)
    texts = ["a</think>Proof. x", "b never closed", "c</think>Proof.", "d</think>"]
    asyncio.run(fn(prompts=["x"] * 4, completions=texts, problem_id=[p.id, p.id, q.id, q.id]))
    g = fn.stats.rows[-1]["group"]
    assert g == {"problem_id": p.id, "completions": texts[:2], "proofs": ["Proof. x", ""], "rewards": [1.0, 0.0]}
    # without a group size the first run of equal problem ids is the group
    assert len(first_group(texts, texts, [1, 2, 3, 4], [p.id] * 3 + [q.id], None)["rewards"]) == 3


STEPS = [  # literal step rows in the shape qedlib.rl.step_metrics writes
    {"step": 1, "loss": 0.0, "reward": 0.10, "reward_std": 0.02, "frac_zero_std": 0.5, "truncation_rate": 0.6, "grad_norm": 0.5,
     "clip_ratio": 0.0, "group": {"problem_id": "p", "completions": ["x\ny", "z"], "proofs": ["", "P"],
                                  "rewards": [0.0, 0.2]}},
    {"step": 2, "loss": 0.0, "reward": 0.20, "reward_std": 0.04, "frac_zero_std": 0.0, "truncation_rate": 0.2, "grad_norm": 0.1,
     "clip_ratio": 0.0},
    {"step": 3, "loss": 0.0, "reward": 0.30, "reward_std": 0.03, "frac_zero_std": 0.25, "truncation_rate": 0.4, "grad_norm": 0.3,
     "clip_ratio": 0.0},
]


def test_findings_are_computed_from_the_runs_numbers():
    text = findings(STEPS, {"weights_changed_frac": 0.0}, RLConfig(num_generations=4, max_completion_length=64))
    assert "std of 0.030" in text and "25% of groups" in text and "all 4 rollouts" in text
    assert "40% of rollouts never closed" in text and "mean reward 0.200" in text and "averaged 0.333" in text
    assert "Largest 0.5 at step 1 (median 0.3" in text and "rises with the truncation rate (r = +1.00)" in text
    # the opposite sign is not explained as truncation-driven
    against = [dict(r, truncation_rate=1 - r["truncation_rate"]) for r in STEPS]
    assert "does not rise with the truncation rate (r = -1.00 over 3 steps)" in findings(against, {}, RLConfig())
    assert "0.00% of tokens" in text and "steps_per_generation 1" in text and "[0, 5]" in text
    assert "trained nothing" in text
    # no group had a signal, yet the weights changed: weight decay and the entropy bonus, not the reward
    flat = [dict(r, frac_zero_std=1.0) for r in STEPS]
    assert "weight decay (0.01)" in findings(flat, {"weights_changed_frac": 0.9}, RLConfig())
    assert "weight decay" not in findings(STEPS, {"weights_changed_frac": 0.9}, RLConfig())
    lag = findings(STEPS, {}, RLConfig(steps_per_generation=2))
    assert "reused for 2 steps" in lag and "Weights" not in lag
    assert findings([], {}, RLConfig()) == "No step records to read."


def test_worked_group_table():
    table, info = worked_group(STEPS)
    assert info == {"step": 1, "problem_id": "p", "group_mean": pytest.approx(0.1)}
    assert list(table["advantage (scale none)"]) == pytest.approx([-0.1, 0.1])
    assert list(table["completion (excerpt)"]) == ["x y", "z"]
    assert worked_group(STEPS[1:]) == (None, None)


def test_reward_comparison_names_both_runs():
    fmt = [{"step": i, "loss": 0.0, "reward": r, "frac_zero_std": 0.0} for i, r in enumerate([0.2, 0.5, 0.8], 1)]
    text = reward_comparison(STEPS, fmt)
    assert text.startswith("The format reward went 0.200 -> 0.800 over 3 steps with 0% of groups all-equal")
    assert "judge reward went 0.100 -> 0.300" in text and "all-equal too" not in text
    flat = [dict(r, frac_zero_std=1.0) for r in fmt]
    assert "every format group was all-equal too" in reward_comparison(STEPS, flat)


def test_rc_findings_add_summaries_and_turns():
    from qedlib.rc_rl import findings as rc_findings
    metrics = {"summary_unclosed_rate": 0.75, "score_by_turn": {"0": {"score_mean": 1.5}, "1": {"score_mean": None}}}
    text = rc_findings(STEPS, metrics, RCRLConfig())
    assert "75% of summaries never closed" in text and "turn 0: 1.50" in text and "turn 1" not in text


def test_judge_view_shows_the_rubric_and_the_prompt_the_judge_read(shipped_problems):
    from qedlib.rubric_rl import judge_view
    cfg = load_config(ROOT / "params/smoke.yaml")
    p = next(p for p in shipped_problems if p.rubric)
    steps = [{"step": 1, "group": {"problem_id": p.id, "completions": ["t"], "proofs": [""], "rewards": [0.0]}},
             {"step": 2, "group": {"problem_id": p.id, "completions": ["t"], "proofs": ["MY PROOF"], "rewards": [0.1]}}]
    pid, rubric, prompt = judge_view(cfg, shipped_problems, steps)
    assert pid == p.id and rubric == p.rubric and "MY PROOF" in prompt and p.rubric in prompt
    with pytest.raises(ValueError, match="rerun the stage"):
        judge_view(cfg, shipped_problems, [{"step": 1}])


def test_state_view_renders_the_cache_state_and_the_summariser_prompt(shipped_problems, tiny_model_path):
    from transformers import AutoTokenizer
    from qedlib.rc_rl import state_view
    p = shipped_problems[0]
    turn = {"turn": 0, "prompt": [], "summary_in": "", "reasoning": "I tried n=1.", "final": "", "think_closed": False,
            "finish_reason": "length", "summary_out": "I checked n=1 only.", "prompt_tokens": 1, "completion_tokens": 4,
            "summary_tokens": 5, "summary_status": "ok"}
    view = state_view([{"problem_id": p.id, "turns": [turn]}], shipped_problems,
                      AutoTokenizer.from_pretrained(tiny_model_path), thinking=False)
    assert "I checked n=1 only." in view["state_prompt"] and p.problem in view["state_prompt"]
    assert "I tried n=1." in view["summariser_prompt"] and view["summary"] == "I checked n=1 only."
    assert "I checked n=1 only." in view["caption"]
    unusable = dict(turn, summary_out="", summary_status="unclosed")
    view = state_view([{"problem_id": p.id, "turns": [unusable]}], shipped_problems,
                      AutoTokenizer.from_pretrained(tiny_model_path), thinking=False)
    assert "No summary of the last step was usable" in view["caption"] and "unclosed" in view["caption"]



def test_worked_state_reads_the_last_steps_trajectories(shipped_problems, tiny_model_path, tmp_path):
    from qedlib.io import write_json
    from qedlib.rc_rl import worked_state
    p = shipped_problems[0]
    turn = {"turn": 0, "prompt": [], "summary_in": "", "reasoning": "r", "final": "", "think_closed": True,
            "finish_reason": "stop", "summary_out": "SUMMARY-0", "prompt_tokens": 1, "completion_tokens": 1,
            "summary_tokens": 1, "summary_status": "ok"}
    write_json(tmp_path / "trajectories_last_step.json", [{"problem_id": p.id, "turns": [turn]}])
    view = worked_state(load_config(None, {"thinking": False}), tmp_path, shipped_problems, tiny_model_path)
    assert "SUMMARY-0" in view["state_prompt"] and view["problem_id"] == p.id


def test_score_by_turn_before_and_after_on_literal_rows():
    from qedlib import rc_rl
    before = [{"problem_id": "a", "turn": 0, "score": 2.0, "truncated": True, "tokens": 10},
              {"problem_id": "a", "turn": 1, "score": None, "truncated": False, "tokens": 30}]
    after = [{"problem_id": "a", "turn": 0, "score": 4.0, "truncated": False, "tokens": 20},
             {"problem_id": "b", "turn": 0, "score": 6.0, "truncated": False, "tokens": 40}]
    table = rc_rl.turn_table(before, after)
    rows = {(r["model"], r["turn"]): r for r in table.to_dict(orient="records")}
    assert rows[("after", 0)]["score"] == 5.0 and rows[("after", 0)]["tokens"] == 30.0
    assert rows[("before", 1)]["score"] is None  # a turn with no valid grade: null in metrics.json, not NaN
    assert rows[("before", 0)]["truncated"] == 1.0
    assert rc_rl.turn_figure(table).data[0].type == "bar"
    assert rc_rl.tokens_per_trajectory(before + after) == (40 + 20 + 40) / 2  # problem a: 10+30+20, b: 40
    assert "at most 64 for one single pass" in rc_rl.tokens_finding(50.0, load_config(None, {"rc_rl.rc.reasoning_budget": 64}).rc_rl)
    metrics = rc_rl.stage_metrics({"reward_last": 0.5}, table, 50.0, [{"reward": 0.25}])
    assert metrics["reward_last"] == 0.5 and metrics["tokens_per_trajectory"] == 50.0
    assert [r["model"] for r in metrics["score_by_turn_after"]] == ["after"] and metrics["format_reward_steps"] == [0.25]
    json.dumps(metrics)  # what write_metrics writes


def test_rubric_rl_notebook_helpers(shipped_problems, tiny_model_path):
    from qedlib import rubric_rl
    cfg = load_config(ROOT / "params/smoke.yaml")
    problems, counts = rubric_rl.load_problems(cfg)
    assert counts["kept"] == len(problems) > 0
    table = rubric_rl.problems_table(problems, n=2)
    assert list(table.columns) == ["id", "category", "problem"] and len(table) == 2
    prompt = rubric_rl.first_prompt(tiny_model_path, problems, thinking=False)
    assert problems[0].problem in prompt
    metrics = rubric_rl.stage_metrics({"steps": 2}, STEPS, [{"reward": 0.1}, {"reward": 0.3}])
    assert metrics == {"steps": 2, "steps_rows": len(STEPS), "format_reward_steps": [0.1, 0.3]}


def test_format_run_with_zero_steps_trains_nothing_and_still_draws_the_judge_run():
    from qedlib import format_run

    def train(*_):
        raise AssertionError("format_steps = 0 must not train")
    steps, figure, text = format_run.beside_judge(train, load_config(None), "rubric_rl", "m", STEPS, 0)
    assert steps == [] and "format reward logged no steps" in text
    assert [t.name for t in figure.data] == ["judge"]

def try_it_overrides(notebook: str) -> list[tuple[str, dict]]:
    """(params file, overrides) of every `python -m qedlib run ...` command in the notebook's Try it section."""
    nb = json.loads((ROOT / "notebooks" / notebook).read_text())
    md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "## Try it" in md, f"{notebook} has no Try it section"
    section = md.split("## Try it", 1)[1]
    cmds = re.findall(r"python -m qedlib run (\S+)([^`\n]*)", section)
    return [(params, dict(parse_override(s) for s in re.findall(r"--set (\S+)", rest))) for params, rest in cmds]


@pytest.mark.parametrize("notebook", ["03_rubric_rl.ipynb", "04_reasoning_cache_rl.ipynb"])
def test_try_it_experiments_load_as_configs(notebook):
    runs = try_it_overrides(notebook)
    assert 3 <= len(runs) <= 5
    for params, overrides in runs:
        assert overrides, "each experiment changes a setting"
        load_config(ROOT / params, overrides)  # every key exists and validates
    nb = (ROOT / "notebooks" / notebook).read_text()
    names = re.findall(r"--run-name (\S+)", nb)
    assert len(names) == len(runs) == len(set(names)), "each experiment gets its own fresh run folder"


def test_training_prints_no_log_dicts_and_records_a_group_per_step(tiny_model_path, shipped_problems, tmp_path, capsys):
    """disable_tqdm made transformers print each {'loss': ...}; the step rows keep the numbers and one group."""
    from qedlib.rl import train_on_problems
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=2, max_completion_length=6, reward="format",
                  save_steps=10)
    rows, trainer = train_on_problems(rl, tiny_model_path, shipped_problems[:4], tmp_path, thinking=False)
    assert "{'loss'" not in capsys.readouterr().out
    assert all(r["loss"] is not None for r in rows)
    assert [len(r["group"]["rewards"]) for r in rows] == [2, 2]


def test_first_and_last_reward_windows_never_overlap():
    from qedlib.rl import summarise_steps
    rows = lambda rs: [{"reward": r, "loss": 0.0, "truncation_rate": 0.0, "invalid_rate": 0.0} for r in rs]
    s = summarise_steps(rows([0.1, 0.2, 0.6]))  # 3 steps: first vs last, not the same mean twice
    assert (s["reward_first"], s["reward_last"]) == (0.1, 0.6)
    s = summarise_steps(rows([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert s["reward_first"] == pytest.approx(0.2) and s["reward_last"] == pytest.approx(0.5)
