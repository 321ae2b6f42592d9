"""The official QED-Nano export: layout, field names and types (from its eval and viewer READMEs), and our
summary recomputed from the exported files. Rows are built with evaluation.make_row on a synthetic run folder."""
import csv
import dataclasses
import json
import math

import pandas as pd
import pytest

from qedlib.stages import evaluation

from qedlib.tools import export
from qedlib.config import load_config, save_config
from qedlib.problem_sets import imobench_dir
from qedlib.grading import Grader, build_prompt
from qedlib.verdicts import Grade, invalid_grade, no_proof_grade
from qedlib.files import JsonlLog

RUBRIC = ("Checkpoints (7 points total):\n- [2 pts] Writes n = 2k.\n- [5 pts] Concludes n + n = 2(2k).\n"
          "Zero-credit items:\n- Examples only.")
GUIDELINES = "(Partial)\n 1. Set up the parity argument.\n(Almost)\n 1. Minor slip in the final step."
OFFICIAL = ("problem_id", "problem", "model_solution", "score", "grade", "schema_0", "cost_run", "grade_cost")
COST = {"input_tokens", "output_tokens", "cost", "time"}


def write_bench(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tmp_path, **eval_over):
    toy = write_bench(tmp_path / "toy.jsonl", [{"pid": f"t{i}", "statement": f"Prove that {i} + {i} is even.", "scheme": RUBRIC,
                                                "ref": f"{i} + {i} = 2 * {i}.", "split": "basic" if i % 2 else "advanced"}
                                               for i in range(3)])
    guided = write_bench(tmp_path / "guided.jsonl", [{"id": f"g{i}", "problem": f"Show {i} * 2 is even.",
                                                      "reference_solution": f"{i} * 2 = 2 * {i}.", "rubric": GUIDELINES}
                                                     for i in range(2)])
    answers = write_bench(tmp_path / "answers.jsonl", [{"id": f"a{i}", "problem": f"Compute {i} + 1.", "answer": str(i + 1)}
                                                       for i in range(3)])
    over = {"eval.benchmarks": [
                {"name": "toy", "path": toy, "columns": {"id": "pid", "problem": "statement", "rubric": "scheme",
                                                         "reference_solution": "ref"}},
                {"name": "guided", "path": guided, "prompt": "proofbench"},
                {"name": "answers", "path": answers, "prompt": "answer", "task": "answer"}],
            "eval.checkpoints": ["base", "org/sft model"], "eval.scaffolds": ["single"], "eval.samples": 3,
            "eval.bootstrap": 50, "eval.pass_k": [1, 2]}
    over.update({f"eval.{k}": v for k, v in eval_over.items()})
    return load_config(None, over)


def gen(final, closed=True, tokens=5):
    return {"final": final, "think_closed": closed, "prompt_tokens": 11, "completion_tokens": tokens, "cost": 0.001,
            "finish_reason": "stop", "calls": 1, "budget_hit": False}


# (checkpoint, benchmark, problem, sample) of the special rows of the fixture
TRUNCATED = ("base", "toy", "t0", 0)  # thinking never closed: no proof, score 0, truncated
EMPTY = ("base", "toy", "t1", 1)  # closed thinking, empty proof: score 0, not truncated by our rule
JUDGE_FAILED = ("base", "toy", "t2", 2)  # judge error: score None, grade []
GENERATED_ONLY = ("base", "toy", "t2", 0)  # generated, killed before grading: no result row
NEVER = ("org/sft model", "toy", "t1", 2)  # never generated
NO_GRADE_KEY = ("org/sft model", "toy", "t0", 1)  # a row without `grade`
BAD_GRADE = ("org/sft model", "guided", "g1", 0)  # a row whose `grade` is not a list


def build_run(tmp_path, cfg, answer_scale=7):
    """A run folder with 05_eval/config.yaml, results.jsonl (special rows above) and generations.jsonl."""
    run = tmp_path / "run"
    stage = run / "05_eval"
    save_config(cfg, stage / "config.yaml")
    results, gens = JsonlLog(stage / "results.jsonl"), JsonlLog(stage / "generations.jsonl")
    benches = evaluation.load_benchmarks(cfg.eval.benchmarks, None, cfg.eval.judge.prompt)
    for c, ck in enumerate(cfg.eval.checkpoints):
        for bench in benches:
            for i, p in enumerate(bench.problems):
                for s in range(cfg.eval.samples):
                    where, key = (ck, bench.name, p.id, s), evaluation.result_key(ck, bench.name, "single", p.id, s)
                    if where == NEVER:
                        continue
                    g = gen(f"Proof {i}.{s}: {p.id} holds because it is 2k.")
                    if where == GENERATED_ONLY:
                        gens.append({"key": key, **g})
                        continue
                    if bench.task == "answer":
                        grade = Grade(True, 7.0 * ((i + s + c) % 2), method="math-verify")
                    elif bench.judge_prompt == "proofbench":
                        grade = Grade(True, float((0, 1, 6, 7)[(i + 2 * s + c) % 4]), judge_text=f"guided verdict {i}{s}")
                    else:
                        grade = Grade(True, float((i + 3 * s + c) % 8), judge_text=f"The proof of {p.id} earns points.")
                    if where == TRUNCATED:
                        g, grade = gen("", closed=False), no_proof_grade("truncated")
                    elif where == EMPTY:
                        g, grade = gen(""), no_proof_grade("empty")
                    elif where == JUDGE_FAILED:
                        grade = invalid_grade("judge_error", "HTTP 503")
                    row = evaluation.make_row(ck, bench, "single", p, s, g, grade)
                    if bench.task == "answer" and answer_scale == 1 and row["score"]:
                        row["score"] = 1.0  # the 0/1 answer rows of the other scale
                    if where == NO_GRADE_KEY:
                        del row["grade"]
                    if where == BAD_GRADE:
                        row["grade"] = "garbage"
                    results.append(row)
    return run


@pytest.fixture
def exported(tmp_path):
    cfg = make_cfg(tmp_path)
    run = build_run(tmp_path, cfg)
    out = tmp_path / "official"
    files = export.export_official(run, out)
    return run, out, files, cfg


def load(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def row_of(out, where, scaffold="single"):
    ck, bench, pid, s = where
    return next(r for r in load(out / export.folder_name(ck) / bench / scaffold / f"run-{s}.jsonl") if r["problem_id"] == pid)


def test_one_file_per_run_same_length_same_problem_order(exported):
    run, out, files, cfg = exported
    rel = sorted(str(f.relative_to(out)) for f in files)
    assert rel == sorted(f"{ck}/{b}/single/run-{k}.jsonl" for ck in ("base", "org_sft_model")
                         for b in ("toy", "guided", "answers") for k in range(3))
    for ck in ("base", "org_sft_model"):
        for bench, ids in (("toy", ["t0", "t1", "t2"]), ("guided", ["g0", "g1"]), ("answers", ["a0", "a1", "a2"])):
            runs = [load(out / ck / bench / "single" / f"run-{k}.jsonl") for k in range(3)]
            assert [[r["problem_id"] for r in rows] for rows in runs] == [ids] * 3, (ck, bench)
            assert [{r["run"] for r in rows} for rows in runs] == [{0}, {1}, {2}]


def test_official_field_names_and_types(exported):
    _, out, files, _ = exported
    for path in files:
        for r in load(path):
            assert set(OFFICIAL) <= set(r), path
            assert isinstance(r["problem_id"], str) and isinstance(r["problem"], str) and r["problem"]
            assert r["model_solution"] is None or isinstance(r["model_solution"], str)
            assert r["score"] is None or (isinstance(r["score"], (int, float)) and not isinstance(r["score"], bool))
            assert isinstance(r["grade"], list) and len(r["grade"]) == 1 and set(r["grade"][0]) == {"points", "desc"}
            points = r["grade"][0]["points"]
            assert points is None or (type(points) is int and 0 <= points <= 7)
            assert (points is None) == (r["score"] is None)
            assert isinstance(r["grade"][0]["desc"], str) and r["grade"][0]["desc"]
            assert isinstance(r["schema_0"], list) and r["schema_0"]
            for item in r["schema_0"]:
                assert set(item) == {"title", "desc", "points"}
                assert isinstance(item["title"], str) and isinstance(item["desc"], str) and type(item["points"]) is int
            assert set(r["cost_run"]) == COST and set(r["grade_cost"]) == COST
            for block in (r["cost_run"], r["grade_cost"]):
                assert type(block["input_tokens"]) is int and type(block["output_tokens"]) is int
                assert isinstance(block["cost"], float) and block["time"] is None  # not timed per problem


def test_scores_points_and_regrading_inputs_per_benchmark(exported):
    _, out, _, _ = exported
    toy, guided, answers = (load(out / "base" / b / "single" / "run-1.jsonl") for b in ("toy", "guided", "answers"))
    assert toy[0]["solution"] == "0 + 0 = 2 * 0." and toy[0]["grading_scheme"] == RUBRIC and "answer" not in toy[0]
    assert guided[0]["solution"] == "0 * 2 = 2 * 0." and guided[0]["grading_guidelines"] == GUIDELINES
    assert answers[2]["answer"] == "3" and "solution" not in answers[2]
    # scores: proofs in points of 7 as graded, answers 0/1 (ours 0/7)
    assert [r["score"] for r in toy] == [3, 0, 5]  # (i + 3s) % 8 with s = 1; t1 is the empty proof
    assert [r["score"] for r in guided] == [6, 7]
    assert [r["score"] for r in answers] == [1, 0, 1] and all(type(r["score"]) is int for r in answers)
    assert [r["grade"][0]["points"] for r in answers] == [1, 0, 1]
    assert toy[0]["grade"][0]["desc"] == "The proof of t0 earns points."
    assert "extracted answer" in answers[0]["grade"][0]["desc"]  # math-verify: no judge text, say what was compared


def test_schema_from_rubric_checkpoints_guidelines_and_answers(exported):
    _, out, _, _ = exported
    toy, guided, answers = (load(out / "base" / b / "single" / "run-0.jsonl")[0] for b in ("toy", "guided", "answers"))
    assert toy["schema_0"] == [{"title": "Checkpoint 1", "desc": "Writes n = 2k.", "points": 2},
                               {"title": "Checkpoint 2", "desc": "Concludes n + n = 2(2k).", "points": 5}]
    assert guided["schema_0"] == [{"title": "Proof grade", "desc": GUIDELINES, "points": 7}]
    assert [i["points"] for i in answers["schema_0"]] == [1]


def test_failed_missing_and_malformed_rows_are_kept(exported):
    _, out, _, _ = exported
    failed = row_of(out, JUDGE_FAILED)
    assert failed["score"] is None and failed["grade"][0]["points"] is None and failed["evaluated"]
    assert "judge_error" in failed["grade"][0]["desc"]
    only_gen = row_of(out, GENERATED_ONLY)
    assert only_gen["score"] is None and not only_gen["evaluated"] and only_gen["model_solution"].startswith("Proof 2.0")
    assert "generated, never graded" in only_gen["grade"][0]["desc"] and only_gen["cost_run"]["output_tokens"] == 5
    never = row_of(out, NEVER)
    assert never["score"] is None and never["model_solution"] is None and never["cost_run"]["output_tokens"] == 0
    assert "never generated" in never["grade"][0]["desc"]
    assert row_of(out, NO_GRADE_KEY)["grade"][0]["points"] == row_of(out, NO_GRADE_KEY)["score"] == 4
    assert row_of(out, BAD_GRADE)["grade"] == [{"points": 6, "desc": "guided verdict 10"}]
    trunc, empty = row_of(out, TRUNCATED), row_of(out, EMPTY)
    assert trunc["score"] == 0 and trunc["truncated"] and trunc["model_solution"] == ""
    assert empty["score"] == 0 and not empty["truncated"] and empty["model_solution"] == ""


def summary(rows, cfg, invalid):
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, judge=dataclasses.replace(cfg.eval.judge, invalid=invalid)))
    keys = ["checkpoint", "benchmark", "scaffold"]
    return evaluation.summary_table(rows, cfg).sort_values(keys).set_index(keys)


@pytest.mark.parametrize("invalid", ["drop", "zero"])
def test_export_reproduces_summary_table(exported, invalid):
    run, out, _, cfg = exported
    ours = summary(evaluation.read_results(run / "05_eval"), cfg, invalid)
    back = summary(export.read_export(out), cfg, invalid)
    assert list(back.index) == list(ours.index) and len(ours) == 6
    cols = ["mean_score_pct", "run_mean_pct", "run_std_pct", "truncation_rate", "invalid_rate", "rows", "samples",
            "pass@1", "pass@2", "tokens_per_problem", "cost_usd", "score_pct_basic", "score_pct_advanced"]
    pd.testing.assert_frame_equal(back[cols], ours[cols], check_exact=False, rtol=1e-9)
    assert ours.loc[("base", "toy", "single"), "invalid_rate"] > 0  # the failed judge call is in the comparison


def test_official_style_aggregation_of_the_files(exported):
    """What the official aggregator does with a folder of run files: per-run mean with null as 0, std over runs."""
    run, out, _, cfg = exported
    ours = summary(evaluation.read_results(run / "05_eval"), cfg, "zero")
    for (ck, bench, sc), want in ours.iterrows():
        files = sorted((out / export.folder_name(ck) / bench / sc).glob("*.jsonl"))
        dfs = [pd.read_json(f, lines=True) for f in files]
        assert len({len(df) for df in dfs}) == 1 and len(dfs) == cfg.eval.samples
        full = sum(item["points"] for item in dfs[0]["schema_0"][0])  # 7, or 1 on answers
        done = [df[df["evaluated"]] for df in dfs]  # rows our results.jsonl holds
        per_run = [100 * df["score"].fillna(0).mean() / full for df in done]
        assert math.isclose(float(pd.Series(per_run).mean()), want["run_mean_pct"], rel_tol=1e-9)
        assert math.isclose(float(pd.Series(per_run).std(ddof=1)), want["run_std_pct"], rel_tol=1e-9, abs_tol=1e-12)
        ours_trunc = pd.concat(done)["truncated"].astype(bool).mean()
        assert math.isclose(ours_trunc, want["truncation_rate"])
    # Their rule, "model_solution is empty", also counts the closed-but-empty proof: 2 of 9 rows, ours 1 of 8.
    dfs = [pd.read_json(f, lines=True) for f in sorted((out / "base" / "toy" / "single").glob("*.jsonl"))]
    sols = pd.concat([df["model_solution"] for df in dfs])
    assert sols.apply(lambda x: isinstance(x, str) and x == "").mean() == pytest.approx(2 / 9)
    assert ours.loc[("base", "toy", "single"), "truncation_rate"] == pytest.approx(1 / 8)


def test_answer_rows_scored_0_1_export_the_same(tmp_path, exported):
    _, out7, _, _ = exported
    other = tmp_path / "scale1"
    other.mkdir()
    run1 = build_run(other, make_cfg(other), answer_scale=1)
    out1 = tmp_path / "official-1"
    export.export_official(run1, out1)
    for k in range(3):
        a = load(out7 / "org_sft_model" / "answers" / "single" / f"run-{k}.jsonl")
        b = load(out1 / "org_sft_model" / "answers" / "single" / f"run-{k}.jsonl")
        assert [r["score"] for r in a] == [r["score"] for r in b] and {r["score"] for r in a} <= {0, 1}


def test_answer_verdict():
    assert [export.answer_verdict(s) for s in (None, 0.0, 1.0, 7.0, 7, 3.6, 3.4, 0.2)] == [None, 0, 1, 1, 1, 1, 0, 0]


def test_score_probability_distribution_in_desc(tmp_path):
    cfg = make_cfg(tmp_path, judge={"mode": "score_prob"}, checkpoints=["base"], samples=1)
    run = tmp_path / "run"
    stage = run / "05_eval"
    save_config(cfg, stage / "config.yaml")
    bench = next(b for b in evaluation.load_benchmarks(cfg.eval.benchmarks, None, "rubric") if b.name == "toy")
    probs = {str(v): 0.0 for v in range(8)} | {"7": 0.5, "3": 0.5}
    grader = Grader(dataclasses.replace(cfg.eval.judge, prompt="rubric"), cache_dir=stage / "judge_cache")
    results = JsonlLog(stage / "results.jsonl")
    for p in bench.problems:
        proof = f"Proof of {p.id}."
        grade = Grade(True, 5.0, probs=probs, mass=0.8, method="judge-prob")
        grader.cache.append({"key": grader.cache_key(build_prompt("rubric", "score_prob", p, proof).text), "grade": grade.to_dict()})
        results.append(evaluation.make_row("base", bench, "single", p, 0, gen(proof), grade))
    rows = load(export.export_official(run, tmp_path / "out")[0])
    desc = rows[0]["grade"][0]["desc"]
    assert "P(3)=0.500" in desc and "P(7)=0.500" in desc and "P(0)=0.000" in desc and "expected points 5.000" in desc
    assert rows[0]["score"] == 5 and rows[0]["grade"][0]["points"] == 5


def test_rerun_removes_stale_runs_and_stray_problems_are_named(exported):
    run, out, _, _ = exported
    stale = out / "base" / "toy" / "single" / "run-7.jsonl"
    stale.write_text("{}\n")
    export.export_official(run, out)
    assert not stale.exists()
    results = JsonlLog(run / "05_eval" / "results.jsonl")
    results.append({**next(iter(results.records.values())), "key": "x", "problem_id": "zz"})
    with pytest.raises(export.ExportError, match="zz"):
        export.export_official(run, out)


def test_command_line(exported, tmp_path, capsys):
    from qedlib.__main__ import main
    run, _, _, _ = exported
    assert main(["export-official", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert "18 run files in 6" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("*/*/*/run-*.jsonl"))) == 18
    assert main(["export-official", str(tmp_path / "nope")]) == 2
    assert "config.yaml" in capsys.readouterr().err


@pytest.mark.skipif(not (imobench_dir() / "proofbench_v2.csv").exists(), reason="IMO-Bench CSVs not available")
def test_imo_proofbench_rows_carry_its_solution_and_guidelines(tmp_path):
    cfg = load_config(None, {"eval.benchmarks": ["imo-proofbench"], "eval.benchmark_limit": 2, "eval.checkpoints": ["base"],
                             "eval.scaffolds": ["single"], "eval.samples": 1})
    run = tmp_path / "run"
    save_config(cfg, run / "05_eval" / "config.yaml")
    bench = evaluation.load_benchmark("imo-proofbench", 2)
    results = JsonlLog(run / "05_eval" / "results.jsonl")
    results.append(evaluation.make_row("base", bench, "single", bench.problems[1], 0, gen("A proof."),
                                       Grade(True, 6.0, judge_text="almost")))
    rows = load(export.export_official(run, tmp_path / "out")[0])
    with open(imobench_dir() / "proofbench_v2.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))[:2]
    assert [r["problem_id"] for r in rows] == [c["Problem ID"] for c in csv_rows]
    assert [r["solution"] for r in rows] == [c["Solution"] for c in csv_rows]
    assert [r["grading_guidelines"] for r in rows] == [c["Grading guidelines"] for c in csv_rows]
    assert [r["score"] for r in rows] == [None, 6] and rows[0]["schema_0"][0]["points"] == 7
