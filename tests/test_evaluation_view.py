"""What notebook 05 shows (qedlib.views.evaluation): findings in words, the paper tables, the final table, the
settings, one graded row read in full, the benchmark/model tables, the pass@k view and the results browser."""
from pathlib import Path

import pytest

from qedlib.config import load_config
from qedlib.plots import Note
from qedlib.problem_sets import Problem
from qedlib.stages import evaluation
from qedlib.views import evaluation as eval_view

from test_evaluation import tiny_cfg
from test_report import fake_run


def block(score, truncated, no_proof, invalid=0.0):
    return {"mean_score_pct": score, "truncation_rate": truncated, "no_proof_rate": no_proof, "invalid_rate": invalid,
            "mean_pct_invalid_dropped": score, "mean_pct_invalid_as_0": score * (1 - invalid)}


def hand_metrics():
    scores = {"base": {"single": block(10.0, 0.8, 0.8), "rc": block(20.0, 0.4, 0.5)},
              "rubric_rl": {"single": block(30.0, 0.2, 0.2, invalid=0.25)}}
    return {"checkpoints": ["base", "rubric_rl"], "scaffolds": ["rc", "single"], "scores": scores,
            "by_benchmark": {"shipped": scores}, "judge_calibration": {"mae": 2.5, "pairwise_agreement": 0.4}}


def flat_calibration(judge=2.8):
    from qedlib import calibration as C
    from qedlib.verdicts import Grade
    rows = [{"problem": Problem("p", "x"), "problem_id": "p", "proof": "", "reference_grade": g, "kind": "", "note": ""}
            for g in (7, 3, 0)]

    class Flat:
        def grade(self, problems, proofs):
            return [Grade(True, judge)] * len(proofs)

        def settings(self):
            return {}
    return C.calibrate(Flat(), rows)


def test_findings_predict_scores_from_a_constant_judge_and_the_no_proof_share():
    text = eval_view.findings(hand_metrics(), flat_calibration(2.8))  # 2.8 / 7 = 40%
    assert "no better than a constant" in text and "40% x (1 - the share with no proof)" in text
    assert "| base | single | 10.0% | 80% | 80% | 8.0% |" in text  # 40% x (1 - 0.8)
    assert "| base | rc | 20.0% | 40% | 50% | 20.0% |" in text
    assert "Run the judge calibration" in eval_view.findings(hand_metrics(), None)
    m = {**hand_metrics(), "scores": {"rc_rl": {"single": block(1.0, 0, 0)}, "base": {"single": block(2.0, 0, 0)}}}
    assert eval_view.findings(m).index("| base |") < eval_view.findings(m).index("| rc_rl |")  # pipeline order


def test_means_findings_explain_the_gap_from_the_invalid_rate():
    text = eval_view.means_findings(hand_metrics())
    assert "base / single: no invalid grade, so both means are 10.0%" in text
    assert "rubric_rl / single: 25% of grades are invalid; dropping them gives 30.0%, counting them as 0 gives 22.5%" in text


def test_paper_table_quotes_all_three_benchmarks():
    t = eval_view.paper_table(hand_metrics())
    assert list(t.loc["base", ["paper IMO-ProofBench", "paper ProofBench", "paper IMO-AnswerBench"]]) == [20.4, 19.5, 55.8]
    assert t.loc["rubric_rl"].isna()["paper ProofBench"] and t.loc["base", "this run shipped (single)"] == 10.0
    text = eval_view.paper_findings()
    for s in ("20.4 -> 39.5 -> 40.0", "19.5 -> 33.3 -> 44.9 (SFT +13.8, RL +11.6)", "55.8 -> 57.5 -> 67.5"):
        assert s in text


def test_final_table_is_small_and_settings_resolve():
    from qedlib.display import settings_table
    t = eval_view.final_table(hand_metrics())
    assert list(t.columns) == ["rc", "single"] and len(t) == 2 * 2 + 3
    assert t.loc["base: score % of 7", "rc"] == "20" and t.loc["rubric_rl: truncated (share of rows)", "rc"] == "n/a"
    assert t.loc["judge calibration: mae", "rc"] == "2.5" and t.loc["judge calibration: mae", "single"] == ""  # shown once
    cfg = load_config(Path(__file__).resolve().parent.parent / "params" / "cpu.yaml")
    assert len(settings_table(cfg, eval_view.SETTINGS)) == len(eval_view.SETTINGS) <= 15


def test_worked_example_shows_the_judge_prompt_as_sent(tmp_path, tiny_generator):
    from qedlib.grading import build_prompt
    cfg = tiny_cfg(tmp_path, samples=1, judge={"endpoint": {"model": "tiny-qwen3", "device": "cpu", "dtype": "float32"},
                                               "mode": "score_prob"})
    run = evaluation.Evaluation(cfg, tmp_path / "05_eval", judge_generator=tiny_generator)
    benches = evaluation.load_benchmarks(cfg.eval.benchmarks)
    rows = [{**r, "truncated": False} for r in run.run(benches, [("base", None)], ["single"], policy_factory=lambda ep: tiny_generator)]
    # a random model seldom closes </think>: grade one proof ourselves so the example has a judge call to show
    p = benches[0].problems[0]
    grade = run.grader("rubric").grade([p], ["Since 0 + 0 = 2 * 0, it is even."])[0]
    row = evaluation.make_row("base", benches[0], "single", p, 0,
                              {"final": "Since 0 + 0 = 2 * 0, it is even.", "think_closed": True, "prompt_tokens": 3,
                               "completion_tokens": 9, "cost": 0.0, "finish_reason": "stop", "calls": 1, "budget_hit": False},
                              grade)
    assert eval_view.pick_example(rows + [row]) is row
    text = eval_view.worked_example(run, rows + [row], benches)
    sent = build_prompt("rubric", "score_prob", p, "Since 0 + 0 = 2 * 0, it is even.").text
    assert "> " + p.problem.splitlines()[0] in text  # the problem as a quote: MathJax typesets it (not a fence)
    assert sent in text and "probabilities: 0: " in text and f"{row['score']:.2f} / 7" in text
    truncated = {**rows[0], "no_proof": "truncated", "graded_by": "no-proof", "score": 0.0}
    assert "No judge call" in eval_view.worked_example(run, [truncated], benches)


def test_notebook_05_tables(tmp_path):
    cfg = tiny_cfg(tmp_path)
    bench = evaluation.load_benchmarks(cfg.eval.benchmarks)
    table = eval_view.benchmarks_table(bench)
    assert table.to_dict(orient="records") == [{"benchmark": "toy", "problems": 3, "judge prompt": "rubric", "task": "proof",
                                               "splits": ["advanced", "basic"]}]
    models = eval_view.models_table(evaluation.models_under_test(cfg, tmp_path))
    assert list(models.checkpoint) == ["base"] and list(models.backend) == ["transformers"]
    assert eval_view.calibration_figures(None) == [] and eval_view.calibration_table(None) is None


def test_pass_at_k_view_draws_the_curve_or_says_why_not(tmp_path):
    """Two samples per problem: the real pass@k figure (one line, k = 1, 2; problem a fails both samples, b passes
    one, so pass@1 = 1/4 and pass@2 = 1/2); one sample: a sentence instead of a figure."""
    cfg = tiny_cfg(tmp_path)  # 2 samples, success = score >= 6
    rows = [{"benchmark": "toy", "checkpoint": "base", "scaffold": "single", "problem_id": p, "sample": s,
             "score": 7.0 if (p, s) == ("b", 1) else 0.0} for p in ("a", "b") for s in (0, 1)]
    fig = eval_view.pass_at_k_view(rows, cfg)
    assert not isinstance(fig, Note)
    (line,) = fig.data
    assert list(line.x) == [1, 2] and list(line.y) == pytest.approx([0.25, 0.5]) and line.name == "toy / base / single"
    one = load_config(None, {"eval.samples": 1})
    note = eval_view.pass_at_k_view(rows[:1], one)
    assert isinstance(note, Note) and "eval.samples = 1" in note.text


def test_results_browser_shows_a_row(tmp_path):
    _, rows = fake_run(tmp_path)
    box = eval_view.results_browser(rows)
    html = box.children[-1].value
    assert "Prove it." in html and "Judge" in html and "score" in html
    empty = eval_view.results_browser([])
    assert "No evaluation rows" in empty.value
