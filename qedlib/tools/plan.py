"""`python -m qedlib plan PARAMS`: a dry run of a recipe that loads no weights.

Per stage it prints the model and its parameter count, the data, the processes, the batch shape,
the rollouts and tokens per optimizer step, the steps, and a per-device GPU memory estimate against
`gpu_memory_gib`; then the endpoints and whether their environment variables are set (never their
values). It exits non-zero when a stage cannot fit or a params key is inert (qedlib.tools.params_check).

Model configs come from a local folder, the Hugging Face cache (offline), the shipped models, or
`KNOWN_ARCHITECTURES` (public config.json facts) for hub models not in the cache; parameters are
counted on torch's meta device (shapes only, no memory).

The memory model (bytes per device; P parameters, P_t trainable, N processes):
- weights/grads/optimizer: fp32 master weights 4 + 4 + 8 (AdamW m, v) per parameter on one device
  (bf16 weights: 2 + 2 + 4); DeepSpeed (ZeRO paper accounting): bf16 weights 2 and grads 2, fp32
  master + m + v 12 per parameter, ZeRO-2 shards grads and optimizer over N, ZeRO-3 everything,
  `offload_*_device: cpu` moves them to host RAM; FSDP2: fp32 weights, grads and AdamW all sharded
  over N; LoRA: frozen weights, adapter grads and AdamW only; QLoRA: 0.5 bytes per frozen weight.
- activations for T tokens per forward (bf16, sdpa/flash attention: no T^2 scores):
  with gradient checkpointing L*T*H*2 (each layer's input kept) + T*A*2 (one layer recomputed in
  backward) + T*V*4 (logits and their gradient, bf16); without, L*T*A*2 + T*V*4, where
  A = 4H + 2*q_dim + 2*kv_dim + 4I values per token per layer (norms, q/k/v, attention output,
  MLP gate/up/activation/product).
- KV cache: 2 x layers x kv_heads x head_dim x bytes per token (bf16 in vLLM; the trained model's
  dtype in transformers rollouts, which also keep B x T x V fp32 logits when logprobs are asked).
- colocated vLLM takes vllm_gpu_memory_utilization x GPU for its bf16 weights and KV cache; with
  sleep mode only while generating, else for the whole run.
- the GPU is what torch reports for the card (USABLE_GIB: an "80 GB" H100 is 79.19 GiB), less a CUDA context
  per training process (CUDA_CONTEXT_GIB) and the communication buffers of its layout (comm_buffers).
- FSDP2 with CPU offload (fsdp_offload_params): fp32 weights, grads and AdamW live in host RAM (16 B per
  parameter); the GPU holds the bf16 copies of the blocks being computed (the current and the prefetched one,
  plus the embedding/head unit). DeepSpeed's optimizer offload keeps fp32 master, m, v and the fp32 gradient
  partitions on the host (16 B per parameter).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..config import Config, Endpoint, load_config, parse_override, build, _set_dotted
from ..stages.evaluation import cost_estimate_text
from ..reasoning_cache import check_summariser
from ..models import EMBEDDED, TINY, cache_dir
from ..launch import accelerate_config_path
from ..problem_sets import load_problems
from ..rl_settings import batch_shape, check_vllm_mode, vllm_context
from . import params_check
from ..tables import markdown_table

GIB = 2 ** 30
# GiB that torch reports as a card's total memory (`torch.cuda.get_device_properties(0).total_memory / 2**30`, the
# "total capacity" in CUDA out-of-memory messages): what vLLM's gpu_memory_utilization multiplies. Marketing
# "80 GB" is neither 80 GiB nor all usable. `python -m qedlib gpu-check` prints the card's own figure.
USABLE_GIB = {"H100-80GB": 79.19, "A100-80GB": 79.15, "H200": 139.8, "A100-40GB": 39.39, "L40S": 44.39,
              "RTX4090": 23.65}
CUDA_CONTEXT_GIB = 0.75  # CUDA context + kernels per process on the GPU (torch with lazy module loading: ~0.5-1 GiB)
DEEPSPEED_BUCKET = 5e8  # DeepSpeed's reduce_bucket_size and allgather_bucket_size defaults (elements; accelerate sets none)
PROMPT_TOKENS = 1024  # assumed longest prompt (problem + instruction); `--prompt-tokens` changes it

# Public config.json facts of hub models, for when a model is not in the local cache (offline plans).
_QWEN3_4B = dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=262144)
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen3-4B-Thinking-2507": _QWEN3_4B,
    "Qwen/Qwen3-4B-Instruct-2507": _QWEN3_4B,
    "Qwen/Qwen3-4B": {**_QWEN3_4B, "max_position_embeddings": 40960},
    "Qwen/Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                            tie_word_embeddings=True, max_position_embeddings=40960),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                                intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                                max_position_embeddings=8192),
}
# The shipped models before `python -m qedlib prepare` has built them (same shapes as models.build_tiny).
SHIPPED_ARCHITECTURES = {
    "smollm2-135m": KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M-Instruct"],
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=49152,
                       tie_word_embeddings=True, max_position_embeddings=4096),
}


class PlanError(ValueError):
    """A model reference whose architecture cannot be found offline."""


# ---------------------------------------------------------------- models (configs only)
@dataclass
class ModelInfo:
    """A model's shape: what the memory estimates need, read from its config alone."""
    ref: str
    source: str  # where the config came from
    config: object
    params: int  # total, tied weights once

    def _get(self, *names, default=None):
        for n in names:
            v = getattr(self.config, n, None)
            if v is not None:
                return v
        return default

    @property
    def layers(self) -> int:
        return self._get("num_hidden_layers")

    @property
    def hidden(self) -> int:
        return self._get("hidden_size")

    @property
    def intermediate(self) -> int:
        return self._get("intermediate_size", default=4 * self.hidden)

    @property
    def vocab(self) -> int:
        return self._get("vocab_size")

    @property
    def heads(self) -> int:
        return self._get("num_attention_heads")

    @property
    def kv_heads(self) -> int:
        return self._get("num_key_value_heads", default=self.heads)

    @property
    def head_dim(self) -> int:
        return self._get("head_dim", default=self.hidden // self.heads)

    @property
    def max_positions(self) -> int:
        return self._get("max_position_embeddings", default=0)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def layer_values_per_token(self) -> int:
        """A = 4H + 2 q_dim + 2 kv_dim + 4I: activation values one decoder layer keeps per token."""
        return (4 * self.hidden + 2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
                + 4 * self.intermediate)

    def lora_params(self, lora) -> int:
        """Trainable adapter parameters: r x (in + out) per targeted linear layer (peft's all-linear skips lm_head)."""
        import torch  # heavy: torch loads only when a model runs
        model = _meta_model(self.config)
        targets = lora.target_modules
        n = 0
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if targets == "all-linear":
                hit = leaf != "lm_head"
            elif isinstance(targets, str):
                hit = re.fullmatch(targets, name) is not None
            else:
                hit = leaf in targets
            if hit:
                n += lora.r * (mod.in_features + mod.out_features)
        return n


def _meta_model(config):
    import torch  # heavy: torch loads only when a model runs
    from transformers import AutoModelForCausalLM  # heavy: transformers loads torch
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_params(config) -> int:
    """Parameters of a model built from `config` on the meta device (no memory; tied weights counted once)."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def model_info(ref: str) -> ModelInfo:
    """A model's config without its weights: shipped name, local folder, HF cache (offline), or the built-in table."""
    from transformers import AutoConfig  # heavy: transformers loads torch
    source, config = None, None
    if ref in (EMBEDDED, TINY):
        folder = cache_dir() / ref
        if (folder / "config.json").exists():
            source, config = f"shipped model ({folder})", AutoConfig.from_pretrained(folder)
        else:
            spec = dict(SHIPPED_ARCHITECTURES[ref])
            source = "built-in table (shipped model not built yet: python -m qedlib prepare)"
            config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    elif Path(ref).expanduser().exists():
        path = Path(ref).expanduser()
        if not (path / "config.json").exists():
            raise PlanError(f"model folder {path} has no config.json")
        source, config = f"local folder {path}", AutoConfig.from_pretrained(path)
    else:
        try:
            config = AutoConfig.from_pretrained(ref, local_files_only=True)
            source = "Hugging Face cache (offline)"
        except (OSError, ValueError):
            spec = KNOWN_ARCHITECTURES.get(ref)
            if spec is None:
                raise PlanError(f"model {ref!r}: not a shipped name or local folder, not in the Hugging Face cache, "
                                f"and not in qedlib.tools.plan.KNOWN_ARCHITECTURES ({', '.join(KNOWN_ARCHITECTURES)}); "
                                f"fetch its config once (`hf download {ref} config.json`) or add its config.json "
                                "facts to that table") from None
            spec = dict(spec)
            source = "built-in table (public config.json facts; not in the local cache)"
            config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    return ModelInfo(ref, source, config, count_params(config))


# ---------------------------------------------------------------- launch regimes
@dataclass
class Regime:
    """How training state is laid out over devices."""
    name: str  # single | ddp | zero2 | zero3 | fsdp
    processes: int
    offload_optimizer: bool = False
    offload_params: bool = False  # DeepSpeed offload_param_device cpu, or FSDP fsdp_offload_params
    describe: str = ""


def regime(launch) -> Regime:
    """The training layout a Launch implies (reads the accelerate config file; no GPU needed)."""
    n = max(1, launch.num_processes)
    if not launch.accelerate_config:
        if n == 1:
            return Regime("single", 1, describe="1 process in the notebook's kernel")
        return Regime("ddp", n, describe=f"{n} processes, data parallel (accelerate's ddp config)")
    path = accelerate_config_path(launch.accelerate_config)
    acc = yaml.safe_load(path.read_text()) or {}
    kind = acc.get("distributed_type", "")
    if kind == "DEEPSPEED":
        ds = acc.get("deepspeed_config", {})
        stage = int(ds.get("zero_stage", 0))
        off_o = str(ds.get("offload_optimizer_device", "none")) == "cpu"
        off_p = str(ds.get("offload_param_device", "none")) == "cpu"
        name = "zero3" if stage == 3 else "zero2" if stage == 2 else "ddp"
        extra = (", optimizer offloaded to CPU" if off_o else "") + (", weights offloaded to CPU" if off_p else "")
        return Regime(name, n, off_o, off_p, f"{n} process{'es' if n > 1 else ''}, DeepSpeed ZeRO-{stage}{extra} ({path.name})")
    if kind == "FSDP":
        off = bool((acc.get("fsdp_config") or {}).get("fsdp_offload_params", False))
        return Regime("fsdp", n, off, off, f"{n} process{'es' if n > 1 else ''}, FSDP2"
                      f"{', weights, grads and AdamW offloaded to CPU' if off else ''} ({path.name})")
    return Regime("ddp", n, describe=f"{n} process{'es' if n > 1 else ''}, {kind or 'data parallel'} ({path.name})")


def training_state(params: int, adapters: int, reg: Regime, weight_bytes: int, frozen_bytes: float | None = None,
                   unit_params: int = 0) -> dict:
    """Bytes per device of weights, grads and optimizer state (and host RAM for offloaded parts).

    `adapters` > 0 means LoRA: the `params` base weights are frozen and only the adapters train. `unit_params`:
    the largest FSDP unit other than a transformer block (the tied embedding/head), for CPU offload."""
    n = reg.processes
    trainable, frozen = (adapters, params) if adapters else (params, 0)
    host = 0.0
    if reg.name in ("zero2", "zero3"):  # DeepSpeed bf16: 2 + 2 + 12 per trainable parameter
        weights = (2.0 * (trainable + frozen)) / (n if reg.name == "zero3" else 1)
        grads = 2.0 * trainable / n
        optim = 12.0 * trainable / n
        if reg.offload_optimizer:
            host += optim + 4.0 * trainable / n  # fp32 master, m, v and the fp32 gradient partition
            optim = 0.0
        if reg.offload_params and reg.name == "zero3":
            host += weights
            weights = 0.0
    elif reg.name == "fsdp" and reg.offload_params:  # all fp32 state on the host; bf16 units on the GPU
        host = (16.0 * trainable + (frozen_bytes or 4.0) * frozen) / n
        weights = 2.0 * unit_params  # the gathered embedding/head unit (blocks: comm_buffers)
        grads = 4.0 * unit_params  # its fp32-reduced gradient before the copy to the host
        optim = 0.0
    elif reg.name == "fsdp":  # fp32 parameters, grads and AdamW, all sharded
        weights = (4.0 * trainable + (frozen_bytes or 4.0) * frozen) / n
        grads = 4.0 * trainable / n
        optim = 8.0 * trainable / n
    else:  # one replica per device
        tb = 4.0 if adapters else weight_bytes  # LoRA adapters are fp32
        weights = tb * trainable + (weight_bytes if frozen_bytes is None else frozen_bytes) * frozen
        grads = tb * trainable
        optim = 2 * tb * trainable  # AdamW m and v in the parameters' dtype
    return {"weights": weights, "grads": grads, "optimizer": optim, "host": host}


def block_params(info: ModelInfo) -> int:
    """Parameters of one transformer block (the FSDP wrap unit): all but the embedding and head, per layer."""
    head = 0 if getattr(info.config, "tie_word_embeddings", False) else info.vocab * info.hidden
    return max(0, info.params - info.vocab * info.hidden - head) // max(1, info.layers)


def comm_buffers(info: ModelInfo, reg: Regime) -> tuple[float, str]:
    """(bytes, how) of a layout's communication buffers on each GPU: DeepSpeed's buckets, FSDP's gathered blocks."""
    block = block_params(info)
    if reg.name == "zero2":
        return 2 * DEEPSPEED_BUCKET * 2.0, "ZeRO-2 reduce + all-gather buckets (5e8 elements each, bf16)"
    if reg.name == "zero3":  # transformers' "auto": reduce bucket H^2, prefetch bucket 0.9 H^2, + one block gathered
        h2 = info.hidden ** 2
        return (1.9 * h2 + block) * 2.0, "ZeRO-3 reduce/prefetch buckets (1.9 x hidden^2) + one gathered block, bf16"
    if reg.name == "fsdp":  # current + prefetched block in bf16, one block's unsharded grads (bf16) and fp32 reduce
        return block * (2 * 2.0 + 2.0 + 4.0), "FSDP2: 2 gathered bf16 blocks + one block's bf16 grads and fp32 reduction"
    if reg.name == "ddp":
        return 2 * 25 * 2 ** 20, "DDP gradient buckets (2 x 25 MiB)"
    return 0.0, ""


def overheads(p: "StagePlan", info: ModelInfo, reg: Regime) -> float:
    """Add the CUDA context and the communication buffers to a training stage's memory; their bytes."""
    buffers, how = comm_buffers(info, reg)
    p.memory["CUDA context"] = CUDA_CONTEXT_GIB * GIB
    if buffers:
        p.memory["communication buffers"] = buffers
        p.notes.append(f"{how}: {_gib(buffers):.2f} GiB")
    return CUDA_CONTEXT_GIB * GIB + buffers


def activations(info: ModelInfo, tokens: int, checkpointing: bool) -> float:
    """Bytes of activations for `tokens` tokens in one forward/backward (see the module docstring)."""
    L, H, V, A = info.layers, info.hidden, info.vocab, info.layer_values_per_token()
    logits = tokens * V * 4
    if checkpointing:
        return L * tokens * H * 2 + tokens * A * 2 + logits
    return L * tokens * A * 2 + logits


# ---------------------------------------------------------------- stage plans
@dataclass
class StagePlan:
    """What one stage will do and need, per device."""
    stage: str
    lines: list = field(default_factory=list)  # (label, text)
    memory: dict = field(default_factory=dict)  # component -> bytes per device
    notes: list = field(default_factory=list)  # how the total is formed
    problems: list = field(default_factory=list)  # reasons it cannot run / fit
    total: float = 0.0

    def add(self, label: str, text: str) -> None:
        self.lines.append((label, text))


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _gib(b: float) -> float:
    return b / GIB


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _source_text(src) -> str:
    text = src.path + (f" split {src.split}" if src.split else "") + (f", first {src.limit}" if src.limit else "")
    if src.path == "shipped":
        text += f" ({len(load_problems('shipped', split=src.split)[:src.limit or None])} problems)"
    elif src.path.startswith("hub:"):
        text += " (hub dataset, not checked offline)"
    else:
        text += " (found)" if Path(src.path).expanduser().exists() else " (MISSING)"
    return text


def _endpoint_memory(ep: Endpoint, role: str, gpu_gib: float | None, prompt_tokens: int, new_tokens: int,
                     plan: StagePlan, models: dict) -> float:
    """Bytes an in-process endpoint (transformers or vLLM) takes on the device; 0 for a server."""
    if ep.backend == "openai":
        return 0.0
    info = _info(ep.model, models)
    if ep.backend == "vllm":
        util = float(ep.vllm.get("gpu_memory_utilization", 0.9))  # vLLM's own default
        ctx = int(ep.vllm.get("max_model_len") or info.max_positions)
        weights = 2.0 * info.params / int(ep.vllm.get("tensor_parallel_size", 1))
        per_seq = ctx * info.kv_bytes_per_token()
        if gpu_gib:
            share = util * gpu_gib * GIB
            fit = (share - weights) / per_seq
            plan.notes.append(f"{role}: vLLM {util:.2f} x {gpu_gib:g} GiB = {_gib(share):.1f} GiB for bf16 weights "
                              f"{_gib(weights):.1f} GiB + KV cache {_gib(per_seq):.2f} GiB per sequence at "
                              f"max_model_len {_fmt(ctx)} -> {max(fit, 0):.1f} sequences at full length")
            if fit < 1:
                plan.problems.append(f"{role}: vLLM's share ({_gib(share):.1f} GiB) cannot hold the weights and one "
                                     f"{_fmt(ctx)}-token sequence; raise gpu_memory_utilization or set max_model_len")
            if prompt_tokens + new_tokens > ctx:
                plan.notes.append(f"{role}: prompt (~{_fmt(prompt_tokens)}) + {_fmt(new_tokens)} new tokens exceeds "
                                  f"max_model_len {_fmt(ctx)}: long generations stop at the context")
            plan.memory[f"{role} (vLLM share)"] = share
            return share
        plan.memory[f"{role} (vLLM weights + 1 sequence)"] = weights + per_seq
        return weights + per_seq
    weights = 2.0 * info.params  # transformers, dtype auto: bf16 on a GPU
    kv = ep.batch_size * (prompt_tokens + new_tokens) * info.kv_bytes_per_token()
    plan.memory[f"{role} (transformers bf16 weights)"] = weights
    plan.memory[f"{role} KV cache ({ep.batch_size} x {_fmt(prompt_tokens + new_tokens)} tokens)"] = kv
    return weights + kv


def _info(ref: str, models: dict) -> ModelInfo:
    if ref not in models:
        models[ref] = model_info(ref)
    return models[ref]


def _judges(judge) -> list[Endpoint]:
    return [judge.endpoint] + [build(Endpoint, p, "judge.panel") if isinstance(p, dict) else p for p in judge.panel]


def plan_distill(cfg: Config, models: dict, prompt_tokens: int) -> StagePlan:
    d = cfg.distill
    p = StagePlan("distill")
    p.add("data", _source_text(d.problems))
    t = d.teacher
    p.add("teacher", f"{t.model} ({t.backend}), {d.sampling.n} samples per problem, <= {_fmt(d.sampling.max_new_tokens)} "
                     f"new tokens each")
    for j in _judges(d.judge):
        p.add("judge", f"{j.model} ({j.backend}), {d.judge.samples} grade(s) per proof, <= "
                       f"{_fmt(d.judge.sampling.max_new_tokens)} tokens")
    p.add("steps", "no training: generate, grade, filter, decontaminate")
    p.total = _endpoint_memory(t, "teacher", usable_gib(cfg), prompt_tokens, d.sampling.max_new_tokens, p, models)
    for j in _judges(d.judge):
        p.total += _endpoint_memory(j, "judge", usable_gib(cfg), prompt_tokens + d.sampling.max_new_tokens,
                                    d.judge.sampling.max_new_tokens, p, models)
    return p


def _stage_model(cfg: Config, ref: str, previous: str) -> tuple[str, str]:
    """(model reference whose architecture trains, how it was named) for a stage's `model` key."""
    if ref == "base":
        return cfg.base_model, "base model"
    if ref == "previous":
        return previous, "previous stage's model (same architecture)"
    if ref in ("sft", "rubric_rl", "rc_rl"):
        return previous, f"{ref} stage's model (same architecture)"
    return ref, "as named"


def _model_line(info: ModelInfo, how: str, adapters: int) -> str:
    extra = f", LoRA adapters {_params_text(adapters)} trained" if adapters else ""
    return f"{info.ref} ({how}; config from {info.source}): {_params_text(info.params)} params{extra}"


def _state_notes(reg: Regime, weight_bytes: int, lora: bool) -> str:
    if reg.name in ("zero2", "zero3"):
        return "DeepSpeed: bf16 weights 2 B + bf16 grads 2 B + fp32 master/m/v 12 B per parameter, " + \
            ("all sharded" if reg.name == "zero3" else "grads and optimizer sharded") + f" over {reg.processes}"
    if reg.name == "fsdp" and reg.offload_params:
        return ("FSDP2 CPU offload: fp32 weights 4 B + grads 4 B + AdamW 8 B per parameter in host RAM; the GPU "
                "holds bf16 copies of the blocks being computed")
    if reg.name == "fsdp":
        return f"FSDP2: fp32 weights 4 B + grads 4 B + AdamW 8 B per parameter, sharded over {reg.processes}"
    if lora:
        return f"frozen weights {weight_bytes} B per parameter; fp32 adapters 4 + 4 + 8 B per adapter parameter"
    return f"{'fp32 master' if weight_bytes == 4 else 'bf16'} weights: {weight_bytes} + {weight_bytes} + " \
           f"{2 * weight_bytes} B per parameter (weights, grads, AdamW m + v) on each device"


def plan_sft(cfg: Config, models: dict, prompt_tokens: int) -> tuple[StagePlan, str]:
    s = cfg.sft
    p = StagePlan("sft")
    ref, how = _stage_model(cfg, s.model, cfg.base_model)
    info = _info(ref, models)
    adapters = info.lora_params(s.lora) if s.lora.enabled else 0
    p.add("model", _model_line(info, how, adapters))
    rows = s.dataset
    if s.dataset == "distill":
        limit = cfg.distill.problems.limit
        rows = "this run's distilled data" + (f" (<= {limit} problems)" if limit else "")
    p.add("data", f"{rows}{', one sample per problem' if s.one_per_problem else ''}; {s.eval_fraction:.0%} held out")
    reg = regime(s.launch)
    p.add("processes", reg.describe)
    tokens = s.batch_size * s.max_length
    p.add("batch", f"{s.batch_size} rows of <= {_fmt(s.max_length)} tokens per device{' (packed)' if s.packing else ''}, "
                   f"{s.grad_accum} accumulation steps -> {s.batch_size * s.grad_accum * reg.processes} rows per "
                   "optimizer step")
    p.add("tokens", f"<= {_fmt(tokens * s.grad_accum * reg.processes)} per optimizer step")
    p.add("steps", f"{s.max_steps}" if s.max_steps > 0 else f"{s.epochs:g} epochs (rows known only after distill)")
    wb = 4 if s.weights_dtype in ("auto", "float32") else 2
    st = training_state(info.params, adapters, reg, wb, frozen_bytes=0.5 if s.qlora else None,
                        unit_params=info.vocab * info.hidden)
    act = activations(info, tokens, s.gradient_checkpointing)
    p.memory.update({"weights": st["weights"], "grads": st["grads"], "optimizer": st["optimizer"],
                     f"activations ({_fmt(tokens)} tokens, checkpointing {'on' if s.gradient_checkpointing else 'off'})": act})
    p.notes.append(_state_notes(reg, wb, s.lora.enabled))
    if st["host"]:
        p.notes.append(f"host RAM for offloaded state: {_gib(st['host']):.1f} GiB per process")
    p.total = st["weights"] + st["grads"] + st["optimizer"] + act + overheads(p, info, reg)
    return p, ref


class _AssumedPrompts:
    """A stand-in tokenizer for rl.vllm_context: every prompt is `n` tokens (no tokenizer is loaded)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, text, add_special_tokens=False) -> dict:
        return {"input_ids": [0] * self.n}


def plan_rl(cfg: Config, stage: str, previous: str, models: dict, prompt_tokens: int) -> tuple[StagePlan, str]:
    rl = getattr(cfg, stage)
    rc = stage == "rc_rl"
    p = StagePlan(stage)
    ref, how = _stage_model(cfg, rl.model, previous)
    info = _info(ref, models)
    adapters = info.lora_params(rl.lora) if rl.lora.enabled else 0
    p.add("model", _model_line(info, how, adapters))
    filt = ", ".join(f"{k} {v}" for k, v in (("min_reward_mean", rl.min_reward_mean),
                                             ("max_reward_mean", rl.max_reward_mean)) if v is not None)
    p.add("data", _source_text(rl.problems) + (f"; difficulty filter {filt}" if filt else ""))
    reg = regime(rl.launch)
    p.add("processes", reg.describe)
    total = rl.prompts_per_step * rl.num_generations
    try:
        micro, accum = batch_shape(rl, reg.processes)
    except ValueError as e:
        p.problems.append(f"{stage}: {e}")
        return p, ref
    checks = [lambda: check_vllm_mode(rl, stage)]
    if rc:
        checks.append(lambda: check_summariser(rl.rc, cfg.thinking, f"{stage}.rc"))
    for check in checks:  # settings that run but not as labelled: plan refuses them
        try:
            check()
        except ValueError as e:
            p.problems.append(str(e))
    # Longest trained sequence: prompt (+ one RC summary per kept turn) + completion budget, as vLLM is told.
    grow = rl.rc.summary.max_new_tokens * (rl.rc.turns if rl.rc.accumulate else 1) + 256 if rc else 0
    seq = prompt_tokens + grow + rl.max_completion_length
    ctx = vllm_context(_AssumedPrompts(prompt_tokens), ["prompt"], rl, grow)  # the context the run would give vLLM
    seq = min(seq, ctx)
    what = "cache-state prompts" if rc else "problems"
    p.add("batch", f"{rl.prompts_per_step} {what} x {rl.num_generations} rollouts = {total} completions per optimizer "
                   f"step; {micro} per device per forward, {accum} accumulation steps over {reg.processes} process(es)")
    if rc:
        problems = rl.prompts_per_step // max(1, rl.states_per_trajectory)
        p.add("rollouts", f"{problems} RC trajectories ({rl.rc.turns} turns of <= {_fmt(rl.rc.reasoning_budget)} + "
                          f"{_fmt(rl.rc.summary.max_new_tokens)} tokens) -> {rl.states_per_trajectory} states each, "
                          f"then {total} rollouts of <= {_fmt(rl.max_completion_length)} tokens")
    p.add("tokens", f"<= {_fmt(total * seq)} trained per optimizer step ({total} x {_fmt(seq)}, prompt assumed "
                    f"{_fmt(prompt_tokens)}{f' + {_fmt(grow)} summary' if grow else ''})")
    p.add("steps", f"{rl.max_steps} optimizer steps, {rl.steps_per_generation} per generated batch")
    wb = 2 if rl.weights_dtype == "bfloat16" else 4
    st = training_state(info.params, adapters, reg, wb, unit_params=info.vocab * info.hidden)
    act = activations(info, micro * seq, rl.gradient_checkpointing)
    p.memory.update({"weights": st["weights"], "grads": st["grads"], "optimizer": st["optimizer"],
                     f"activations ({micro} x {_fmt(seq)} tokens, checkpointing "
                     f"{'on' if rl.gradient_checkpointing else 'off'})": act})
    p.notes.append(_state_notes(reg, wb, rl.lora.enabled))
    if st["host"]:
        p.notes.append(f"host RAM for offloaded state: {_gib(st['host']):.1f} GiB per process")
    fixed = overheads(p, info, reg)  # CUDA context and communication buffers: there all run
    train_peak = st["weights"] + st["grads"] + st["optimizer"] + act + fixed
    resident = st["weights"] + st["optimizer"] + fixed  # what stays on the device while rollouts run (grads are freed)
    gpu = usable_gib(cfg)
    kv_tok = info.kv_bytes_per_token()
    if rl.use_vllm and rl.vllm_mode == "colocate":
        p.add("vLLM", f"colocated, {rl.vllm_gpu_memory_utilization:.2f} of the GPU, context {_fmt(ctx)}"
                      f"{', sleep mode' if rl.vllm_enable_sleep_mode else ''}, tensor parallel "
                      f"{rl.vllm_tensor_parallel_size}")
        per_seq = ctx * kv_tok
        weights = 2.0 * info.params / rl.vllm_tensor_parallel_size
        if gpu:
            share = rl.vllm_gpu_memory_utilization * gpu * GIB
            fit = (share - weights) / per_seq
            p.memory[f"vLLM share ({rl.vllm_gpu_memory_utilization:.2f} x {gpu:g} GiB)"] = share
            p.notes.append(f"vLLM share: bf16 weights {_gib(weights):.1f} GiB + KV cache {_gib(per_seq):.2f} GiB per "
                           f"{_fmt(ctx)}-token sequence ({kv_tok // 1024} KiB/token) -> {max(fit, 0):.1f} sequences "
                           f"at full length")
            if fit < 1:
                p.problems.append(f"{stage}: vLLM's share cannot hold its weights and one {_fmt(ctx)}-token sequence; "
                                  "raise vllm_gpu_memory_utilization or lower vllm_max_model_length")
            if rl.vllm_enable_sleep_mode:
                p.total = max(train_peak, resident + share)
                p.notes.append("sleep mode: peak = max(training, weights + optimizer + vLLM share)")
            else:
                p.total = train_peak + share
                p.notes.append("peak = training + vLLM share (resident all run)")
        else:
            p.total = train_peak + weights + per_seq
    else:
        if rl.use_vllm:
            p.add("vLLM", f"server {rl.vllm_server_host_env or rl.vllm_server_host}:"
                          f"{rl.vllm_server_port_env or rl.vllm_server_port} (`trl vllm-serve` on other GPUs); "
                          f"KV cache {_gib(ctx * kv_tok):.2f} GiB per {_fmt(ctx)}-token sequence there")
            p.total = train_peak
        else:
            # Our transformers rollouts: the trained model generates; KV in its dtype, one step of fp32 log-probs
            # held for the sampler's logprobs (generation.SampledLogprobs).
            kv_dtype = 2 if reg.name in ("zero2", "zero3") or wb == 2 else 4
            per_proc = total // reg.processes * rl.steps_per_generation
            batch = min(rl.rollout_batch_size, per_proc)
            roll_ctx = max(seq, prompt_tokens + grow + rl.rc.reasoning_budget) if rc else seq  # RC turns too
            kv = batch * roll_ctx * info.kv_bytes_per_token(kv_dtype)
            logits = batch * info.vocab * 4 * 2  # this step's log-probs and the previous step's
            p.add("generator", f"transformers (the trained model), {batch} sequences per generate() call")
            p.memory[f"rollout KV cache ({batch} x {_fmt(roll_ctx)} tokens, {kv_dtype} B)"] = kv
            p.memory[f"rollout log-probs held (2 steps x {batch} x vocab, fp32)"] = logits
            p.total = max(train_peak, resident + kv + logits)
            p.notes.append("peak = max(training, weights + optimizer + rollout KV cache + held log-probs)")
    for j in _judges(rl.judge) if rl.reward == "judge" else []:
        p.total += _endpoint_memory(j, "judge", gpu, seq, rl.judge.sampling.max_new_tokens, p, models)
    if rc and rl.rc.summariser == "frozen":
        p.total += _endpoint_memory(rl.rc.summariser_endpoint, "summariser", gpu, seq, rl.rc.summary.max_new_tokens,
                                    p, models)
    return p, ref


def plan_eval(cfg: Config, trained: str, models: dict, prompt_tokens: int) -> StagePlan:
    e = cfg.eval
    p = StagePlan("eval")
    budget = max(e.sampling.max_new_tokens, e.rc.reasoning_budget + e.rc.summary.max_new_tokens)
    if e.endpoint is not None:
        p.add("model", f"served endpoint {e.endpoint.model} ({e.endpoint.backend})")
        policy = e.endpoint
    else:
        info = _info(trained, models)
        p.add("model", f"checkpoints {', '.join(e.checkpoints)}: {info.ref} architecture (config from {info.source}), "
                       f"{_params_text(info.params)} params, one at a time")
        policy = dataclasses.replace(cfg.generation, model=trained)
    p.add("data", ", ".join(map(str, e.benchmarks)) + (f", first {e.benchmark_limit}" if e.benchmark_limit else ""))
    p.add("runs", f"{e.samples} sample(s) per problem x scaffolds {', '.join(e.scaffolds)}; <= "
                  f"{_fmt(e.sampling.max_new_tokens)} new tokens (RC: {e.rc.turns} turns of {_fmt(e.rc.reasoning_budget)})")
    p.add("steps", "no training")
    if "rc" in e.scaffolds:
        try:
            check_summariser(e.rc, cfg.thinking, "eval.rc")
        except ValueError as err:
            p.problems.append(str(err))
    p.total = _endpoint_memory(policy, "policy", usable_gib(cfg), prompt_tokens, budget, p, models)
    for j in _judges(e.judge):
        p.total += _endpoint_memory(j, "judge", usable_gib(cfg), prompt_tokens + budget,
                                    e.judge.sampling.max_new_tokens, p, models)
    if "rc" in e.scaffolds and e.rc.summariser == "frozen":
        p.total += _endpoint_memory(e.rc.summariser_endpoint, "summariser", usable_gib(cfg), prompt_tokens + budget,
                                    e.rc.summary.max_new_tokens, p, models)
    return p


def endpoints(cfg: Config) -> list[tuple[str, Endpoint]]:
    """Every (where, endpoint) of the recipe that is reached over HTTP."""
    found = [("generation", cfg.generation), ("distill.teacher", cfg.distill.teacher)]
    found += [("distill.judge", j) for j in _judges(cfg.distill.judge)]
    for st in ("rubric_rl", "rc_rl"):
        found += [(f"{st}.judge", j) for j in _judges(getattr(cfg, st).judge)]
    found.append(("rc_rl.rc.summariser_endpoint", cfg.rc_rl.rc.summariser_endpoint))
    found += [("eval.judge", j) for j in _judges(cfg.eval.judge)]
    found.append(("eval.rc.summariser_endpoint", cfg.eval.rc.summariser_endpoint))
    if cfg.eval.endpoint is not None:
        found.append(("eval.endpoint", cfg.eval.endpoint))
    return [(w, ep) for w, ep in found if ep.backend == "openai"]


@dataclass
class Plan:
    """The whole recipe's plan."""
    stages: list
    endpoint_lines: list
    inert: list
    gpu_gib: Optional[float]
    no_effect: list = field(default_factory=list)  # (dotted key, why): read, but without effect in the mode set

    @property
    def largest(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def reasons(self) -> list[str]:
        out = [r for s in self.stages for r in s.problems]
        if self.gpu_gib:
            out += [f"{s.stage}: estimated {_gib(s.total):.1f} GiB per device > {self.gpu_gib:g} GiB GPU"
                    for s in self.stages if s.total > self.gpu_gib * GIB]
        out += [f"inert params key {k}: set but read by no code (qedlib.tools.params_check)" for k in self.inert]
        out += [f"params key {k} has no effect here: {why}" for k, why in self.no_effect]
        return out

    def fits(self, stage: StagePlan) -> str:
        if self.gpu_gib is None:
            return "no GPU planned"
        return "yes" if stage.total <= self.gpu_gib * GIB and not stage.problems else "NO"


def make_plan(params: str | Path, overrides: dict | None = None, prompt_tokens: int = PROMPT_TOKENS) -> Plan:
    """Plan every stage of a params file (no weights loaded)."""
    cfg = load_config(params, overrides)
    models: dict = {}
    stages = [plan_distill(cfg, models, prompt_tokens)]
    sft, model = plan_sft(cfg, models, prompt_tokens)
    stages.append(sft)
    for st in ("rubric_rl", "rc_rl"):
        p, model = plan_rl(cfg, st, model, models, prompt_tokens)
        stages.append(p)
    stages.append(plan_eval(cfg, model, models, prompt_tokens))
    if cfg.stages:  # an eval-only recipe (params `stages`) plans only the stages it runs
        stages = [s for s in stages if any(st.endswith(s.stage) or st.split("_", 1)[1] == s.stage for st in cfg.stages)]
    lines = []
    for where, ep in endpoints(cfg):
        url = f"{ep.base_url_env} {'set' if os.environ.get(ep.base_url_env) else 'NOT SET'}" if ep.base_url_env else \
            (f"base_url {ep.base_url}" if ep.base_url else "no base_url (OpenAI's default)")
        key = f"{ep.api_key_env} {'set' if os.environ.get(ep.api_key_env) else 'NOT SET'}" if ep.api_key_env else "no key"
        lines.append((where, ep.model, url, key))
    tree = params
    if overrides:  # check the keys the run will see: the file's and the overrides'
        tree = yaml.safe_load(Path(params).read_text()) or {}
        for k, v in overrides.items():
            _set_dotted(tree, k, v)
    plan = Plan(stages, lines, params_check.inert_keys(tree), usable_gib(cfg))
    plan.no_effect = params_check.no_effect_keys(tree)
    return plan


def usable_gib(cfg: Config) -> Optional[float]:
    """The GiB a stage may use per GPU: gpu_memory_gib when set, else what torch reports for the `gpu` card model."""
    if cfg.gpu_memory_gib is not None or cfg.gpu is None:
        return cfg.gpu_memory_gib
    if cfg.gpu not in USABLE_GIB:
        raise PlanError(f"gpu: {cfg.gpu!r} is not in plan.USABLE_GIB ({', '.join(USABLE_GIB)}); set gpu_memory_gib "
                        "to the GiB torch reports for your card (python -m qedlib gpu-check prints it)")
    return USABLE_GIB[cfg.gpu]


def render(plan: Plan) -> str:
    """The plan as text; the last line is the largest per-device estimate."""
    out = []
    for s in plan.stages:
        out.append(f"== {s.stage} ==")
        out += [f"  {label:10s} {text}" for label, text in s.lines]
        if s.memory:
            out.append("  memory per device: " + "; ".join(f"{k} {_gib(v):.2f} GiB" for k, v in s.memory.items()))
        out += [f"  ({n})" for n in s.notes]
        out.append(f"  estimate   {_gib(s.total):.2f} GiB per device"
                   + (f" of {plan.gpu_gib:g} GiB: fits {plan.fits(s)}" if plan.gpu_gib else " (no GPU planned)"))
        out += [f"  PROBLEM    {r}" for r in s.problems]
        out.append("")
    out.append(markdown_table(["stage", "GiB per device", "GPU GiB", "fits"],
                     [[s.stage, round(_gib(s.total), 2), plan.gpu_gib if plan.gpu_gib else "-", plan.fits(s)]
                      for s in plan.stages]))
    out.append("")
    out.append("endpoints (HTTP):" if plan.endpoint_lines else "endpoints: none (every model runs in-process)")
    out += [f"  {w}: {m}; {u}; {k}" for w, m, u, k in plan.endpoint_lines]
    reasons = plan.reasons
    out.append("")
    out.append("cannot run as planned:" if reasons else "plan OK")
    out += [f"  - {r}" for r in reasons]
    big = plan.largest
    out.append(f"largest per-device estimate: {_gib(big.total):.1f} GiB ({big.stage})")
    return "\n".join(out)


def main(params: str, sets: list[str], prompt_tokens: int = PROMPT_TOKENS) -> int:
    """Print the plan; 1 when a stage cannot fit or a key is inert, else 0."""
    overrides = dict(parse_override(s) for s in sets)
    plan = make_plan(params, overrides, prompt_tokens)
    print(cost_estimate_text(load_config(params, overrides)) + "\n")  # GPU-hours, judge tokens and dollars of 05_eval
    print(render(plan))
    return 1 if plan.reasons else 0
