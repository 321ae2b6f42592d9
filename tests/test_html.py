"""Executed notebooks outside JupyterLab: figures carry an HTML rendering that draws in nbconvert's HTML (plotly.js
embedded once), widget state is saved, and library progress bars / deprecation warnings stay out of the outputs.

Runs stage 01 on params/smoke.yaml (~30 s; it has plotly figures, a widget browser and model loading).
"""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.smoke
PLOTLY_MIME = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> Path:
    from qedlib.runner import run_pipeline
    run = run_pipeline(str(REPO / "params" / "smoke.yaml"), run_name="html", stages=["01_distill"],
                       outputs=tmp_path_factory.mktemp("outputs"))
    return run / "01_distill" / "01_distill.ipynb"


def outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def test_figures_carry_an_html_rendering_with_plotly_js_once(executed):
    outs = outputs(json.loads(executed.read_text()))
    figures = [o for o in outs if PLOTLY_MIME in o.get("data", {})]
    assert len(figures) >= 3  # the funnel and two histograms
    assert all("text/html" in o["data"] for o in figures)  # the mime type for JupyterLab, HTML for everyone else
    html = ["".join(o["data"]["text/html"]) for o in outs if "text/html" in o.get("data", {})]
    assert sum("plotly.js v" in h for h in html) == 1  # the bundle's banner: embedded once, not per figure


def test_widget_state_is_saved(executed):
    nb = json.loads(executed.read_text())
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    views = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for o in outputs(nb)
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views and all(v in state for v in views)  # every displayed widget (the sample browser) can be rebuilt


def test_no_library_progress_bars_or_warnings_in_outputs(executed):
    outs = outputs(json.loads(executed.read_text()))
    stderr = "".join("".join(o["text"]) for o in outs if o["output_type"] == "stream" and o["name"] == "stderr")
    assert "Warning" not in stderr, stderr[:1000]
    plain = "".join("".join(o.get("data", {}).get("text/plain", "")) for o in outs)
    assert "Loading weights" not in plain and "Saving the dataset" not in plain  # bars a saved notebook shows at 0%


def test_nbconvert_html_draws_every_figure_in_chromium(executed, tmp_path, chromium):
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter().from_filename(str(executed))
    page = tmp_path / "01_distill.html"
    page.write_text(body)
    n_figs = sum(PLOTLY_MIME in o.get("data", {}) for o in outputs(json.loads(executed.read_text())))
    dom = chromium(page)  # no network: only the plotly.js embedded in the notebook can draw
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom)) == n_figs
    assert len(re.findall(r'class="[^"]*\bmain-svg\b', dom)) >= n_figs
    assert len(re.findall(r'class="[^"]*\b(trace bars|funnellayer|barlayer)\b', dom)) >= n_figs


def test_the_runner_signs_the_notebook_and_writes_its_html(executed):
    import nbformat
    from nbformat.sign import NotebookNotary
    assert NotebookNotary().check_signature(nbformat.read(str(executed), as_version=4))  # widgets render in Lab
    page = executed.with_suffix(".html")
    src = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page.read_text(), re.I)  # how the page loads MathJax
    if _has_server_mathjax():  # the run folder's copy, by a relative link; else nbconvert's CDN link stays
        # (plotly.js, embedded once, carries a MathJax 3 CDN URL as a string it would inject only for LaTeX in a figure)
        assert src[0] == "../.mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe", src
        assert not [s for s in src if "mathjax/2" in s.lower() and s.startswith("http")], src  # nbconvert's CDN link


def _has_server_mathjax() -> bool:
    import importlib.util
    return importlib.util.find_spec("jupyter_server_mathjax") is not None


def test_progress_bars_are_one_line_each(executed):
    nb = json.loads(executed.read_text())
    for c in nb["cells"]:
        outs = c.get("outputs", [])
        streams = [o for o in outs if o["output_type"] == "stream"]
        assert not any(a["output_type"] == b["output_type"] == "stream" and a["name"] == b["name"]
                       for a, b in zip(outs, outs[1:]))  # consecutive writes merged, as Lab shows them
        assert not any("\r" in "".join(o["text"]) for o in streams)  # only each bar's last state is kept
