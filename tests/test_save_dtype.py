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


def test_cast_names_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        cast_saved_weights(tmp_path, "bfloat16")


def test_cpu_params_save_sft_in_bf16_and_rl_in_fp32():
    from qedlib.config import load_config
    cfg = load_config("params/cpu.yaml")
    assert cfg.sft.save_dtype == "bfloat16" and cfg.sft.keep_checkpoints == "none"
    assert load_config("params/qed-nano.yaml").sft.save_dtype == "float32"
