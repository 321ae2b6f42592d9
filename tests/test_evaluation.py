"""Stage-5 evaluation on tiny-qwen3: rows with the official columns, resume after a kill, benchmarks, metrics."""
import json
from pathlib import Path

import pytest

from qedlib.stages import evaluation
from qedlib.config import load_config
from qedlib.verdicts import extract_boxed  # what make_row stores as `extracted_answer`

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
    rows = evaluation.run_stage(cfg, tmp_path, judge_generator=tiny_generator, policy_factory=lambda ep: tiny_generator)
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
        evaluation.run_stage(cfg, tmp_path, judge_generator=judge1, policy_factory=lambda ep: dying)
    done = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(done) == 3
    # run 2: only the 3 missing (problem, sample) pairs are generated and graded
    policy2, judge2 = Counting(tiny_generator), Counting(tiny_generator)
    rows = evaluation.run_stage(cfg, tmp_path, judge_generator=judge2, policy_factory=lambda ep: policy2)
    assert len(rows) == 6 and policy2.prompts == 3
    assert judge2.prompts <= 3  # truncated proofs need no judge call at all
    assert judge1.prompts + judge2.prompts == sum(not r["truncated"] for r in rows)
    assert {r["key"] for r in done} <= {r["key"] for r in rows}
    # run 3: nothing left, nothing generated (the policy is not even built)
    built = []
    evaluation.run_stage(cfg, tmp_path, judge_generator=judge2, policy_factory=lambda ep: built.append(ep) or tiny_generator)
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
        evaluation.run_stage(cfg, tmp_path, judge_generator=DeadJudge(tiny_generator), policy_factory=lambda ep: pol)
    assert pol.prompts == 1 and (folder / "generations.jsonl").exists() and not (folder / "results.jsonl").exists()
    pol2, judge = Closing(tiny_generator), Counting(tiny_generator)
    rows = evaluation.run_stage(cfg, tmp_path, judge_generator=judge, policy_factory=lambda ep: pol2)
    assert len(rows) == 3 and pol2.prompts == 2 and judge.prompts == 3  # the logged proof was graded, not regenerated
    assert all(not r["truncated"] and r["model_solution"].startswith("A proof.") for r in rows)


def test_benchmarks_load_with_their_judge_prompts():
    shipped = evaluation.load_benchmark("shipped")
    assert shipped.judge_prompt == "rubric" and all(p.extra.get("split") == "eval" for p in shipped.problems)
    from qedlib.problem_sets import imobench_dir
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
        evaluation.run_stage(cfg, tmp_path)


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
    rows = evaluation.run_stage(cfg, tmp_path, judge_generator=judge, policy_factory=lambda ep: Answers(tiny_generator))
    by_id = {r["problem_id"]: r for r in rows}
    assert set(by_id) == {"007", "8"}  # CSV ids keep their text
    assert by_id["007"]["score"] == 7.0 and by_id["007"]["graded_by"] == "exact" and by_id["007"]["reference_answer"] == "6"
    assert by_id["8"]["score"] == 0.0 and by_id["8"]["no_proof"] == "no_answer" and by_id["8"]["valid"]
    assert judge.prompts == 0


def test_bad_rows_are_skipped_and_counted_and_missing_benchmarks_fail(tmp_path):
    from qedlib.problem_sets import DataError
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


def test_extract_boxed_reads_the_last_answer_as_answer_rows_store_it():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{3}") == "3"
    assert extract_boxed(r"x = \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_boxed("no answer") is None


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


def test_no_proof_rate_counts_rows_without_a_judge_call():
    rows = [{"no_proof": "truncated"}, {"no_proof": "empty"}, {"no_proof": None}, {}]
    assert evaluation.no_proof_rate(rows) == 0.5 and evaluation.no_proof_rate([]) is None


def test_try_it_commands_load_with_cpu_params(tmp_path):
    """Every 'Try it' command notebook 05 writes (views.evaluation.try_it) names existing keys, a fresh run folder,
    and evaluates the run's own SFT model, never the base model (which never closes its thinking on the laptop)."""
    import shlex
    from qedlib.config import parse_override
    from qedlib.views import evaluation as eval_view
    repo = Path(__file__).resolve().parent.parent
    nb = json.loads((repo / "notebooks" / "05_eval.ipynb").read_text())
    assert "".join(nb["cells"][-2]["source"]).startswith("## Try it")
    assert "eval_view.try_it(" in "".join(nb["cells"][-1]["source"])
    sft = tmp_path / "run" / "02_sft" / "model"
    sft.mkdir(parents=True)
    cpu = load_config(repo / "params" / "cpu.yaml")
    text = eval_view.try_it([{"score": 2.6}, {"score": 2.8}], cpu, tmp_path / "run")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python -m qedlib run")]
    assert 3 <= len(commands) <= 5 and text.count("Look for") == len(commands)
    names = set()
    for cmd in commands:
        argv = shlex.split(cmd)
        params, name = argv[4], argv[argv.index("--run-name") + 1]
        overrides = dict(parse_override(argv[i + 1]) for i, a in enumerate(argv) if a == "--set")
        cfg = load_config(repo / params, overrides)  # raises on a key that does not exist
        assert cfg.eval.checkpoints == [str(sft.resolve())] and argv[argv.index("--stages") + 1] == "05_eval"
        if "eval.success_threshold" in overrides:
            assert 0 < cfg.eval.success_threshold <= 2.8  # a grade this run's judge gave
        assert name not in names and name != cfg.run_name
        names.add(name)


# ---------------------------------------------------------------- notebook 05 calls the library
def notebook_code(name: str) -> str:
    nb = json.loads((Path(__file__).resolve().parent.parent / "notebooks" / name).read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_notebook_05_runs_the_steps_of_run_stage_in_its_order():
    import inspect
    import re
    steps = {"load_benchmarks", "models_under_test", "Evaluation", "run"}
    in_evaluate = [n for n in re.findall(r"\b(\w+)\(", inspect.getsource(evaluation.run_stage)) if n in steps]
    in_notebook = [n for n in re.findall(r"\b(?:evaluation|run)\.(\w+)\(", notebook_code("05_eval.ipynb")) if n in steps]
    assert in_evaluate == ["load_benchmarks", "models_under_test", "Evaluation", "run"]
    assert in_notebook == in_evaluate


def test_unknown_scaffold_is_refused_by_the_evaluation_itself(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ValueError, match=r"eval.scaffolds: unknown \['magic'\]"):
        evaluation.Evaluation(cfg, tmp_path).run([], [], ["single", "magic"])


def test_stage_metrics_add_calibration_and_export_count():
    metrics = evaluation.stage_metrics({"rows": 4}, None, [Path("a"), Path("b")])
    assert metrics == {"rows": 4, "judge_calibration": None, "official_export_files": 2}
