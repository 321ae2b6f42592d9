"""Every key a shipped params file sets is read by the code that consumes its section."""
from pathlib import Path

import pytest

from qedlib.tools import params_check
from qedlib.tools.params_check import all_inert_keys, inert_keys

PARAMS = sorted((Path(__file__).resolve().parent.parent / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.name)
def test_shipped_params_set_no_inert_key(path):
    assert inert_keys(path) == []


def test_no_config_field_is_inert():
    assert all_inert_keys() == []


def test_a_key_its_consumers_never_read_is_reported(monkeypatch):
    # Pretend RC-RL were consumed by its stage module alone: the learning rate (read in grpo.py) becomes inert there.
    monkeypatch.setitem(params_check.SECTION_READERS, "rc_rl", (["stages/rc_rl.py"], "04_reasoning_cache_rl.ipynb"))
    found = inert_keys({"rc_rl": {"lr": 1.0e-6, "rc": {"turns": 3}}, "rubric_rl": {"lr": 1.0e-6}})
    assert found == ["rc_rl.lr"]


def test_a_reader_file_that_moved_is_an_error_not_inert_keys(monkeypatch):
    """A module renamed or moved under another folder must fail the check, not make its section's keys look inert."""
    monkeypatch.setitem(params_check.SECTION_READERS, "rc_rl", (["no_such_module.py"], "04_reasoning_cache_rl.ipynb"))
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        inert_keys({"rc_rl": {"lr": 1.0e-6}})


def test_every_listed_reader_exists():
    files = [f for readers, _ in params_check.SECTION_READERS.values() for f in readers]
    files += [f for readers in params_check.CLASS_READERS.values() for f in readers]
    assert [f for f in files if not (params_check.PKG / f).exists()] == []
