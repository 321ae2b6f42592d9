"""Executed notebooks as their reader gets them: signed as trusted (JupyterLab renders their widgets) and written as
HTML whose math is typeset by the run folder's own MathJax, with no network (qedlib.display.trust_notebook,
write_html; the runner calls both after each stage)."""
import re
from pathlib import Path

import pytest

from qedlib.display import MATHJAX_DIR, trust_notebook, write_html


def _notebook(path: Path) -> Path:
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("The clip ratio $\\rho = \\pi_\\theta / \\pi_{old}$ and $$\\sum_i x_i^2$$."),
                nbformat.v4.new_code_cell("1 + 1", outputs=[nbformat.v4.new_output(
                    "execute_result", data={"text/plain": "2"}, execution_count=1)], execution_count=1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def test_an_executed_notebook_is_signed_as_trusted(tmp_path, monkeypatch):
    import nbformat
    from nbformat.sign import NotebookNotary
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))  # a private signature store
    nb_path = _notebook(tmp_path / "run" / "02_sft" / "02_sft.ipynb")
    nb = nbformat.read(str(nb_path), as_version=4)
    assert not NotebookNotary().check_signature(nb)  # untrusted as written (papermill's output)
    assert trust_notebook(nb_path)
    assert NotebookNotary().check_signature(nbformat.read(str(nb_path), as_version=4))


def test_html_math_uses_the_run_folders_mathjax_not_a_cdn(tmp_path):
    pytest.importorskip("jupyter_server_mathjax", reason="pip install jupyter-server-mathjax (MathJax 2.7, offline)")
    run = tmp_path / "run"
    page = write_html(_notebook(run / "03_rubric_rl" / "03_rubric_rl.ipynb"), run)
    text = page.read_text()
    src = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', text, re.I)  # local or CDN, however spelled
    assert src == ["../" + MATHJAX_DIR + "/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"], src
    assert "cdnjs" not in " ".join(src) and (run / MATHJAX_DIR / "MathJax.js").exists()


def test_html_math_is_typeset_offline_in_chromium(tmp_path, chromium):
    pytest.importorskip("jupyter_server_mathjax", reason="pip install jupyter-server-mathjax (MathJax 2.7, offline)")
    run = tmp_path / "run"
    page = write_html(_notebook(run / "03_rubric_rl" / "03_rubric_rl.ipynb"), run)
    dom = chromium(page)  # no network: only the copy in the run folder can typeset
    frames = re.findall(r'class="MathJax(?:_Display)?"[^>]*data-mathml="([^"]*)"', dom)
    assert len(frames) == 2, frames  # the inline and the display formula
    assert "msubsup" in frames[1] and "Math Processing Error" not in dom  # x_i^2 became MathML


def test_tidy_outputs_keeps_one_line_per_progress_bar_and_drops_empty_progress_tables(tmp_path):
    import nbformat
    from qedlib.display import tidy_outputs
    nb = nbformat.v4.new_notebook()
    bar = [nbformat.v4.new_output("stream", name="stderr", text=t) for t in (
        "\rjudge:   0%|          | 0/48", "\rjudge:  50%|#####     | 24/48", "\rjudge: 100%|##########| 48/48", "\n")]
    hf = ("<div><progress value='21' max='20' style='width:300px'></progress> [20/20 09:58, Epoch 3.33/4]</div>"
          "<table border=\"1\" class=\"dataframe\"><thead><tr><th>Step</th><th>Training Loss</th></tr></thead>"
          "<tbody>\n  </tbody>\n</table><p>")
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=bar + [nbformat.v4.new_output(
        "display_data", data={"text/html": hf, "text/plain": "<IPython.core.display.HTML object>"})])]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    assert tidy_outputs(path) == 4  # three stream outputs merged away, one HTML display cleaned
    outs = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert [o.output_type for o in outs] == ["stream", "display_data"]
    assert outs[0].text == "judge: 100%|##########| 48/48\n"
    html = outs[1].data["text/html"]
    assert "[20/20 09:58, Epoch 3.33/4]" in html and "<progress" not in html and "Training Loss" not in html
    assert tidy_outputs(path) == 0  # already tidy: the file is left alone
