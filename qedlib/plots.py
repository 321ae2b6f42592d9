"""Small plotly helpers shared by the stage notebooks (training curves, bars, histograms).

Every helper returns a plotly figure, or a `Note` (one Markdown sentence with the same `.show()`)
when there is nothing to draw, so a notebook cell `curves(...).show()` never shows an empty frame.
`curves` puts series of different scales (tokens vs nats, rates vs counts) on separate panels.
"""
from __future__ import annotations

import math

SCALE_RATIO = 10.0  # series whose largest values differ by more than this share no y axis


class Note:
    """A one-sentence Markdown stand-in for a figure with nothing to show; `.show()` displays it."""

    def __init__(self, text: str):
        self.text = text

    def show(self) -> None:
        """Display the sentence as Markdown (plain text outside IPython)."""
        try:
            from IPython.display import Markdown, display
        except ImportError:
            print(self.text)
            return
        display(Markdown(self.text))

    def _repr_markdown_(self) -> str:
        return self.text

    def to_html(self, **_) -> str:
        """The sentence as an HTML paragraph (where a figure's to_html would go, e.g. the report)."""
        import html
        import re
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


def curves(rows: list[dict], x: str, ys: list[str], title: str, yaxis: str = ""):
    """One line per metric in `ys` against `x`, one panel per scale (missing values skipped; a Note when none)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    pts = {y: _series(rows, x, y) for y in ys}
    missing = [y for y in ys if not pts[y]]
    if len(missing) == len(ys):
        return Note(f"**{title}**: nothing to plot, no step logged a value for {', '.join(ys)}.")
    groups = scale_groups({y: [p[1] for p in v] for y, v in pts.items() if v})
    note = f" (no values: {', '.join(missing)})" if missing else ""
    fig = make_subplots(rows=len(groups), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for row, group in enumerate(groups, 1):
        for y in group:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts[y]], y=[p[1] for p in pts[y]], mode="lines+markers", name=y),
                          row=row, col=1)
        label = yaxis if len(groups) == 1 and yaxis else ", ".join(group)
        fig.update_yaxes(title_text=label, row=row, col=1)
    fig.update_xaxes(title_text=x, row=len(groups), col=1)
    xs = [p[0] for v in pts.values() for p in v]
    if all(isinstance(v, int) for v in xs) and max(xs) - min(xs) <= 12:
        fig.update_xaxes(dtick=1)  # a few integer steps: no 1.2, 1.4, ... ticks
    fig.update_layout(title=title + note, height=160 + 200 * len(groups), template="plotly_white")
    return fig


def stacked_time(rows: list[dict], x: str, parts: list[str], title: str):
    """Stacked bars of where each step's time went (a Note when no part was timed)."""
    import plotly.graph_objects as go
    timed = [p for p in parts if any(_number(r.get(p)) and r.get(p) > 0 for r in rows)]
    if not timed:
        return Note(f"**{title}**: nothing to plot, no step recorded a time for {', '.join(parts)}.")
    fig = go.Figure([go.Bar(x=[r[x] for r in rows], y=[r.get(p) or 0 for r in rows], name=p) for p in timed])
    fig.update_layout(barmode="stack", title=title, xaxis_title=x, yaxis_title="seconds", height=320,
                      template="plotly_white")
    return fig


def bars(labels: list, values: list, title: str, yaxis: str = ""):
    """A simple bar chart (a Note when no value is a number)."""
    import plotly.graph_objects as go
    if not any(_number(v) for v in values):
        return Note(f"**{title}**: nothing to plot, no bar has a value.")
    fig = go.Figure(go.Bar(x=labels, y=[v if _number(v) else None for v in values]))
    fig.update_layout(title=title, yaxis_title=yaxis, height=320, template="plotly_white")
    return fig


def setup_notebook_rendering() -> None:
    """In a Jupyter kernel: figures carry plotly's mime type (JupyterLab) and an HTML rendering with plotly.js
    embedded once, at the first figure (nbconvert HTML and other viewers that run the page's scripts)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return
    import plotly.io as pio
    if pio.renderers.default != "plotly_mimetype+notebook":  # set once: setting it again re-embeds plotly.js
        pio.renderers.default = "plotly_mimetype+notebook"
