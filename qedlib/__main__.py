"""Command line: `python -m qedlib {prepare,run,plan,bench,train,export-official,gpu-check}`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .layout import TRAINED, TRAINED_STAGES, OUTPUTS
from .run_state import check_record
from .training import finish_training
from .config import ConfigError, parse_override, load_config
from .problem_sets import DataError
from .models import build_tiny, prepare_embedded
from .runner import run_pipeline
from .tools.plan import PROMPT_TOKENS, PlanError, main as plan_main
from .tools.bench import BENCHMARKS, run_benchmark
from .launch import keep_fsdp_on_cpu
from .tools.export import default_out, export_official


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qedlib", description="QED Workbook")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="convert the embedded GGUF model and build the tiny test model (once)")
    r = sub.add_parser("run", help="execute the notebooks with papermill into outputs/<run>/")
    r.add_argument("params", help="params YAML, e.g. params/cpu.yaml")
    r.add_argument("--run-name", help="folder name under outputs/ (default: the params' run_name)")
    r.add_argument("--stages", nargs="+", help="subset of stages, e.g. 02_sft 05_eval or sft eval")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. --set sft.lr=1.0e-5 (repeatable)")
    r.add_argument("--outputs", default=None, help="outputs folder (default: ./outputs)")
    pl = sub.add_parser("plan", help="dry run: per-stage model, batch and GPU memory estimate (loads no weights)")
    pl.add_argument("params", help="params YAML, e.g. params/gpu-1.yaml")
    pl.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params key, e.g. --set rubric_rl.micro_batch_size=1 (repeatable)")
    pl.add_argument("--prompt-tokens", type=int, default=None,
                    help="assumed longest prompt in tokens for the RL sequence length (default 1024)")
    b = sub.add_parser("bench", help="run a benchmark and print its table")
    b.add_argument("name", help="benchmark name (see --list)", nargs="?")
    b.add_argument("--list", action="store_true", help="list benchmarks")
    t = sub.add_parser("train", help="run a training stage in this process (what accelerate launch calls)")
    t.add_argument("stage", choices=TRAINED_STAGES)
    t.add_argument("--params", required=True)
    t.add_argument("--run-dir", required=True)
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    x = sub.add_parser("export-official", help="write 05_eval results as the official QED-Nano files: "
                       "DIR/<checkpoint>/<benchmark>/<scaffold>/run-<k>.jsonl")
    x.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding 05_eval/results.jsonl, e.g. outputs/cpu")
    x.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/05_eval/official)")
    g = sub.add_parser("gpu-check", help="GPU acceptance check (<= 10 min on one GPU): tests, speed, memory, vLLM")
    g.add_argument("--cpu", action="store_true", help="the same check with tiny shapes on the CPU (no CUDA needed)")
    g.add_argument("--out", help="results folder (default: outputs/gpu-check/<time>-<gpu|cpu>)")
    g.add_argument("--sections", nargs="+", choices=list("abcde"), help="run only these sections (default: all)")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "prepare":
            print(f"embedded model: {prepare_embedded()}")
            print(f"tiny test model: {build_tiny()}")
        elif args.cmd == "run":
            overrides = dict(parse_override(s) for s in args.sets)
            run_dir = run_pipeline(args.params, args.run_name, args.stages, overrides, args.outputs or OUTPUTS)
            print(f"[qedlib] done: {run_dir}")
        elif args.cmd == "plan":
            try:
                return plan_main(args.params, args.sets, args.prompt_tokens or PROMPT_TOKENS)
            except PlanError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        elif args.cmd == "bench":
            if args.list or not args.name:
                for k, (_, desc) in BENCHMARKS.items():
                    print(f"{k:20s} {desc}")
                return 0
            run_benchmark(args.name)
        elif args.cmd == "gpu-check":
            from .tools.gpu_check import main as gpu_check  # heavy: loads TRL and torch; only this subcommand needs them
            return gpu_check(args.out, args.cpu, args.sections)
        elif args.cmd == "train":
            overrides = dict(parse_override(s) for s in args.sets)
            cfg = load_config(args.params, overrides)
            keep_fsdp_on_cpu()  # an FSDP config stays FSDP on a CPU-only machine (tests; see its docstring)
            # each rank of `accelerate launch` (or of a batch job) runs the stage's `train` step; a job whose model
            # was already trained with these settings skips
            done, why = check_record(cfg, args.run_dir, TRAINED[args.stage], need="training")
            if done:
                print(f"[qedlib] {args.stage}: not training again ({why})", flush=True)
            else:
                importlib.import_module(f"qedlib.stages.{args.stage}").train(cfg, args.run_dir)
                finish_training(args.stage, cfg, args.run_dir)
        elif args.cmd == "export-official":
            files = export_official(args.run_dir, args.out)
            groups = sorted({f.parent for f in files})
            print(f"[export] {len(files)} run files in {len(groups)} checkpoint/benchmark/scaffold folders under "
                  f"{(args.out or default_out(args.run_dir))}; official aggregate of one: scripts/stats.py {groups[0]}")
    except KeyboardInterrupt as e:  # one line, not a traceback: where it stopped and how to go on
        what = str(e) or f"interrupted ({args.cmd}); rerun the same command to resume"
        print(f"[qedlib] {what}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, FileNotFoundError, RuntimeError) as e:  # bad input: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    if code == 130:  # Ctrl-C: the lock is released and the notebook marked; leave now, so that no library's
        sys.stdout.flush()  # exit hook (a half-stopped kernel client) can hold the terminal
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
