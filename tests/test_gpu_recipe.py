"""params/gpu-1.yaml's training stages through their OWN launch config and optimizer on CPU (tiny model).

Each stage runs `accelerate launch` with the stage's shipped config (fsdp-offload: FSDP2, CPUOffloadPolicy,
bf16 compute, fp32 masters, torch AdamW), 2 steps at lr 1e-6. Overrides change only the model, sizes and device,
plus what has no CPU stand-in: vLLM off (transformers rollouts), the format reward (no judge server), the shipped
problems (no hub). An update of lr 1e-6 is far below bf16's spacing, so `weights_changed_frac` near 1 shows the
optimizer stepped fp32 masters; the launch log shows FSDP2's real offload policy and dtypes.
"""
from __future__ import annotations

import json

import pytest

from qedlib.config import load_config
from qedlib.launch import accelerate_train

pytestmark = pytest.mark.gpu_recipe
PARAMS = "params/gpu-1.yaml"
FSDP_LINE = "FSDP2 {'offload': 'CPUOffloadPolicy', 'param_dtype': 'bfloat16', 'reduce_dtype': 'float32'}"


def _rl_overrides(stage: str) -> dict:
    """The model, sizes and device for a 2-step RL run; what has no CPU stand-in switched off."""
    s = stage
    out = {"base_model": "tiny-qwen3", "device": "cpu", f"{s}.model": "base", f"{s}.reward": "format",
           f"{s}.problems": {"path": "shipped", "limit": 4}, f"{s}.min_reward_mean": None,
           f"{s}.max_reward_mean": None, f"{s}.use_vllm": False, f"{s}.num_generations": 2,
           f"{s}.prompts_per_step": 2, f"{s}.micro_batch_size": 2, f"{s}.max_steps": 2,
           f"{s}.max_completion_length": 8, f"{s}.save_steps": 2, f"{s}.lr": 1.0e-6,
           # a size: gpu-1's divisor 64 is its 64 sequences per step (the official scale); these runs have 4
           f"{s}.loss_divisor": None}
    if stage == "rc_rl":
        out.update({"rc_rl.states_per_trajectory": 1, "rc_rl.rc.turns": 1, "rc_rl.rc.reasoning_budget": 8,
                    "rc_rl.rc.summary.max_new_tokens": 8, "rc_rl.rc.summary_thinking_budget": 8})
    return out


def _launch_log(folder) -> str:
    return (folder / "launch.log").read_text()


def test_gpu1_stages_use_the_fsdp_offload_config():
    cfg = load_config(PARAMS)
    for stage in ("sft", "rubric_rl", "rc_rl"):
        launch = getattr(cfg, stage).launch
        assert (launch.accelerate_config, launch.num_processes) == ("fsdp-offload", 1), stage
        assert getattr(cfg, stage).weights_dtype == "float32", stage


def test_gpu1_sft_keeps_fp32_masters_under_fsdp_offload(tmp_path):
    import datasets
    from qedlib import proof_chat as policy
    run = tmp_path / "run"
    rows = [policy.sft_row(f"Prove that {i} + {i} = {2 * i}.", "Add.", f"{i} + {i} = {2 * i}.") for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(run / "01_distill" / "dataset"))
    overrides = {"base_model": "tiny-qwen3", "device": "cpu", "sft.max_length": 96, "sft.max_steps": 2,
                 "sft.batch_size": 2, "sft.grad_accum": 1, "sft.save_steps": 2, "sft.eval_fraction": 0.0,
                 "sft.lr": 1.0e-6, "sft.packing": False}
    assert accelerate_train("sft", PARAMS, run, overrides, load_config(PARAMS, overrides).sft.launch) == 0
    metrics = json.loads((run / "02_sft" / "train_metrics.json").read_text())
    assert metrics["fsdp"] == {"offload": "CPUOffloadPolicy", "param_dtype": "bfloat16", "reduce_dtype": "float32"}
    assert set(metrics["optimizer_dtypes"]) == {"float32"}
    assert metrics["steps"] == 2 and metrics["weights_changed_frac"] > 0.9
    assert "--config_file" in _launch_log(run / "02_sft") and "fsdp-offload.yaml" in _launch_log(run / "02_sft")


@pytest.mark.parametrize("stage,folder", [("rubric_rl", "03_rubric_rl"), ("rc_rl", "04_reasoning_cache_rl")])
def test_gpu1_rl_keeps_fp32_masters_under_fsdp_offload(tmp_path, stage, folder):
    run = tmp_path / "run"
    overrides = _rl_overrides(stage)
    assert accelerate_train(stage, PARAMS, run, overrides, getattr(load_config(PARAMS, overrides), stage).launch) == 0
    result = json.loads((run / folder / "train_result.json").read_text())
    assert result["steps"] == 2 and result["losses_finite"]
    assert result["weights_changed_frac"] > 0.9  # lr 1e-6 updates survived: fp32 masters were stepped
    log = _launch_log(run / folder)
    assert FSDP_LINE in log and "fsdp-offload.yaml" in log
    assert "rl: the optimizer steps 3,219,840 float32 values" in log  # every tiny-qwen3 weight, fp32


def test_side_run_trains_under_the_stages_own_launch(capsys, monkeypatch):
    """gpu-1's opening-reward run beside the judge run goes through the stage's fsdp-offload launch, not the kernel."""
    from qedlib.stages import rubric_rl
    from qedlib.views.rubric_rl import side_run_result
    overrides = {**_rl_overrides("rubric_rl"), "rubric_rl.reward": "judge"}  # gpu-1's reward: its side run is `opening`
    cfg = load_config(PARAMS, overrides)

    def in_kernel(*_):
        raise AssertionError("a launched stage's side run must not train in the kernel")
    monkeypatch.setattr(rubric_rl, "train", in_kernel)
    steps, _, _ = side_run_result(cfg, "tiny-qwen3", [{"step": 1, "reward": 0.0}], 2, PARAMS, overrides)
    assert [r["step"] for r in steps] == [1, 2]
    out = capsys.readouterr().out
    assert "fsdp-offload.yaml" in out and "rubric_rl.reward=opening" in out and FSDP_LINE in out
    with pytest.raises(ValueError, match="pass params_file and overrides"):
        side_run_result(cfg, "tiny-qwen3", [], 2)


def test_master_weight_guard_reads_the_config_contents_not_its_name(tmp_path):
    import yaml
    from qedlib.config import Launch
    from qedlib.training import check_master_weights
    ddp_named_zero = tmp_path / "zero-but-ddp.yaml"
    ddp_named_zero.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "mixed_precision": "bf16"}))
    with pytest.raises(ValueError, match="rl.weights_dtype: bfloat16.*distributed_type MULTI_GPU"):
        check_master_weights("bfloat16", Launch(accelerate_config=str(ddp_named_zero)), "rl")
    with pytest.raises(ValueError, match="keeps no fp32 master weights"):
        check_master_weights("bfloat16", Launch(), "sft")  # the kernel: plain AdamW on bf16 weights
    fsdp_plain_name = tmp_path / "mine.yaml"
    fsdp_plain_name.write_text(yaml.safe_dump({"distributed_type": "FSDP", "mixed_precision": "bf16"}))
    check_master_weights("bfloat16", Launch(accelerate_config=str(fsdp_plain_name)), "rl")  # FSDP upcasts to fp32
    check_master_weights("bfloat16", Launch(accelerate_config="zero3"), "rl")  # DeepSpeed keeps an fp32 copy
    fsdp_fp32 = tmp_path / "fsdp-no-mp.yaml"
    fsdp_fp32.write_text(yaml.safe_dump({"distributed_type": "FSDP", "mixed_precision": "no"}))
    with pytest.raises(ValueError, match="mixed_precision no"):
        check_master_weights("bfloat16", Launch(accelerate_config=str(fsdp_fp32)), "rl")
    check_master_weights("float32", Launch(), "sft")


def test_master_weight_check_reads_what_the_optimizer_steps(capsys):
    """The step-0 check looks at the optimizer's own tensors, through accelerate's wrapper."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from qedlib.training import MasterWeightsCheck, optimizer_masters

    class Holder:  # MasterWeightsCheck needs only the trainer's optimizer at train begin
        optimizer = None
    layer = torch.nn.Linear(4, 3)
    try:
        fp32 = Accelerator(cpu=True).prepare_optimizer(torch.optim.AdamW(layer.parameters(), lr=1e-6))
    finally:
        AcceleratorState._reset_state(True)  # leave no accelerate singleton behind for other tests
    assert type(fp32).__name__ == "AcceleratedOptimizer" and optimizer_masters(fp32) == {"float32": 15}
    check = MasterWeightsCheck(Holder(), "rl")
    check.check(fp32, "rl")
    assert check.holds == {"float32": 15} and "the optimizer steps 15 float32 values" in capsys.readouterr().out
    bf16 = torch.optim.AdamW(layer.to(torch.bfloat16).parameters(), lr=1e-6)
    with pytest.raises(ValueError, match="rl: the optimizer steps bfloat16 tensors \\(15 values\\)"):
        check.check(bf16, "rl")
