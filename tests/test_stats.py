"""qedlib.stats on literal numbers: pass@k against brute-force enumeration, intervals, rates, costs."""
import itertools
import math

import numpy as np
import pytest

from qedlib import stats
from qedlib.config import Endpoint
from qedlib.generation import cost_of


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_matches_enumeration(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    assert stats.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_literals_and_errors():
    assert stats.pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    assert stats.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert stats.pass_at_k(200, 0, 10) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        stats.pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="c <= n"):
        stats.pass_at_k(2, 3, 1)


def rows_of(scores: dict[str, list], **extra) -> list[dict]:
    return [{"problem_id": pid, "sample": i, "score": s, **extra} for pid, ss in scores.items() for i, s in enumerate(ss)]


def test_score_pct_and_runs():
    rows = rows_of({"a": [7, 0, 7], "b": [0, 0, 7]})
    assert stats.score_pct([7, 0]) == pytest.approx(50.0)
    ci = stats.score_with_ci(rows, n_boot=200)
    assert ci["mean_score_pct"] == pytest.approx(100 * 3.5 / 7)
    assert ci["problems"] == 2
    # runs: sample 0 -> (7+0)/2, sample 1 -> 0, sample 2 -> 7  => 50, 0, 100 %
    mean, std = stats.runs_mean_std(rows)
    assert mean == pytest.approx(50.0)
    assert std == pytest.approx(np.std([50, 0, 100], ddof=1))


def test_invalid_and_truncated_rows():
    rows = [{"problem_id": "a", "sample": 0, "score": None, "truncated": True, "valid": False},
            {"problem_id": "a", "sample": 1, "score": 7, "truncated": False, "valid": True},
            {"problem_id": "b", "sample": 0, "score": None, "truncated": False, "valid": False},
            {"problem_id": "b", "sample": 1, "score": 1, "truncated": False, "valid": True}]
    # truncated counts as 0; the judge failure is dropped -> a: 3.5, b: 1
    assert stats.score_with_ci(rows, n_boot=0)["mean_score_pct"] == pytest.approx(100 * 2.25 / 7)
    assert stats.score_with_ci(rows, n_boot=0, invalid="zero")["mean_score_pct"] == pytest.approx(100 * 2.0 / 7)
    assert stats.truncation_rate(rows) == 0.25
    assert stats.invalid_rate(rows) == 0.25


def test_bootstrap_ci_brackets_mean_and_is_deterministic():
    vals = [0, 1, 2, 3, 4, 5, 6, 7]
    lo, hi = stats.bootstrap_ci(vals, n_boot=2000, seed=1)
    assert lo < 3.5 < hi
    assert 1.5 < lo and hi < 5.5  # the sd of the mean is ~0.8
    assert (lo, hi) == stats.bootstrap_ci(vals, n_boot=2000, seed=1)
    assert stats.bootstrap_ci([4.0], n_boot=100) == (4.0, 4.0)
    assert all(math.isnan(x) for x in stats.bootstrap_ci([], n_boot=10))
    # constant values have a zero-width interval
    assert stats.bootstrap_ci([2, 2, 2], n_boot=100) == (2.0, 2.0)


def test_pass_at_k_over_rows_and_curve():
    rows = rows_of({"a": [7, 6, 0], "b": [0, 1, 0], "c": [6, 0, 0]})
    # a: c=2, b: c=0, c: c=1 (threshold 6)
    assert stats.pass_at_k_rows(rows, 1) == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert stats.pass_at_k_rows(rows, 2) == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert stats.pass_at_k_rows(rows, 1, threshold=1) == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert math.isnan(stats.pass_at_k_rows(rows, 4))
    curve = stats.pass_at_k_curve([{**r, "checkpoint": "x", "scaffold": "single"} for r in rows], n_boot=100)
    assert list(curve["k"]) == [1, 2, 3]
    assert curve["pass_at_k"].iloc[-1] == pytest.approx(2 / 3)
    assert (curve["ci_low"] <= curve["pass_at_k"] + 1e-12).all() and (curve["pass_at_k"] <= curve["ci_high"] + 1e-12).all()


def test_tokens_cost_and_summary():
    rows = [{"problem_id": "a", "sample": 0, "score": 7, "tokens": 100, "truncated": False, "valid": True, "split": "basic",
             "cost_run": {"input_tokens": 10, "output_tokens": 100, "cost": 0.5}, "grade_cost": {"cost": 0.25},
             "checkpoint": "m", "benchmark": "b", "scaffold": "single"},
            {"problem_id": "b", "sample": 0, "score": 0, "tokens": 300, "truncated": False, "valid": True, "split": "advanced",
             "cost_run": {"input_tokens": 10, "output_tokens": 300, "cost": 1.5}, "grade_cost": {"cost": 0.25},
             "checkpoint": "m", "benchmark": "b", "scaffold": "single"}]
    assert stats.tokens_per_problem(rows) == 200
    assert stats.total_cost(rows) == {"generation_usd": 2.0, "grading_usd": 0.5, "total_usd": 2.5}
    ep = Endpoint(model="m", price_in_per_mtok=0.5, price_out_per_mtok=2.0)
    assert cost_of(ep, 1_000_000, 2_000_000) == pytest.approx(4.5)  # the one cost function every generator uses
    df = stats.summarise(rows, ks=[1], n_boot=100)
    rec = df.iloc[0]
    assert rec["mean_score_pct"] == pytest.approx(50.0)
    assert rec["score_pct_basic"] == pytest.approx(100.0) and rec["score_pct_advanced"] == 0.0
    assert rec["pass@1"] == pytest.approx(0.5)
    assert rec["tokens_per_problem"] == 200 and rec["cost_usd"] == 2.5


def test_learning_gain_interval_excludes_zero_only_for_a_real_rise():
    from qedlib.stats import learning_gain
    rose = learning_gain([0.1, 0.2, 0.15, 0.1, 0.2, 0.15], [0.6, 0.7, 0.65, 0.6, 0.7, 0.65])
    assert abs(rose["gain"] - 0.5) < 1e-9 and 0 < rose["ci_low"] <= 0.5 <= rose["ci_high"]
    noise = learning_gain([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    assert noise["gain"] == 0 and noise["ci_low"] < 0 < noise["ci_high"]
    one = learning_gain([0.2], [0.4])  # one value a side: no interval to resample, the point is reported as such
    assert one["n_first"] == 1 and one["ci_low"] == one["ci_high"] == one["gain"]
    assert rose["beyond_noise"] and not noise["beyond_noise"] and not one["beyond_noise"]
    few = learning_gain([0.1, 0.2], [0.6, 0.7])  # an interval that excludes 0 from 2 groups a side is no verdict
    assert few["ci_low"] > 0 and not few["beyond_noise"]


@pytest.mark.parametrize("lo,hi,n,expected", [(0.1, 0.3, 5, "up"), (-0.3, -0.1, 5, "down"), (-0.1, 0.3, 5, "none"),
                                              (0.1, 0.3, 4, "few"), (-0.1, 0.3, 2, "few")])
def test_verdict_needs_an_interval_that_excludes_zero_and_enough_values(lo, hi, n, expected):
    from qedlib.stats import MIN_VERDICT_N, verdict
    assert MIN_VERDICT_N == 5 and verdict(lo, hi, n) == expected
