"""Every key a shipped params file sets is read by the code that consumes its section."""
from pathlib import Path

import pytest

from qedlib import params_check
from qedlib.params_check import all_inert_keys, inert_keys

PARAMS = sorted((Path(__file__).resolve().parent.parent / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.name)
def test_shipped_params_set_no_inert_key(path):
    assert inert_keys(path) == []


def test_no_config_field_is_inert():
    assert all_inert_keys() == []


def test_a_key_its_consumers_never_read_is_reported(monkeypatch):
    # Pretend RC-RL were consumed by rc_rl.py alone: the learning rate (read in rl.py) becomes inert there.
    monkeypatch.setitem(params_check.SECTION_READERS, "rc_rl", (["rc_rl.py"], "04_reasoning_cache_rl.ipynb"))
    found = inert_keys({"rc_rl": {"lr": 1.0e-6, "rc": {"turns": 3}}, "rubric_rl": {"lr": 1.0e-6}})
    assert found == ["rc_rl.lr"]
