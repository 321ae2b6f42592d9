"""Stage-5 evaluation on tiny-qwen3: rows with the official columns, resume after a kill, benchmarks, metrics."""
import json
import math
from pathlib import Path

import pytest

from qedlib import evaluation
from qedlib.config import load_config
from qedlib.data import Problem

RUBRIC = "Checkpoints (7 points total):\n- [7 pts] A correct proof.\nZero-credit:\n- Restating the claim."


def tiny_cfg(tmp_path, **eval_over):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"pid": f"t{i}", "statement": f"Prove that {i} + {i} is even.", "scheme": RUBRIC,
                                         "split": "basic" if i % 2 else "advanced"}) + "\n" for i in range(3)))
    tiny = {"model": "tiny-qwen3", "device": "cpu", "dtype": "float32", "batch_size": 8}
    over = {"base_model": "tiny-qwen3", "generation": tiny,
            "eval.benchmarks": [{"name": "toy", "path": str(bench), "columns": {"id": "pid", "problem": "statement", "rubric": "scheme"}}],
            "eval.checkpoints": ["base"], "eval.scaffolds": ["single"], "eval.samples": 2, "eval.chunk": 1,
            "eval.sampling": {"temperature": 0.8, "max_new_tokens": 8}, "eval.bootstrap": 50, "eval.pass_k": [1, 2],
            "eval.judge": {"endpoint": tiny, "sampling": {"temperature": 0.0, "max_new_tokens": 8}, "cache": False},
            "eval.max_invalid_rate": 1.0}  # a random judge in text mode writes no score tag: every grade is invalid
    over.update({f"eval.{k}": v for k, v in eval_over.items()})
    return load_config(None, over)


class Counting:
    """Wraps a generator: counts prompts, optionally raises on the call numbered `fail_at` (a simulated kill)."""

    def __init__(self, gen, fail_at=None):
        self.gen, self.fail_at, self.calls, self.prompts = gen, fail_at, 0, 0

    @property
    def endpoint(self):
        return self.gen.endpoint

    def generate(self, prompts, sampling, thinking=False):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.prompts += len(prompts)
        return self.gen.generate(prompts, sampling, thinking)


def test_rows_have_official_columns_and_metrics(tmp_path, tiny_generator):
    cfg = tiny_cfg(tmp_path)
    rows = evaluation.evaluate(cfg, tmp_path, judge_generator=tiny_generator, policy_factory=lambda ep: tiny_generator)
    assert len(rows) == 3 * 2
    for r in rows:
        for col in ("model_solution", "score", "grade", "cost_run", "grade_cost", "checkpoint", "benchmark", "scaffold",
                    "problem_id", "sample", "split", "truncated", "tokens", "valid", "invalid_reason", "judge_text"):
            assert col in r, col
        assert set(r["cost_run"]) == {"input_tokens", "output_tokens", "cost"} and set(r["grade_cost"]) == set(r["cost_run"])
        assert 0 < r["tokens"] <= 8
        if r["truncated"]:  # a random model seldom closes </think>: no proof, score 0, and no judge call
            assert r["score"] == 0.0 and r["valid"] and r["no_proof"] == "truncated" and r["grade_cost"]["input_tokens"] == 0
        assert r["score"] is None or 0 <= r["score"] <= 7
    assert {r["split"] for r in rows} == {"basic", "advanced"}
    m = evaluation.eval_metrics(rows, cfg)
    assert m["rows"] == 6 and m["problems"] == 3 and m["samples"] == 2 and m["checkpoints"] == ["base"]
    block = m["scores"]["base"]["single"]
    for k in ("mean_score_pct", "ci_low", "ci_high", "truncation_rate", "tokens_per_problem", "invalid_rate", "pass@1", "pass@2",
              "mean_pct_invalid_dropped", "mean_pct_invalid_as_0", "summary_unclosed_rate"):
        assert k in block
    assert 0 <= block["truncation_rate"] <= 1 and block["tokens_per_problem"] > 0
    path = evaluation.write_parquet(rows, tmp_path / "05_eval" / "results.parquet")
    import pandas as pd
    assert len(pd.read_parquet(path)) == 6


def test_killed_eval_resumes_without_regenerating_or_regrading(tmp_path, tiny_generator):
    cfg = tiny_cfg(tmp_path)
    folder = tmp_path / "05_eval"
    # run 1: killed during the 4th policy call (chunk = 1 problem): 3 rows finished
    dying = Counting(tiny_generator, fail_at=4)
    judge1 = Counting(tiny_generator)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(cfg, tmp_path, judge_generator=judge1, policy_factory=lambda ep: dying)
    done = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(done) == 3
    # run 2: only the 3 missing (problem, sample) pairs are generated and graded
    policy2, judge2 = Counting(tiny_generator), Counting(tiny_generator)
    rows = evaluation.evaluate(cfg, tmp_path, judge_generator=judge2, policy_factory=lambda ep: policy2)
    assert len(rows) == 6 and policy2.prompts == 3
    assert judge2.prompts <= 3  # truncated proofs need no judge call at all
    assert judge1.prompts + judge2.prompts == sum(not r["truncated"] for r in rows)
    assert {r["key"] for r in done} <= {r["key"] for r in rows}
    # run 3: nothing left, nothing generated (the policy is not even built)
    built = []
    evaluation.evaluate(cfg, tmp_path, judge_generator=judge2, policy_factory=lambda ep: built.append(ep) or tiny_generator)
    assert built == []


def test_logged_generation_is_graded_not_regenerated(tmp_path, tiny_generator):
    cfg = tiny_cfg(tmp_path, samples=1, scaffolds=["single"])
    folder = tmp_path / "05_eval"

    class DeadJudge(Counting):
        def generate(self, prompts, sampling, thinking=False):
            raise KeyboardInterrupt("judge died")

    # make sure the first proof is gradable so the judge is called: force closed thinking via a policy wrapper
    class Closing(Counting):
        def generate(self, prompts, sampling, thinking=False):
            self.prompts += len(prompts)
            out = self.gen.generate(prompts, sampling, thinking)
            for g in out:
                for c in g:
                    c.final, c.think_closed = "A proof. " + c.text, True
            return out

    pol = Closing(tiny_generator)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(cfg, tmp_path, judge_generator=DeadJudge(tiny_generator), policy_factory=lambda ep: pol)
    assert pol.prompts == 1 and (folder / "generations.jsonl").exists() and not (folder / "results.jsonl").exists()
    pol2, judge = Closing(tiny_generator), Counting(tiny_generator)
    rows = evaluation.evaluate(cfg, tmp_path, judge_generator=judge, policy_factory=lambda ep: pol2)
    assert len(rows) == 3 and pol2.prompts == 2 and judge.prompts == 3  # the logged proof was graded, not regenerated
    assert all(not r["truncated"] and r["model_solution"].startswith("A proof.") for r in rows)


def test_benchmarks_load_with_their_judge_prompts():
    shipped = evaluation.load_benchmark("shipped")
    assert shipped.judge_prompt == "rubric" and all(p.extra.get("split") == "eval" for p in shipped.problems)
    from qedlib.data import imobench_dir
    if not imobench_dir().exists():
        pytest.skip(f"IMO-Bench CSVs not found at {imobench_dir()}")
    pb = evaluation.load_benchmark("imo-proofbench")
    assert pb.judge_prompt == "proofbench" and len(pb.problems) == 60
    assert {p.extra["split"] for p in pb.problems} == {"basic", "advanced"}
    ab = evaluation.load_benchmark("imo-answerbench", limit=5)
    assert ab.judge_prompt == "answer" and ab.task == "answer" and all(p.answer for p in ab.problems)


def test_bad_benchmark_entry_and_scaffold_are_named(tmp_path):
    with pytest.raises(Exception, match="needs 'path'"):
        evaluation.load_benchmark({"name": "x"})
    cfg = tiny_cfg(tmp_path, scaffolds=["single", "magic"])
    with pytest.raises(ValueError, match="magic"):
        evaluation.evaluate(cfg, tmp_path)


def test_missing_checkpoint_is_skipped_with_a_note(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, checkpoints=["base", "sft"])
    names = [n for n, _ in evaluation.models_under_test(cfg, tmp_path)]
    assert names == ["base"] and "skipping checkpoint 'sft'" in capsys.readouterr().out


def test_two_means_side_by_side(tmp_path):
    """Invalid grades dropped vs counted as 0: both in the summary and the metrics, computed by hand here."""
    cfg = tiny_cfg(tmp_path, samples=1, bootstrap=10, pass_k=[1])
    base = {"checkpoint": "base", "benchmark": "toy", "scaffold": "single", "sample": 0, "truncated": False, "tokens": 5}
    rows = [{**base, "problem_id": "a", "score": 7.0}, {**base, "problem_id": "b", "score": 0.0, "no_proof": "empty"},
            {**base, "problem_id": "c", "score": None, "invalid_reason": "judge_error"},
            {**base, "problem_id": "d", "score": 3.5}]
    summary = evaluation.summary_table(rows, cfg)
    assert summary["mean_pct_invalid_dropped"][0] == pytest.approx(100 * 10.5 / 3 / 7)
    assert summary["mean_pct_invalid_as_0"][0] == pytest.approx(100 * 10.5 / 4 / 7)
    cols = list(summary.columns)
    assert cols.index("mean_pct_invalid_dropped") == cols.index("mean_score_pct") + 1
    block = evaluation.eval_metrics(rows, cfg)["scores"]["base"]["single"]
    assert block["mean_pct_invalid_dropped"] == pytest.approx(50.0) and block["mean_pct_invalid_as_0"] == pytest.approx(37.5)
    assert block["summary_unclosed_rate"] is None  # no RC summaries here
    rc = [{**r, "scaffold": "rc", "summaries": 2, "summaries_unclosed": u} for r, u in zip(rows, (0, 1, 2, 1))]
    assert evaluation.summary_unclosed_rate(rc) == pytest.approx(4 / 8)


def test_answer_benchmark_rows_are_binary_without_a_judge_call(tmp_path, tiny_generator):
    """Answer rows: no boxed answer scores 0, a boxed reference scores 7, both decided without the judge."""
    bench = tmp_path / "answers.csv"
    bench.write_text("id,problem,answer\n007,What is 6 times 1?,6\n8,What is 1/2?,0.5\n")
    cfg = tiny_cfg(tmp_path, samples=1, benchmarks=[{"name": "ans", "path": str(bench), "prompt": "answer", "task": "answer"}])

    class Answers(Counting):
        def generate(self, prompts, sampling, thinking=False):
            out = self.gen.generate(prompts, sampling, thinking)
            for g, m in zip(out, prompts):
                for c in g:
                    c.final, c.think_closed = ("So \\boxed{6}." if "6 times" in m[-1]["content"] else "</"), True
            return out

    judge = Counting(tiny_generator)
    rows = evaluation.evaluate(cfg, tmp_path, judge_generator=judge, policy_factory=lambda ep: Answers(tiny_generator))
    by_id = {r["problem_id"]: r for r in rows}
    assert set(by_id) == {"007", "8"}  # CSV ids keep their text
    assert by_id["007"]["score"] == 7.0 and by_id["007"]["graded_by"] == "exact" and by_id["007"]["reference_answer"] == "6"
    assert by_id["8"]["score"] == 0.0 and by_id["8"]["no_proof"] == "no_answer" and by_id["8"]["valid"]
    assert judge.prompts == 0


def test_bad_rows_are_skipped_and_counted_and_missing_benchmarks_fail(tmp_path):
    from qedlib.data import DataError
    f = tmp_path / "b.jsonl"
    f.write_text('{"problem": "Prove A.", "rubric": "x"}\n{"problem": "Prove B.", "rubric": ["x"]}\n{"problem": ""}\n')
    [bench] = evaluation.load_benchmarks([{"name": "b", "path": str(f), "on_bad_row": "skip"}])
    assert len(bench.problems) == 1 and [s["row"] for s in bench.skipped] == [1, 2]
    m = evaluation.eval_metrics([], tiny_cfg(tmp_path), [bench])
    assert m["skipped_rows"]["b"] == {"skipped_rows": 2, "skipped_reasons": {
        "column 'rubric' is not text": 1, "no problem text in column 'problem'": 1}}
    with pytest.raises(DataError, match=r"b\.jsonl:2: column 'rubric'"):
        evaluation.load_benchmarks([{"name": "b", "path": str(f)}])
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        evaluation.load_benchmarks(["shipped", str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match="unknown.*'colums'"):
        evaluation.load_benchmark({"path": str(f), "colums": {}})


def test_extract_boxed():
    assert evaluation.extract_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{3}") == "3"
    assert evaluation.extract_boxed(r"x = \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert evaluation.extract_boxed("no answer") is None


def test_judge_is_not_loaded_when_no_proof_needs_it(tmp_path, tiny_generator):
    cfg = tiny_cfg(tmp_path, samples=1)

    class NeverCloses(Counting):
        def generate(self, prompts, sampling, thinking=False):
            out = self.gen.generate(prompts, sampling, thinking)
            for g in out:
                for c in g:
                    c.final, c.think_closed = "", False
            return out

    run = evaluation.Evaluation(cfg, tmp_path / "05_eval")
    benches = evaluation.load_benchmarks(cfg.eval.benchmarks)
    rows = run.run(benches, evaluation.models_under_test(cfg, tmp_path), ["single"], policy_factory=lambda ep: NeverCloses(tiny_generator))
    assert len(rows) == 3 and all(r["truncated"] and r["score"] == 0.0 for r in rows)
    assert isinstance(run.judge_generator, evaluation.LazyGenerator) and run.judge_generator._gen is None


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
    text = evaluation.findings(hand_metrics(), flat_calibration(2.8))  # 2.8 / 7 = 40%
    assert "no better than a constant" in text and "40% x (1 - the share with no proof)" in text
    assert "| base | single | 10.0% | 80% | 80% | 8.0% |" in text  # 40% x (1 - 0.8)
    assert "| base | rc | 20.0% | 40% | 50% | 20.0% |" in text
    assert "Run the judge calibration" in evaluation.findings(hand_metrics(), None)
    m = {**hand_metrics(), "scores": {"rc_rl": {"single": block(1.0, 0, 0)}, "base": {"single": block(2.0, 0, 0)}}}
    assert evaluation.findings(m).index("| base |") < evaluation.findings(m).index("| rc_rl |")  # pipeline order


def test_means_findings_explain_the_gap_from_the_invalid_rate():
    text = evaluation.means_findings(hand_metrics())
    assert "base / single: no invalid grade, so both means are 10.0%" in text
    assert "rubric_rl / single: 25% of grades are invalid; dropping them gives 30.0%, counting them as 0 gives 22.5%" in text


def test_paper_table_quotes_all_three_benchmarks():
    t = evaluation.paper_table(hand_metrics())
    assert list(t.loc["base", ["paper IMO-ProofBench", "paper ProofBench", "paper IMO-AnswerBench"]]) == [20.4, 19.5, 55.8]
    assert t.loc["rubric_rl"].isna()["paper ProofBench"] and t.loc["base", "this run shipped (single)"] == 10.0
    text = evaluation.paper_findings()
    for s in ("20.4 -> 39.5 -> 40.0", "19.5 -> 33.3 -> 44.9 (SFT +13.8, RL +11.6)", "55.8 -> 57.5 -> 67.5"):
        assert s in text


def test_final_table_is_small_and_settings_resolve():
    from qedlib.display import settings_table
    t = evaluation.final_table(hand_metrics())
    assert list(t.columns) == ["rc", "single"] and len(t) == 2 * 2 + 3
    assert t.loc["base: score % of 7", "rc"] == "20" and t.loc["rubric_rl: truncated (share of rows)", "rc"] == "n/a"
    assert t.loc["judge calibration: mae", "rc"] == "2.5" and t.loc["judge calibration: mae", "single"] == ""  # shown once
    cfg = load_config(Path(__file__).resolve().parent.parent / "params" / "cpu.yaml")
    assert len(settings_table(cfg, evaluation.SETTINGS)) == len(evaluation.SETTINGS) <= 15


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
    assert evaluation.pick_example(rows + [row]) is row
    text = evaluation.worked_example(run, rows + [row], benches)
    sent = build_prompt("rubric", "score_prob", p, "Since 0 + 0 = 2 * 0, it is even.").text
    assert sent in text and p.problem in text and "probabilities: 0: " in text and f"{row['score']:.2f} / 7" in text
    truncated = {**rows[0], "no_proof": "truncated", "graded_by": "no-proof", "score": 0.0}
    assert "No judge call" in evaluation.worked_example(run, [truncated], benches)


def test_no_proof_rate_counts_rows_without_a_judge_call():
    rows = [{"no_proof": "truncated"}, {"no_proof": "empty"}, {"no_proof": None}, {}]
    assert evaluation.no_proof_rate(rows) == 0.5 and evaluation.no_proof_rate([]) is None


def test_try_it_commands_load_with_cpu_params():
    """Every 'Try it' command of notebook 05 names existing keys, a fresh run folder, and evaluates the base model only."""
    import shlex
    from qedlib.config import parse_override
    repo = Path(__file__).resolve().parent.parent
    nb = json.loads((repo / "notebooks" / "05_eval.ipynb").read_text())
    text = "".join(nb["cells"][-1]["source"])
    assert text.startswith("## Try it")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python -m qedlib run")]
    assert 3 <= len(commands) <= 5 and text.count("Look for") == len(commands)
    names = set()
    for cmd in commands:
        argv = shlex.split(cmd)
        params, name = argv[4], argv[argv.index("--run-name") + 1]
        overrides = dict(parse_override(argv[i + 1]) for i, a in enumerate(argv) if a == "--set")
        cfg = load_config(repo / params, overrides)  # raises on a key that does not exist
        assert cfg.eval.checkpoints == ["base"] and argv[argv.index("--stages") + 1] == "05_eval"
        assert name not in names and name != cfg.run_name
        names.add(name)


# ---------------------------------------------------------------- notebook 05 calls the library
def notebook_code(name: str) -> str:
    nb = json.loads((Path(__file__).resolve().parent.parent / "notebooks" / name).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_notebook_05_runs_what_evaluate_runs_in_its_order():
    import inspect
    import re
    steps = {"load_benchmarks", "models_under_test", "Evaluation", "run"}
    in_evaluate = [n for n in re.findall(r"\b(\w+)\(", inspect.getsource(evaluation.evaluate)) if n in steps]
    in_notebook = [n for n in re.findall(r"\b(?:evaluation|run)\.(\w+)\(", notebook_code("05_eval.ipynb")) if n in steps]
    assert in_evaluate == ["load_benchmarks", "models_under_test", "Evaluation", "run"]
    assert in_notebook == in_evaluate


def test_unknown_scaffold_is_refused_by_the_evaluation_itself(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ValueError, match=r"eval.scaffolds: unknown \['magic'\]"):
        evaluation.Evaluation(cfg, tmp_path).run([], [], ["single", "magic"])


def test_notebook_05_tables_pass_at_k_and_metrics(tmp_path):
    from qedlib.plots import Note
    cfg = tiny_cfg(tmp_path)
    bench = evaluation.load_benchmarks(cfg.eval.benchmarks)
    table = evaluation.benchmarks_table(bench)
    assert table.to_dict(orient="records") == [{"benchmark": "toy", "problems": 3, "judge prompt": "rubric", "task": "proof",
                                               "splits": ["advanced", "basic"]}]
    models = evaluation.models_table(evaluation.models_under_test(cfg, tmp_path))
    assert list(models.checkpoint) == ["base"] and list(models.backend) == ["transformers"]
    rows = [{"benchmark": "toy", "checkpoint": "base", "scaffold": "single", "problem_id": p, "sample": s, "score": 7.0 * s}
            for p in ("a", "b") for s in (0, 1)]
    drawn = []
    assert evaluation.pass_at_k_view(rows, cfg, lambda curve: drawn.append(curve) or "figure") == "figure"
    assert list(drawn[0]["k"]) == [1, 2] and drawn[0]["pass_at_k"].iloc[-1] == 1.0
    one = load_config(None, {"eval.samples": 1})
    note = evaluation.pass_at_k_view(rows[:1], one, lambda curve: pytest.fail("no figure with one sample"))
    assert isinstance(note, Note) and "eval.samples = 1" in note.text
    assert evaluation.calibration_figures(None) == [] and evaluation.calibration_table(None) is None
    metrics = evaluation.stage_metrics({"rows": 4}, None, [Path("a"), Path("b")])
    assert metrics == {"rows": 4, "judge_calibration": None, "official_export_files": 2}
