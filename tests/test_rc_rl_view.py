"""What notebook 04 shows (qedlib.views.rc_rl) and the stage steps it reads back (qedlib.stages.rc_rl): the settings
table, a cache state in full, the findings (fed a laptop run's numbers: tests/fixtures/rc_rl_run.json), the score by
turn, the Try-it experiments."""
import json
from pathlib import Path

import pytest

from qedlib.config import RCRLConfig, load_config
from qedlib.display import settings_table
from qedlib.config import parse_override
from qedlib.files import write_json
from qedlib.rl_findings import findings as grpo_run_findings
from qedlib.stages import rc_rl
from qedlib.views import rc_rl as rc_rl_view

ROOT = Path(__file__).resolve().parent.parent

STEPS = [  # literal step rows in the shape qedlib.grpo.step_metrics writes
    {"step": 1, "loss": 0.0, "reward": 0.10, "reward_std": 0.02, "frac_zero_std": 0.5, "truncation_rate": 0.6,
     "grad_norm": 0.5, "clip_ratio": 0.0, "trajectory_s": 1.0, "rollout_s": 2.0, "summary_unclosed_rate": 0.5},
    {"step": 2, "loss": 0.0, "reward": 0.20, "reward_std": 0.04, "frac_zero_std": 0.0, "truncation_rate": 0.2,
     "grad_norm": 0.1, "clip_ratio": 0.0, "trajectory_s": 1.5, "rollout_s": 2.5, "summary_unclosed_rate": 0.0},
    {"step": 3, "loss": 0.0, "reward": 0.30, "reward_std": 0.03, "frac_zero_std": 0.25, "truncation_rate": 0.4,
     "grad_norm": 0.3, "clip_ratio": 0.0, "trajectory_s": 1.2, "rollout_s": 2.2, "summary_unclosed_rate": None},
]


def test_settings_show_the_papers_rc_rl_values():
    """The paper column notebook 04 showed when its settings cell carried the values itself."""
    table = settings_table(load_config(ROOT / "params/cpu.yaml"), rc_rl_view.SETTINGS)
    assert list(table["paper"]) == ["3", "49,152", "2,048", "at most two short paragraphs", "frozen", "-", "2", "16",
                                    "64", "-", "49,152", "1e-06", "4", "0.0001", "judge"]
    assert table.index[0] == "reasoning turns" and table.index[-1] == "reward"


def test_rc_findings_add_summaries_and_turns_and_leave_out_weights_changed():
    metrics = {"summary_unclosed_rate": 0.75, "weights_changed_frac": 0.9,
               "score_by_turn": {"0": {"score_mean": 1.5, "ci_low": 1.0, "ci_high": 2.0, "n_scored": 4},
                                 "1": {"score_mean": None}}}
    text = rc_rl_view.findings(STEPS, metrics, RCRLConfig())
    assert text.startswith(grpo_run_findings(STEPS, {"summary_unclosed_rate": 0.75}, RCRLConfig()))  # stage 3's first
    assert "Weights" not in text and "90.0%" not in text  # "weights changed" is no evidence: the probe replaces it
    assert "75% were unusable" in text and "turn 0: 1.50 [1.00, 2.00], 4 graded" in text and "turn 1" not in text


def test_step_figures_one_scale_per_panel_and_a_log_gradient_norm():
    rows = [dict(r, judge_score_mean=2.5, summary_cut_rate=0.25) for r in STEPS]
    figures = rc_rl_view.step_figures(rows)
    assert [f.layout.title.text for f in figures] == ["RC-RL reward per step", "Rates and gradient norm per step",
                                                      "Where the time goes"]
    assert figures[0].layout.yaxis.title.text == "reward" and figures[0].layout.yaxis2.title.text == "judge_score_mean"
    assert figures[1].layout.yaxis2.type == "log" and figures[1].layout.yaxis2.title.text == "grad_norm (log)"
    assert [t.name for t in figures[2].data] == ["trajectory_s", "rollout_s"]  # grading_s was not timed


def test_state_view_renders_the_cache_state_and_the_summariser_prompt(shipped_problems, tiny_model_path):
    from transformers import AutoTokenizer
    p = shipped_problems[0]
    turn = {"turn": 0, "prompt": [], "summary_in": "", "reasoning": "I tried n=1.", "final": "", "think_closed": False,
            "finish_reason": "length", "summary_out": "I checked n=1 only.", "prompt_tokens": 1, "completion_tokens": 4,
            "summary_tokens": 5, "summary_status": "ok", "summary_finish": "length"}
    view = rc_rl_view.state_view([{"problem_id": p.id, "turns": [turn]}], shipped_problems,
                                 AutoTokenizer.from_pretrained(tiny_model_path), thinking=False,
                                 summary_length="two sentences")
    assert "I checked n=1 only." in view["state_prompt"] and p.problem in view["state_prompt"]
    assert "Write two sentences in the first person" in view["summariser_prompt"]
    assert "I tried n=1." in view["summariser_prompt"] and view["summary"] == "I checked n=1 only."
    assert "I checked n=1 only." in view["caption"] and "cut at its token budget" in view["caption"]
    assert "nothing checks what it says" in view["caption"] and "status ok" not in view["caption"]
    two_lines = dict(turn, summary_out="I checked n=1.\nThen I stopped.")  # every line inside the quote
    caption = rc_rl_view.state_view([{"problem_id": p.id, "turns": [two_lines]}], shipped_problems,
                                    AutoTokenizer.from_pretrained(tiny_model_path), thinking=False,
                                    summary_length="two sentences")["caption"]
    assert caption.endswith("> I checked n=1.\n> Then I stopped.")
    unusable = dict(turn, summary_out="", summary_status="unclosed")
    view = rc_rl_view.state_view([{"problem_id": p.id, "turns": [unusable]}], shipped_problems,
                                 AutoTokenizer.from_pretrained(tiny_model_path), thinking=False,
                                 summary_length="two sentences")
    assert "No summary of the last step was usable" in view["caption"] and "unclosed" in view["caption"]
    with pytest.raises(ValueError, match="rerun the stage"):
        rc_rl_view.state_view([], shipped_problems, None, thinking=False, summary_length="two sentences")


def test_worked_state_reads_the_last_steps_trajectories(shipped_problems, tiny_model_path, tmp_path):
    p = shipped_problems[0]
    turn = {"turn": 0, "prompt": [], "summary_in": "", "reasoning": "r", "final": "", "think_closed": True,
            "finish_reason": "stop", "summary_out": "SUMMARY-0", "prompt_tokens": 1, "completion_tokens": 1,
            "summary_tokens": 1, "summary_status": "ok"}
    write_json(tmp_path / "trajectories_last_step.json", [{"problem_id": p.id, "turns": [turn]}])
    view = rc_rl_view.worked_state(load_config(None, {"thinking": False}), tmp_path, shipped_problems, tiny_model_path)
    assert "SUMMARY-0" in view["state_prompt"] and view["problem_id"] == p.id
    assert "Write at most two short paragraphs in the first person" in view["summariser_prompt"]  # the paper's default


def test_score_by_turn_before_and_after_on_literal_rows():
    before = [{"problem_id": "a", "turn": 0, "score": 2.0, "truncated": True, "tokens": 10},
              {"problem_id": "a", "turn": 1, "score": None, "truncated": False, "tokens": 30}]
    after = [{"problem_id": "a", "turn": 0, "score": 4.0, "truncated": False, "tokens": 20},
             {"problem_id": "b", "turn": 0, "score": 6.0, "truncated": False, "tokens": 40}]
    table = rc_rl_view.turn_table(before, after)
    rows = {(r["model"], r["turn"]): r for r in table.to_dict(orient="records")}
    assert rows[("after", 0)]["score"] == 5.0 and rows[("after", 0)]["tokens"] == 30.0
    assert rows[("after", 0)]["graded"] == 2 and rows[("before", 1)]["graded"] == 0
    assert rows[("before", 1)]["score"] is None  # a turn with no valid grade: null in metrics.json, not NaN
    assert rows[("before", 0)]["truncated"] == 1.0
    figure = rc_rl_view.turn_figure(table)
    assert [t.name for t in figure.data] == ["before", "after"] and figure.layout.yaxis.title.text
    assert figure.layout.xaxis.title.text == "RC turn"
    assert rc_rl.tokens_per_trajectory(before + after) == (40 + 20 + 40) / 2  # problem a: 10+30+20, b: 40
    settings = load_config(None, {"rc_rl.rc.reasoning_budget": 64}).rc_rl
    assert "at most 64 for one single pass" in rc_rl_view.tokens_finding(50.0, settings)
    assert "no more tokens than one pass" in rc_rl_view.tokens_finding(50.0, settings)
    assert "more tokens, in bounded pieces" in rc_rl_view.tokens_finding(130.0, settings)
    metrics = rc_rl.stage_metrics({"reward_last": 0.5}, table, 50.0)
    assert metrics["reward_last"] == 0.5 and metrics["tokens_per_trajectory"] == 50.0
    assert [r["model"] for r in metrics["score_by_turn_after"]] == ["after"]
    json.dumps(metrics)  # what write_metrics writes


# ---------------------------------------------------------------- findings on literal numbers (each branch)
LEARNING = {"reward": "format", "first": 0.30, "last": 0.55, "gain": 0.25, "ci_low": 0.10, "ci_high": 0.40,
            "n_first": 8, "n_last": 8, "steps_first": [1, 2], "steps_last": [5, 6]}


@pytest.mark.parametrize("lo,hi,verdict", [(0.10, 0.40, "rose beyond noise"), (-0.4, -0.1, "fell beyond noise"),
                                           (-0.05, 0.40, "includes 0: no change beyond noise")])
def test_learning_finding_claims_a_rise_only_when_the_interval_excludes_zero(lo, hi, verdict):
    text = rc_rl_view.learning_finding(dict(LEARNING, ci_low=lo, ci_high=hi))
    assert verdict in text and "0.300 (mean of 8 groups in steps 1-2) -> 0.550" in text
    assert "too few groups" in rc_rl_view.learning_finding(dict(LEARNING, n_first=1))
    assert "No gain measured: 1 step" in rc_rl_view.learning_finding(
        {"reward": "format", "gain": None, "note": "1 step(s) logged group rewards"})


def test_probe_and_turn_findings_say_noise_when_the_interval_holds_zero():
    probe = {"probe_items": 8, "logprob_start": -2.0, "logprob_trained": -1.9, "logprob_gain": 0.1, "ci_low": -0.01,
             "ci_high": 0.2, "kl": 0.05}
    assert "within noise" in rc_rl_view.probe_finding(probe) and "KL(trained || start) is 0.0500" in \
        rc_rl_view.probe_finding(probe)
    assert "beyond noise" in rc_rl_view.probe_finding(dict(probe, ci_low=0.05))
    assert "4 items are too few for a verdict (at least 5)" in rc_rl_view.probe_finding(dict(probe, probe_items=4,
                                                                                              ci_low=0.05))
    turn = {"0": {"score_mean": 2.0, "ci_low": 1.5, "ci_high": 2.5, "n_scored": 12},
            "change": {"from_turn": 0, "to_turn": 1, "mean": -0.5, "ci_low": -0.9, "ci_high": -0.1, "pairs": 12}}
    assert "the later turn scores lower beyond noise" in rc_rl_view.turn_finding(turn)
    assert "too few pairs to tell" in rc_rl_view.turn_finding({**turn, "change": dict(turn["change"], pairs=3)})
    assert "no difference beyond noise" in rc_rl_view.turn_finding({**turn, "change": dict(turn["change"], ci_high=0.2)})
    assert rc_rl_view.turn_finding({}) is None and rc_rl_view.summary_finding({}, RCRLConfig()) is None


# ---------------------------------------------------------------- "Try it"
def test_every_try_it_override_loads_starts_from_the_runs_stage_03_and_the_command_says_the_same():
    text = rc_rl_view.try_it()
    for x in rc_rl_view.EXPERIMENTS:
        cfg = load_config(ROOT / "params/cpu.yaml", x["overrides"])
        for key, value in x["overrides"].items():
            got = cfg
            for part in key.split("."):
                got = getattr(got, part)
            assert got == value, key
        assert x["overrides"]["rc_rl.model"] == "outputs/cpu/03_rubric_rl/model"
        line = next(ln for ln in text.splitlines() if f"try-{x['name']} " in ln)
        sets = dict(parse_override(s.split("`")[0]) for s in line.split("--set ")[1:])
        assert sets == x["overrides"] and x["look_for"] in text


def test_start_model_reads_a_relative_folder_from_the_repository_root(tmp_path, monkeypatch, tiny_model_path):
    import shutil
    monkeypatch.chdir(tmp_path)  # as the notebook's kernel, which runs in notebooks/
    target = ROOT / "outputs" / "test-rc-start" / "model"
    shutil.copytree(tiny_model_path, target, dirs_exist_ok=True)
    try:
        cfg = load_config(None, {"rc_rl.model": "outputs/test-rc-start/model"})
        assert rc_rl.start_model(cfg, tmp_path) == str(target)
    finally:
        shutil.rmtree(target.parent)


CHECK = {"reward": "opening", "problems": 4, "trained_on": 0, "states": 12, "samples_per_state": 4, "start": 0.25,
         "trained": 0.979, "gain": 0.729, "ci_low": 0.625, "ci_high": 0.833, "n": 12,
         "per_state": [{"problem_id": "qed-014", "state": 0, "start": 0.25, "trained": 1.0}]}


@pytest.mark.parametrize("lo,hi,n,verdict", [(0.625, 0.833, 12, "it rose beyond noise"),
                                             (-0.8, -0.1, 12, "it fell beyond noise"),
                                             (-0.05, 0.8, 12, "includes 0: no change beyond noise"),
                                             (0.625, 0.833, 4, "too few states for a verdict")])
def test_reward_check_finding_states_its_test(lo, hi, n, verdict):
    """The make run's numbers (0.25 -> 0.979 on 12 states of 4 problems none of which it trained on) and each branch."""
    text = rc_rl_view.reward_check_finding(dict(CHECK, ci_low=lo, ci_high=hi, states=n))
    assert verdict in text and "0.250 (starting policy) -> 0.979 (trained): gain +0.729" in text
    assert "none of which the run trained on" in text
    assert "2 of which the run trained on" in rc_rl_view.reward_check_finding(dict(CHECK, trained_on=2))
    assert "Not measured" in rc_rl_view.reward_check_finding({"states": 0, "note": "rc_rl.check_problems is 0"})
    fig = rc_rl_view.reward_check_figure(CHECK)
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text and len(fig.data) == 2


def test_report_shows_the_reward_check_row(tmp_path):
    from qedlib.tools import report
    write_json(tmp_path / "04_reasoning_cache_rl" / "metrics.json", {"steps": 6, "reward_check": CHECK})
    md = report.achieved_section(tmp_path)
    row = next(l for l in md.splitlines() if "fixed cache states" in l and l.startswith("| 04"))
    assert "0.25" in row and "0.979" in row and "+0.729" in row and "| yes |" in row


def test_rc_findings_carry_the_reward_check_when_measured():
    text = rc_rl_view.findings(STEPS, {"reward_check": CHECK}, RCRLConfig())
    assert "**Reward on fixed cache states.**" in text and "it rose beyond noise" in text
    assert "fixed cache states" not in rc_rl_view.findings(STEPS, {}, RCRLConfig())
