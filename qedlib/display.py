"""What a notebook shows a reader: a short settings table (paper vs this run), a small metrics table,
and a sentence of interpretation. Used by every stage notebook, so the five read alike.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

NOT_IN_PAPER = "-"  # the paper publishes no value for this setting


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


def settings_table(cfg: Any, rows: Iterable[tuple[str, str, Any]]):
    """A table of the few settings that matter: (label, dotted key in the config, the paper's value or
    NOT_IN_PAPER) -> columns setting / this run / paper. Keep it to <= 15 rows."""
    import pandas as pd
    rows = list(rows)
    if len(rows) > 15:
        raise ValueError(f"settings_table: {len(rows)} rows; show the <= 15 settings a reader needs")
    return pd.DataFrame([{"setting": label, "this run": _fmt(_dotted(cfg, key)), "paper": _fmt(paper)}
                         for label, key, paper in rows]).set_index("setting")


def metrics_table(metrics: dict, keys: Iterable[tuple[str, str]], title: Optional[str] = None):
    """A small table of final metrics: (label, dotted key in `metrics`); missing keys show as 'n/a'."""
    import pandas as pd
    out = []
    for label, key in keys:
        try:
            v = _dotted(metrics, key)
        except (KeyError, AttributeError, TypeError):
            v = None
        out.append({"metric": label, "value": "n/a" if v is None else _fmt(v)})
    df = pd.DataFrame(out).set_index("metric")
    return df.rename(columns={"value": title}) if title else df


def say(text: str) -> None:
    """Show one paragraph of interpretation as Markdown (plain text outside a notebook)."""
    try:
        from IPython.display import Markdown, display
        display(Markdown(text))
    except ImportError:  # pragma: no cover - IPython ships with the notebook stack
        print(text)


def quiet_library_bars() -> None:
    """Turn off transformers' and datasets' own progress bars (loading/writing weights, dataset maps).

    In a saved notebook they are widgets whose state is not stored, so they read '0%' forever.
    """
    import datasets
    import transformers
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

def experiments_markdown(experiments: list[dict], params_file: str, stages: str) -> str:
    """Notebook "Try it" experiments ({name, overrides, look_for}) as markdown: a fresh-run command, what to see."""
    import yaml
    out = []
    for i, x in enumerate(experiments, 1):  # values as YAML scalars, what --set parses (3.0e-05, not 3e-05)
        sets = " ".join(f"--set {k}={yaml.safe_dump(v).splitlines()[0]}" for k, v in x["overrides"].items())
        out.append(f"{i}. **{x['name']}**: `python -m qedlib run {params_file} --run-name try-{x['name']} "
                   f"--stages {stages} {sets}`  \n   Look for: {x['look_for']}")
    return "\n".join(out)
