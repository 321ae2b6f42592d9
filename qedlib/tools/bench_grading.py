"""Benchmark: judge grading throughput against a local llm-katan echo server at several concurrency levels.

Run with `python -m qedlib bench judge-concurrency` (registered in qedlib.tools.bench).
"""
from __future__ import annotations

import os
import time

from ..tables import markdown_table as table
from ..config import Endpoint, Judge
from ..problem_sets import Problem
from ..grading import Grader
from ..judge_server import JudgeServer, free_port, katan_echo_command
from ..verdicts import invalid_table


def run(proofs: int = 64, latency_ms: int = 500, levels: tuple = (1, 4, 16)) -> str:
    """Grade `proofs` proofs against a llm-katan echo server with `latency_ms` latency at each concurrency level."""
    problem = Problem("bench", "Prove that the sum of two odd integers is even.",
                      rubric="Checkpoints (7 points total):\n- [7 pts] A complete proof.")
    os.environ.setdefault("QED_BENCH_JUDGE_KEY", "local-test-key")  # llm-katan wants an Authorization header
    port = free_port()
    rows, secs = [], {}
    with JudgeServer(command=katan_echo_command(port, latency_ms=latency_ms, max_concurrent=max(levels) * 2),
                     port=port) as server:
        for level in levels:
            ep = Endpoint(model="echo", backend="openai", base_url=server.base_url, api_key_env="QED_BENCH_JUDGE_KEY",
                          max_concurrency=level, timeout_s=30.0, max_retries=2)
            grader = Grader(Judge(endpoint=ep), cache_dir=None)
            texts = [f"Proof number {k}: let a = 2m+1 and b = 2n+1; then a+b = 2(m+n+1) is even." for k in range(proofs)]
            t0 = time.perf_counter()
            grades = grader.grade([problem] * proofs, texts)
            secs[level] = time.perf_counter() - t0
            rows.append([level, proofs, len(grades), round(secs[level], 2), round(proofs / secs[level], 1),
                         round(secs[1] / secs[level], 1), grader.stats["calls"],
                         ", ".join(f"{k}={v}" for k, v in invalid_table(grades).items() if v) or "none"])
    print(table(["in flight", "proofs", "grades", "seconds", "grades/s", "speed-up", "judge calls",
                 "invalid (echo has no score)"], rows))
    top = max(levels)
    return f"{top} in flight: {secs[1] / secs[top]:.1f}x faster than 1 ({secs[top]:.1f}s vs {secs[1]:.1f}s for {proofs} grades at {latency_ms} ms latency)"
