"""Benchmark `generation`: tokens/s of the transformers backend, batched vs one prompt at a time."""
from __future__ import annotations

import time

from ..tables import markdown_table
from ..config import Endpoint, Sampling
from ..problem_sets import load_problems
from ..generation import make_generator
from ..models import EMBEDDED


def run(model: str = EMBEDDED, prompts: int = 16, max_new_tokens: int = 64) -> str:
    """Greedy-generate `max_new_tokens` for `prompts` shipped problems at batch 1 and batch `prompts`."""
    probs = load_problems("shipped")[:prompts]
    msgs = [[{"role": "user", "content": p.problem}] for p in probs]
    rows, speed = [], {}
    for dtype in ("float32", "bfloat16"):
        for bs in (1, prompts):
            gen = make_generator(Endpoint(model=model, batch_size=bs, dtype=dtype))
            gen.generate(msgs[:1], Sampling(temperature=0.0, max_new_tokens=4))  # warm-up
            t0 = time.perf_counter()
            out = gen.generate(msgs, Sampling(temperature=0.0, max_new_tokens=max_new_tokens))
            dt = time.perf_counter() - t0
            toks = sum(c.completion_tokens for group in out for c in group)
            speed[(dtype, bs)] = toks / dt
            rows.append([dtype, bs, len(msgs), toks, round(dt, 2), round(toks / dt, 1)])
    print(markdown_table(["dtype", "batch", "prompts", "new tokens", "seconds", "tokens/s"], rows))
    best = max(speed, key=speed.get)
    return (f"batch {prompts} {best[0]} {speed[best]:.0f} tok/s vs batch 1 float32 {speed[('float32', 1)]:.0f} tok/s "
            f"({speed[best] / speed[('float32', 1)]:.1f}x)")
