"""The run report: `<run_dir>/report.md` and a self-contained `<run_dir>/report.html`.

Written by notebooks/05_eval.ipynb (section "Metrics and the report") and again by the pipeline runner. It
gathers every stage's metrics.json (with the git commit, hardware and wall time from run.json / timings.json),
the eval scores by checkpoint and scaffold with 95% intervals, pass@k curves, score against tokens per problem
(figures from qedlib.plots), and the paper's published numbers (RECIPE) for the benchmarks the run used. The
HTML embeds plotly's JavaScript inline (no CDN), so it opens offline.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Optional

from .. import stats
from ..files import read_json_or_none
from ..plots import Note, pass_at_k_figure, score_figure, tokens_figure
from ..stages import evaluation
from ..layout import (DISTILL, EVAL, METRICS_FILE, RC_RL, RUBRIC_RL, RUN_FILE, SFT, STAGES, TIMINGS_FILE, PEAK_MEMORY_FILE, git_commit,
                      hardware)
from ..paper import PAPER_RESULTS, PAPER_ROW_OF_CHECKPOINT
from ..run_state import write_text_if_changed
from ..stats import MIN_VERDICT_N, verdict
from ..tables import markdown_table


def _flatten(d: dict, prefix: str = "", depth: int = 2) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out.update(_flatten(v, key + ".", depth - 1))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v):
            out[key] = ", ".join(str(x) for x in v)
    return out


def stage_metrics(run_dir) -> list[dict]:
    """One record per stage that wrote metrics.json: its wall time and flattened metrics."""
    run_dir = Path(run_dir)
    timings = read_json_or_none(run_dir / TIMINGS_FILE) or (read_json_or_none(run_dir / RUN_FILE) or {}).get("timings_s", {})
    peaks = read_json_or_none(run_dir / PEAK_MEMORY_FILE) or {}
    out = []
    for stage in STAGES:
        m = read_json_or_none(run_dir / stage / METRICS_FILE)
        if m is None:
            continue
        out.append({"stage": stage, "wall_s": timings.get(stage), "peak_gib": peaks.get(stage), "metrics": _flatten(m)})
    return out


def run_info(run_dir) -> dict:
    """Commit, hardware and params of the run (run.json when the pipeline runner wrote it, else this process)."""
    info = read_json_or_none(Path(run_dir) / RUN_FILE) or {}
    if "commit" not in info or "hardware" not in info:
        info = {**info, "commit": info.get("commit") or git_commit(), "hardware": info.get("hardware") or hardware()}
    return info


def paper_comparison(summary) -> list[dict]:
    """Rows pairing our scores with the paper's on the same benchmark (only benchmarks the run used)."""
    out = []
    if summary is None or len(summary) == 0:
        return out
    for _, r in summary.iterrows():
        paper = PAPER_RESULTS.get(r["benchmark"])
        if not paper:
            continue
        row_name = PAPER_ROW_OF_CHECKPOINT.get(r["checkpoint"])
        if r["scaffold"] != "single" and r["checkpoint"] == "rc_rl":
            row_name = "QED-Nano + test-time scaffold"
        out.append({"benchmark": r["benchmark"], "checkpoint": r["checkpoint"], "scaffold": r["scaffold"],
                    "ours_pct": r["mean_score_pct"], "paper_row": row_name or "-",
                    "paper_pct": paper.get(row_name) if row_name else None})
    return out


# ---------------------------------------------------------------- figures (drawn by qedlib.plots)
def report_figures(rows: list[dict], summary, threshold: float = 6, n_boot: int = 1000, seed: int = 0) -> dict:
    """The report's figures by name (empty when there are no eval rows; a plots.Note where one has nothing to show)."""
    if not rows:
        return {}
    curve = stats.pass_at_k_curve(rows, ("benchmark", "checkpoint", "scaffold"), threshold, n_boot, seed)
    return {"scores": score_figure(summary), "tokens": tokens_figure(summary), "pass_at_k": pass_at_k_figure(curve)}


# ---------------------------------------------------------------- writing
FLOATS = ".3g"  # every report table shows three significant digits


SUMMARY_COLUMNS = ["checkpoint", "benchmark", "scaffold", "mean_score_pct", "mean_pct_invalid_dropped", "mean_pct_invalid_as_0",
                   "ci_low", "ci_high", "run_std_pct", "samples", "truncation_rate", "invalid_rate", "tokens_per_problem",
                   "cost_usd", "summary_unclosed_rate"]
SCORES_NOTE = ("A missing proof or final answer scores 0; an invalid grade (the judge failed, or nobody could decide an "
               "answer) has no score: `mean_pct_invalid_dropped` leaves those rows out, `mean_pct_invalid_as_0` counts "
               "them as 0, and `mean_score_pct` (with the interval) follows eval.judge.invalid.")


def with_both_means(summary, rows: list[dict], by: tuple = ("checkpoint", "benchmark", "scaffold")):
    """The summary with the two means (invalid dropped / invalid as 0) added where it lacks them."""
    if summary is None or not len(summary) or "mean_pct_invalid_as_0" in summary.columns:
        return summary
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(b) for b in by), []).append(r)
    means = [evaluation.both_means(groups.get(key, [])) for key in zip(*(summary[b] for b in by))]
    summary = summary.copy()
    for col in ("mean_pct_invalid_dropped", "mean_pct_invalid_as_0"):
        summary[col] = [m[col] for m in means]
    return summary


# The stage table's columns: (header with unit, metrics.json key, factor, stages whose key means that or None for
# any); a column shows when some stage has it. ("samples" is generated samples in 01, samples per problem in 05.)
STAGE_COLUMNS = [
    ("steps", "steps", 1, None), ("samples generated", "samples", 1, (DISTILL,)),
    ("samples kept", "kept", 1, (DISTILL,)), ("teacher grade (mean, 0-7)", "mean_grade", 1, None),
    ("train loss, first", "train_loss_first", 1, None), ("train loss, last", "train_loss_last", 1, None),
    ("eval loss", "eval_loss", 1, None), ("think block closed after SFT (%)", "think_closed_after", 100, None),
    ("reward, first steps (0-1)", "reward_first", 1, None), ("reward, last steps (0-1)", "reward_last", 1, None),
    ("rollouts truncated (%)", "truncation_rate", 100, (RUBRIC_RL, RC_RL)),
    ("graded eval rows", "rows", 1, (EVAL,)),
    ("eval samples per problem", "samples", 1, (EVAL,)), ("cost ($)", "cost_usd", 1, None),
]


def stage_table(records: list[dict]) -> tuple[list[str], list[list]]:
    """Headers and rows of the report's stage table: stage, wall time (s), peak memory (GiB, when the runner measured
    it), then the STAGE_COLUMNS some stage has."""
    def cell(record, key, factor, stages):
        v = record["metrics"].get(key)
        return v * factor if _number(v) and (stages is None or record["stage"] in stages) else None
    cols = [c for c in STAGE_COLUMNS if any(cell(r, *c[1:]) is not None for r in records)]
    memory = any(r.get("peak_gib") is not None for r in records)
    rows = [[r["stage"], r["wall_s"]] + ([r.get("peak_gib")] if memory else []) + [cell(r, *c[1:]) for c in cols]
            for r in records]
    return ["stage", "wall time (s)"] + (["peak memory (GiB)"] if memory else []) + [c[0] for c in cols], rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


STAGES_NOTE = ("Key numbers per stage ('-': the stage does not have it); each stage's full metrics are in "
               "`<stage>/metrics.json` of the run folder. An RL stage's first / last steps reward is the mean over "
               "the first and the last third of its steps (at least 1 each): the windows of \"What each stage "
               "achieved\".")


PAPER_NOTE = ("Each published number (RECIPE; the released models on the hub) next to this run's mean % of 7 with its "
              "95% bootstrap interval over problems, and whether it falls inside. IMO-AnswerBench rows score 7 or 0, so "
              "the % is the paper's accuracy. Cost: generated tokens and judge tokens per problem and run, wall time of "
              "the group, dollars at the params' prices, dollars per percentage point.")
PAPER_COLUMNS = ["checkpoint", "benchmark", "scaffold", "paper", "measured", "ci_low", "ci_high", "verdict",
                 "tokens per problem", "wall s", "judge tokens per problem", "generation $", "judge $", "$ per point"]
JUDGES_NOTE = ("The judges graded the same proofs; the measures are the official `stats.py --grader` ones: MAE and "
               "advantage error in points (lower is better), bucket accuracy and local consistency (higher is better).")


def paper_section(run_dir) -> Optional[str]:
    """The paper beside the run, from 05_eval/metrics.json (its `paper_comparison`); None when no result has a paper row."""
    recs = (read_json_or_none(Path(run_dir) / EVAL / METRICS_FILE) or {}).get("paper_comparison")
    if not recs:
        return None
    return PAPER_NOTE + "\n\n" + markdown_table(PAPER_COLUMNS, [[_cost_cell(c, r.get(c)) for c in PAPER_COLUMNS] for r in recs], ",.1f")


def _cost_cell(column: str, value):
    """Dollars with their significant digits (a cent-sized judge bill must not print as 0.0); tokens as integers."""
    if value is None or not isinstance(value, float):
        return value
    if "$" in column or column.startswith("cost"):
        return f"${value:.3g}"
    return f"{value:,.0f}" if "tokens" in column else value


def judges_section(run_dir) -> Optional[str]:
    """The judges compared on the calibration proofs, from 05_eval/metrics.json; None unless there are several."""
    judges = (read_json_or_none(Path(run_dir) / EVAL / METRICS_FILE) or {}).get("judge_comparison") or []
    if len(judges) < 2:
        return None
    cols = list(judges[0])
    return JUDGES_NOTE + "\n\n" + markdown_table(cols, [[_cost_cell(c, j.get(c)) for c in cols] for j in judges], ",.3f")


ACHIEVED_NOTE = ("What each training stage exists for, measured with its 95% bootstrap interval (the numbers its "
                 "notebook shows, read from `<stage>/metrics.json`). An RL stage's reward is the mean group reward of "
                 "its first vs its last steps (`learning`); RC-RL also measures it on fixed cache states, the starting "
                 "vs the trained policy (`reward_check`, interval over states); the probe is the mean per-token log-probability of a fixed "
                 "set of completions under the trained model minus under the model the stage started from, with "
                 "KL(trained || start) (`probe`). SFT: the behaviour it teaches, before (base) vs after (`effect`), and "
                 "its held-out targets' log-probability (`probe`). Beyond noise: the interval excludes 0 and each side "
                 f"has at least {MIN_VERDICT_N} values (groups, problems or probe items); \"too few (n)\" below that.")
ACHIEVED_COLUMNS = ["stage", "measure", "before / first", "after / last", "change", "95% CI", "beyond noise", "KL"]
ACHIEVED_STAGES = (SFT, RUBRIC_RL, RC_RL)


def _verdict(rec: dict) -> str:
    """yes / no / "too few (n)" by stats.verdict, n the smallest count the record keeps (groups per side, problems,
    probe items)."""
    lo, hi = rec.get("ci_low"), rec.get("ci_high")
    if not (_number(lo) and _number(hi)):
        return "-"
    counts = [rec[k] for k in ("n_first", "n_last", "n", "probe_items") if _number(rec.get(k))]
    n = int(min(counts)) if counts else MIN_VERDICT_N
    v = verdict(lo, hi, n)
    return f"too few ({n})" if v == "few" else "yes" if v in ("up", "down") else "no"


def _ci(rec: dict, fmt: str = ".3g") -> str:
    lo, hi = rec.get("ci_low"), rec.get("ci_high")
    return f"[{lo:+{fmt}}, {hi:+{fmt}}]" if _number(lo) and _number(hi) else "-"


def _achieved_rows(stage: str, m: dict) -> list[list]:
    """Rows of "What each stage achieved" for one stage's metrics.json (a "not recorded" row where a record is absent)."""
    rows = []
    fmt = lambda v: f"{v:.3g}" if _number(v) else "-"
    change = lambda v: f"{v:+.3g}" if _number(v) else "-"
    if stage == SFT:
        effect = m.get("effect") or {}
        for name, rec in effect.items():
            if isinstance(rec, dict):
                rows.append([stage, f"behaviour: {name}", fmt(rec.get("before")), fmt(rec.get("after")),
                             change(rec.get("gain")), _ci(rec), _verdict(rec), "-"])
        if not effect:
            rows.append([stage, "behaviour before vs after (effect)", "not recorded", "", "", "", "", ""])
    else:
        rec = m.get("learning")
        if isinstance(rec, dict) and _number(rec.get("gain")):
            rows.append([stage, f"reward: {rec.get('reward', '?')}", fmt(rec.get("first")), fmt(rec.get("last")),
                         change(rec.get("gain")), _ci(rec), _verdict(rec), "-"])
        else:
            rows.append([stage, "reward, first vs last steps (learning)", "not recorded", "", "", "", "", ""])
        check = m.get("reward_check")
        if isinstance(check, dict) and _number(check.get("gain")):  # RC-RL's fixed cache states
            rows.append([stage, f"reward: {check.get('reward', '?')}, {check.get('states')} fixed cache states",
                         fmt(check.get("start")), fmt(check.get("trained")), change(check.get("gain")), _ci(check),
                         _verdict(check), "-"])
    probe = m.get("probe")
    if isinstance(probe, dict) and _number(probe.get("logprob_gain")):
        what = "held-out targets" if stage == SFT else "fixed probe completions"
        rows.append([stage, f"log-prob per token of {what}", fmt(probe.get("logprob_start")),
                     fmt(probe.get("logprob_trained")), change(probe.get("logprob_gain")), _ci(probe), _verdict(probe),
                     fmt(probe.get("kl"))])
    else:
        rows.append([stage, "policy shift on a probe set (probe)", "not recorded", "", "", "", "", ""])
    return rows


def achieved_section(run_dir) -> str:
    """Section "What each stage achieved": per training stage that wrote metrics.json, its `effect` (SFT) or
    `learning` (RL) record and its `probe` record as they are stored, with "not recorded" where a record is absent
    (never a number the stage did not write), and "beyond noise" only where the interval excludes 0."""
    rows = []
    for stage in ACHIEVED_STAGES:
        m = read_json_or_none(Path(run_dir) / stage / METRICS_FILE)
        if m is not None:
            rows += _achieved_rows(stage, m)
    if not rows:
        return "No training stage has written metrics.json yet."
    return ACHIEVED_NOTE + "\n\n" + markdown_table(ACHIEVED_COLUMNS, rows, FLOATS)


COMPARISONS_NOTE = ("Each difference is B minus A in score % of 7 on the problems both were graded on, with a paired "
                    "95% bootstrap interval over problems (the same resampled problems for both); beyond noise when the "
                    "interval excludes 0 with at least 5 problems (05_eval/metrics.json `comparisons`).")
COMPARISONS_COLUMNS = ["compared", "A", "B", "B - A (points)", "95% CI", "problems", "beyond noise"]


def comparisons_section(run_dir) -> Optional[str]:
    """The eval's paired differences (checkpoint after checkpoint per scaffold, each scaffold against single pass)
    from 05_eval/metrics.json; None when the eval did not record them."""
    comps = (read_json_or_none(Path(run_dir) / EVAL / METRICS_FILE) or {}).get("comparisons")
    if not comps:
        return None
    rows = [[f"{c['kind']}s on {c.get('scaffold') or c.get('checkpoint')}", c["a"], c["b"], c.get("diff_pct"),
             _ci(c, ".1f"), c.get("problems"), "yes" if c.get("beyond_noise") else "no"] for c in comps]
    return COMPARISONS_NOTE + "\n\n" + markdown_table(COMPARISONS_COLUMNS, rows, "+.1f")


def _sections(run_dir, rows, summary) -> list[tuple[str, str]]:
    info = run_info(run_dir)
    run_rows = [["run folder", str(Path(run_dir).resolve())], ["git commit", info.get("commit")],
                ["hardware", info.get("hardware")], ["params", info.get("params_file", "-")]]
    sec = [("Run", markdown_table(["key", "value"], run_rows, FLOATS))]
    records = stage_metrics(run_dir)
    sec.append(("Stages", STAGES_NOTE + "\n\n" + markdown_table(*stage_table(records), FLOATS) if records
                else "No stage has written metrics.json yet."))
    sec.append(("What each stage achieved", achieved_section(run_dir)))
    if summary is not None and len(summary):
        cols = [c for c in SUMMARY_COLUMNS if c in summary.columns] + [c for c in summary.columns if c.startswith(("pass@", "score_pct_"))]
        sec.append(("Scores (mean % of 7, 95% bootstrap CI over problems)",
                    SCORES_NOTE + "\n\n" + markdown_table(cols, summary[cols].values.tolist(), FLOATS)))
        paired = comparisons_section(run_dir)
        if paired:
            sec.append(("Which differences are beyond noise (paired bootstrap over problems)", paired))
        comp = paper_comparison(summary)
        beside, judges = paper_section(run_dir), judges_section(run_dir)
        if beside:  # the released models (or folders named in eval.paper_rows) beside their published numbers
            sec.append(("The paper beside the run (published vs measured, with cost)", beside))
        elif comp:
            sec.append(("Paper comparison (RECIPE headline results; the paper used Qwen3-4B at full budgets)",
                        markdown_table(list(comp[0]), [list(c.values()) for c in comp], FLOATS)))
        if judges:
            sec.append(("Judges on the calibration proofs (official grader metrics)", judges))
    else:
        sec.append(("Scores", f"No evaluation results yet (run {EVAL})."))
    return sec


def write_report(run_dir, rows: Optional[list[dict]] = None, summary=None, threshold: float = 6, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Write report.md and a self-contained report.html in the run folder; return their paths and the figures."""
    run_dir = Path(run_dir)
    rows = rows or []
    if summary is None and rows:
        summary = stats.summarise(rows, ks=(1,), threshold=threshold, n_boot=n_boot, seed=seed)
    summary = with_both_means(summary, rows)
    sections = _sections(run_dir, rows, summary)
    figs = report_figures(rows, summary, threshold, n_boot, seed)
    md = ["# QED Workbook run report", ""]
    for title, body in sections:
        md += [f"## {title}", "", body, ""]
    plotted = [name for name, f in figs.items() if not isinstance(f, Note)]
    if figs:
        md += ["## Figures", ""] + ([f"Interactive figures ({', '.join(plotted)}) are in report.html.", ""] if plotted else [])
        md += [f.text + "\n" for f in figs.values() if isinstance(f, Note)]
    md_path = run_dir / "report.md"
    html_path = run_dir / "report.html"
    # rewritten only when the content changes: a rerun that skips every stage leaves the run folder untouched
    changed = [write_text_if_changed(md_path, "\n".join(md)), write_text_if_changed(html_path, _html(sections, figs))]
    return {"md": md_path, "html": html_path, "figures": figs, "changed": any(changed)}


def refresh(run_dir, cfg) -> dict:
    """Rewrite the report from what the run folder holds (every stage's metrics, 05_eval/results.jsonl).

    The pipeline runner calls this after the last stage, so the report also carries 05_eval's own
    metrics and wall time, which do not exist yet while 05_eval writes its first version.
    """
    eval_dir = Path(run_dir) / EVAL
    rows = evaluation.read_results(eval_dir) if (eval_dir / "results.jsonl").exists() else []  # no eval yet: stages only
    summary = evaluation.summary_table(rows, cfg) if rows else None
    return write_report(run_dir, rows, summary, cfg.eval.success_threshold, cfg.eval.bootstrap, cfg.seed)


def _md_table_to_html(body: str) -> str:
    """A section body (paragraphs, then at most one Markdown table) as HTML; `code` spans become <code>."""
    lines = [l for l in body.splitlines() if l.startswith("|")]
    text = "\n".join(l for l in body.splitlines() if not l.startswith("|")).strip()
    code = lambda t: re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(t))
    paras = "".join(f"<p>{code(p)}</p>" for p in text.split("\n\n") if p.strip())
    if len(lines) < 2:
        return paras
    cells = lambda l: [c.strip() for c in l.strip().strip("|").split(" | ")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells(lines[0]))
    body_rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(l)) + "</tr>" for l in lines[2:])
    return f"{paras}<table><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>"


def _html(sections, figs: dict) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>QED Workbook run report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "vertical-align:top}th{background:#f3f3f3}</style></head><body><h1>QED Workbook run report</h1>"]
    for title, body in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>{_md_table_to_html(body)}")
    if figs:
        parts.append("<h2>Figures</h2>")
    first = next((name for name, f in figs.items() if not isinstance(f, Note)), None)
    for name, fig in figs.items():
        # plotly.js is embedded inline once, in the first plotted figure; the others reuse it. No CDN.
        parts.append(f"<div class='figure' id='fig-{name}'>" +
                     fig.to_html(full_html=False, include_plotlyjs=(name == first), div_id=f"plot-{name}") + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
