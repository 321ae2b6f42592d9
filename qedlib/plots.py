"""Plotly figures shared by the notebooks and the run report: training curves, bars, and the eval figures
(score by checkpoint, pass@k, score vs tokens).

Every helper returns a plotly figure, or a `Note` (one Markdown sentence with the same `.show()`)
when there is nothing to draw, so a notebook cell `curves(...).show()` never shows an empty frame.
`curves` puts series of different scales (tokens vs nats, rates vs counts) on separate panels.
"""
from __future__ import annotations

import html
import math
import re
from typing import Iterable

SCALE_RATIO = 10.0  # series whose largest values differ by more than this share no y axis


class Note:
    """A one-sentence Markdown stand-in for a figure with nothing to show; `.show()` displays it."""

    def __init__(self, text: str):
        self.text = text

    def show(self) -> None:
        """Display the sentence as Markdown (plain text outside IPython)."""
        try:
            from IPython.display import Markdown, display  # optional: only inside a notebook
        except ImportError:
            print(self.text)
            return
        display(Markdown(self.text))

    def _repr_markdown_(self) -> str:
        return self.text

    def to_html(self, **_) -> str:
        """The sentence as an HTML paragraph (where a figure's to_html would go, e.g. the report)."""
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", html.escape(self.text))
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return f"<p class='note'>{text}</p>"

    def __repr__(self) -> str:
        return f"Note({self.text!r})"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: list[dict], x: str, y: str) -> list[tuple]:
    return [(r[x], r[y]) for r in rows if _number(r.get(y)) and r.get(x) is not None]


def unit_of(name: str) -> str | None:
    """The unit a metric's name says (tokens, nats, seconds), or None: such series never share an axis with others."""
    n = name.lower()
    if "length" in n or "tokens" in n:
        return "tokens"
    if "entropy" in n:
        return "nats"
    if n.endswith("_s") or "seconds" in n:
        return "seconds"
    return None


def scale_groups(series: dict[str, list[float]]) -> list[list[str]]:
    """Group series names that can share a y axis: same unit by name (tokens, nats, seconds), else all in [0, 1]
    (rates, fractions, 0-1 rewards), else within SCALE_RATIO of each other."""
    top = {n: max(abs(v) for v in vals) for n, vals in series.items()}
    groups: list[list[str]] = []
    units = {n: unit_of(n) for n in series}
    for unit in dict.fromkeys(u for u in units.values() if u):
        groups += _by_magnitude([n for n in series if units[n] == unit], top)
    rest = [n for n in series if not units[n]]
    unit_interval = [n for n in rest if min(series[n]) >= 0 and max(series[n]) <= 1]
    groups += [unit_interval] if unit_interval else []
    return groups + _by_magnitude([n for n in rest if n not in unit_interval], top)


def _by_magnitude(names: list[str], top: dict) -> list[list[str]]:
    groups: list[list[str]] = []
    for name in sorted(names, key=lambda n: -top[n]):
        if groups and top[name] * SCALE_RATIO >= top[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def curves(rows: list[dict], x: str, ys: list[str], title: str, yaxis: str = "", log: Iterable[str] = ()):
    """One line per metric in `ys` against `x`, one panel per scale (missing values skipped; a Note when none). A metric
    named in `log` (e.g. a gradient norm, whose spikes hide every other step on a linear axis) gets its own panel on
    a log axis."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    from plotly.subplots import make_subplots  # heavy: as above
    pts = {y: _series(rows, x, y) for y in ys}
    missing = [y for y in ys if not pts[y]]
    if len(missing) == len(ys):
        return Note(f"**{title}**: nothing to plot, no step logged a value for {', '.join(ys)}.")
    log = [y for y in log if y in pts and pts[y]]
    groups = scale_groups({y: [p[1] for p in v] for y, v in pts.items() if v and y not in log}) + [[y] for y in log]
    note = f" (no values: {', '.join(missing)})" if missing else ""
    fig = make_subplots(rows=len(groups), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for row, group in enumerate(groups, 1):
        for y in group:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts[y]], y=[p[1] for p in pts[y]], mode="lines+markers", name=y),
                          row=row, col=1)
        label = yaxis if len(groups) == 1 and yaxis else ", ".join(group)
        fig.update_yaxes(title_text=label + (" (log)" if group[0] in log else ""), row=row, col=1,
                         type="log" if group[0] in log else None)
    fig.update_xaxes(title_text=x, row=len(groups), col=1)
    xs = [p[0] for v in pts.values() for p in v]
    if all(isinstance(v, int) for v in xs) and max(xs) - min(xs) <= 12:
        fig.update_xaxes(dtick=1)  # a few integer steps: no 1.2, 1.4, ... ticks
    fig.update_layout(title=title + note, height=160 + 200 * len(groups), template="plotly_white")
    return fig


def stacked_time(rows: list[dict], x: str, parts: list[str], title: str):
    """Stacked bars of where each step's time went (a Note when no part was timed)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    timed = [p for p in parts if any(_number(r.get(p)) and r.get(p) > 0 for r in rows)]
    if not timed:
        return Note(f"**{title}**: nothing to plot, no step recorded a time for {', '.join(parts)}.")
    fig = go.Figure([go.Bar(x=[r[x] for r in rows], y=[r.get(p) or 0 for r in rows], name=p) for p in timed])
    fig.update_layout(barmode="stack", title=title, xaxis_title=x, yaxis_title="seconds", height=320,
                      template="plotly_white")
    return fig


def bars(labels: list, values: list, title: str, yaxis: str = ""):
    """A simple bar chart (a Note when no value is a number)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    if not any(_number(v) for v in values):
        return Note(f"**{title}**: nothing to plot, no bar has a value.")
    fig = go.Figure(go.Bar(x=labels, y=[v if _number(v) else None for v in values]))
    fig.update_layout(title=title, yaxis_title=yaxis, height=320, template="plotly_white")
    return fig


# ---------------------------------------------------------------- eval figures (notebook 05 and the run report)
def score_figure(summary):
    """Bar chart: mean score % of 7 by checkpoint, one bar per scaffold, 95% bootstrap intervals (notebook 05
    "Comparison across checkpoints and scaffolds", and the run report)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    fig = go.Figure()
    for (bench, sc), grp in summary.groupby(["benchmark", "scaffold"], sort=False):
        # the value written on each bar: a score of 0 is a result, not a missing bar
        # inside the bar at its foot, clear of the error bar's whisker; a bar too short to hold it gets it above
        fig.add_bar(x=list(grp["checkpoint"]), y=list(grp["mean_score_pct"]), name=f"{bench} / {sc}",
                    text=[f"{v:.1f}" for v in grp["mean_score_pct"]], insidetextanchor="start",
                    textposition=["inside" if v >= 8 else "outside" for v in grp["mean_score_pct"]],
                    error_y=dict(type="data", symmetric=False, array=list(grp["ci_high"] - grp["mean_score_pct"]),
                                 arrayminus=list(grp["mean_score_pct"] - grp["ci_low"])))
    fig.update_layout(barmode="group", title="Score by checkpoint and scaffold (95% bootstrap CI over problems)",
                      yaxis_title="mean score (% of 7)", yaxis_range=[0, 100], xaxis_title="checkpoint", template="plotly_white")
    return fig


def pass_at_k_figure(curve):
    """pass@k against k per checkpoint and scaffold, with bootstrap intervals (a Note when there is only k = 1);
    notebook 05 "pass@k" and the run report."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    if curve is None or not len(curve) or curve["k"].max() < 2:
        return Note("**pass@k**: nothing to plot, a curve needs at least two samples per problem (`eval.samples`); "
                    "with one, pass@1 is the success rate in the scores table.")
    fig = go.Figure()
    for key, grp in curve.groupby(["benchmark", "checkpoint", "scaffold"], sort=False):
        fig.add_scatter(x=list(grp["k"]), y=list(grp["pass_at_k"]), mode="lines+markers", name=" / ".join(map(str, key)),
                        error_y=dict(type="data", symmetric=False, array=list(grp["ci_high"] - grp["pass_at_k"]),
                                     arrayminus=list(grp["pass_at_k"] - grp["ci_low"])))
    fig.update_layout(title="pass@k (unbiased estimator; success = score >= threshold)", xaxis_title="k",
                      xaxis_dtick=1, yaxis_title="pass@k", yaxis_range=[0, 1.02], template="plotly_white")
    return fig


def tokens_figure(summary):
    """Score against generated tokens per problem (cost-effectiveness of scaffolds); notebook 05 and the run report.
    One marker per checkpoint and scaffold, named in the legend (colour: checkpoint, symbol: scaffold) and on hover,
    with its 95% interval: no text beside the markers, which overprint where checkpoints score alike."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    import plotly.colors as pc  # heavy: loads only when a figure is drawn
    fig = go.Figure()
    palette = pc.qualitative.Plotly
    symbols = ["circle", "diamond", "square", "triangle-up", "x", "star"]
    cks = list(dict.fromkeys(summary["checkpoint"]))
    scs = list(dict.fromkeys(summary["scaffold"]))
    several = summary["benchmark"].nunique() > 1
    for _, r in summary.iterrows():
        name = f"{r['checkpoint']} / {r['scaffold']}" + (f" ({r['benchmark']})" if several else "")
        fig.add_scatter(x=[r["tokens_per_problem"]], y=[r["mean_score_pct"]], mode="markers", name=name,
                        marker=dict(size=12, color=palette[cks.index(r["checkpoint"]) % len(palette)],
                                    symbol=symbols[scs.index(r["scaffold"]) % len(symbols)]),
                        error_y=dict(type="data", symmetric=False, array=[r["ci_high"] - r["mean_score_pct"]],
                                     arrayminus=[r["mean_score_pct"] - r["ci_low"]]),
                        hovertemplate=f"{name}<br>%{{x:.0f}} tokens, %{{y:.1f}}%<extra></extra>")
    fig.update_layout(title="Score vs tokens per problem (95% bootstrap CI over problems)",
                      xaxis_title="generated tokens per problem (all calls)", yaxis_title="mean score (% of 7)",
                      yaxis_range=[0, 100], legend_title_text="checkpoint / scaffold", template="plotly_white")
    return fig


def setup_notebook_rendering() -> None:
    """In a Jupyter kernel: figures carry plotly's mime type (JupyterLab) and an HTML rendering with plotly.js
    embedded once, at the first figure (nbconvert HTML and other viewers that run the page's scripts)."""
    try:
        from IPython import get_ipython  # optional: only inside a notebook
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return
    import plotly.io as pio  # heavy: loads only in a notebook kernel
    if pio.renderers.default != "plotly_mimetype+notebook":  # set once: setting it again re-embeds plotly.js
        pio.renderers.default = "plotly_mimetype+notebook"
