"""Many nodes through accelerate's standard launcher: the command each SLURM node builds, and two single-process
"nodes" on 127.0.0.1 (machine ranks 0 and 1, gloo, the shipped FSDP config) training rubric RL together."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from qedlib.config import Launch, load_config
from qedlib.judge_server import free_port
from qedlib.launch import accelerate_train, expand_nodelist, launch_command, multinode_flags, slurm_launch

ROOT = Path(__file__).resolve().parent.parent
SLURM = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_GPUS_ON_NODE": "8"}


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_nodelist_expands_like_scontrol():
    assert expand_nodelist("gpu[07-09,12]") == ["gpu07", "gpu08", "gpu09", "gpu12"]
    assert expand_nodelist("a1,b[1-2]-ib,c") == ["a1", "b1-ib", "b2-ib", "c"]
    assert expand_nodelist("") == []


def test_each_slurm_node_builds_the_same_multinode_command_with_its_rank(monkeypatch, tmp_path):
    """qed-nano's RL launch (zero3, 32 processes on 4 nodes) as node 2 of a SLURM job sees it."""
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    launch = slurm_launch(load_config(ROOT / "params" / "qed-nano.yaml").rubric_rl.launch)
    assert (launch.num_machines, launch.num_processes) == (4, 32)
    cmd = launch_command("rubric_rl", ROOT / "params" / "qed-nano.yaml", tmp_path, {}, launch)
    assert _flag(cmd, "--config_file").endswith("qedlib/accelerate/zero3.yaml")
    assert [_flag(cmd, f) for f in ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                                    "--main_process_port", "--rdzv_backend")] == ["32", "4", "2", "gpu07", "29500",
                                                                                "static"]
    assert "--same_network" in cmd and cmd[cmd.index("-m", 3):][:4] == ["-m", "qedlib", "train", "rubric_rl"]
    monkeypatch.setenv("SLURM_NODEID", "0")
    first = launch_command("rubric_rl", ROOT / "params" / "qed-nano.yaml", tmp_path, {}, launch)
    assert [a for a in first if a != "0"] == [a for a in cmd if a != "2"]  # only the rank differs between nodes
    # The zero configs start torchrun on every node, not DeepSpeed's pdsh launcher.
    assert yaml.safe_load((ROOT / "qedlib/accelerate/zero3.yaml").read_text())["deepspeed_config"][
        "deepspeed_multinode_launcher"] == "standard"


def test_multinode_without_rank_or_host_is_refused_clearly():
    with pytest.raises(ValueError, match="launch.machine_rank, or run under SLURM"):
        multinode_flags(Launch(num_machines=2), env={})
    with pytest.raises(ValueError, match="launch.main_process_ip"):
        multinode_flags(Launch(num_machines=2, machine_rank=1), env={})


def test_the_sbatch_script_runs_the_python_node_launcher(tmp_path):
    """The batch script calls `python -m qedlib.launch` per node; with SLURM's variables that prints the command."""
    text = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    assert "-m qedlib.launch" in text and "srun" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_train.sbatch")]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "qedlib.launch", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "SLURM job" in out.stdout


@pytest.mark.multinode
def test_two_nodes_on_loopback_train_rubric_rl_with_fsdp_and_save_one_model(tmp_path):
    from qedlib.models import SavedWeights, changed_fraction, resolve_model
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base_model": "tiny-qwen3", "device": "cpu", "rubric_rl": {
        "model": "base", "reward": "format", "problems": {"limit": 4}, "num_generations": 2, "lr": 1.0e-3,
        "prompts_per_step": 2, "max_steps": 2, "max_completion_length": 6, "save_steps": 2}}))
    run, port = tmp_path / "run", free_port()
    errors: list = []

    def node(rank: int) -> None:
        launch = Launch(num_processes=2, accelerate_config="fsdp", num_machines=2, machine_rank=rank,
                        main_process_ip="127.0.0.1", main_process_port=port)
        try:
            accelerate_train("rubric_rl", params, run, {}, launch)
        except Exception as e:  # reported below, after both nodes ended
            errors.append((rank, e))
    nodes = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in nodes:
        t.start()
    for t in nodes:
        t.join(timeout=900)
    assert not errors, errors
    folder = run / "03_rubric_rl"
    log = (folder / "launch.log").read_text()
    assert "--machine_rank 0" in log and "--machine_rank 1" in log
    ranks = [json.loads(p.read_text()) for p in sorted((folder / "ranks").glob("rank*.json"))]
    assert [(r["rank"], r["world_size"], r["steps"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    saved, ckpt = SavedWeights(folder / "model"), SavedWeights(folder / "checkpoints" / "checkpoint-2")
    assert changed_fraction(ckpt, saved) == 0.0  # one model, equal to the weights trained at the last step
    assert changed_fraction(SavedWeights(resolve_model("tiny-qwen3")), saved) > 0.5
    assert "FSDP2 {'offload': 'OffloadPolicy', 'param_dtype': 'bfloat16', 'reduce_dtype': 'float32'}" in log


def test_a_slurm_job_with_other_processes_than_the_params_is_refused(monkeypatch):
    """sbatch --nodes=4 for qed-nano's SFT (8 processes: one node) would train a 4x global batch: refused."""
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    sft = load_config(ROOT / "params" / "qed-nano.yaml").sft.launch
    with pytest.raises(ValueError, match=r"32 processes but the stage's launch.num_processes is 8.*--nodes=1"):
        slurm_launch(sft)
