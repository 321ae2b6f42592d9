"""qedlib.launch: the `accelerate launch` command, failures with the log tail, 2 CPU processes (gloo)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from qedlib.config import Launch
from qedlib.launch import accelerate_config_path, accelerate_train, launch_command


def test_launch_command_composes_config_processes_and_overrides(tmp_path):
    cmd = launch_command("sft", "params/cpu.yaml", tmp_path, {"sft.lr": 1.0e-5, "sft.report_to": ["tensorboard"]},
                         Launch(num_processes=4, accelerate_config="zero3"))
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1].endswith("qedlib/accelerate/zero3.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    tail = cmd[cmd.index("-m", 3):]
    assert tail[:4] == ["-m", "qedlib", "train", "sft"]
    assert tail[tail.index("--run-dir") + 1] == str(tmp_path.resolve())
    assert "sft.lr=1.0e-05" in tail and 'sft.report_to=["tensorboard"]' in tail
    # Multi-node flags pass through and switch off the automatic local port.
    multi = launch_command("rubric_rl", "p.yaml", tmp_path, {}, Launch(
        num_processes=16, accelerate_config="fsdp", extra_args=["--num_machines", "2", "--machine_rank", "0"]))
    assert "--main_process_port" not in multi and "rubric_rl" in multi


def test_shipped_configs_exist_and_bad_names_are_explained():
    from accelerate.commands.config.config_args import load_config_from_file
    for name in ("zero2", "zero2-offload", "zero3", "fsdp", "fsdp-offload", "ddp", "cpu-gloo"):
        assert yaml.safe_load(accelerate_config_path(name).read_text())["distributed_type"]
        parsed = load_config_from_file(str(accelerate_config_path(name)))  # accelerate's own loader accepts it
        assert parsed.distributed_type.value in ("DEEPSPEED", "FSDP", "MULTI_GPU")
    assert load_config_from_file(str(accelerate_config_path("zero3"))).deepspeed_config["zero_stage"] == 3
    offload = load_config_from_file(str(accelerate_config_path("fsdp-offload")))
    assert offload.fsdp_config["fsdp_offload_params"] is True and offload.mixed_precision == "bf16"
    assert offload.fsdp_config["fsdp_version"] == 2 and offload.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    with pytest.raises(FileNotFoundError, match="shipped: cpu-gloo, ddp, fsdp, fsdp-offload, zero2, zero2-offload, zero3"):
        accelerate_config_path("zero4")
    with pytest.raises(ValueError, match="stage"):
        launch_command("distill", "p.yaml", ".", {}, Launch())


def test_failure_raises_with_the_log_tail(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist") as err:
        accelerate_train("sft", tmp_path / "missing.yaml", tmp_path, {}, Launch(num_processes=1))
    assert "launch.log" in str(err.value) and (tmp_path / "02_sft" / "launch.log").exists()


def test_two_cpu_processes_train_with_gloo(tmp_path, capsys):
    import datasets
    from qedlib import proof_chat as policy
    from qedlib.models import TINY
    run = tmp_path / "run"
    rows = [policy.sft_row(f"Prove that {i} + {i} = {2 * i}.", "Add.", f"{i} + {i} = {2 * i}.") for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(run / "01_distill" / "dataset"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": TINY, "device": "cpu", "sft": {
        "max_length": 96, "max_steps": 2, "batch_size": 2, "save_steps": 2, "eval_fraction": 0.0}}))
    assert accelerate_train("sft", params, run, {"sft.lr": 1.0e-3}, Launch(num_processes=2)) == 0
    ranks = [json.loads(p.read_text()) for p in sorted((run / "02_sft" / "ranks").glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["steps_this_run"] == 2 for r in ranks)
    assert [p.name for p in (run / "02_sft" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert (run / "02_sft" / "model" / "config.json").exists()
    assert "'loss'" in capsys.readouterr().out  # the log was streamed here
    metrics = json.loads((run / "02_sft" / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2


def _transformers_version() -> tuple:
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


# transformers < 5.18 (the GPU set's 5.17) loads a resumed multi-process optimizer with map_location="cpu:0",
# which torch cannot restore; 5.18 maps CPU to plain "cpu". On GPUs the location is cuda:N and unaffected.
@pytest.mark.skipif(_transformers_version() < (5, 18), reason="transformers < 5.18 cannot resume multi-process "
                    "training on CPU (optimizer map_location 'cpu:0'); GPU resume is unaffected")
def test_shipped_fsdp2_config_trains_saves_and_resumes_on_two_cpu_processes(tmp_path):
    """The shipped FSDP v2 config (transformer-block wrapping, full state dict), moved to the CPU:
    both ranks train, the saved model is a plain HF folder whose weights moved, and resume continues."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from qedlib import proof_chat as policy
    from qedlib.launch import accelerate_config_path
    from qedlib.models import TINY, resolve_model
    shipped = yaml.safe_load(accelerate_config_path("fsdp").read_text())
    assert shipped["distributed_type"] == "FSDP" and shipped["fsdp_config"]["fsdp_version"] == 2
    config = tmp_path / "fsdp-cpu.yaml"
    config.write_text(yaml.safe_dump({**shipped, "use_cpu": True, "mixed_precision": "no", "num_processes": 2}))
    run = tmp_path / "run"
    rows = [policy.sft_row(f"Prove that {i} + {i} = {2 * i}.", "Add.", f"{i} + {i} = {2 * i}.") for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(run / "01_distill" / "dataset"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": TINY, "device": "cpu", "sft": {
        "max_length": 96, "max_steps": 2, "batch_size": 2, "save_steps": 2, "eval_fraction": 0.0, "lr": 1.0e-3}}))
    launch = Launch(num_processes=2, accelerate_config=str(config))
    assert accelerate_train("sft", params, run, {}, launch) == 0
    ranks = [json.loads(p.read_text()) for p in sorted((run / "02_sft" / "ranks").glob("rank*.json"))]
    assert [(r["rank"], r["world_size"], r["steps_this_run"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(run / "02_sft" / "model", dtype=torch.float32)
    assert sum(p.numel() for p in tuned.parameters()) == sum(p.numel() for p in base.parameters())
    assert sum((a - b).abs().sum().item() for a, b in zip(base.parameters(), tuned.parameters())) > 0
    assert accelerate_train("sft", params, run, {"sft.resume": True, "sft.max_steps": 4}, launch) == 0
    metrics = json.loads((run / "02_sft" / "train_metrics.json").read_text())
    assert (metrics["resumed_from"], metrics["steps"], metrics["steps_this_run"]) == ("checkpoint-2", 4, 2)


@pytest.mark.parametrize("offload", [True, False])
def test_fsdp_offload_reduces_every_micro_batch_to_the_host(monkeypatch, tmp_path, offload):
    """Under fsdp-offload (accelerate exports FSDP_OFFLOAD_PARAMS=true) SFT and RL sync gradients at every micro-batch,
    so FSDP2 never holds an unsharded fp32 gradient on the GPU across an accumulation; elsewhere the default no_sync."""
    from qedlib.config import load_config
    from qedlib.grpo import grpo_args
    from qedlib.stages.sft import trl_args
    assert yaml.safe_load(accelerate_config_path("fsdp-offload").read_text())["fsdp_config"]["fsdp_offload_params"]
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true" if offload else "false")
    cfg = load_config(Path(__file__).resolve().parent.parent / "params" / "smoke.yaml")
    want = {"sync_each_batch": True} if offload else None
    for args in (trl_args(cfg, tmp_path / "sft", "cpu", False), grpo_args(cfg.rubric_rl, tmp_path / "rl", 0, 1, "cpu")):
        assert args.accelerator_config.gradient_accumulation_kwargs == want
