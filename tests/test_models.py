"""Model references and the device pick (qedlib.models)."""
import pytest

from qedlib.models import pick_device, resolve_model


def test_model_reference_errors():
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model("no-such-model")
    assert resolve_model("Qwen/Qwen3-4B-Thinking-2507") == "Qwen/Qwen3-4B-Thinking-2507"


def test_pick_device_prints_and_honours_overrides(capsys):
    c = pick_device("cpu", "float32")
    assert (c.device, c.dtype) == ("cpu", "float32") and "device=cpu" in capsys.readouterr().out
