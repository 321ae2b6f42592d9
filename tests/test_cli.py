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


def test_the_command_line_starts_without_loading_trl_or_torch():
    """`python -m qedlib --help`, `plan` and `run` import the CLI and the runner; TRL and torch load only in the
    subcommands and notebook cells that train or generate (qedlib.rl_settings keeps plan's checks TRL-free)."""
    import subprocess
    import sys
    code = ("import sys, qedlib.__main__, qedlib.runner, qedlib.tools.plan; "
            "print(sorted(m for m in ('trl', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
