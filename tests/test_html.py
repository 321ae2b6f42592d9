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
