"""What a notebook shows a reader: a short settings table (paper vs this run), a small metrics table,
and a sentence of interpretation. Used by every stage notebook, so the five read alike.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .paper import recipe_value


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) or "(none)"
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-3 or abs(v) >= 1e5) and v else f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def settings_table(cfg: Any, rows: Iterable[tuple[str, str]]):
    """A table of the few settings that matter: (label, dotted key in the config) -> columns setting / this run /
    paper, the paper's value read from qedlib.paper.RECIPE ("-": not published). Keep it to <= 15 rows."""
    import pandas as pd  # heavy: pandas loads only for tables
    rows = list(rows)
    if len(rows) > 15:
        raise ValueError(f"settings_table: {len(rows)} rows; show the <= 15 settings a reader needs")
    return pd.DataFrame([{"setting": label, "this run": _fmt(_dotted(cfg, key)), "paper": _fmt(recipe_value(key))}
                         for label, key in rows]).set_index("setting")


def metrics_table(metrics: dict, keys: Iterable[tuple[str, str]], title: Optional[str] = None):
    """A small table of final metrics: (label, dotted key in `metrics`); missing keys show as 'n/a'."""
    import pandas as pd  # heavy: pandas loads only for tables
    out = []
    for label, key in keys:
        try:
            v = _dotted(metrics, key)
        except (KeyError, AttributeError, TypeError):
            v = None
        out.append({"metric": label, "value": "n/a" if v is None else _fmt(v)})
    df = pd.DataFrame(out).set_index("metric")
    return df.rename(columns={"value": title}) if title else df


def excerpt(text: str, n: int = 48) -> str:
    """The first `n` characters of `text` for a table cell, ended with "..." when cut, never inside a `$...$` span
    (a cut span would show raw TeX: MathJax needs both dollars). Keeps pandas' own 50-character cut from applying."""
    if len(text) <= n:
        return text
    cut = text[:n]
    if cut.count("$") % 2:
        cut = cut[:cut.rfind("$")]
    return cut.rstrip() + "..."


def rubric_parts(text: str) -> list[tuple[Optional[str], list[str]]]:
    """A rubric's sections: (heading line or None before the first heading, the "- " / "* " items under it). A
    heading is any other non-empty line ("Checkpoints (7 points total):", "Zero-credit items:", "Deductions:")."""
    parts: list[tuple[Optional[str], list[str]]] = [(None, [])]
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith(("- ", "* ")):
            parts[-1][1].append(line[2:])
        elif line:
            parts.append((line, []))
    return [p for p in parts if p[0] is not None or p[1]]


def rubric_markdown(text: str) -> str:
    """A rubric as Markdown: each heading in bold with a blank line around it, so the items after it start a list of
    their own instead of merging into the list before it (where a line after a list item continues that item)."""
    out = []
    for head, items in rubric_parts(text):
        if head:
            out.append(f"**{head}**")
        if items:
            out.append("\n".join(f"- {i}" for i in items))
    return "\n\n".join(out)


def say(text: str) -> None:
    """Show one paragraph of interpretation as Markdown (plain text outside a notebook)."""
    try:
        from IPython.display import Markdown, display  # heavy: notebook display only
        display(Markdown(text))
    except ImportError:  # pragma: no cover - IPython ships with the notebook stack
        print(text)


def quiet_library_bars() -> None:
    """Turn off transformers' and datasets' own progress bars (loading/writing weights, dataset maps).

    In a saved notebook they are widgets whose state is not stored, so they read '0%' forever.
    """
    import datasets  # heavy: datasets loads pyarrow
    import transformers  # heavy: transformers loads torch
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

def experiments_markdown(experiments: list[dict], params_file: str, stages: str, estimated_from: str = "") -> str:
    """Notebook "Try it" experiments ({name, overrides, look_for}, optionally `minutes` on 2 cores and `measured`) as
    markdown: a fresh-run command, its time (measured, or `estimated_from` a measured one), what to see."""
    out = []
    for i, x in enumerate(experiments, 1):  # values as YAML scalars, what --set parses (3.0e-05, not 3e-05)
        sets = " ".join(f"--set {k}={yaml.safe_dump(v).splitlines()[0]}" for k, v in x["overrides"].items())
        took = ""
        if x.get("minutes"):
            how = "measured" if x.get("measured") else f"estimated from {estimated_from or 'a measured one'}"
            took = f"About {x['minutes']:g} min on 2 cores ({how}). "
        out.append(f"{i}. **{x['name']}**: `python -m qedlib run {params_file} --run-name try-{x['name']} "
                   f"--stages {stages} {sets}`  \n   {took}Look for: {x['look_for']}")
    return "\n".join(out)


# ---------------------------------------------------------------- executed notebooks, read outside the kernel
MATHJAX_DIR = ".mathjax"  # in the run folder: a copy of MathJax 2.7 (from jupyter-server-mathjax) the HTML pages load
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"  # the combined config that package ships (HTML-CSS output)
_MATHJAX_SKIP = ("localization", "a11y")  # translations and accessibility maps: not needed to typeset English pages


def trust_notebook(nb_path) -> bool:
    """Sign an executed notebook as trusted in the user's Jupyter signature store (nbformat's NotebookNotary), as
    JupyterLab does when the user runs a notebook: it is the user's own output, so JupyterLab renders its widgets
    and HTML instead of `VBox(children=...)`. False (and a printed reason) when the store cannot be written."""
    import nbformat  # heavy: loads only to sign a notebook
    from nbformat.sign import NotebookNotary  # heavy: loads only to sign a notebook
    try:
        nb = nbformat.read(str(nb_path), as_version=4)
        notary = NotebookNotary()
        notary.sign(nb)
        return notary.check_signature(nb)
    except Exception as e:  # a read-only home or no sqlite: the notebook still opens, untrusted
        print(f"[qedlib] could not sign {nb_path} as trusted ({type(e).__name__}: {e}); "
              f"in JupyterLab use 'Trust Notebook' or run `jupyter trust {nb_path}`")
        return False


def local_mathjax(run_dir) -> Path | None:
    """The run folder's copy of MathJax (copied once from the jupyter-server-mathjax package), or None when that
    package is not installed (`pip install jupyter-server-mathjax`)."""
    spec = importlib.util.find_spec("jupyter_server_mathjax")  # found, not imported: only its files are used
    if spec is None or not spec.submodule_search_locations:
        return None
    dest = Path(run_dir) / MATHJAX_DIR
    if not (dest / "MathJax.js").exists():
        src = Path(list(spec.submodule_search_locations)[0]) / "static"
        shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_MATHJAX_SKIP))
    return dest


def write_html(nb_path, run_dir) -> Path:
    """`<stage>.html` next to an executed notebook, as nbconvert writes it, but typesetting math with the run
    folder's own MathJax (a relative link, so the folder can move; no CDN). Without jupyter-server-mathjax the page
    keeps nbconvert's CDN link and a line says what to install."""
    from nbconvert import HTMLExporter  # heavy: loads only to write HTML
    nb_path = Path(nb_path)
    mj = local_mathjax(run_dir)
    exporter = HTMLExporter()
    if mj is None:
        print("[qedlib] math in the HTML pages needs MathJax from a CDN: `pip install jupyter-server-mathjax` "
              "to typeset it offline")
    else:
        rel = Path(os.path.relpath(mj, nb_path.parent)).as_posix()
        exporter.mathjax_url = f"{rel}/MathJax.js?config={MATHJAX_CONFIG}"
    body, _ = exporter.from_filename(str(nb_path))
    out = nb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


_PROGRESS_TAG = re.compile(r"<progress\b[^>]*>\s*</progress>", re.I)
_EMPTY_TABLE = re.compile(r"<table\b[^>]*>\s*<thead>.*?</thead>\s*<tbody>\s*</tbody>\s*</table>", re.I | re.S)


def tidy_outputs(nb_path) -> int:
    """Clean an executed notebook's saved outputs the way a live front end shows them, so nbconvert HTML and other
    viewers do too: consecutive stream outputs are merged and each `\\r`-rewritten progress line keeps only its last
    state (one line per bar instead of one line per refresh), and HTML progress displays (transformers' notebook
    callback) lose their `<progress>` element and their table when it has no rows, keeping the text beside them
    ("[20/20 09:58, Epoch 3.33/4]"). Returns the number of outputs removed or changed; rewrites the file if any."""
    import nbformat  # heavy: loads only to tidy a notebook
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor  # heavy: loads only to tidy a notebook
    nb = nbformat.read(str(nb_path), as_version=4)
    before = [len(c.get("outputs", [])) for c in nb.cells]
    changed = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        CoalesceStreamsPreprocessor().preprocess_cell(cell, {}, i)
        for out in cell.outputs:
            html = out.get("data", {}).get("text/html")
            if html is None:
                continue
            text = html if isinstance(html, str) else "".join(html)
            tidy = _EMPTY_TABLE.sub("", _PROGRESS_TAG.sub("", text))
            if tidy != text:
                out["data"]["text/html"] = tidy
                changed += 1
    changed += sum(before) - sum(len(c.get("outputs", [])) for c in nb.cells)
    if changed:
        nbformat.write(nb, str(nb_path))
    return changed
