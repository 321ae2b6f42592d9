"""Judge calibration metrics (qedlib.calibration) on the shipped set and on literal rows."""
import json
from pathlib import Path

import pytest

from conftest import chat_reply

from qedlib import calibration as C
from qedlib.config import Endpoint, Judge, Sampling
from qedlib.problem_sets import DataError, Problem
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


# ---------------------------------------------------------------- human-graded sets and several judges
REPO = Path(__file__).resolve().parent.parent
GRADINGBENCH_SAMPLE = Path(__file__).parent / "fixtures" / "matharena_gradingbench_sample.jsonl"
# what each fake judge answers per proof (the proofs carry these ids); None: the judge call fails (HTTP 500)
JUDGE_A = {"P1-A": 6, "P1-B": 3, "P1-C": 3, "P2-A": 7, "P2-B": 4, "P2-C": 0}
JUDGE_B = {"P1-A": 3, "P1-B": 3, "P1-C": 3, "P2-A": 3, "P2-B": 3, "P2-C": None}


def scripted_judge(scores):
    """A fake judge's reply function: the score of the proof id found in the prompt, or a 500 when it is None."""
    def reply(body):
        prompt = body["messages"][-1]["content"]
        pid = next(k for k in scores if f"Proof {k}." in prompt)
        if scores[pid] is None:
            return 500, b'{"error": "scripted failure"}'
        return chat_reply(f"Assessment of {pid}.\n<score>{scores[pid]}</score>", prompt_tokens=50, completion_tokens=20)
    return reply


def test_gradingbench_schema_reads_through_the_column_mapping():
    rows = C.load_calibration(GRADINGBENCH_SAMPLE, C.GRADINGBENCH_COLUMNS)
    assert [r["reference_grade"] for r in rows] == [7, 3, 0, 7, 7, 2]
    assert [r["problem_id"] for r in rows] == ["1", "1", "1", "2", "2", "2"]
    assert rows[0]["proof"].startswith("Proof P1-A.") and "lamps" in rows[0]["problem"].problem
    # the marking scheme (a list of {title, points, desc}) becomes the rubric text the judge reads
    assert rows[0]["problem"].rubric.splitlines()[0].startswith("Invariant (3 points): States and proves")
    with pytest.raises(DataError, match="column 'answer_text' is missing.*map it with columns"):
        C.load_calibration(GRADINGBENCH_SAMPLE, {**C.GRADINGBENCH_COLUMNS, "proof": "answer_text"})


def test_official_grader_metrics_by_hand():
    """stats.py --grader on judge A's scores, computed by hand (see the comments)."""
    table = [{"problem_id": pid[:2], "score": float(s), "reference_grade": float(p)}
             for (pid, s), p in zip(JUDGE_A.items(), [7, 3, 0, 7, 7, 2])]
    m = C.official_metrics(table)
    assert m["mae"] == pytest.approx((1 + 0 + 3 + 0 + 3 + 2) / 6)
    assert m["accuracy"] == pytest.approx(2 / 6)  # (3, 3) in 1-3 and (7, 7): the only bucket matches
    # P1 pairs (6,7)-(3,3) agree, (6,7)-(3,0) agree, (3,3)-(3,0): 3<=3 but 3>0, disagree: 2/3; P2 likewise 2/3
    assert m["local_consistency"] == pytest.approx(2 / 3)
    # P1: advantages 2,-1,-1 vs 11/3,-1/3,-10/3 -> 14/9; P2: 10/3,1/3,-11/3 vs 5/3,5/3,-10/3 -> 10/9
    assert m["advantage_diff"] == pytest.approx((14 / 9 + 10 / 9) / 2)
    assert C.official_accuracy([(3.5, 3.0), (0.0, 0.0)]) == 0.5  # 3.5 is in no bucket: never rounded


def calibration_config(tmp_path, url_a, url_b):
    from qedlib.config import load_config
    judge = {"backend": "openai", "api": "chat", "max_retries": 0, "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}
    return load_config(REPO / "params" / "paper-table.yaml", {
        "eval.judge.endpoint": {"model": "judge-a", "base_url": url_a, **judge},
        "eval.calibration.path": str(GRADINGBENCH_SAMPLE),
        "eval.calibration.judges": [{"model": "judge-b", "base_url": url_b, "label": "small judge", **judge}]})


def test_two_judges_side_by_side_and_a_failed_call_is_no_grade(tmp_path, fake_openai):
    from qedlib.stages import evaluation
    server_a, server_b = fake_openai(scripted_judge(JUDGE_A)), fake_openai(scripted_judge(JUDGE_B))
    cfg = calibration_config(tmp_path, server_a.url, server_b.url)
    run = evaluation.Evaluation(cfg, tmp_path / "05_eval")
    main = evaluation.judge_calibration(run, [], cfg)
    judges = evaluation.judge_comparison(run, [], cfg, main)
    assert list(judges) == ["judge-a", "small judge"]
    a, b = judges["judge-a"]["official"], judges["small judge"]["official"]
    assert a["mae"] == pytest.approx(1.5) and a["local_consistency"] == pytest.approx(2 / 3)
    # judge B failed on P2-C: five grades, that row is in no measure (not a 0)
    assert judges["small judge"]["valid"] == 5 and judges["small judge"]["invalid_by_reason"]["judge_error"] == 1
    assert b["mae"] == pytest.approx((4 + 0 + 3 + 4 + 4) / 5) and b["accuracy"] == pytest.approx(1 / 5)
    assert b["local_consistency"] == pytest.approx((0 + 1) / 2) and b["advantage_diff"] == pytest.approx((22 / 9 + 0) / 2)
    table = C.comparison_table(judges)
    assert list(table.index) == ["judge-a", "small judge"] and table.loc["judge-a", "MAE (points, lower is better)"] == 1.5
    assert table.loc["judge-a", "tokens_per_grade"] == 70 and table.loc["judge-a", "cost_per_grade"] == pytest.approx(90e-6)
    fig = C.comparison_figure(judges)
    assert len(fig.data) == 4 and list(fig.data[0].x) == ["judge-a", "small judge"]
    # rerun: valid grades come from the cache, the failed call is asked again and now counts
    JUDGE_B["P2-C"] = 2
    calls_a, calls_b = server_a.calls, server_b.calls
    try:
        again = evaluation.judge_comparison(run, [], cfg, evaluation.judge_calibration(run, [], cfg))
    finally:
        JUDGE_B["P2-C"] = None
    assert server_a.calls == calls_a and server_b.calls == calls_b + 1
    assert again["small judge"]["valid"] == 6
