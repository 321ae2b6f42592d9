"""The run report: markdown content, a self-contained HTML whose plotly figures render offline in headless Chromium."""
import json
import re
from pathlib import Path

import pytest

from qedlib.tools import report

from qedlib import stats
from qedlib.files import write_json, write_metrics


def fake_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A run folder with two stages' metrics and literal eval rows (2 checkpoints x 2 scaffolds, 3 problems x 2 samples)."""
    run = tmp_path / "run"
    write_metrics(run / "02_sft", {"train_loss": 1.25, "steps": 10})
    write_json(run / "timings.json", {"02_sft": 12.5, "05_eval": 30.0})
    write_json(run / "run.json", {"commit": "abc1234", "hardware": "test box", "params_file": "params/smoke.yaml"})
    rows = []
    scores = {"base": [0, 1, 0, 6, 0, 0], "rc_rl": [7, 6, 1, 7, 0, 6]}
    for ck, ss in scores.items():
        for sc, bonus in (("single", 0), ("rc", 1)):
            for i, s in enumerate(ss):
                rows.append({"checkpoint": ck, "benchmark": "imo-proofbench", "scaffold": sc, "problem_id": f"p{i // 2}",
                             "sample": i % 2, "split": "basic", "score": min(7, s + bonus), "truncated": False, "valid": True,
                             "tokens": 100 * (1 + 2 * bonus), "model_solution": "proof", "judge_text": "fine",
                             "problem": "Prove it.", "cost_run": {"cost": 0.0}, "grade_cost": {"cost": 0.0}})
    write_metrics(run / "05_eval", {"rows": len(rows)})
    return run, rows


def test_markdown_report_has_every_section(tmp_path):
    run, rows = fake_run(tmp_path)
    out = report.write_report(run, rows, n_boot=100)
    md = out["md"].read_text()
    assert "abc1234" in md and "test box" in md
    stages = md.split("## Stages", 1)[1].split("## ", 1)[0]
    header = next(l for l in stages.splitlines() if l.startswith("| stage"))
    assert header == "| stage | wall time (s) | steps | graded eval rows |"  # labels with units, only keys a stage has
    assert "| 02_sft | 12.5 | 10 | - |" in stages and "| 05_eval | 30 | - | 24 |" in stages
    assert "05_eval" in md
    # rc_rl single: problem means 6.5, 4, 3 -> 13.5/3/7 = 64.3 %
    assert "64.3" in md
    assert "Paper comparison" in md and "40" in md  # the paper's QED-Nano IMO-ProofBench number
    assert set(out["figures"]) == {"scores", "tokens", "pass_at_k"}
    html = out["html"].read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js is inline, nothing is fetched
    assert len(html) > 3_000_000  # the whole plotly.js bundle is in the file
    assert html.count("Plotly.newPlot") == 3


def test_report_shows_both_means_side_by_side(tmp_path):
    """Invalid grades dropped vs counted as 0: two columns of the scores table, with what they mean."""
    run, rows = fake_run(tmp_path)
    rows = [r for r in rows if r["checkpoint"] == "base" and r["scaffold"] == "single"]
    rows[0] = {**rows[0], "score": None, "valid": False, "invalid_reason": "judge_error"}  # one failed judge call
    md = report.write_report(run, rows, n_boot=10)["md"].read_text()
    table = md[md.index("## Scores"):]
    header = next(line for line in table.splitlines() if line.startswith("| checkpoint"))
    cells = next(line for line in table.splitlines() if line.startswith("| base"))
    cols = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in cells.split("|")]))
    # scores 1, 0, 6, 0, 0 over 5 valid rows, or over all 6 with the invalid one as 0
    assert float(cols["mean_pct_invalid_dropped"]) == pytest.approx(100 * 7 / 5 / 7, abs=0.05)
    assert float(cols["mean_pct_invalid_as_0"]) == pytest.approx(100 * 7 / 6 / 7, abs=0.05)
    assert "counts them as 0" in table


def test_paper_comparison_only_for_used_benchmarks():
    import pandas as pd
    summary = pd.DataFrame([{"checkpoint": "sft", "benchmark": "toy", "scaffold": "single", "mean_score_pct": 3.0},
                            {"checkpoint": "sft", "benchmark": "proofbench", "scaffold": "single", "mean_score_pct": 5.0}])
    comp = report.paper_comparison(summary)
    assert comp == [{"benchmark": "proofbench", "checkpoint": "sft", "scaffold": "single", "ours_pct": 5.0,
                     "paper_row": "QED-Nano-SFT", "paper_pct": 33.3}]


def test_report_without_eval_rows(tmp_path):
    run, _ = fake_run(tmp_path)
    out = report.write_report(run, [])
    assert "No evaluation results yet" in out["md"].read_text() and out["figures"] == {}


def test_html_report_renders_every_figure_offline(tmp_path, chromium):
    run, rows = fake_run(tmp_path)
    out = report.write_report(run, rows, n_boot=100)
    n_figs = len(out["figures"])
    dom = chromium(out["html"])  # the DOM after scripts ran; networking is off so only inline JS can draw
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom)) == n_figs
    assert len(re.findall(r'class="[^"]*\bmain-svg\b', dom)) >= n_figs
    # the bars, lines and markers were drawn (plotly adds these groups only when rendering traces)
    assert len(re.findall(r'class="[^"]*\b(trace bars|scatterlayer)\b', dom)) >= n_figs


def test_stage_table_scales_fractions_to_percent(tmp_path):
    run, rows = fake_run(tmp_path)
    write_metrics(run / "03_rubric_rl", {"steps": 2, "weights_changed_frac": 0.25, "truncation_rate": 1.0})
    headers, table = report.stage_table(report.stage_metrics(run))
    row = dict(zip(headers, next(r for r in table if r[0] == "03_rubric_rl")))
    assert row["rollouts truncated (%)"] == 100.0 and row["steps"] == 2
    assert "weights changed (%)" not in headers  # Adam moves every weight with a gradient: not evidence of learning


def test_what_each_stage_achieved_shows_the_records_and_says_when_absent(tmp_path):
    run, rows = fake_run(tmp_path)
    write_metrics(run / "02_sft", {"steps": 10, "effect": {"closes_think": {
        "before": 0.0, "after": 0.917, "gain": 0.917, "ci_low": 0.75, "ci_high": 1.0, "n": 12}},
        "probe": {"logprob_start": -2.31, "logprob_trained": -1.52, "logprob_gain": 0.79, "ci_low": 0.70,
                  "ci_high": 0.88, "kl": 0.41}})
    write_metrics(run / "03_rubric_rl", {"steps": 12, "learning": {
        "reward": "format", "first": 0.12, "last": 0.46, "gain": 0.34, "ci_low": 0.21, "ci_high": 0.47},
        "probe": {"logprob_start": -1.9, "logprob_trained": -1.88, "logprob_gain": 0.02, "ci_low": -0.01,
                  "ci_high": 0.05, "kl": 0.003}})
    write_metrics(run / "04_reasoning_cache_rl", {"steps": 4})  # an older run: no learning or probe record
    md = report.write_report(run, rows, n_boot=100)["md"].read_text()
    sec = md.split("## What each stage achieved", 1)[1].split("\n## ", 1)[0]
    assert "| 02_sft | behaviour: closes_think | 0 | 0.917 | +0.917 | [+0.75, +1] | yes | - |" in sec
    assert "| 02_sft | log-prob per token of held-out targets | -2.31 | -1.52 | +0.79 | [+0.7, +0.88] | yes | 0.41 |" in sec
    assert "| 03_rubric_rl | reward: format | 0.12 | 0.46 | +0.34 | [+0.21, +0.47] | yes | - |" in sec
    # an interval that includes 0 is not called a change
    assert "| 03_rubric_rl | log-prob per token of fixed probe completions | -1.9 | -1.88 | +0.02 | [-0.01, +0.05] | no | 0.003 |" in sec
    assert "| 04_reasoning_cache_rl | reward, first vs last steps (learning) | not recorded |" in sec
    assert "| 04_reasoning_cache_rl | policy shift on a probe set (probe) | not recorded |" in sec


def test_pass_at_k_with_one_sample_is_a_sentence(tmp_path):
    """One sample per problem: no pass@k curve to draw; report.md/html say why instead of an empty frame."""
    from qedlib.plots import Note
    run, rows = fake_run(tmp_path)
    rows = [r for r in rows if r["sample"] == 0]
    out = report.write_report(run, rows, n_boot=10)
    assert isinstance(out["figures"]["pass_at_k"], Note)
    assert "at least two samples per problem" in out["md"].read_text()
    html = out["html"].read_text()
    assert "at least two samples per problem" in html and html.count("Plotly.newPlot") == 2
    assert len(html) > 3_000_000  # plotly.js still embedded, in the first plotted figure


def test_report_lists_the_eval_paired_differences(tmp_path):
    import json
    run, rows = fake_run(tmp_path)
    fixture = json.loads((Path(__file__).parent / "fixtures" / "eval_cpu_comparisons.json").read_text())
    write_metrics(run / "05_eval", {"rows": len(rows), "comparisons": fixture["comparisons"]})
    md = report.write_report(run, rows, n_boot=100)["md"].read_text()
    sec = md.split("## Which differences are beyond noise (paired bootstrap over problems)", 1)[1].split("\n## ", 1)[0]
    assert "| checkpoints on single | base | sft | +37.0 | [+36.5, +37.5] | 12 | yes |" in sec
    assert "| checkpoints on single | sft | rubric_rl | -2.8 | [-9.2, +0.5] | 12 | no |" in sec  # as notebook 05 says
    assert "| scaffolds on sft | single | rc | -5.9 | [-14.8, +0.2] | 12 | no |" in sec
