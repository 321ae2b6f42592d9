"""Smoke tests: execute every notebook with papermill on params/smoke.yaml and assert its metrics.

One pipeline run (module-scoped) feeds one test per stage, so a failure names the stage.
"""
import json
import math
from pathlib import Path

import pytest

from qedlib.config import load_config
from qedlib.layout import STAGES

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "params" / "smoke.yaml"
pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from qedlib.runner import run_pipeline
    return run_pipeline(str(SMOKE), run_name="smoke", outputs=tmp_path_factory.mktemp("outputs"))


def metrics(run_dir, stage):
    return json.loads((run_dir / stage / "metrics.json").read_text())


def test_every_stage_left_an_executed_notebook_without_secrets(run_dir):
    for stage in STAGES:
        nb = run_dir / stage / f"{stage}.ipynb"
        assert nb.exists(), stage
        text = nb.read_text()
        assert "Traceback" not in text or '"ename"' not in text
    assert json.loads((run_dir / "run.json").read_text())["timings_s"].keys() == set(STAGES)
    peaks = json.loads((run_dir / "peak_memory.json").read_text())  # the runner's PeakMemory, per stage (GiB)
    assert peaks.keys() == set(STAGES) and all(0.1 < v < 24 for v in peaks.values()), peaks


def test_distill_metrics(run_dir):
    m = metrics(run_dir, "01_distill")
    cfg = load_config(SMOKE)
    assert m["problems"] == cfg.distill.problems.limit
    assert m["samples"] == m["problems"] * cfg.distill.sampling.n
    assert 0 < m["kept"] <= m["samples"]
    from datasets import load_from_disk
    ds = load_from_disk(m["dataset_dir"])
    assert len(ds) == m["kept"] and {"problem", "reasoning_content", "proof", "messages", "grade"} <= set(ds.column_names)


def test_sft_metrics(run_dir):
    m = metrics(run_dir, "02_sft")
    assert m["steps"] == load_config(SMOKE).sft.max_steps
    assert math.isfinite(m["train_loss_first"]) and math.isfinite(m["train_loss_last"])
    assert (Path(m["model_dir"]) / "config.json").exists()
    assert m["weights_changed_frac"] > 0.5  # fp32 master weights: the update is not rounded away


@pytest.mark.parametrize("stage,section", [("03_rubric_rl", "rubric_rl"), ("04_reasoning_cache_rl", "rc_rl")])
def test_rl_metrics(run_dir, stage, section):
    m = metrics(run_dir, stage)
    assert m["steps"] == getattr(load_config(SMOKE), section).max_steps
    assert m["losses_finite"]
    assert 0.0 <= m["reward_min"] <= m["reward_max"] <= 1.0
    assert 0.0 <= m["truncation_rate"] <= 1.0
    assert (Path(m["model_dir"]) / "config.json").exists()
    assert m["weights_changed_frac"] > 0.5  # lr 1e-6 moves fp32 master weights (bf16 weights: ~0.2%)
    steps = [json.loads(line)["step"] for line in (Path(run_dir) / stage / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, m["steps"] + 1))  # both RL stages count optimizer steps from 1


def test_rc_rl_started_from_the_rubric_rl_model(run_dir):
    assert metrics(run_dir, "04_reasoning_cache_rl")["init_model"].endswith("03_rubric_rl/model")
    assert metrics(run_dir, "03_rubric_rl")["init_model"].endswith("02_sft/model")


def test_eval_metrics_and_report(run_dir):
    cfg = load_config(SMOKE)
    m = metrics(run_dir, "05_eval")
    n_ckpt, n_scaff = len(cfg.eval.checkpoints), len(cfg.eval.scaffolds)
    assert m["rows"] == cfg.eval.benchmark_limit * cfg.eval.samples * n_ckpt * n_scaff
    assert sorted(m["scores"]) == sorted(cfg.eval.checkpoints)
    for ckpt, by_scaffold in m["scores"].items():
        assert sorted(by_scaffold) == sorted(cfg.eval.scaffolds)
        for scaffold, row in by_scaffold.items():
            assert 0.0 <= row["mean_score_pct"] <= 100.0 and 0.0 <= row["truncation_rate"] <= 1.0, (ckpt, scaffold)
    assert (run_dir / "report.md").exists() and (run_dir / "report.html").exists()
    from qedlib.tools.export import export_official  # the official-format export runs on the smoke run folder
    assert len(export_official(run_dir)) == n_ckpt * len(cfg.eval.benchmarks) * n_scaff * cfg.eval.samples


def test_report_lists_every_stage_with_wall_time_including_eval(run_dir):
    """The runner rewrites the report after the last stage, so 05_eval's own row is in it too."""
    md = (run_dir / "report.md").read_text()
    stages = md.split("## Stages", 1)[1].split("## ", 1)[0]
    for stage in ("01_distill", "02_sft", "03_rubric_rl", "04_reasoning_cache_rl", "05_eval"):
        row = next((l for l in stages.splitlines() if l.startswith(f"| {stage} |")), None)
        assert row is not None, stage
        assert float(row.split("|")[2]) > 0, row  # wall time from timings.json
        assert float(row.split("|")[3]) > 0.1, row  # peak memory (GiB) from peak_memory.json
    assert "mean_score_pct" in md or "Scores (mean" in md


@pytest.mark.parametrize("stage,section", [("03_rubric_rl", "rubric_rl"), ("04_reasoning_cache_rl", "rc_rl")])
def test_rl_stages_record_what_rose_and_how_far_the_policy_moved(run_dir, stage, section):
    """metrics.json's `learning` (first vs last steps' group means with a bootstrap interval) and `probe` (the trained
    policy vs its start on fixed completions): the numbers the notebook and the report show."""
    m = metrics(run_dir, stage)
    learning = m["learning"]
    assert learning["reward"] == getattr(load_config(SMOKE), section).reward
    assert {"first", "last", "gain", "ci_low", "ci_high"} <= set(learning)
    if learning["gain"] is not None and math.isfinite(learning["gain"]):
        assert learning["ci_low"] <= learning["gain"] <= learning["ci_high"]
    assert m["probe"]["probe_items"] > 0 and m["probe"]["kl"] >= 0 and math.isfinite(m["probe"]["logprob_gain"])


def test_sft_records_its_effect_and_the_held_out_probe(run_dir):
    m = metrics(run_dir, "02_sft")
    assert {"closes_think", "stops", "tokens"} <= set(m["effect"])
    for v in m["effect"].values():
        assert v["ci_low"] <= v["gain"] <= v["ci_high"]
    assert m["probe"] is None or m["probe"]["probe_items"] > 0


def test_eval_ranks_checkpoints_with_paired_intervals(run_dir):
    comparisons = metrics(run_dir, "05_eval")["comparisons"]
    assert comparisons
    for c in comparisons:
        assert {"diff_pct", "ci_low", "ci_high", "beyond_noise"} <= set(c)


def test_executed_notebooks_are_trusted_and_have_their_html_page(run_dir):
    import nbformat
    from nbformat.sign import NotebookNotary
    notary = NotebookNotary()
    for stage in STAGES:
        nb_path = run_dir / stage / f"{stage}.ipynb"
        assert notary.check_signature(nbformat.read(nb_path, 4)), stage
        assert (run_dir / stage / f"{stage}.html").exists(), stage
    assert "## What each stage achieved" in (run_dir / "report.md").read_text()


def test_rc_rl_records_the_reward_on_fixed_cache_states(run_dir):
    """metrics.json's `reward_check`: the starting vs the trained policy on the same cache states (a prompt per turn
    of each checked problem, one more after a usable last summary), the gain the mean of the valid pairs, inside its
    interval."""
    cfg = load_config(SMOKE).rc_rl
    check = metrics(run_dir, "04_reasoning_cache_rl")["reward_check"]
    assert check["reward"] == cfg.reward and check["problems"] == min(cfg.check_problems, 4)
    n, turns = check["problems"], cfg.rc.turns  # a prompt per turn, one more after a usable last summary
    assert n * turns <= len(check["per_state"]) <= n * (turns + 1) and check["states"] <= len(check["per_state"])
    assert check["trained_on"] == check["problems"]  # smoke trains on all 4 of its problems
    diffs = [r["trained"] - r["start"] for r in check["per_state"] if r["trained"] is not None and r["start"] is not None]
    assert check["gain"] == pytest.approx(sum(diffs) / len(diffs))
    assert check["ci_low"] <= check["gain"] <= check["ci_high"]
