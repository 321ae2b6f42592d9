"""Small plotly helpers shared by the stage notebooks (training curves, bars, histograms)."""
from __future__ import annotations


def curves(rows: list[dict], x: str, ys: list[str], title: str, yaxis: str = ""):
    """One line per metric in `ys` against `x`, from a list of dict rows (missing values skipped)."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for y in ys:
        pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=y))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=yaxis, height=360, template="plotly_white")
    return fig


def stacked_time(rows: list[dict], x: str, parts: list[str], title: str):
    """Stacked bars of where each step's time went."""
    import plotly.graph_objects as go
    fig = go.Figure([go.Bar(x=[r[x] for r in rows], y=[r.get(p) or 0 for r in rows], name=p) for p in parts])
    fig.update_layout(barmode="stack", title=title, xaxis_title=x, yaxis_title="seconds", height=320,
                      template="plotly_white")
    return fig


def bars(labels: list, values: list, title: str, yaxis: str = ""):
    """A simple bar chart."""
    import plotly.graph_objects as go
    fig = go.Figure(go.Bar(x=labels, y=values))
    fig.update_layout(title=title, yaxis_title=yaxis, height=320, template="plotly_white")
    return fig
