"""Core building blocks: thinking split, model references, data validation, JSONL resume, runner errors."""
import json
import os

import pytest

from qedlib.data import DataError, load_problems, records_to_problems
from qedlib.generation import split_thinking
from qedlib.io import JsonlLog, write_json
from qedlib.models import pick_device, resolve_model


def test_split_thinking_on_literal_strings():
    assert split_thinking("a</think>\n\nproof", thinking=True) == ("a", "proof", True)
    assert split_thinking("<think>a</think>b</think> final", thinking=True) == ("a</think>b", "final", True)
    assert split_thinking("still reasoning", thinking=True) == ("still reasoning", "", False)
    assert split_thinking("plain answer", thinking=False) == ("", "plain answer", True)
    assert split_thinking("<think>unfinished", thinking=False) == ("unfinished", "", False)
    assert split_thinking("proof text", thinking=True, reasoning_field="r") == ("r", "proof text", True)


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
    from qedlib.data import read_records
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


def test_model_reference_errors():
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model("no-such-model")
    assert resolve_model("Qwen/Qwen3-4B-Thinking-2507") == "Qwen/Qwen3-4B-Thinking-2507"


def test_pick_device_prints_and_honours_overrides(capsys):
    c = pick_device("cpu", "float32")
    assert (c.device, c.dtype) == ("cpu", "float32") and "device=cpu" in capsys.readouterr().out


def test_jsonl_log_survives_a_torn_line(tmp_path):
    log = JsonlLog(tmp_path / "x.jsonl")
    log.append({"key": "a", "v": 1})
    log.append({"key": "b", "v": 2})
    with open(tmp_path / "x.jsonl", "ab") as f:
        f.write(b'{"key": "c", "v"')  # a crash mid-write
    again = JsonlLog(tmp_path / "x.jsonl")
    assert len(again) == 2 and "c" not in again
    again.append({"key": "c", "v": 3})
    assert [json.loads(l)["key"] for l in open(tmp_path / "x.jsonl")] == ["a", "b", "c"]


def test_runner_names_the_failing_notebook_and_cell(tmp_path, monkeypatch):
    """A stage that raises stops the run with the notebook, the cell and the error."""
    from qedlib import runner
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    cells = [{"id": "params", "cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [], "execution_count": None,
              "source": "params_file = ''\nrun_dir = ''\noverrides = {}"},
             {"id": "fails", "cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": "raise ValueError('bad row 7 in data.jsonl')"}]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "qed", "display_name": "qed", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    write_json(nbdir / "01_distill.ipynb", nb)
    monkeypatch.setattr(runner, "NOTEBOOKS", nbdir)
    with pytest.raises(RuntimeError, match=r"stage 01_distill failed in notebook 01_distill.ipynb, cell 1 .*bad row 7"):
        runner.run_pipeline("params/smoke.yaml", "t", ["distill"], outputs=tmp_path / "out")


def test_unknown_stage_is_rejected():
    from qedlib.config import ConfigError
    from qedlib.runner import _select_stages
    assert _select_stages(["sft", "05_eval"]) == ["02_sft", "05_eval"]
    with pytest.raises(ConfigError, match="--stages 'nope'"):
        _select_stages(["nope"])


def test_bench_cli_lists_benchmarks_and_rejects_unknown(capsys):
    from qedlib.__main__ import main
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("generation", "judge-concurrency", "sft-packing", "rl-learning"))
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        main(["bench", "nope"])


def test_cli_reports_a_bad_params_file(tmp_path, capsys):
    from qedlib.__main__ import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lrr: 1\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown key 'sft.lrr'" in capsys.readouterr().err


def test_previous_is_the_stage_before_in_the_pipeline(tmp_path, capsys):
    from qedlib.config import Config
    from qedlib.layout import MODEL_DIRS, checkpoint
    cfg = Config(base_model="base-model")
    import pytest
    with pytest.raises(FileNotFoundError, match="set rubric_rl.model: base"):  # nothing trained yet: no silent base
        checkpoint(cfg, tmp_path, "previous", "rubric_rl")
    for name in ("sft", "rubric_rl", "rc_rl"):  # a finished run
        (tmp_path / MODEL_DIRS[name]).mkdir(parents=True)
        (tmp_path / MODEL_DIRS[name] / "config.json").write_text("{}")
    # rerunning 03 in a finished run starts from SFT, not from the newer RC-RL model
    assert checkpoint(cfg, tmp_path, "previous", "rubric_rl") == str(tmp_path / MODEL_DIRS["sft"])
    assert checkpoint(cfg, tmp_path, "previous", "rc_rl") == str(tmp_path / MODEL_DIRS["rubric_rl"])
    (tmp_path / MODEL_DIRS["rubric_rl"] / "config.json").unlink()  # rubric RL skipped: RC-RL falls back, says so
    assert checkpoint(cfg, tmp_path, "previous", "rc_rl") == str(tmp_path / MODEL_DIRS["sft"])
    assert "'previous' is rubric_rl" in capsys.readouterr().out
    with pytest.raises(ValueError, match="training stage"):
        checkpoint(cfg, tmp_path, "previous")
