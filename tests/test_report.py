"""The run report: markdown content, a self-contained HTML whose plotly figures render offline in headless Chromium."""
import json
import re
from pathlib import Path

import pytest

from qedlib import report, stats
from qedlib.io import write_json, write_metrics


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


def test_results_browser_shows_a_row(tmp_path):
    _, rows = fake_run(tmp_path)
    box = report.results_browser(rows)
    html = box.children[-1].value
    assert "Prove it." in html and "Judge" in html and "score" in html


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
    assert row["weights changed (%)"] == 25.0 and row["rollouts truncated (%)"] == 100.0 and row["steps"] == 2


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


def test_tokens_figure_labels_coinciding_checkpoints_once():
    import pandas as pd
    summary = pd.DataFrame([{"scaffold": "single", "tokens_per_problem": 16.0, "mean_score_pct": 0.0, "checkpoint": c,
                             "benchmark": "toy"} for c in ("base", "sft")])
    (trace,) = report.tokens_figure(summary).data
    assert list(trace.x) == [16.0] and list(trace.text) == ["base (toy), sft (toy)"]
