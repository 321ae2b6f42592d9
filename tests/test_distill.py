"""Distillation stage: teacher generation (tiny-qwen3 and a local OpenAI-style server), resume after
kill -9, selection rules, the SFT dataset schema and the FineProofs-SFT loader."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import chat_reply

from qedlib.stages import distill

from qedlib.views import distill as distill_view
from qedlib.config import load_config
from qedlib.problem_sets import Problem
from qedlib.generation import Completion, split_thinking
from qedlib.files import read_jsonl

REPO = Path(__file__).resolve().parent.parent


def tiny_cfg(**over):
    base = {"distill.teacher.model": "tiny-qwen3", "distill.sampling.max_new_tokens": 8, "distill.sampling.n": 2,
            "distill.thinking": False, "distill.teacher.batch_size": 4}
    return load_config(None, {**base, **over})


PROBLEMS = [Problem("p1", "Prove that 1 + 1 = 2.", source="lit", category="algebra"),
            Problem("p2", "Prove that there are infinitely many primes.", source="lit", category="number theory")]


@pytest.fixture(scope="module")
def tiny_teacher():
    return distill.make_teacher(tiny_cfg().distill)


def completion(text, thinking, finish="stop"):
    r, final, closed = split_thinking(text, thinking)
    return Completion(text, r, final, closed, finish, 10, 20, 0.001)


# ---------------------------------------------------------------- records
def test_sample_record_thinking_closed_open_and_length():
    dc = tiny_cfg(**{"distill.thinking": True}).distill
    closed = distill.sample_record(PROBLEMS[0], 0, completion("let me see</think>\n\nProof. done.", True), dc)
    assert (closed["reasoning"], closed["proof"], closed["truncated"]) == ("let me see", "Proof. done.", False)
    unclosed = distill.sample_record(PROBLEMS[0], 1, completion("still thinking about it", True), dc)
    assert unclosed["proof"] == "" and unclosed["truncated"] and not unclosed["think_closed"]
    cut = distill.sample_record(PROBLEMS[0], 2, completion("ok</think>Proof. Since", True, "length"), dc)
    assert cut["proof"] == "Proof. Since" and cut["truncated"]
    assert closed["key"] == distill.sample_key("p1", 0, distill.teacher_hash(dc)) and closed["cost"] == 0.001


def test_sample_record_thinking_off_whole_answer_is_proof():
    dc = tiny_cfg().distill
    rec = distill.sample_record(PROBLEMS[0], 0, completion("Proof. 1 + 1 = 2 by definition.", False), dc)
    assert rec["reasoning"] == "" and rec["proof"] == "Proof. 1 + 1 = 2 by definition." and not rec["truncated"]


def test_teacher_messages_bare_problem_or_system():
    assert distill.teacher_messages("P", None) == [{"role": "user", "content": "P"}]
    assert distill.teacher_messages("P", "Be rigorous.")[0] == {"role": "system", "content": "Be rigorous."}


# ---------------------------------------------------------------- generation with tiny-qwen3
def test_generate_tiny_logs_every_sample_and_skips_on_rerun(tmp_path, tiny_teacher):
    dc = tiny_cfg().distill
    stats = distill.generate_samples(PROBLEMS, dc, tmp_path, tiny_teacher, progress=False)
    assert stats["generated"] == 4 and stats["skipped"] == 0
    recs = list(read_jsonl(tmp_path / "samples.jsonl"))
    assert sorted(r["key"] for r in recs) == [distill.sample_key(p, i, distill.teacher_hash(dc)) for p in ("p1", "p2") for i in (0, 1)]
    assert all(r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 for r in recs)
    assert all(r["finish_reason"] in ("stop", "length") for r in recs)
    again = distill.generate_samples(PROBLEMS, dc, tmp_path, tiny_teacher, progress=False)
    assert again["generated"] == 0 and again["skipped"] == 4
    assert len(list(read_jsonl(tmp_path / "samples.jsonl"))) == 4
    # asking for more samples per problem generates only the new indices
    more = distill.generate_samples(PROBLEMS, tiny_cfg(**{"distill.sampling.n": 3}).distill, tmp_path, tiny_teacher, progress=False)
    assert more["generated"] == 2 and more["skipped"] == 4


def test_generate_tiny_thinking_without_close_is_truncated(tmp_path, tiny_teacher):
    dc = tiny_cfg(**{"distill.thinking": True, "distill.sampling.n": 1}).distill
    distill.generate_samples(PROBLEMS, dc, tmp_path, tiny_teacher, progress=False)
    recs = list(read_jsonl(tmp_path / "samples.jsonl"))
    # a random 8-token model does not write </think>: no proof, truncated
    assert all(r["truncated"] and r["proof"] == "" for r in recs if not r["think_closed"])
    assert any(not r["think_closed"] for r in recs)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from qedlib.stages import distill
    from qedlib.config import load_config
    from qedlib.problem_sets import Problem
    cfg = load_config(None, {"distill.teacher.model": "tiny-qwen3", "distill.sampling.max_new_tokens": 16,
                             "distill.sampling.n": 2, "distill.thinking": False, "distill.teacher.batch_size": 1})
    problems = [Problem(f"k{i}", f"Prove that {i} + {i} = {2 * i}.") for i in range(6)]
    distill.generate_samples(problems, cfg.distill, sys.argv[1], progress=False)
""")


def test_resume_after_kill_9(tmp_path, tiny_teacher):
    script = tmp_path / "gen.py"
    script.write_text(KILL_SCRIPT)
    log = tmp_path / "stage" / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "stage")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.read_bytes().count(b"\n") < 2):
        assert proc.poll() is None, "the generation subprocess ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = list(read_jsonl(log)) if log.read_bytes().endswith(b"\n") else None
    survivors = distill.read_samples(tmp_path / "stage")  # trims a torn last line, if any
    assert 2 <= len(survivors) < 12, "kill -9 should land mid-run"
    if done_before is not None:
        assert [r["key"] for r in done_before] == [r["key"] for r in survivors]

    cfg = tiny_cfg(**{"distill.sampling.max_new_tokens": 16, "distill.teacher.batch_size": 12})
    problems = [Problem(f"k{i}", f"Prove that {i} + {i} = {2 * i}.") for i in range(6)]
    stats = distill.generate_samples(problems, cfg.distill, tmp_path / "stage", tiny_teacher, progress=False)
    assert stats["skipped"] == len(survivors) and stats["generated"] == 12 - len(survivors)
    final = list(read_jsonl(log))
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == 12, "no duplicate and no lost record"
    # finished samples were not regenerated: the first records are byte-for-byte what the killed run wrote
    assert final[:len(survivors)] == survivors


# ---------------------------------------------------------------- OpenAI-compatible backend
def teacher_and_judge(body):
    """The fake teacher answers in both reasoning styles; the fake judge by what the proof says."""
    problem = body["messages"][-1]["content"]
    if body["model"] == "judge":
        if "JUDGE-DOWN" in problem:
            return 400, b""
        return chat_reply("The proof is fine." + ("" if "NO-TAG" in problem else "\n<score>5</score>"), completion_tokens=9)
    if "server error" in problem:
        return 400, b"bad request"
    if "reasoning field" in problem:  # a vLLM/SGLang reasoning parser: separate field
        return chat_reply("Proof. Field.", reasoning="thought in a field", prompt_tokens=7, completion_tokens=11)
    return chat_reply("thought inline</think>\n\nProof. Inline.", prompt_tokens=7, completion_tokens=11)


@pytest.fixture
def openai_server(fake_openai):
    return fake_openai(teacher_and_judge).url


def test_openai_teacher_both_reasoning_styles_and_errors_not_logged(tmp_path, openai_server):
    cfg = load_config(None, {"distill.teacher.backend": "openai", "distill.teacher.model": "teacher",
                             "distill.teacher.base_url": openai_server, "distill.teacher.max_retries": 0,
                             "distill.teacher.max_concurrency": 3, "distill.teacher.price_out_per_mtok": 2.0,
                             "distill.thinking": True, "distill.sampling.n": 2})
    problems = [Problem("a", "inline please"), Problem("b", "reasoning field please"), Problem("c", "server error")]
    stats = distill.generate_samples(problems, cfg.distill, tmp_path, progress=False)
    assert stats["generated"] == 4 and stats["errors"] == 2 and "HTTP 400" in stats["first_error"]
    recs = {r["key"].split("@")[0]: r for r in read_jsonl(tmp_path / "samples.jsonl")}
    assert set(recs) == {"a#0", "a#1", "b#0", "b#1"}
    assert (recs["a#0"]["reasoning"], recs["a#0"]["proof"]) == ("thought inline", "Proof. Inline.")
    assert (recs["b#1"]["reasoning"], recs["b#1"]["proof"]) == ("thought in a field", "Proof. Field.")
    assert recs["a#0"]["cost"] == pytest.approx(11 * 2.0 / 1e6)
    # the failed problem is retried on the rerun (and fails again), the others are skipped
    again = distill.generate_samples(problems, cfg.distill, tmp_path, progress=False)
    assert again["skipped"] == 4 and again["errors"] == 2


# ---------------------------------------------------------------- selection
def _sample(pid, i, truncated=False, tokens=100, proof="Proof."):
    return {"key": f"{pid}#{i}", "problem_id": pid, "sample_index": i, "text": proof, "reasoning": "r",
            "proof": proof, "think_closed": True, "finish_reason": "length" if truncated else "stop",
            "truncated": truncated, "prompt_tokens": 10, "completion_tokens": tokens, "cost": 0.0}


def _grade(pid, i, points, valid=True, reason=None):
    # keyed like grade_samples keys it: the sample's key ~ hash of the (default) judge settings
    return {"key": distill.grade_key(f"{pid}#{i}", tiny_cfg().distill.judge), "sample_key": f"{pid}#{i}", "problem_id": pid, "sample_index": i, "valid": valid, "points": points if valid else None,
            "reason": reason, "judge_text": f"judged {pid}#{i}", "cost": 0.0}


def _selection_inputs():
    samples = [_sample("p1", 0), _sample("p1", 1), _sample("p1", 2, truncated=True),
               _sample("p2", 0, tokens=5000), _sample("p2", 1), _sample("p2", 2)]
    grades = [_grade("p1", 0, 5.0), _grade("p1", 1, 6.0), _grade("p1", 2, 7.0),
              _grade("p2", 0, 7.0), _grade("p2", 1, None, valid=False, reason="no_score_tag"), _grade("p2", 2, 1.0)]
    return samples, grades


def test_select_best_per_problem_with_reasons():
    samples, grades = _selection_inputs()
    dc = tiny_cfg(**{"distill.min_grade": 2.0, "distill.max_sft_tokens": 1000, "distill.per_problem": "best"}).distill
    rows = {r["key"]: r["status"] for r in distill.select_samples(samples, grades, dc, PROBLEMS)}
    assert rows == {"p1#0": "not_best", "p1#1": "kept", "p1#2": "truncated", "p2#0": "too_long",
                    "p2#1": "invalid:no_score_tag", "p2#2": "below_min_grade"}


def test_select_all_passing_and_keep_truncated():
    samples, grades = _selection_inputs()
    dc = tiny_cfg(**{"distill.min_grade": 0.0, "distill.per_problem": "all", "distill.drop_truncated": False}).distill
    rows = {r["key"]: r["status"] for r in distill.select_samples(samples, grades, dc, PROBLEMS)}
    assert [k for k, s in rows.items() if s == "kept"] == ["p1#0", "p1#1", "p1#2", "p2#0", "p2#2"]


def test_select_invalid_as_zero_and_ungraded():
    samples, grades = _selection_inputs()
    dc = tiny_cfg(**{"distill.per_problem": "all", "distill.judge.invalid": "zero"}).distill
    grades = [{**g, "key": distill.grade_key(g["sample_key"], dc.judge)} for g in grades]  # graded by this judge
    rows = {r["key"]: r for r in distill.select_samples(samples, grades[:-1], dc, PROBLEMS)}
    assert rows["p2#1"]["status"] == "kept" and rows["p2#1"]["points"] == 0.0
    assert rows["p2#2"]["status"] == "ungraded"


def test_select_too_long_uses_given_token_counts():
    samples, grades = _selection_inputs()
    dc = tiny_cfg(**{"distill.max_sft_tokens": 50, "distill.per_problem": "all"}).distill
    counts = {s["key"]: 10 for s in samples}
    counts["p1#1"] = 51
    rows = {r["key"]: r["status"] for r in distill.select_samples(samples, grades, dc, PROBLEMS, counts)}
    assert rows["p1#1"] == "too_long" and rows["p1#0"] == "kept" and rows["p2#0"] == "kept"


def test_funnel_counts_add_up():
    samples, grades = _selection_inputs()
    dc = tiny_cfg(**{"distill.min_grade": 2.0, "distill.max_sft_tokens": 1000}).distill
    rows = distill.select_samples(samples, grades, dc, PROBLEMS)
    steps = distill.funnel(5, {"decontamination": 3}, rows, n_expected=6)
    assert steps[0]["count"] == 5 and steps[1] == {"step": "problems after decontamination", "count": 2,
                                                   "dropped": 3, "why": "decontamination"}
    assert steps[-1] == {"step": "kept", "count": 1, "dropped": 0, "why": ""}
    graded = next(s for s in steps if s["step"] == "samples graded")["count"]
    assert graded - sum(s["dropped"] for s in steps if s["step"].startswith("after dropping")) == 1
    m = distill.stage_metrics(rows, samples, grades, 5, {"decontamination": 3}, 1.0, "x")
    assert (m["samples"], m["graded"], m["invalid"], m["truncated"], m["kept"], m["decontaminated"]) == (6, 6, 1, 1, 1, 3)
    assert m["invalid_reasons"] == {"no_score_tag": 1} and m["mean_grade"] == pytest.approx(26 / 5)


# ---------------------------------------------------------------- dataset
def test_dataset_schema_and_messages(tmp_path):
    samples, grades = _selection_inputs()
    rows = distill.select_samples(samples, grades, tiny_cfg(**{"distill.per_problem": "all"}).distill, PROBLEMS)
    ds = distill.build_dataset(rows)
    assert ds.column_names == distill.SFT_COLUMNS and len(ds) == 4
    row = ds[0]
    assert row["messages"] == [{"content": PROBLEMS[0].problem, "role": "user"},
                               {"content": "<think>\nr\n</think>\n\nProof.", "role": "assistant"}]
    assert row["grade"] == 5.0 and row["source"] == "lit" and row["category"] == "algebra"
    out = distill.save_dataset(ds, tmp_path)
    assert out == tmp_path / "dataset" and not (tmp_path / "dataset.tmp").exists()
    from qedlib import sft_data  # stage 02's reader gives back the same rows and schema
    back, _ = sft_data.load_sft_data(tiny_cfg(**{"sft.dataset": str(out), "sft.one_per_problem": False}), tmp_path)
    assert back.features == ds.features and back[0] == row


def test_empty_selection_still_builds_a_typed_dataset():
    ds = distill.build_dataset([])
    assert len(ds) == 0 and ds.features == distill.sft_features()


def test_sft_reader_maps_public_fineproofs_columns(tmp_path):
    import pandas as pd
    from qedlib import sft_data
    public = {"problem": ["P"], "reasoning_content": ["think"], "proof": ["Proof."], "category": ["Algebra"],
              "competition": ["IMO-2023"], "gemini-3-pro-grade": [7], "qwen3-4b-thinking-reward@128": [0.25],
              "source": ["olympiads"],
              "messages": [[{"content": "P", "role": "user"}, {"content": "<think>think</think>Proof.", "role": "assistant"}]]}
    pd.DataFrame(public).to_parquet(tmp_path / "fp.parquet")
    ds, _ = sft_data.load_sft_data(tiny_cfg(**{"sft.dataset": str(tmp_path / "fp.parquet")}), tmp_path)
    assert ds.column_names == distill.SFT_COLUMNS and ds.features == sft_data.sft_features()
    assert ds[0]["grade"] == 7.0 and ds[0]["competition"] == "IMO-2023"


# ---------------------------------------------------------------- displays
def test_browser_and_render_escape_html():
    samples, grades = _selection_inputs()
    samples[0]["proof"] = "<script>x</script>"
    rows = distill.select_samples(samples, grades, tiny_cfg().distill, PROBLEMS)
    html = distill_view.render_sample(rows[0])
    assert "&lt;script&gt;" in html and "<script>" not in html and "judged p1#0" in html
    box = distill_view.sample_browser(rows)
    pick, page = box.children[0].children
    view = box.children[1]
    assert page.max == 2 and "p1#0" in view.value
    page.value = 1
    assert "p1#1" in view.value
    pick.value = "p2"
    assert "p2#" in view.value
    assert distill_view.funnel_figure(distill.funnel(2, {}, rows, 6)).data[0].type == "funnel"


# ---------------------------------------------------------------- screening, rubrics, gradability
SCREEN_OK = "Fine.\n<screening>\nincomplete: no\nwrong_statement: no\npurely_computational: no\ndifficulty: 4\n</screening>"


def test_screening_verdicts_on_literal_answers():
    assert distill._screening_verdict(SCREEN_OK, [1, 10]) == {"keep": True, "why": "", "difficulty": 4}
    assert distill._screening_verdict(SCREEN_OK, [5, 10])["why"] == "difficulty 4 outside [5, 10]"
    flagged = distill._screening_verdict(SCREEN_OK.replace("purely_computational: no", "purely_computational: yes"), [1, 10])
    assert flagged == {"keep": False, "why": "flagged purely_computational", "difficulty": 4}
    assert distill._screening_verdict("no block", [1, 10])["why"].startswith("unparseable screening answer")


def test_gradable_needs_the_judge_prompt_fields():
    judge = tiny_cfg().distill.judge
    probs = [Problem("a", "x", rubric="- [7 pts] all"), Problem("b", "y")]
    assert [p.id for p in distill.gradable(probs, judge)[0]] == ["a"] and distill.gradable(probs, judge)[1] == 1


def run_steps(cfg, folder) -> dict:
    """The stage's steps called as notebook 01's cells call them (test_notebook_calls_the_steps_in_order checks the
    order), without run_stage."""
    dc = cfg.distill
    teacher = distill.make_teacher(dc)
    prep = distill.prepare_problems(cfg, folder, teacher)
    distill.generate_samples(prep["problems"], dc, folder, teacher, progress=False, seed=cfg.seed)
    samples = distill.read_samples(folder, prep["problems"], dc.sampling.n, dc, seed=cfg.seed)
    distill.grade_samples(prep["problems"], samples, distill.stage_grader(dc, folder, teacher), folder, progress=False,
                          max_invalid_rate=dc.max_invalid_rate)
    grades = distill.read_grades(folder)
    rows, _ = distill.select(cfg, folder, prep, samples, grades)
    out = distill.save_dataset(distill.build_dataset(rows), folder)
    return distill.stage_metrics(rows, samples, grades, prep["loaded"], prep["removed"], 0.0, out)


# the step functions that write the stage's artifacts, in the order the notebook must call them
NOTEBOOK_STEPS = ["make_teacher", "prepare_problems", "generate_samples", "read_samples", "stage_grader",
                  "grade_samples", "read_grades", "select", "build_dataset", "save_dataset", "stage_metrics"]


def test_notebook_calls_the_steps_in_order():
    import re
    import nbformat
    nb = nbformat.read(REPO / "notebooks" / "01_distill.ipynb", 4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    calls = [m for m in re.findall(r"\bdistill\.(\w+)\(", code) if m in NOTEBOOK_STEPS]
    assert calls == NOTEBOOK_STEPS
    assert "write_metrics(stage_dir, metrics)" in code and not hasattr(distill, "run")  # one way through the stage


def test_run_stage_calls_the_notebook_steps_in_order():
    import inspect
    import re
    source = inspect.getsource(distill.run_stage)
    calls = [m for m in re.findall(r"\b(\w+)\(", source) if m in NOTEBOOK_STEPS]
    assert calls == NOTEBOOK_STEPS and "write_metrics(folder, metrics)" in source


def tiny_stage_cfg():
    ep = {"model": "tiny-qwen3", "batch_size": 8}
    return load_config(None, {"base_model": "tiny-qwen3", "distill.teacher": ep, "distill.judge.endpoint": ep,
                              "distill.judge.mode": "score_prob", "distill.thinking": False,
                              "distill.problems": {"path": "shipped", "split": None, "limit": 4}, "distill.sampling.n": 2,
                              "distill.sampling.max_new_tokens": 8, "distill.drop_truncated": False,
                              "distill.max_sft_tokens": 4096, "distill.decontaminate": ["shipped:eval", "imo-nope"]})


def test_steps_end_to_end_tiny_and_rerun_is_free(tmp_path):
    cfg = tiny_stage_cfg()
    folder = tmp_path / "01_distill"
    folder.mkdir()
    m = run_steps(cfg, folder)
    # the first 4 shipped problems include one eval problem: decontamination removes it
    assert m["problems"] == 4 and m["decontaminated"] == 1 and m["samples"] == 6 and m["graded"] == 6
    assert m["invalid"] == 0 and m["kept"] == 3 and 0 <= m["mean_grade"] <= 7
    from datasets import load_from_disk
    ds = load_from_disk(str(folder / "dataset"))
    assert ds.column_names == distill.SFT_COLUMNS and len(ds) == 3
    report = json.loads((folder / "decontamination.json").read_text())
    assert report["removed"][0]["id"] == "qed-002" and any("imo-nope" in n for n in report["notes"])
    funnel = json.loads((folder / distill.FUNNEL_FILE).read_text())
    assert funnel[0] == {"step": "problems loaded", "count": 4, "dropped": 0, "why": ""}
    assert funnel[-1] == {"step": "kept", "count": 3, "dropped": 0, "why": ""}
    lines = {f: (folder / f).read_bytes() for f in ("samples.jsonl", "grades.jsonl")}
    again = run_steps(cfg, folder)
    assert {f: (folder / f).read_bytes() for f in lines} == lines  # nothing regenerated or regraded
    assert {k: again[k] for k in ("samples", "kept", "mean_grade")} == {k: m[k] for k in ("samples", "kept", "mean_grade")}


def test_run_stage_gives_the_notebook_steps_metrics_and_files(tmp_path):
    """distill.run_stage (what a script or the CLI calls) and the notebook's cell-by-cell steps write the same."""
    cfg = tiny_stage_cfg()
    by_steps = tmp_path / "steps" / "01_distill"
    by_steps.mkdir(parents=True)
    m = run_steps(cfg, by_steps)
    got = distill.run_stage(cfg, tmp_path / "stage")
    by_stage = tmp_path / "stage" / "01_distill"
    assert json.loads((by_stage / "metrics.json").read_text()) == json.loads(json.dumps(got))
    timing = ("seconds", "dataset_dir")
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in m.items() if k not in timing}
    assert got["dataset_dir"] == str(by_stage / "dataset") and got["kept"] == 3
    strip = lambda f: [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(f)]  # noqa: E731
    for name in ("samples.jsonl", "grades.jsonl"):
        assert strip(by_stage / name) == strip(by_steps / name)
    for name in (distill.FUNNEL_FILE, "decontamination.json"):
        assert (by_stage / name).read_text() == (by_steps / name).read_text()


def test_screen_and_write_rubrics_with_tiny_model_log_and_drop_unparseable(tmp_path, tiny_teacher):
    dc = tiny_cfg(**{"distill.judge.sampling.max_new_tokens": 8}).distill
    probs = [Problem("a", "Prove that 2 is even.", reference_solution="2 = 2 * 1."), Problem("b", "Prove 1 < 2.")]
    kept, rows = distill.screen_problems(probs, dc, tiny_teacher, tmp_path)
    # a random model never writes a <screening> block: every problem is dropped, with the reason
    assert kept == [] and all(r["why"].startswith("unparseable screening answer") for r in rows)
    before = (tmp_path / "screening.jsonl").read_bytes()
    distill.screen_problems(probs, dc, None, tmp_path)  # all logged: no generator needed on rerun
    assert (tmp_path / "screening.jsonl").read_bytes() == before
    out, written = distill.write_rubrics(probs, dc, tiny_teacher, tmp_path)
    assert written == 0 and [p.rubric for p in out] == [None, None]
    rec = next(read_jsonl(tmp_path / "rubrics.jsonl"))
    assert rec["id"] == "a" and "rubric" in rec["error"]  # only the problem with a reference solution is tried


def test_grade_samples_http_judge_logs_grades_and_retries_judge_errors(tmp_path, openai_server):
    cfg = load_config(None, {"distill.judge.endpoint": {"backend": "openai", "model": "judge", "base_url": openai_server,
                                                        "max_retries": 0, "price_in_per_mtok": 1.0},
                             "distill.judge.cache": False})
    probs = [Problem("p1", "Prove A.", rubric="- [7 pts] all"), Problem("p2", "Prove B.", rubric="- [7 pts] all")]
    samples = [_sample("p1", 0, proof="Proof. Good."), _sample("p1", 1, proof="Proof. NO-TAG."),
               _sample("p2", 0, proof="Proof. JUDGE-DOWN."), _sample("p2", 1, proof="")]
    grader = distill.stage_grader(cfg.distill, tmp_path)
    stats = distill.grade_samples(probs, samples, grader, tmp_path, progress=False)
    assert stats["graded"] == 3 and stats["judge_errors"] == 1
    got = {g["sample_key"]: g for g in distill.read_grades(tmp_path)}
    assert got["p1#0"]["valid"] and got["p1#0"]["points"] == 5.0 and got["p1#0"]["cost"] == pytest.approx(100 / 1e6)
    assert (got["p1#1"]["valid"], got["p1#1"]["reason"]) == (False, "no_tag")
    # an empty proof is a valid 0 graded without a judge call (the same rule as RL and eval) ...
    assert (got["p2#1"]["valid"], got["p2#1"]["points"], got["p2#1"]["no_proof"]) == (True, 0.0, "empty") and "p2#0" not in got
    rows = {r["key"]: r["status"] for r in distill.select_samples(samples, list(got.values()), cfg.distill, probs)}
    # ... and never kept for SFT, even with min_grade 0
    assert cfg.distill.min_grade == 0.0
    assert rows == {"p1#0": "kept", "p1#1": "invalid:no_tag", "p2#0": "ungraded", "p2#1": "no_proof"}
    again = distill.grade_samples(probs, samples, grader, tmp_path, progress=False)
    assert again["skipped"] == 3 and again["judge_errors"] == 1  # only the failed call is retried


# ---------------------------------------------------------------- readable saved outputs (issue #24)
class _Handle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, obj, raw=False):
        self.shown.append(obj["text/plain"])


def test_progress_in_a_notebook_updates_one_line_and_keeps_the_final_one():
    shown = []
    line = distill.NotebookLine(display=lambda obj, raw, display_id: _Handle(shown))
    from tqdm import tqdm
    bar = tqdm(total=3, desc="judge", unit="sample", file=line, mininterval=0, ncols=100)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert shown and all("\r" not in s and "\n" not in s for s in shown)  # one line each time, replaced in place
    assert line.last.startswith("judge: 100%") and "3/3" in line.last
    assert not distill._in_kernel()  # plain pytest: tqdm writes to stderr as usual


def test_rubric_headings_stay_headings_above_their_lists():
    text = ("Checkpoints (7 points total):\n- [2 pts] Writes m.\n- [3 pts] Adds.\nZero-credit items:\n"
            "- Examples only.\nDeductions:\n- [-1] Slip <x>.")
    out = distill_view.rubric_html(text)
    assert out.count("<ul>") == 3 and out.count("<li>") == 4
    assert "<b>Zero-credit items:</b></p><ul><li>Examples only.</li></ul>" in out
    assert "<b>Deductions:</b>" in out and "Slip &lt;x&gt;." in out
    assert "Zero-credit" not in out.split("</ul>")[0]  # the heading does not run into the list above it
