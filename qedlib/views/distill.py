"""What notebooks/01_distill.ipynb shows of the distillation stage: figures, the worked example, the sample
browser, the run's findings in words, and the settings, metrics and "Try it" tables.

The stage's steps (and the data these take) are in qedlib.stages.distill; nothing here computes a result the
stage writes.
"""
from __future__ import annotations

import html

from ..display import experiments_markdown, rubric_parts
from ..grading import build_prompt
from ..layout import DISTILL
from ..stages.distill import grade_key


def funnel_figure(steps: list[dict]):
    """A plotly funnel of the stage's funnel rows. Notebook 01, "Selection and the funnel"."""
    import plotly.graph_objects as go  # heavy: plotly loads only when a figure is drawn
    fig = go.Figure(go.Funnel(y=[s["step"] for s in steps], x=[s["count"] for s in steps], textinfo="value"))
    fig.update_layout(title="distillation funnel", height=80 + 40 * len(steps), margin=dict(l=220))
    return fig


def grade_histogram(rows: list[dict]):
    """Histogram of valid grades (0-7), coloured by problem source. Notebook 01, "Grades, lengths, tokens and cost"."""
    import pandas as pd  # heavy: loads only when a figure is drawn
    import plotly.express as px  # heavy: loads only when a figure is drawn
    df = pd.DataFrame([r for r in rows if r["points"] is not None] or [{"points": None, "source": ""}])
    fig = px.histogram(df, x="points", color="source", nbins=28, range_x=[0, 7], barmode="stack",
                       title="grades of the teacher's samples (0-7) by source")
    return fig


def length_histogram(rows: list[dict]):
    """Distribution of teacher completion tokens, coloured by selection status.
    Notebook 01, "Grades, lengths, tokens and cost"."""
    import pandas as pd  # heavy: loads only when a figure is drawn
    import plotly.express as px  # heavy: loads only when a figure is drawn
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


def worked_example(rows: list[dict], problems: list, dc, grades: list[dict]) -> dict | None:
    """One sample read in full: problem, rubric, reasoning, proof, the exact judge prompt and the grade.

    Picks the best-graded kept sample (else the best-graded sample that has a proof); None when
    no sample has a proof. The prompt is rebuilt with grading.build_prompt, the text the grader sent.
    Notebook 01, "One sample, read in full" (rendered by `render_worked_example`).
    """
    graded = [r for r in rows if r["proof"] and r["points"] is not None]
    pool = [r for r in graded if r["status"] == "kept"] or graded
    if not pool:
        return None
    row = max(pool, key=lambda r: (r["points"], -r["sample_index"]))
    problem = {p.id: p for p in problems}[row["problem_id"]]
    grade = {g["key"]: g for g in grades}[grade_key(row["key"], dc.judge)]
    prompt = build_prompt(dc.judge.prompt, dc.judge.mode, problem, row["proof"])
    return {"row": row, "rubric": problem.rubric or "", "judge_prompt": prompt.text, "prompt_prefix": prompt.prefix,
            "mode": dc.judge.mode, "grade": grade}


def rubric_html(text: str) -> str:
    """A rubric as HTML: each heading line ("Checkpoints (7 points total):", "Zero-credit items:", "Deductions:") a
    bold heading and the "- " lines under it a bullet list, so a heading never runs into the list above it (as it
    does when the text is read as markdown, where a line after a list item continues that item)."""
    e, out = html.escape, []
    for head, items in rubric_parts(text):
        if head:
            out.append(f"<p style='margin:0.4em 0 0.1em'><b>{e(head)}</b></p>")
        if items:
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>")
    return "".join(out) or "<pre><i>(empty)</i></pre>"


def render_worked_example(ex: dict | None) -> str:
    """HTML of `worked_example`: every part in full, the reasoning and the proof split at `</think>`; the problem and
    the rubric as typeset text, the model's outputs and the judge prompt exactly as written.
    Notebook 01, "One sample, read in full"."""
    e = html.escape
    if ex is None:
        return "<i>no sample with a proof was graded: nothing to show</i>"
    row, g = ex["row"], ex["grade"]
    pre = lambda t: f"<pre style='white-space:pre-wrap'>{e(t) if t else '<i>(empty)</i>'}</pre>"  # noqa: E731
    # the problem is our text: typeset its $...$ (MathJax skips <pre>); model outputs and the prompt stay raw
    math_text = lambda t: f"<p style='white-space:pre-wrap'>{e(t)}</p>"  # noqa: E731
    how = (f"expected score over 0-7 from the judge's next-token probabilities after {e(ex['prompt_prefix'])}"
           if ex["mode"] == "score_prob" else "the number in the judge's score tag")
    probs = ", ".join(f"{k}: {v:.2f}" for k, v in (g.get("probs") or {}).items())
    return (f"<b>{e(row['key'])}</b> · status <b>{e(row['status'])}</b> · {row['completion_tokens']} teacher tokens, "
            f"finish {e(row['finish_reason'])}<h4>Problem</h4>{math_text(row['problem'])}<h4>Rubric</h4>{rubric_html(ex['rubric'])}"
            f"<h4>Teacher reasoning (before &lt;/think&gt;)</h4>{pre(row['reasoning'])}"
            f"<h4>Teacher proof (after &lt;/think&gt;)</h4>{pre(row['proof'])}"
            f"<h4>The judge prompt, exactly as sent (user message)</h4>{pre(ex['judge_prompt'])}"
            f"<h4>Grade: {row['points']:.2f} / 7</h4><p>{how}"
            + (f"; probabilities {e(probs)}" if probs else "") + f"</p><h4>Judge text</h4>{pre(g.get('judge_text', ''))}")


def sample_browser(rows: list[dict]):
    """An ipywidgets browser: pick a problem, page through its samples (reasoning, proof, grade, judge).
    Notebook 01, "Browse the samples"."""
    import ipywidgets as w  # optional: the notebook's widgets, only when the browser is built
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
    """What the stage's own numbers say: the real grade range, truncation, what selection kept and why.
    Notebook 01, "Metrics, and what they say"."""
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


# Key settings shown beside the paper's (qedlib.display.settings_table; the paper's values are qedlib.paper.RECIPE's).
SETTINGS = [("teacher", "distill.teacher.model"),
            ("teacher thinking", "distill.thinking"),
            ("teacher temperature", "distill.sampling.temperature"),
            ("teacher max new tokens", "distill.sampling.max_new_tokens"),
            ("teacher requests in flight", "distill.teacher.max_concurrency"),
            ("samples per problem", "distill.sampling.n"),
            ("judge", "distill.judge.endpoint.model"),
            ("judge prompt", "distill.judge.prompt"),
            ("judge mode", "distill.judge.mode"),
            ("samples kept per problem", "distill.per_problem"),
            ("min grade kept (0-7)", "distill.min_grade"),
            ("drop truncated samples", "distill.drop_truncated"),
            ("decontaminate against", "distill.decontaminate")]


# Final metrics shown as one small table (qedlib.display.metrics_table).
METRICS = [("problems loaded", "problems"), ("removed by decontamination", "decontaminated"),
           ("samples", "samples"), ("graded", "graded"), ("invalid grades", "invalid"), ("truncated", "truncated"),
           ("kept", "kept"), ("problems kept", "kept_problems"), ("mean grade (valid)", "mean_grade"),
           ("mean grade (kept)", "mean_grade_kept"), ("teacher completion tokens", "teacher_completion_tokens"),
           ("cost (USD)", "cost"), ("seconds", "seconds")]


# "Try it" experiments (notebook 01's last section), each rerunning 01_distill alone into its own folder. `minutes` on
# 2 idle cores: strict-grade measured (2026-12-05: 123 s; 3 of 48 samples below 2.5, 23 of 24 problems kept), the
# others estimated from it (decontam-eval does the same work; more-samples generates and grades twice the samples;
# drop-truncated generates up to twice the tokens).
EXPERIMENTS = [
    {"name": "decontam-eval", "overrides": {"distill.problems.split": None}, "minutes": 2,
     "look_for": "load train and eval problems together: decontamination against `shipped:eval` now removes the "
                 "12 held-out problems (the funnel's 'problems after decontamination' row drops by 12)."},
    {"name": "strict-grade", "overrides": {"distill.min_grade": 2.5}, "minutes": 2, "measured": True,
     "look_for": "a stricter filter, set inside the 135M judge's narrow band of grades. Measured: the funnel gains "
                 "a 'below_min_grade' row (3 of 48 samples) and one of the 24 problems leaves the SFT set (23 kept), "
                 "chosen by the judge's taste."},
    {"name": "more-samples", "overrides": {"distill.sampling.n": 4}, "minutes": 4,
     "look_for": "four samples per problem: 'best of 4' should raise the mean kept grade over the mean of all "
                 "grades; with a judge that barely separates proofs the gap stays small."},
    {"name": "drop-truncated", "overrides": {"distill.drop_truncated": True, "distill.sampling.max_new_tokens": 256},
     "minutes": 3,
     "look_for": "the paper's rule (a cut proof is never kept) with a larger budget: how many samples survive, "
                 "and how long the teacher's answers are when allowed to finish."},
]


def try_it(params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section, built from EXPERIMENTS (one source, tested), with each
    experiment's time on 2 cores (measured or estimated). Notebook 01, "Try it"."""
    return experiments_markdown(EXPERIMENTS, params_file, DISTILL, estimated_from="strict-grade")
