"""`python -m qedlib bench rl-step` is wired: both trainers take a step against a real llm-katan echo judge."""
from __future__ import annotations

from qedlib.bench import BENCHMARKS


def test_rl_step_is_registered():
    assert BENCHMARKS["rl-step"][0] == "qedlib.bench_rl_step:run"


def test_rl_step_bench_runs_both_trainers_against_the_echo_judge(capsys):
    """~20 s on 2 CPU cores: two GRPO trainers, one step each, and a judge server."""
    from qedlib.bench_rl_step import run
    headline = run(prompts=1, group=4, max_completion_length=4, latency_ms=100)
    out = capsys.readouterr().out
    assert "x faster" in headline and "4 completions" in headline
    rows = [line for line in out.splitlines() if line.startswith("| ours") or line.startswith("| plain")]
    assert len(rows) == 2
    for row in rows:  # every non-empty completion reached the judge on both sides, one step each
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "4" and 1 <= int(cells[2]) <= 4
    plain_grading = float(rows[1].split("|")[4])
    assert plain_grading >= 0.1 * int(rows[1].split("|")[3])  # one blocking 100 ms call after another
