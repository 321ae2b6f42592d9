"""Notebook 04's findings fed the numbers of the laptop run the issue cites (tests/fixtures/rc_rl_issue_run.json: its
turns.jsonl, steps and metrics) state what those numbers show, word for word: a score by turn with its interval and
"too few pairs to tell" instead of a bare mean per turn; summaries counted from the data; no "weights changed"."""
import json
from pathlib import Path

from qedlib.config import load_config
from qedlib.stages import rc_rl
from qedlib.views import rc_rl as rc_rl_view

ROOT = Path(__file__).resolve().parent.parent
RUN = json.loads((ROOT / "tests/fixtures/rc_rl_issue_run.json").read_text())
# that run's summariser: the policy itself, thinking first, 48 + 32 tokens
SETTINGS = load_config(ROOT / "params/cpu.yaml", {"rc_rl.rc.summariser": "policy", "rc_rl.rc.summary_thinking": None,
                                                  "rc_rl.rc.summary_thinking_budget": 32,
                                                  "rc_rl.rc.summary.max_new_tokens": 48}).rc_rl


def test_score_by_turn_of_the_issue_run_has_intervals_and_says_too_few_pairs():
    by_turn = rc_rl.score_by_turn(RUN["turns"])
    assert rc_rl_view.turn_finding(by_turn) == (
        "**By turn** (judge score 0-7 of each turn's proof during training, 95% interval over trajectories): "
        "turn 0: 2.64 [2.61, 2.68], 3 graded; turn 1: 1.76 [0.00, 2.67], 3 graded. Turn 1 minus turn 0 on the same "
        "trajectories: -0.88 points (95% interval [-2.63, +0.07], 3 pairs): too few pairs to tell.")


def test_summaries_of_the_issue_run_are_counted_from_its_turns():
    metrics = dict(RUN["metrics"], summaries=sum(1 for t in RUN["turns"] if t["summary_status"]))
    assert rc_rl_view.summary_finding(metrics, SETTINGS) == (
        "**Summaries** (written by the policy itself). 6 summaries: 50% were unusable (thinking never closed, or "
        "empty) and the previous cache state was kept.")


def test_the_issue_runs_findings_leave_out_weights_changed():
    metrics = dict(RUN["metrics"], score_by_turn=rc_rl.score_by_turn(RUN["turns"]))
    text = rc_rl_view.findings(RUN["steps"], metrics, SETTINGS)
    assert "Weights" not in text and "89.5%" not in text
