"""What notebooks/01_distill.ipynb shows of the distillation stage: figures, the sample browser, the worked
example rendered, the run's findings in words, and the settings, metrics and "Try it" tables.

The stage's steps (and the data these take) are in qedlib.distill; nothing here computes a result the
stage writes.
"""
from __future__ import annotations

import html

from .display import NOT_IN_PAPER, experiments_markdown
from .layout import DISTILL


def funnel_figure(steps: list[dict]):
    """A plotly funnel of the stage's funnel rows."""
    import plotly.graph_objects as go
    fig = go.Figure(go.Funnel(y=[s["step"] for s in steps], x=[s["count"] for s in steps], textinfo="value"))
    fig.update_layout(title="distillation funnel", height=80 + 40 * len(steps), margin=dict(l=220))
    return fig


def grade_histogram(rows: list[dict]):
    """Histogram of valid grades (0-7), coloured by problem source."""
    import pandas as pd
    import plotly.express as px
    df = pd.DataFrame([r for r in rows if r["points"] is not None] or [{"points": None, "source": ""}])
    fig = px.histogram(df, x="points", color="source", nbins=28, range_x=[0, 7], barmode="stack",
                       title="grades of the teacher's samples (0-7) by source")
    return fig


def length_histogram(rows: list[dict]):
    """Distribution of teacher completion tokens, coloured by selection status."""
    import pandas as pd
    import plotly.express as px
    df = pd.DataFrame(rows or [{"completion_tokens": 0, "status": ""}])
    return px.histogram(df, x="completion_tokens", color="status", nbins=30, barmode="stack",
                        title="teacher completion length (tokens) by selection status")


def render_sample(row: dict) -> str:
    """HTML for one sample: status, grade, proof, reasoning (folded) and the judge's assessment."""
    e = html.escape
    grade = "no grade" if row["points"] is None else f"{row['points']:.2f} / 7"
    invalid = f" (invalid: {e(str(row['invalid_reason']))})" if row.get("invalid_reason") else ""
    return (f"<b>{e(row['key'])}</b> · status <b>{e(row['status'])}</b> · grade {grade}{invalid} · "
            f"{row['completion_tokens']} tokens, finish {e(row['finish_reason'])}"
            f"<h4>Problem</h4><pre style='white-space:pre-wrap'>{e(row['problem'])}</pre>"
            f"<h4>Proof</h4><pre style='white-space:pre-wrap'>{e(row['proof']) or '<i>(none)</i>'}</pre>"
            f"<details><summary>Reasoning ({len(row['reasoning'])} chars)</summary>"
            f"<pre style='white-space:pre-wrap'>{e(row['reasoning'])}</pre></details>"
            f"<h4>Judge</h4><pre style='white-space:pre-wrap'>{e(row['judge_text'] or '')}</pre>")


def render_worked_example(ex: dict | None) -> str:
    """HTML of `worked_example`: every part in full, the reasoning and the proof split at `</think>`."""
    e = html.escape
    if ex is None:
        return "<i>no sample with a proof was graded: nothing to show</i>"
    row, g = ex["row"], ex["grade"]
    pre = lambda t: f"<pre style='white-space:pre-wrap'>{e(t) if t else '<i>(empty)</i>'}</pre>"  # noqa: E731
    how = (f"expected score over 0-7 from the judge's next-token probabilities after {e(ex['prompt_prefix'])}"
           if ex["mode"] == "score_prob" else "the number in the judge's score tag")
    probs = ", ".join(f"{k}: {v:.2f}" for k, v in (g.get("probs") or {}).items())
    return (f"<b>{e(row['key'])}</b> · status <b>{e(row['status'])}</b> · {row['completion_tokens']} teacher tokens, "
            f"finish {e(row['finish_reason'])}<h4>Problem</h4>{pre(row['problem'])}<h4>Rubric</h4>{pre(ex['rubric'])}"
            f"<h4>Teacher reasoning (before &lt;/think&gt;)</h4>{pre(row['reasoning'])}"
            f"<h4>Teacher proof (after &lt;/think&gt;)</h4>{pre(row['proof'])}"
            f"<h4>The judge prompt, exactly as sent (user message)</h4>{pre(ex['judge_prompt'])}"
            f"<h4>Grade: {row['points']:.2f} / 7</h4><p>{how}"
            + (f"; probabilities {e(probs)}" if probs else "") + f"</p><h4>Judge text</h4>{pre(g.get('judge_text', ''))}")


def sample_browser(rows: list[dict]):
    """An ipywidgets browser: pick a problem, page through its samples (reasoning, proof, grade, judge)."""
    import ipywidgets as w
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    options = [(f"{pid} ({sum(r['status'] == 'kept' for r in rs)}/{len(rs)} kept)", pid) for pid, rs in by_problem.items()]
    pick = w.Dropdown(options=options, description="problem")
    page = w.IntSlider(min=0, max=0, description="sample")
    view = w.HTML()

    def show(*_):
        rs = by_problem.get(pick.value, [])
        page.max = max(0, len(rs) - 1)
        view.value = render_sample(rs[min(page.value, page.max)]) if rs else "no samples"
    pick.observe(show, "value")
    page.observe(show, "value")
    show()
    return w.VBox([w.HBox([pick, page]), view])


def findings(metrics: dict, rows: list[dict]) -> str:
    """What the stage's own numbers say: the real grade range, truncation, what selection kept and why."""
    valid = sorted(r["points"] for r in rows if r["valid"] and r["points"] is not None)
    n = metrics["samples"]
    out = [f"**{n} samples** of {metrics['problems_used']} problems ({metrics['decontaminated']} removed as "
           f"overlapping a benchmark); {metrics['truncated']} of {n} hit the teacher's token budget (truncated)."]
    if valid:
        lo, hi = valid[0], valid[-1]
        out.append(f"Valid grades run from **{lo:.2f} to {hi:.2f}** out of 7 (mean {metrics['mean_grade']:.2f}).")
        if hi - lo < 1.5:
            out.append(f"All grades lie within {hi - lo:.2f} points of each other: the judge hardly separates these "
                       "proofs, so keeping the best of each problem picks by the judge's taste, not proof quality.")
    if metrics["kept"]:
        out.append(f"Kept {metrics['kept']} samples of {metrics['kept_problems']} problems (mean grade "
                   f"{metrics['mean_grade_kept']:.2f}); they become stage 02's training set.")
        cut = sum(1 for r in rows if r["status"] == "kept" and r.get("truncated"))
        if cut:
            out.append(f"{cut} of them were cut at the token budget (`distill.drop_truncated` is off): SFT will "
                       "imitate proofs that stop mid-sentence, and the grades above are grades of fragments.")
    else:
        out.append("Nothing was kept: stage 02 has no data (lower `distill.min_grade` or raise the token budget).")
    return " ".join(out)


# Key settings shown beside the paper's (qedlib.display.settings_table).
SETTINGS = [("teacher", "distill.teacher.model", "DeepSeek-Math-V2"),
            ("teacher thinking", "distill.thinking", True),
            ("teacher temperature", "distill.sampling.temperature", 1.0),
            ("teacher max new tokens", "distill.sampling.max_new_tokens", "~125k"),
            ("teacher requests in flight", "distill.teacher.max_concurrency", 256),
            ("samples per problem", "distill.sampling.n", NOT_IN_PAPER),
            ("judge", "distill.judge.endpoint.model", NOT_IN_PAPER),
            ("judge prompt", "distill.judge.prompt", "rubric"),
            ("judge mode", "distill.judge.mode", "text"),
            ("samples kept per problem", "distill.per_problem", "best"),
            ("min grade kept (0-7)", "distill.min_grade", NOT_IN_PAPER),
            ("drop truncated samples", "distill.drop_truncated", NOT_IN_PAPER),
            ("decontaminate against", "distill.decontaminate", "the eval benchmarks")]


# Final metrics shown as one small table (qedlib.display.metrics_table).
METRICS = [("problems loaded", "problems"), ("removed by decontamination", "decontaminated"),
           ("samples", "samples"), ("graded", "graded"), ("invalid grades", "invalid"), ("truncated", "truncated"),
           ("kept", "kept"), ("problems kept", "kept_problems"), ("mean grade (valid)", "mean_grade"),
           ("mean grade (kept)", "mean_grade_kept"), ("teacher completion tokens", "teacher_completion_tokens"),
           ("cost (USD)", "cost"), ("seconds", "seconds")]


# "Try it" experiments (notebook 01's last section): params overrides on params/cpu.yaml, each minutes on a laptop.
EXPERIMENTS = [
    {"name": "decontam-eval", "overrides": {"distill.problems.split": None},
     "look_for": "load train and eval problems together: decontamination against `shipped:eval` now removes the "
                 "12 held-out problems (the funnel's 'problems after decontamination' row drops by 12)."},
    {"name": "strict-grade", "overrides": {"distill.min_grade": 2.5},
     "look_for": "a stricter filter, set inside the 135M judge's narrow band of grades: the funnel gains a "
                 "'below_min_grade' row and whole problems leave the SFT set, chosen by the judge's taste."},
    {"name": "more-samples", "overrides": {"distill.sampling.n": 4},
     "look_for": "four samples per problem: 'best of 4' should raise the mean kept grade over the mean of all "
                 "grades; with a judge that barely separates proofs the gap stays small."},
    {"name": "drop-truncated", "overrides": {"distill.drop_truncated": True, "distill.sampling.max_new_tokens": 256},
     "look_for": "the paper's rule (a cut proof is never kept) with a larger budget: how many samples survive, "
                 "and how long the teacher's answers are when allowed to finish."},
]


def try_it(params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section, built from EXPERIMENTS (one source, tested)."""
    return experiments_markdown(EXPERIMENTS, params_file, DISTILL)
