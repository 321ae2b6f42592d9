"""Multi-process training: run a stage under `accelerate launch` in a subprocess and stream its log.

Used by notebooks 02_sft, 03_rubric_rl and 04_reasoning_cache_rl when `launch.num_processes > 1`
or `launch.accelerate_config` is set: the notebook runs exactly what you would type in a shell,

    accelerate launch --config_file qedlib/accelerate/zero2.yaml --num_processes 8 \\
        -m qedlib train sft --params params/qed-nano.yaml --run-dir outputs/qed-nano

and prints the log line by line as it arrives. Shipped configs (qedlib/accelerate/, give the name
or a path): `ddp` (plain data parallel), `zero2`, `zero2-offload` (DeepSpeed's CPU Adam, compiled on
first use), `zero3` (DeepSpeed), `fsdp` (PyTorch FSDP2), `fsdp-offload` (FSDP2 with CPU offload: fp32
masters, grads and torch AdamW on the host; gpu-1's one-GPU path), `cpu-gloo` (2 CPU processes with the
gloo backend, used by the tests).

Multi-node: `launch.num_machines > 1` adds accelerate's standard multi-node flags (`multinode_flags`:
machines, this node's rank, the first node as rendezvous), taking what the params leave unset from
SLURM's variables. `scripts/slurm_train.sbatch` runs `python -m qedlib.launch STAGE ...` (`node_main`)
once per node, which builds that command with the node's own rank. `num_processes` counts processes
over all machines. The run folder must be on a filesystem every node sees (checkpoints and the final
model are written by the main process).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path

from .config import Launch, load_config, parse_override
from .judge_server import free_port
from .layout import TRAINED

CONFIG_DIR = Path(__file__).resolve().parent / "accelerate"


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped config name (zero2, zero3, fsdp, ddp, cpu-gloo) or a path -> an existing config file."""
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    in_repo = CONFIG_DIR.parent.parent / path  # a repo-relative path in params, run from notebooks/
    if not path.is_absolute() and in_repo.exists():
        return in_repo.resolve()
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"launch.accelerate_config {name_or_path!r}: no such file and not a shipped config "
                            f"(shipped: {names})")


def _format_value(v) -> str:
    """A --set value as YAML reads it back: JSON, with floats like 1e-06 written 1.0e-06 (YAML 1.1 needs the dot)."""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and "e" in repr(v) and "." not in repr(v).split("e")[0]:
        mantissa, exponent = repr(v).split("e")
        return f"{mantissa}.0e{exponent}"
    return json.dumps(v)  # YAML reads JSON: lists, dicts, true/false, null, numbers


def launch_command(stage: str, params_file: str | Path, run_dir: str | Path, overrides: dict | None,
                   launch: Launch) -> list[str]:
    """The `accelerate launch ... -m qedlib train STAGE ...` command as a list (print it with shlex.join)."""
    if stage not in TRAINED:
        raise ValueError(f"stage {stage!r}: expected one of {', '.join(TRAINED)}")
    import torch  # heavy: torch loads only when a model runs
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    extra = [str(a) for a in launch.extra_args]
    config = launch.accelerate_config
    if config is None and launch.num_processes > 1:
        # No config given: data parallel over GPUs when there are any, else CPU processes with gloo.
        config = "ddp" if torch.cuda.is_available() else "cpu-gloo"
    if config:
        cmd += ["--config_file", str(accelerate_config_path(config))]
    if launch.num_processes >= 1 and "--num_processes" not in extra:
        cmd += ["--num_processes", str(launch.num_processes)]
    if launch.num_machines > 1:
        cmd += multinode_flags(launch)
    elif "--main_process_port" not in extra and "--num_machines" not in extra:
        cmd += ["--main_process_port", str(free_port())]  # concurrent runs on one machine do not collide
    cmd += extra
    cmd += ["-m", "qedlib", "train", stage, "--params", str(Path(params_file).resolve()),
            "--run-dir", str(Path(run_dir).resolve())]
    for k, v in (overrides or {}).items():
        cmd += ["--set", f"{k}={_format_value(v)}"]
    return cmd


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") -> host names, in order (what `scontrol show hostnames` prints)."""
    hosts, depth, token = [], 0, ""
    for ch in nodelist + ",":
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            hosts += _expand_host(token.strip()) if token.strip() else []
            token = ""
        else:
            token += ch
    return hosts


def _expand_host(token: str) -> list[str]:
    """One host pattern with at most one bracket group ("gpu[01-03,07]") -> its host names (zero padding kept)."""
    if "[" not in token:
        return [token]
    prefix, rest = token.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            out.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return out


def multinode_flags(launch: Launch, env: dict | None = None) -> list[str]:
    """accelerate's multi-node flags for this node: machines, this node's rank and the rendezvous (the first node).

    Unset ranks and hosts come from SLURM's variables (SLURM_NODEID, SLURM_JOB_NODELIST), so every node of a
    batch job builds the same command with its own rank."""
    env = os.environ if env is None else env
    rank = launch.machine_rank if launch.machine_rank is not None else env.get("SLURM_NODEID")
    if rank is None:
        raise ValueError(f"launch.num_machines is {launch.num_machines}: set launch.machine_rank, or run under SLURM "
                         "(SLURM_NODEID), on every node")
    host = launch.main_process_ip
    if host is None:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if not nodes:
            raise ValueError(f"launch.num_machines is {launch.num_machines}: set launch.main_process_ip (the first "
                             "node), or run under SLURM (SLURM_JOB_NODELIST)")
        host = nodes[0]
    return ["--num_machines", str(launch.num_machines), "--machine_rank", str(int(rank)),
            "--main_process_ip", host, "--main_process_port", str(launch.main_process_port),
            "--rdzv_backend", "static", "--same_network"]


def slurm_launch(launch: Launch, env: dict | None = None) -> Launch:
    """A stage's Launch as one node of a SLURM job sees it: machines from SLURM_NNODES and processes = machines x
    GPUs per node (SLURM_GPUS_ON_NODE, else the params' count per machine); rank and host stay SLURM's.

    The job must have the processes the params name: SFT's global batch is processes x batch_size x grad_accum,
    so a job with more nodes than the params would silently train with a larger batch at the same lr and steps.
    """
    env = os.environ if env is None else env
    nodes = int(env.get("SLURM_NNODES", launch.num_machines))
    per_node = int(env.get("SLURM_GPUS_ON_NODE") or max(1, launch.num_processes // max(1, launch.num_machines)))
    if nodes * per_node != launch.num_processes:
        raise ValueError(f"the SLURM job has {nodes} node(s) x {per_node} GPU(s) = {nodes * per_node} processes but the "
                         f"stage's launch.num_processes is {launch.num_processes} (num_machines "
                         f"{launch.num_machines}): submit with --nodes={max(1, launch.num_processes // per_node)}, or "
                         "change launch.num_processes / num_machines in the params (--set) so the global batch is "
                         "the one you mean")
    return replace(launch, num_machines=nodes, num_processes=nodes * per_node)


def accelerate_train(stage: str, params_file: str | Path, run_dir: str | Path, overrides: dict | None,
                     launch: Launch, tail_lines: int = 60) -> int:
    """Run a training stage under `accelerate launch`, streaming its log; raise RuntimeError on failure."""
    cmd = launch_command(stage, params_file, run_dir, overrides, launch)
    log_path = Path(run_dir) / TRAINED[stage] / "launch.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", QED_LAUNCHED="1", TOKENIZERS_PARALLELISM="false")
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else repo
    if "OMP_NUM_THREADS" not in env:  # processes sharing the CPU cores must not oversubscribe them
        per_node = max(1, launch.num_processes // max(1, launch.num_machines))  # the processes on this machine
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))
    shown = [a if i else "accelerate" for i, a in enumerate(cmd)]
    shown = shown[:1] + ["launch"] + shown[3:]
    print("[qedlib] " + shlex.join(shown), flush=True)
    tail: deque[str] = deque(maxlen=tail_lines)
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1, env=env) as proc:
        log.write("$ " + shlex.join(cmd) + "\n")
        for line in proc.stdout:
            print(line, end="", flush=True)
            log.write(line)
            tail.append(line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"`accelerate launch` for stage {stage} exited with code {rc}; full log: {log_path}\n"
                           f"--- last {len(tail)} lines ---\n" + "".join(tail))
    return rc


def keep_fsdp_on_cpu() -> bool:
    """In a process `accelerate launch` started with an FSDP config on a machine without a GPU, make accelerate
    build FSDP instead of quietly falling back to plain data parallel; True when it did.

    accelerate 1.15 enables FSDP only for GPU-like distributed types (AcceleratorState checks MULTI_GPU,
    MULTI_NPU, ...), so on a CPU box the launch's MULTI_CPU state drops the FSDP plugin and the run is DDP.
    torch's FSDP2 itself runs on CPU over gloo (fully_shard on a CPU mesh, CPUOffloadPolicy a no-op copy), so
    marking the already-initialised process state as multi-device lets the same config, wrapping, mixed
    precision and optimizer run here as on the GPU. Nothing changes where a GPU is present.
    """
    import torch  # heavy: torch loads only when a model runs
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return False
    from accelerate.state import PartialState  # heavy: accelerate loads torch
    from accelerate.utils import DistributedType  # heavy: accelerate loads torch
    if getattr(PartialState.__init__, "qed_keeps_fsdp", False):
        return True
    original = PartialState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # transformers' TrainingArguments resets and rebuilds this state, so the mark is set on every build.
        if self._shared_state.get("distributed_type") in (DistributedType.MULTI_CPU, DistributedType.NO):
            self._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # read by AcceleratorState
    init.qed_keeps_fsdp = True
    PartialState.__init__ = init
    _unpinned_cpu_offload()
    return True


def _unpinned_cpu_offload() -> None:
    """On a CPU-only machine, FSDP2's CPUOffloadPolicy without pinned memory (pinning needs a GPU driver; it only
    speeds host-device copies, which do not exist here): the same offload layout and optimizer otherwise."""
    from accelerate.utils import FullyShardedDataParallelPlugin  # heavy: accelerate loads torch
    from torch.distributed.fsdp import CPUOffloadPolicy  # heavy: torch loads only when a model runs
    original = FullyShardedDataParallelPlugin.__post_init__

    def post_init(self):
        original(self)
        if isinstance(self.cpu_offload, CPUOffloadPolicy) and self.cpu_offload.pin_memory:
            self.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    FullyShardedDataParallelPlugin.__post_init__ = post_init


def node_main(argv: list[str] | None = None) -> int:
    """`python -m qedlib.launch STAGE --params P --run-dir D [--set k=v ...]`: on one node of a SLURM job
    (scripts/slurm_train.sbatch), start this node's part of the stage's multi-node `accelerate launch`."""
    parser = argparse.ArgumentParser(prog="python -m qedlib.launch", description=node_main.__doc__)
    parser.add_argument("stage", choices=list(TRAINED))
    parser.add_argument("--params", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args(argv)
    overrides = dict(parse_override(x) for x in args.sets)
    launch = slurm_launch(getattr(load_config(args.params, overrides), args.stage).launch)
    print(f"[qedlib] node {os.environ.get('SLURM_NODEID', launch.machine_rank)} of {launch.num_machines}", flush=True)
    return accelerate_train(args.stage, args.params, args.run_dir, overrides, launch)


if __name__ == "__main__":
    sys.exit(node_main())

