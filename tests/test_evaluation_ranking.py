"""The eval ranking with its uncertainty (notebook 05, "Comparison across checkpoints and scaffolds"): paired bootstrap
over problems of the difference between two checkpoints (stages.evaluation.paired_difference / comparisons), and the
sentences views.evaluation.ranking_findings and try_it write from the laptop run's numbers
(tests/fixtures/eval_cpu_*.json, from /work/cpu-before/05_eval of `make run`)."""
import json
from pathlib import Path

import pytest

from qedlib.config import Config
from qedlib.stages import evaluation
from qedlib.views import evaluation as eval_view

FIX = Path(__file__).parent / "fixtures"


def _row(ck, pid, score, sc="single"):
    return {"checkpoint": ck, "benchmark": "toy", "scaffold": sc, "problem_id": pid, "sample": 0, "score": score,
            "truncated": False}


def test_paired_difference_sees_a_shift_that_two_overlapping_intervals_hide():
    # problems vary a lot (0..7) but B is exactly 0.5 above A on each: unpaired intervals overlap, the paired one is a point
    a = [_row("a", f"p{i}", float(i % 8) * 0.9) for i in range(10)]
    b = [_row("b", f"p{i}", float(i % 8) * 0.9 + 0.5) for i in range(10)]
    d = evaluation.paired_difference(a, b, n_boot=500, seed=0)
    assert d["problems"] == 10 and d["diff_pct"] == pytest.approx(100 * 0.5 / 7)
    assert d["ci_low"] == pytest.approx(d["diff_pct"]) and d["beyond_noise"]


def test_paired_difference_needs_five_shared_problems_to_call_it():
    a = [_row("a", f"p{i}", 0.0) for i in range(4)]
    b = [_row("b", f"p{i}", 7.0) for i in range(4)] + [_row("b", "extra", 7.0)]
    d = evaluation.paired_difference(a, b, n_boot=200)
    assert d["problems"] == 4 and d["diff_pct"] == pytest.approx(100.0) and not d["beyond_noise"]


def test_sft_to_rubric_rl_on_the_laptop_run_is_within_noise():
    rows = json.loads((FIX / "eval_cpu_rows_sft_rubric.json").read_text())
    sft = [r for r in rows if r["checkpoint"] == "sft"]
    rl = [r for r in rows if r["checkpoint"] == "rubric_rl"]
    d = evaluation.paired_difference(sft, rl, n_boot=1000, seed=0)
    assert d["problems"] == 12 and round(d["diff_pct"], 1) == -2.8
    assert d["ci_low"] < 0 < d["ci_high"] and not d["beyond_noise"]


def test_comparisons_pair_each_stage_with_the_one_before_and_each_scaffold_with_single():
    rows = [_row(ck, f"p{i}", s, sc) for i in range(6) for ck, s in (("base", 0.0), ("sft", 2.6), ("rc_rl", 2.7))
            for sc in ("single", "rc")]
    cfg = Config()
    cfg.eval.bootstrap = 200
    comps = evaluation.comparisons(rows, cfg)
    pairs = [(c["kind"], c.get("scaffold") or c.get("checkpoint"), c["a"], c["b"]) for c in comps]
    assert pairs[:3] == [("checkpoint", "single", "base", "sft"), ("checkpoint", "single", "sft", "rc_rl"),
                         ("checkpoint", "single", "base", "rc_rl")]
    assert ("scaffold", "sft", "single", "rc") in pairs and len(pairs) == 9


def test_ranking_findings_on_the_laptop_run():
    metrics = json.loads((FIX / "eval_cpu_comparisons.json").read_text())
    text = eval_view.ranking_findings(metrics)
    assert "**single**: sft 37.0% > rc_rl 34.4% > rubric_rl 34.2% > base 0.0% (mean score, % of 7)." in text
    assert "- base -> sft: +37.0 points [+36.5, +37.5] over 12 problems, beyond noise." in text
    assert ("- sft -> rubric_rl: -2.8 points [-9.2, +0.5] over 12 problems, within noise: the interval includes 0."
            in text)
    assert "**rc**: rubric_rl 36.8% > sft 31.1% = rc_rl 31.1% > base 0.0%" in text  # equal means are a tie
    assert "0 of 4 checkpoints score differently beyond noise with rc than with a single pass." in text
    assert "Of 8 checkpoint comparisons, 4 rise and 0 fall beyond noise" in text
    assert "should move the bar up" not in text and "2.5x" not in text


def test_try_it_starts_from_the_runs_sft_model_with_a_reachable_threshold(tmp_path):
    model = tmp_path / "run" / "02_sft" / "model"
    model.mkdir(parents=True)
    rows = json.loads((FIX / "eval_cpu_rows_sft_rubric.json").read_text())
    # the laptop run's measured SFT group times (05_eval/wall_times.json of /work/cpu-before)
    metrics = {"by_benchmark": {"shipped": {"sft": {"single": {"wall_s": 34.182}, "rc": {"wall_s": 43.204}}}}}
    cfg = Config()
    cfg.eval.rc.turns, cfg.eval.rc.reasoning_budget, cfg.eval.rc.summary.max_new_tokens = 2, 64, 48
    cfg.eval.sampling.max_new_tokens = 128
    text = eval_view.try_it(rows, cfg, tmp_path / "run", metrics)
    assert f"'eval.checkpoints=[{model.resolve()}]'" in text and "checkpoints=[base]" not in text
    thr = int(text.split("eval.success_threshold=")[1].split()[0])  # a whole grade (the config's type)
    top = max(r["score"] for r in rows if r["score"])
    assert thr == 2 and top == pytest.approx(2.7146, abs=1e-4)  # some rows pass, so pass@k is not 0 everywhere
    assert text.count("```bash") == 3
    # single at 224 tokens (34.2 s x 224 / 128) + RC 43.2 s; three samples = 3 x 34.2 s; the text judge: at least 34 s
    assert "matched tokens** (about 103 s of evaluation" in text and "pass@k** (about 103 s of evaluation" in text
    assert "text mode** (at least about 34 s of evaluation" in text and "max_new_tokens=224" in text
    assert "time: run this notebook's evaluation of sft first" in eval_view.try_it(rows, cfg, tmp_path / "run")
    missing = eval_view.try_it(rows, Config(), tmp_path / "elsewhere")
    assert "run 02_sft first" in missing
