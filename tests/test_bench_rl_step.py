"""Benchmarks are wired: the registry resolves; `bench rl-step`, run through it, steps both trainers against an
echo judge and ends with its headline."""
from __future__ import annotations

import importlib

import pytest

from qedlib.tools.bench import BENCHMARKS, run_benchmark


def test_every_benchmark_resolves_and_lives_with_the_tools():
    """Each registry entry names a function that exists, in a module under qedlib/tools/ (benchmarks are tools: no
    stage module holds one), and `bench NAME` with an unknown name lists what exists."""
    for name, (target, _) in BENCHMARKS.items():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), name
        assert module.startswith("qedlib.tools.bench"), f"{name}: {module} is not a tool module"
    with pytest.raises(SystemExit, match="rl-step"):
        run_benchmark("no-such-benchmark")


def test_rl_step_bench_runs_both_trainers_against_the_echo_judge(capsys):
    """~20 s on 2 CPU cores: `bench rl-step` through the registry, two GRPO trainers, two steps each, and a judge
    server; its table ends with the headline line."""
    headline = run_benchmark("rl-step", models=("tiny-qwen3-1k",), prompts=1, group=4, max_completion_length=4,
                             latency_ms=100)
    out = capsys.readouterr().out
    assert "x faster" in headline and "4 completions" in headline
    lines = out.strip().splitlines()
    assert lines[-1] == f"headline: {headline}" and lines[-2].startswith("| tiny-qwen3-1k | plain")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| tiny-qwen3-1k")]
    assert [r[1].split(":")[0].split(" ")[0] for r in rows] == ["ours", "plain"]
    for r in rows:  # every non-empty completion of the timed step reached the judge, on both sides
        assert r[2] == "4" and 1 <= int(r[3]) <= 4
    plain = rows[1]
    assert float(plain[4]) >= 0.1 * int(plain[3])  # one blocking 100 ms call after another
