"""Source notebooks: one parameters cell of literals, a title, no outputs, the qed kernel."""
import ast
import json
from pathlib import Path

import pytest

from qedlib.layout import STAGES

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_one_notebook_per_stage():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_notebook_shape(stage):
    nb = json.loads((NOTEBOOKS / f"{stage}.ipynb").read_text())
    cells = nb["cells"]
    assert nb["metadata"]["kernelspec"]["name"] == "qed"
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith(f"# {stage[:2]}")
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    tree = ast.parse("".join(params[0]["source"]))
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign), "the parameters cell holds assignments only"
        ast.literal_eval(node.value)  # literals only
        names |= {t.id for t in node.targets}
    assert {"params_file", "run_dir", "overrides"} <= names
    nxt = code[code.index(params[0]) + 1]
    assert "start_stage(" in "".join(nxt["source"]), "the cell after parameters validates them"
    tail = [c for c in code if "try_it(" not in "".join(c["source"])]  # a computed "Try it" may follow the metrics
    assert "write_metrics(" in "".join(tail[-1]["source"]), "the last cell (before Try it) writes metrics.json"
    assert all("try_it(" in "".join(c["source"]) for c in code[code.index(tail[-1]) + 1:])
