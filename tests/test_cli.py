"""The command line (qedlib.__main__): benchmark listing and a bad params file named."""
import pytest

from qedlib.__main__ import main


def test_bench_cli_lists_benchmarks_and_rejects_unknown(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("generation", "judge-concurrency", "sft-packing", "rl-learning"))
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        main(["bench", "nope"])


def test_cli_reports_a_bad_params_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lrr: 1\n")
    assert main(["run", str(bad)]) == 2
    assert "unknown key 'sft.lrr'" in capsys.readouterr().err
