"""Problem loading (qedlib.problem_sets): CSV cells as text, bad rows named or skipped, ProofBench's schema,
and the built-in IMO-Bench names downloaded once from a loopback server with a sha256 check."""
import contextlib
import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from qedlib import problem_sets as data
from qedlib.config import ProblemSource, load_config
from qedlib.problem_sets import DataError, load_problems, load_source, records_to_problems, skipped_metrics


def test_csv_cells_stay_text(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,problem,answer,rubric\n007,"What is 3+3?",6,\n12,"Half of one?",0.50,"- [7 pts] all"\n')
    a, b = load_problems(str(f))
    assert (a.id, a.answer, a.rubric) == ("007", "6", None)  # not 7 / "6.0" / nan
    assert (b.id, b.answer, b.rubric) == ("12", "0.50", "- [7 pts] all")


def test_non_text_problem_or_rubric_is_named_or_skipped(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"q": "Prove A.", "scheme": "- [7 pts] A"}, {"q": "Prove B.", "scheme": ["- [7 pts] B"]},
            {"q": 42, "scheme": "x"}, {"q": "", "scheme": "y"}, {"q": "Prove C.", "scheme": None}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = {"problem": "q", "rubric": "scheme"}
    with pytest.raises(DataError, match=r"p.jsonl:2: column 'scheme' \(rubric\) holds list .*not text.*on_bad_row: skip"):
        load_problems(str(f), columns=cols)
    with pytest.raises(DataError, match=r"row 2: column 'q' \(problem\) holds int"):
        data.records_to_problems([rows[0], rows[0] | {"q": "Prove D."}, rows[2]], cols, "p.jsonl")
    src = ProblemSource(path=str(f), columns=cols, on_bad_row="skip")
    probs = load_source(src)
    assert [p.problem for p in probs] == ["Prove A.", "Prove C."]
    assert [s["row"] for s in probs.skipped] == [1, 2, 3]
    assert skipped_metrics(probs) == {"skipped_rows": 3, "skipped_reasons": {
        "column 'scheme' is not text": 1, "column 'q' is not text": 1, "no problem text in column 'q'": 1}}
    # the params key is validated like any other
    cfg = load_config(None, {"rubric_rl.problems": {"path": str(f), "on_bad_row": "skip", "columns": cols}})
    assert cfg.rubric_rl.problems.on_bad_row == "skip"
    with pytest.raises(Exception, match="on_bad_row"):
        load_config(None, {"rubric_rl.problems.on_bad_row": "ignore"})


def test_duplicate_ids_error_or_first():
    rows = [{"id": "a", "problem": "P1"}, {"id": "a", "problem": "P1 again"}, {"id": "b", "problem": "P2"}]
    with pytest.raises(DataError, match="row 1: duplicate id 'a'.*duplicates: first"):
        data.records_to_problems(rows, None, "f")
    assert [p.problem for p in data.records_to_problems(rows, None, "f", duplicates="first")] == ["P1", "P2"]


def _proofbench_rows():
    """Rows in ProofBench's hub schema (wenjiema02/ProofBench, train split): 3 graded solutions per problem."""
    out = []
    for k in range(3):
        for n in range(3):
            out.append({"problem_id": f"pb-{k}", "problem": f"Prove that {k} + {k} is even.", "generator": f"model-{n}",
                        "model_solution": f"solution {n}", "reference_solution": f"{k} + {k} = 2*{k}.",
                        "expert_rating": n * 3, "marking_scheme": f"- [7 pts] write {k} + {k} as 2*{k}",
                        "generation_prompt": "Prove it.", "metadata": {"contest": "TOY", "contest_year": "2025"},
                        "response_number": n})
    return out


def test_proofbench_mapping_of_the_paper_recipe_loads_a_file_in_proofbench_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from qedlib.stages.evaluation import load_benchmark
    f = tmp_path / "proofbench.parquet"
    pq.write_table(pa.Table.from_pylist(_proofbench_rows()), f)
    params = yaml.safe_load(open("params/qed-nano.yaml"))
    [entry] = [b for b in params["eval"]["benchmarks"] if isinstance(b, dict) and b.get("name") == "proofbench"]
    assert entry["path"] == "hub:wenjiema02/ProofBench"  # the recipe names the hub dataset ...
    bench = load_benchmark({**entry, "path": str(f)})  # ... and its mapping reads that schema
    assert bench.name == "proofbench" and bench.judge_prompt == "rubric" and len(bench.problems) == 3
    p = bench.problems[1]
    assert (p.id, p.problem, p.rubric, p.reference_solution, p.source) == (
        "pb-1", "Prove that 1 + 1 is even.", "- [7 pts] write 1 + 1 as 2*1", "1 + 1 = 2*1.", "TOY")
    # the same mapping is in the decontamination list
    assert entry in params["distill"]["decontaminate"]


# ---------------------------------------------------------------- IMO-Bench download over loopback
@contextlib.contextmanager
def serve(folder):
    """python http.server on 127.0.0.1 serving `folder`; yields (base URL, list of requested paths)."""
    seen = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            seen.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No QED_IMOBENCH, no development copy, an empty cache: what a user's GPU machine looks like."""
    shared = data.local_imobench_dir()
    if shared is None or not all((shared / n).exists() for n in data.IMOBENCH_FILES):
        pytest.skip("no copy of the IMO-Bench CSVs to serve (../shared/data/imobench)")
    monkeypatch.delenv("QED_IMOBENCH", raising=False)
    monkeypatch.setattr(data, "local_imobench_dir", lambda: None)
    monkeypatch.setenv("QED_CACHE", str(tmp_path / "cache"))
    return shared


def test_builtin_names_download_once_and_verify(fresh_machine, tmp_path, monkeypatch):
    with serve(fresh_machine) as (url, seen):
        monkeypatch.setenv("QED_IMOBENCH_URL", url)
        probs = load_problems("imo-proofbench")
        assert len(probs) == 60 and seen == ["/proofbench_v2.csv"]
        answers = load_problems("imo-answerbench")
        assert len(answers) == 400 and answers[0].answer == "3"
        assert load_problems("imo-proofbench", limit=2) and len(seen) == 2  # read from the cache, not fetched again
    cached = tmp_path / "cache" / "imobench" / data.IMOBENCH_REVISION / "proofbench_v2.csv"
    assert cached.exists() and not list(cached.parent.glob("*.part"))


def test_a_changed_file_is_refused(fresh_machine, tmp_path, monkeypatch):
    bad = tmp_path / "mirror"
    bad.mkdir()
    shutil.copy(fresh_machine / "answerbench_v2.csv", bad / "answerbench_v2.csv")
    with open(bad / "answerbench_v2.csv", "a") as fh:
        fh.write("extra,row,that,is,not,official\n")
    with serve(bad) as (url, _):
        monkeypatch.setenv("QED_IMOBENCH_URL", url)
        with pytest.raises(DataError, match="sha256 .* is not the pinned"):
            load_problems("imo-answerbench")
    assert not list((tmp_path / "cache").rglob("answerbench_v2.csv*"))


def test_offline_without_a_copy_is_one_clear_error(fresh_machine, monkeypatch):
    from qedlib.judge_server import free_port
    monkeypatch.setenv("QED_IMOBENCH_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DataError, match=r"proofbench_v2.csv is not available here and could not be downloaded.*"
                                        r"copy it there yourself .*sha256 aa8b813d.*or set QED_IMOBENCH"):
        load_problems("imo-proofbench")


def test_qed_imobench_overrides(fresh_machine, tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "answerbench_v2.csv").write_text("Problem ID,Problem,Short Answer,Category,Subcategory,Source\n"
                                               "x-1,What is 2+2?,4,Algebra,,toy\n")
    monkeypatch.setenv("QED_IMOBENCH", str(folder))
    monkeypatch.setenv("QED_IMOBENCH_URL", "http://127.0.0.1:9")  # would fail if it were used
    [p] = load_problems("imo-answerbench")
    assert (p.id, p.answer) == ("x-1", "4")
    with pytest.raises(DataError, match="has no proofbench_v2.csv"):
        load_problems("imo-proofbench")


def test_hub_revision_reaches_load_dataset(monkeypatch):
    import datasets
    from qedlib.config import ProblemSource
    from qedlib.problem_sets import load_source
    seen = {}

    def fake_load_dataset(name, config=None, split=None, revision=None):
        seen.update(name=name, split=split, revision=revision)
        return datasets.Dataset.from_list([{"problem": "Prove that 1 = 1.", "id": "p1"}])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    probs = load_source(ProblemSource(path="hub:org/set", hub_revision="0123abc"))
    assert seen == {"name": "org/set", "split": "train", "revision": "0123abc"} and probs[0].problem == "Prove that 1 = 1."


def test_shipped_problems_are_valid():
    probs = load_problems("shipped")
    assert len(probs) >= 30
    assert sum(p.extra["split"] == "eval" for p in probs) >= 10
    assert all(p.reference_solution and p.rubric for p in probs)
    assert sum(p.answer is not None for p in probs) >= len(probs) // 3


def test_row_without_problem_is_named():
    with pytest.raises(DataError, match=r"f.jsonl: row 1: column 'question' is missing or empty"):
        records_to_problems([{"question": "ok"}, {"question": ""}], {"problem": "question"}, "f.jsonl")


def test_bad_json_line_is_named(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"problem": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid JSON"):
        load_problems(str(p))


def test_read_records_from_parquet_folder_and_bad_paths(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from qedlib.problem_sets import read_records
    rows = [{"problem": "P1", "messages": [{"role": "user", "content": "P1"}, {"role": "assistant", "content": "A"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    got, where = read_records(tmp_path / "t.parquet")
    assert got == rows and isinstance(got[0]["messages"], list) and where.endswith("t.parquet")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd", hub_split="test")[0] == rows
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_records(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.parquet")


def test_imobench_loads_or_skips():
    try:
        probs = load_problems("imo-proofbench")
    except DataError as e:
        pytest.skip(f"IMO-Bench not available: {e}")
    assert len(probs) == 60 and {p.extra["split"] for p in probs} == {"basic", "advanced"}
