"""Judge calibration metrics (qedlib.calibration) on the shipped set and on literal rows."""
import json

import pytest

from qedlib import calibration as C
from qedlib.config import Endpoint, Judge, Sampling
from qedlib.data import DataError, Problem
from qedlib.grading import Grader
from qedlib.verdicts import Grade


class ScriptedGrader:
    """Returns fixed grades; stands in for a judge so the metric arithmetic can be checked exactly."""

    def __init__(self, grades):
        self.grades = grades

    def grade(self, problems, proofs):
        return self.grades

    def settings(self):
        return {"model": "scripted"}


def rows_of(ref):
    p, q = Problem("p", "Prove p."), Problem("q", "Prove q.")
    return [{"problem": p if k < 3 else q, "problem_id": "p" if k < 3 else "q", "proof": f"proof {k}",
             "reference_grade": g, "kind": "x", "note": ""} for k, g in enumerate(ref)]


def test_shipped_calibration_set_loads_and_joins():
    rows = C.load_calibration()
    assert len(rows) >= 12
    assert all(r["problem"].id == r["problem_id"] and r["problem"].rubric for r in rows)
    assert {r["kind"] for r in rows} >= {"good", "flawed", "wrong"}


def test_metrics_by_hand():
    rows = rows_of([7, 3, 0, 7, 0])
    grades = [Grade(True, 6.0), Grade(True, 4.0), Grade(True, 4.0), Grade(False, None, reason="no_tag"), Grade(True, 1.0)]
    r = C.calibrate(ScriptedGrader(grades), rows)
    assert r["valid"] == 4 and r["invalid_rate"] == 0.2 and r["invalid_by_reason"]["no_tag"] == 1
    assert r["mae"] == pytest.approx((1 + 1 + 4 + 1) / 4)
    # buckets: 7->4-6 (miss), 3->4-6 (miss), 0->4-6 (miss), 0->1-3 (miss)
    assert r["bucket_accuracy"] == 0.0
    # problem p pairs: (7,3): 6>4 agree; (7,0): 6>4 agree; (3,0): 4=4 tie -> 1/2; problem q has one valid row
    assert r["pairwise_agreement"] == pytest.approx(2.5 / 3) and r["pairs"] == 3
    # advantages on p: judge 6,4,4 (mean 14/3), reference 7,3,0 (mean 10/3)
    ms, mr = 14 / 3, 10 / 3
    expect = (abs((6 - ms) - (7 - mr)) + abs((4 - ms) - (3 - mr)) + abs((4 - ms) - (0 - mr))) / 3
    assert r["advantage_error"] == pytest.approx(expect)
    assert C.bucket_confusion(r)[3][2] == 1 and sum(map(sum, C.bucket_confusion(r))) == 4
    figs = C.calibration_figures(r)
    assert set(figs) == {"confusion", "scatter"} and figs["confusion"].data[0].z is not None


def test_bucket_of():
    assert [C.bucket_of(x) for x in (0, 0.4, 1, 3.4, 3.6, 6, 6.6, 7)] == ["0", "0", "1-3", "1-3", "4-6", "4-6", "7", "7"]


def test_custom_file_with_column_mapping_and_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"q": "Prove x.", "answer_text": "Because.", "human": 5, "pid": "a"}) + "\n")
    rows = C.load_calibration(f, columns={"problem": "q", "proof": "answer_text", "reference_grade": "human",
                                          "problem_id": "pid"})
    assert rows[0]["problem"].problem == "Prove x." and rows[0]["reference_grade"] == 5.0
    with pytest.raises(DataError, match="row 0.*'proof'"):
        C.load_calibration(f)
    f.write_text(json.dumps({"problem_id": "nope", "proof": "x", "reference_grade": 3}) + "\n")
    with pytest.raises(DataError, match="row 0: problem id 'nope'"):
        C.load_calibration(f)
    f.write_text(json.dumps({"problem_id": "nope", "proof": "x", "reference_grade": 9}) + "\n")
    with pytest.raises(DataError, match="outside 0-7"):
        C.load_calibration(f)


def test_calibrate_with_a_real_inprocess_judge(tmp_path):
    rows = C.load_calibration()[:3]
    judge = Judge(endpoint=Endpoint(model="tiny-qwen3", dtype="float32"), mode="score_prob",
                  sampling=Sampling(max_new_tokens=4))
    r = C.calibrate(Grader(judge, cache_dir=tmp_path), rows)
    assert r["rows"] == 3 and r["valid"] == 3 and r["invalid_rate"] == 0.0
    assert 0 <= r["mae"] <= 7 and r["prompt_tokens_per_grade"] > 0 and len(r["table"]) == 3


def constant_result(ref, judge):
    return C.calibrate(ScriptedGrader([Grade(True, float(g)) for g in judge]), rows_of(ref))


def test_constant_baseline_and_chance_by_hand():
    r = constant_result([7, 3, 0, 7, 0], [2, 2, 2, 2, 2])
    base = C.constant_baseline(r)
    assert base["best_constant"] == 3 and base["best_constant_mae"] == pytest.approx((4 + 0 + 3 + 4 + 3) / 5)
    assert base["judge_mean"] == 2 and base["judge_mean_mae"] == pytest.approx((5 + 1 + 2 + 5 + 2) / 5)
    assert C.chance_levels() == {"pairwise_agreement": 0.5, "bucket_accuracy": 0.25}
    table = C.judge_vs_baselines(r)
    assert table.loc["pairwise ordering within a problem", "constant judge"] == 0.5
    assert table.iloc[0]["constant judge"] == pytest.approx(2.8)


def test_a_constant_judge_is_called_one_and_a_perfect_judge_is_not():
    ref = [7, 3, 0, 7, 0]
    flat, perfect = constant_result(ref, [2.5] * 5), constant_result(ref, ref)
    assert C.beats_constant(flat) is False and C.beats_constant(perfect) is True
    assert "no better than a constant" in C.findings(flat) and "2.50 / 7 (36%)" in C.findings(flat)
    assert "carries signal" in C.findings(perfect) and "0.00 points" in C.findings(perfect)
    assert "No calibration proof" in C.findings(None)
    s = C.summary(flat)
    assert s["beats_constant"] is False and s["best_constant_mae"] == pytest.approx(2.8) and s["mae"] is not None


def test_proofs_table_shows_every_proof_with_the_judges_grade_where_graded():
    rows = C.load_calibration()
    graded = C.calibrate(ScriptedGrader([Grade(True, 4.0), Grade(False, None, reason="no_tag")]), rows[:2])
    table = C.proofs_table(rows, graded)
    assert len(table) == len(rows) == 36 and set(table["kind"]) == {"good", "flawed", "wrong"}
    assert list(table["judge"][:3]) == [4.0, "invalid (no_tag)", "not graded"]
    assert table["proof"][0] == rows[0]["proof"] and table["note"][0] == rows[0]["note"]  # in full, not cut
