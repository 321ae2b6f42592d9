"""One stage interface: every stage module exposes `run_stage(cfg, run_dir, params_file=None, overrides=None, ...)`,
each training stage a `train(cfg, run_dir)` step (what `python -m qedlib train STAGE` runs on every rank), and every
notebook imports exactly its one stage module and its one view module."""
import inspect
import json
import re
from pathlib import Path

import pytest

from qedlib.layout import STAGES, TRAINED_STAGES

REPO = Path(__file__).resolve().parent.parent
STAGE_MODULE = {"01_distill": "distill", "02_sft": "sft", "03_rubric_rl": "rubric_rl", "04_reasoning_cache_rl": "rc_rl",
                "05_eval": "evaluation"}


def test_every_stage_folder_has_a_stage_module_and_a_view_module():
    assert list(STAGE_MODULE) == STAGES
    for name in STAGE_MODULE.values():
        assert (REPO / "qedlib" / "stages" / f"{name}.py").exists() and (REPO / "qedlib" / "views" / f"{name}.py").exists()


@pytest.mark.parametrize("name", list(STAGE_MODULE.values()))
def test_run_stage_has_the_one_signature(name):
    import importlib
    module = importlib.import_module(f"qedlib.stages.{name}")
    params = list(inspect.signature(module.run_stage).parameters.values())
    assert [p.name for p in params[:4]] == ["cfg", "run_dir", "params_file", "overrides"], name
    assert params[2].default is None and params[3].default is None
    assert all(p.default is not inspect.Parameter.empty or p.kind is p.VAR_KEYWORD for p in params[4:]), \
        f"{name}.run_stage: an extra argument without a default breaks the one interface"


@pytest.mark.parametrize("name", TRAINED_STAGES)
def test_training_stages_expose_train_for_each_rank(name):
    import importlib
    module = importlib.import_module(f"qedlib.stages.{name}")
    assert list(inspect.signature(module.train).parameters)[:2] == ["cfg", "run_dir"]


@pytest.mark.parametrize("folder,name", list(STAGE_MODULE.items()))
def test_each_notebook_imports_its_stage_and_its_view(folder, name):
    nb = json.loads((REPO / "notebooks" / f"{folder}.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    stages = set(re.findall(r"from qedlib\.stages import (\w+)", code))
    views = set(re.findall(r"from qedlib\.views import (\w+)", code))
    assert stages == {name} and views == {name}, (folder, stages, views)
    if folder not in ("01_distill", "05_eval"):  # these two teach by running their steps one by one
        assert f"{name}.run_stage(" in code, f"{folder} does not call {name}.run_stage"
