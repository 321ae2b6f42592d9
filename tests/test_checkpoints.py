"""keep_checkpoints: what a finished training stage leaves in its checkpoints folder."""
import os

import pytest

from qedlib.files import folder_size
from qedlib.training import prune_checkpoints


def stage(tmp_path):
    """A finished stage: checkpoints 2 and 4 (4 = the final model), and model/ written from the last step."""
    for step, weights in ((2, b"w" * 1000), (4, b"v" * 1000)):
        ck = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes(weights)
        (ck / "optimizer.pt").write_bytes(b"o" * 2000)
        (ck / "scheduler.pt").write_bytes(b"s")
        (ck / "trainer_state.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"v" * 1000)
    return tmp_path / "checkpoints", tmp_path / "model"


def test_last_keeps_final_weights_once_without_optimizer(tmp_path):
    ckpts, model = stage(tmp_path)
    before = folder_size(tmp_path)
    freed = prune_checkpoints(ckpts, "last", model)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4"]
    assert sorted(p.name for p in (ckpts / "checkpoint-4").iterdir()) == ["model.safetensors", "trainer_state.json"]
    assert (ckpts / "checkpoint-4" / "model.safetensors").samefile(model / "model.safetensors")  # one copy on disk
    assert folder_size(tmp_path) == before - freed == 1000 + 2  # the weights once, and the trainer state
    assert (ckpts / "checkpoint-4" / "model.safetensors").read_bytes() == b"v" * 1000


def test_last_does_not_link_different_weights(tmp_path):
    ckpts, model = stage(tmp_path)
    (model / "model.safetensors").write_bytes(b"x" * 1000)  # e.g. a merged LoRA model: not the checkpoint's file
    prune_checkpoints(ckpts, "last", model)
    assert not (ckpts / "checkpoint-4" / "model.safetensors").samefile(model / "model.safetensors")
    assert os.stat(model / "model.safetensors").st_nlink == 1


@pytest.mark.parametrize("keep, left", [("all", ["checkpoint-2", "checkpoint-4"]), ("none", None)])
def test_all_and_none(tmp_path, keep, left):
    ckpts, model = stage(tmp_path)
    prune_checkpoints(ckpts, keep, model)
    assert (sorted(p.name for p in ckpts.iterdir()) if ckpts.exists() else None) == left
    assert (model / "model.safetensors").exists()
