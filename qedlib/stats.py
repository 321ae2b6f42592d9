"""Evaluation statistics: score as % of 7, spread over runs, pass@k, bootstrap intervals, costs.

Used by notebooks/05_eval.ipynb and the run report (qedlib.tools.report). Everything takes plain
result rows (dicts with `problem_id`, `sample`, `score` 0-7 or None, `truncated`, `tokens`, ...)
so it works the same on a fresh eval, a resumed one, or a results.jsonl read back from disk.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable, Optional

import numpy as np

MAX_POINTS = 7


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: chance that k of n samples (c of them correct) hold at least one success."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n} (draw more samples per problem)")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k), as a product to stay exact for large n.
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_pct(scores: Iterable[Optional[float]]) -> float:
    """Mean score as a percentage of 7 (None entries are skipped); nan when there is none."""
    vals = [s for s in scores if s is not None]
    return 100.0 * float(np.mean(vals)) / MAX_POINTS if vals else float("nan")


def effective_score(row: dict, invalid: str = "drop") -> Optional[float]:
    """The score a row contributes: points, 0 for a truncated proof, None/0 for an invalid grade."""
    if row.get("score") is not None:
        return float(row["score"])
    if row.get("truncated"):
        return 0.0  # no final proof is a failed proof, not a missing grade
    return 0.0 if invalid == "zero" else None


def _by_problem(rows: list[dict], invalid: str) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        s = effective_score(r, invalid)
        if s is not None:
            groups[str(r["problem_id"])].append(s)
    return groups


def problem_means(rows: list[dict], invalid: str = "drop") -> np.ndarray:
    """Mean score (0-7) of each problem over its samples."""
    return np.array([np.mean(v) for v in _by_problem(rows, invalid).values()], dtype=float)


def bootstrap_ci(values: Iterable[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 statistic: Callable[[np.ndarray], float] = np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over `values` (resampled with replacement)."""
    vals = np.asarray(list(values), dtype=float)
    if vals.size == 0:
        return float("nan"), float("nan")
    if vals.size == 1 or n_boot <= 0:
        v = float(statistic(vals))
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, vals.size, size=(n_boot, vals.size))
    stats = np.array([statistic(vals[i]) for i in idx]) if statistic is not np.mean else vals[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# The fewest values on each side (groups, problems) before a bootstrap interval is read as a verdict: a percentile
# bootstrap of 2-4 values spans little more than their min and max, so "beyond noise" would rest on a handful of points.
MIN_VERDICT_N = 5



def verdict(lo, hi, n: int) -> str:
    """How a change with 95% interval [lo, hi] from n values (per side: groups, problems, probe items) reads:
    "up" / "down" only when the interval excludes 0 and n >= MIN_VERDICT_N; "few" below that; else "none"."""
    if n < MIN_VERDICT_N:
        return "few"
    return "up" if lo > 0 else "down" if hi < 0 else "none"


def learning_gain(first: Iterable[float], last: Iterable[float], n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """Did a reward rise? Mean of `last` minus mean of `first` (e.g. the group-mean rewards of a run's first and last
    steps) with a percentile bootstrap interval that resamples each side independently. The gain is "beyond noise"
    (`beyond_noise`) when the interval excludes 0 and each side has at least MIN_VERDICT_N values. NaN for an empty side; the interval is the point when a side has one
    value (no spread to resample: say so rather than read it as certain)."""
    a, b = np.asarray(list(first), dtype=float), np.asarray(list(last), dtype=float)
    out = {"first": float(a.mean()) if a.size else float("nan"), "last": float(b.mean()) if b.size else float("nan"),
           "n_first": int(a.size), "n_last": int(b.size)}
    out["gain"] = out["last"] - out["first"]
    out["beyond_noise"] = False
    if a.size < 2 or b.size < 2 or n_boot <= 0:
        out["ci_low"] = out["ci_high"] = out["gain"]
        return out
    rng = np.random.default_rng(seed)
    diffs = b[rng.integers(0, b.size, (n_boot, b.size))].mean(1) - a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    out["ci_low"], out["ci_high"] = float(lo), float(hi)
    out["beyond_noise"] = bool(min(a.size, b.size) >= MIN_VERDICT_N and (lo > 0 or hi < 0))
    return out


def score_with_ci(rows: list[dict], n_boot: int = 1000, seed: int = 0, invalid: str = "drop") -> dict:
    """Mean score % of 7 with a 95% bootstrap interval over problems (samples averaged per problem)."""
    means = problem_means(rows, invalid)
    lo, hi = bootstrap_ci(means, n_boot, seed)
    pct = lambda v: 100.0 * v / MAX_POINTS
    return {"mean_score_pct": pct(float(means.mean())) if means.size else float("nan"),
            "ci_low": pct(lo), "ci_high": pct(hi), "problems": int(means.size)}


def runs_mean_std(rows: list[dict], invalid: str = "drop") -> tuple[float, float]:
    """Mean and sample std of the per-run score % (a run = one sample index over all problems)."""
    runs: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        s = effective_score(r, invalid)
        if s is not None:
            runs[int(r["sample"])].append(s)
    per_run = [score_pct(v) for v in runs.values()]
    if not per_run:
        return float("nan"), float("nan")
    return float(np.mean(per_run)), float(np.std(per_run, ddof=1)) if len(per_run) > 1 else 0.0


def pass_at_k_rows(rows: list[dict], k: int, threshold: float = 6, invalid: str = "drop") -> float:
    """Mean over problems of unbiased pass@k, success = score >= threshold; nan if no problem has k samples."""
    vals = [pass_at_k(len(v), sum(s >= threshold for s in v), k)
            for v in _by_problem(rows, invalid).values() if len(v) >= k]
    return float(np.mean(vals)) if vals else float("nan")


def pass_at_k_ci(rows: list[dict], k: int, threshold: float = 6, n_boot: int = 1000, seed: int = 0,
                 invalid: str = "drop") -> dict:
    """pass@k (as a fraction) with a 95% bootstrap interval over problems."""
    per_problem = [pass_at_k(len(v), sum(s >= threshold for s in v), k)
                   for v in _by_problem(rows, invalid).values() if len(v) >= k]
    if not per_problem:
        return {"k": k, "pass_at_k": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    lo, hi = bootstrap_ci(per_problem, n_boot, seed)
    return {"k": k, "pass_at_k": float(np.mean(per_problem)), "ci_low": lo, "ci_high": hi}


def truncation_rate(rows: list[dict]) -> float:
    """Fraction of truncated rows: the thinking never closed, so there is no proof (see the glossary in
    notebooks/README.md; an empty proof after `</think>` is counted apart, as `no_proof`)."""
    return float(np.mean([bool(r.get("truncated")) for r in rows])) if rows else float("nan")


def invalid_rate(rows: list[dict]) -> float:
    """Fraction of rows with no score because grading failed (judge errors, unreadable answers).

    A missing proof (truncated or empty) is scored 0, not invalid.
    """
    if not rows:
        return float("nan")
    return float(np.mean([r.get("score") is None and not r.get("truncated") for r in rows]))


def tokens_per_problem(rows: list[dict]) -> float:
    """Mean generated tokens per (problem, sample) attempt, all scaffold calls included."""
    return float(np.mean([r.get("tokens", 0) for r in rows])) if rows else float("nan")


def total_cost(rows: list[dict]) -> dict:
    """Summed USD cost of generation (`cost_run`) and grading (`grade_cost`) over rows."""
    gen = sum((r.get("cost_run") or {}).get("cost", 0.0) for r in rows)
    grade = sum((r.get("grade_cost") or {}).get("cost", 0.0) for r in rows)
    return {"generation_usd": gen, "grading_usd": grade, "total_usd": gen + grade}


def summarise(rows: list[dict], by: tuple = ("checkpoint", "benchmark", "scaffold"), ks: Iterable[int] = (1,),
              threshold: float = 6, n_boot: int = 1000, seed: int = 0, invalid: str = "drop"):
    """One row per group: score % with CI, per-split %, mean/std over runs, pass@k, truncation, tokens, cost."""
    import pandas as pd  # heavy: loads only when a table is built
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(b) for b in by)].append(r)
    out = []
    for key, grp in groups.items():
        rec = dict(zip(by, key))
        rec.update(score_with_ci(grp, n_boot, seed, invalid))
        rec["samples"] = len({r["sample"] for r in grp})
        rec["rows"] = len(grp)
        rec["run_mean_pct"], rec["run_std_pct"] = runs_mean_std(grp, invalid)
        for split in sorted({str(r.get("split")) for r in grp if r.get("split")}):
            rec[f"score_pct_{split}"] = score_pct(effective_score(r, invalid) for r in grp if str(r.get("split")) == split)
        for k in ks:
            rec[f"pass@{k}"] = pass_at_k_rows(grp, k, threshold, invalid)
        rec["truncation_rate"] = truncation_rate(grp)
        rec["invalid_rate"] = invalid_rate(grp)
        rec["tokens_per_problem"] = tokens_per_problem(grp)
        rec["cost_usd"] = total_cost(grp)["total_usd"]
        out.append(rec)
    return pd.DataFrame(out)


def pass_at_k_curve(rows: list[dict], by: tuple = ("checkpoint", "scaffold"), threshold: float = 6,
                    n_boot: int = 1000, seed: int = 0, invalid: str = "drop"):
    """pass@k for k = 1..(samples per problem) per group, with bootstrap intervals (a long table)."""
    import pandas as pd  # heavy: loads only when a table is built
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(b) for b in by)].append(r)
    out = []
    for key, grp in groups.items():
        n_max = max((len(v) for v in _by_problem(grp, invalid).values()), default=0)
        for k in range(1, n_max + 1):
            out.append({**dict(zip(by, key)), **pass_at_k_ci(grp, k, threshold, n_boot, seed, invalid)})
    return pd.DataFrame(out)


def is_nan(x) -> bool:
    """True for float nan (metrics.json writes these as null)."""
    return isinstance(x, float) and math.isnan(x)
