"""sft.save_dtype: a trained model saved in bf16 is the fp32 model rounded, loads, and is half the size."""
import json

import pytest
import torch

from qedlib.training import cast_saved_weights


@pytest.fixture
def saved(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():  # an update far above bf16's spacing, as SFT at lr 1e-4 makes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    out = tmp_path / "model"
    model.save_pretrained(out)
    return model, out


def test_cast_to_bf16_rounds_each_weight_and_halves_the_file(saved):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model, out = saved
    before = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    cast_saved_weights(out, "bfloat16")
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert after < 0.55 * before
    tensors = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for name, p in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p.to(torch.bfloat16)), name


def test_cast_leaves_a_hard_linked_checkpoint_in_fp32(saved, tmp_path):
    import os
    from safetensors.torch import load_file
    _, out = saved
    twin = tmp_path / "checkpoint-model.safetensors"
    os.link(out / "model.safetensors", twin)  # what keep_checkpoints: last makes of identical files
    cast_saved_weights(out, "bfloat16")
    assert {v.dtype for v in load_file(str(twin)).values()} == {torch.float32}
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}


def test_sft_measures_what_rounding_keeps(saved, tiny_model_path):
    from qedlib.config import load_config
    from qedlib.stages.sft import saved_dtype_moved
    from qedlib.views.sft import training_findings
    _, out = saved
    m = saved_dtype_moved(load_config(None, {"sft.save_dtype": "bfloat16"}), out, tiny_model_path)
    assert m["weights_changed_frac"] > 0.99  # every weight got a random 1e-2 kick, in fp32
    assert 0.5 < m["weights_changed_frac_saved"] <= m["weights_changed_frac"]
    text = training_findings({**m, "train_loss_first": 2.0, "train_loss_last": 1.0, "steps": 3, "examples": 2})
    assert f"{m['weights_changed_frac_saved']:.1%} still differ from the start" in text and "bfloat16" in text
    fp32 = saved_dtype_moved(load_config(None, {}), out, tiny_model_path)
    assert "weights_changed_frac_saved" not in fp32 and fp32["save_dtype"] == "float32"


def test_cast_names_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        cast_saved_weights(tmp_path, "bfloat16")


def test_cpu_params_save_sft_in_bf16_and_rl_in_fp32():
    from qedlib.config import load_config
    cfg = load_config("params/cpu.yaml")
    assert cfg.sft.save_dtype == "bfloat16" and cfg.sft.keep_checkpoints == "none"
    assert load_config("params/qed-nano.yaml").sft.save_dtype == "float32"
