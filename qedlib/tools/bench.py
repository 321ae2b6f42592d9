"""Benchmarks: `python -m qedlib bench NAME` prints a markdown table whose last line starts with `headline:`.

Each benchmark is registered here by "module:function" and imported only when run (the registry
names modules by string, so moving a benchmark is a one-line change here); the function prints its
own table (qedlib.tables.markdown_table) and returns the headline string.
"""
from __future__ import annotations

import importlib

BENCHMARKS = {
    "generation": ("qedlib.tools.bench_generation:run", "batched vs one-at-a-time tokens/s, transformers backend"),
    "judge-concurrency": ("qedlib.tools.bench_grading:run", "64 grades against a 0.5 s-latency server at concurrency 1/4/16"),
    "sft-packing": ("qedlib.tools.bench_sft:run", "SFT tokens/s with packing/padding-free vs padded batches"),
    "rl-learning": ("qedlib.tools.bench_rl_learning:run", "reward curve of GRPO on a learnable reward (embedded model)"),
    "rl-step": ("qedlib.tools.bench_rl_step:run", "one GRPO step, async batched judge vs plain TRL calling it per completion"),
}


def run_benchmark(name: str, **kwargs) -> str:
    """Run one registered benchmark; print its headline last."""
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; available: " +
                         ", ".join(f"{k} ({v[1]})" for k, v in BENCHMARKS.items()))
    mod, fn = BENCHMARKS[name][0].split(":")
    headline = getattr(importlib.import_module(mod), fn)(**kwargs)
    print(f"headline: {headline}")
    return headline
