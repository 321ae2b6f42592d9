"""An RL stage's settings checked and turned into numbers before anything trains: the batch shape, the objective's
consistency, vLLM's mode, address and context length.

Read by the GRPO algorithm (qedlib.grpo) and by the tools that plan or benchmark a step (qedlib.tools.plan,
bench_rl_step) without importing TRL: this module imports nothing heavy.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from .training import check_master_weights


# Loss types whose policy term the entropy bonus can be aggregated like (entropy_weighting: policy):
# the factor turns TRL's per-token mean of the entropy into the loss type's own aggregation.
ENTROPY_AS_POLICY = {
    "luspo": lambda tokens, seqs, max_len: tokens / seqs,  # token sum / number of sequences
    "dr_grpo": lambda tokens, seqs, max_len: tokens / (seqs * max_len),  # token sum / (B x max length)
    "bnpo": lambda tokens, seqs, max_len: 1.0,  # token sum / number of tokens: already a token mean
}


def world_size(default: int = 1) -> int:
    """Processes in this training job: accelerate's real count once distributed is set up, else `default`."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return default


def batch_shape(rl, num_processes: int) -> tuple[int, int]:
    """(completions per device per forward, accumulation steps) for one optimizer step of
    prompts_per_step x num_generations completions over `num_processes` processes."""
    total = rl.prompts_per_step * rl.num_generations
    if total % num_processes:
        raise ValueError(f"prompts_per_step x num_generations = {total} must be divisible by the number of "
                         f"processes ({num_processes})")
    micro = min(rl.micro_batch_size, total // num_processes) if rl.micro_batch_size else total // num_processes
    if total % (micro * num_processes):
        raise ValueError(f"prompts_per_step x num_generations = {total} must be divisible by micro_batch_size "
                         f"({micro}) x processes ({num_processes})")
    return micro, total // (micro * num_processes)


def check_objective(rl) -> None:
    """Refuse settings whose objective would not be the one the params label."""
    if rl.entropy_coef and rl.entropy_weighting == "policy" and rl.loss_type not in ENTROPY_AS_POLICY:
        raise ValueError(f"entropy_weighting: policy is defined for loss_type in {sorted(ENTROPY_AS_POLICY)}, "
                         f"not {rl.loss_type!r}: set entropy_weighting: token_mean (TRL's per-token mean) or "
                         "entropy_coef: 0.0")
    if rl.ratio_logprobs == "sampler" and rl.sampling_correction != "none":
        raise ValueError("ratio_logprobs: sampler already puts the sampler's logprobs in the PPO ratio; "
                         "sampling_correction must be none (or use ratio_logprobs: trainer with TRL's IS correction)")
    if rl.loss_divisor not in (None, 1) and rl.loss_type != "luspo":
        raise ValueError(f"loss_divisor: {rl.loss_divisor} is the official trainer's scale of the luspo loss (token sum / "
                         f"sequences); loss_type {rl.loss_type!r} normalises differently: set loss_divisor: 1 or null")
    if rl.loss_divisor is not None and rl.loss_divisor < 1:
        raise ValueError(f"loss_divisor: {rl.loss_divisor} must be >= 1 (null: processes x accumulation steps)")
    check_vllm_mode(rl)
    check_master_weights(rl.weights_dtype, rl.launch, "rl")


def check_vllm_mode(rl, section: str = "rl") -> None:
    """Refuse vLLM settings that have no effect in the chosen mode (a silent change to what runs)."""
    if rl.use_vllm and rl.vllm_mode == "server" and rl.vllm_max_model_length is not None:
        raise ValueError(f"{section}.vllm_max_model_length: {rl.vllm_max_model_length} has no effect in server mode (the "
                         "server's context is fixed when it starts): remove it and start the server with "
                         f"`trl vllm-serve --max-model-len {rl.vllm_max_model_length}` (or `vllm serve ... "
                         "--max-model-len`)")


def vllm_server_address(rl, section: str = "rl") -> tuple[str, int]:
    """(host, port) of the vLLM server: the environment variables named by vllm_server_host_env /
    vllm_server_port_env when set in the params, else vllm_server_host / vllm_server_port."""
    host, port = rl.vllm_server_host, rl.vllm_server_port
    for key, var in (("vllm_server_host_env", rl.vllm_server_host_env), ("vllm_server_port_env", rl.vllm_server_port_env)):
        if var is None:
            continue
        value = os.environ.get(var)
        if not value:
            raise ValueError(f"{section}.{key} names {var}, which is not set: export {var}=<the generator node's "
                             f"{'address' if key.startswith('vllm_server_host') else 'port'}> before starting training")
        if key == "vllm_server_host_env":
            host = value
        elif not value.isdigit():
            raise ValueError(f"{var}={value!r} ({section}.{key}) is not a port number")
        else:
            port = int(value)
    return host, port


def probe_vllm_server(host: str, port: int, timeout: float = 30.0) -> str:
    """Check that the vLLM server returns the per-token sampler logprobs `ratio_logprobs: sampler` needs,
    after temperature and top-p (`--logprobs-mode processed_logprobs`, as `trl vllm-serve` starts it);
    returns the served model's name, raises one clear error otherwise."""
    base = f"http://{host}:{port}"
    fix = ("start it with `trl vllm-serve --model ...` (which sets both), or `VLLM_SERVER_DEV_MODE=1 vllm serve ... "
           "--logprobs-mode processed_logprobs --max-logprobs -1`; or set ratio_logprobs: trainer")

    def call(path, body=None):
        req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ValueError(f"vLLM server {base}{path} answered HTTP {e.code}: ratio_logprobs: sampler needs its "
                             f"development endpoints and per-token logprobs; {fix}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"vLLM server {base} cannot be reached ({e}): start it, or set the host/port variables "
                             "named by vllm_server_host_env / vllm_server_port_env") from None
    model = call("/v1/models")["data"][0]["id"]
    info = call("/server_info?config_format=json")
    mode = (info.get("vllm_config", info).get("model_config") or {}).get("logprobs_mode")
    if mode != "processed_logprobs":
        raise ValueError(f"vLLM server {base} runs with logprobs_mode {mode!r}: its logprobs ignore temperature and "
                         f"top-p, so the PPO ratio policy / sampler would be biased; {fix}")
    out = call("/v1/completions", {"model": model, "prompt": "1 + 1 =", "max_tokens": 2, "logprobs": 0,
                                    "temperature": 1.0, "return_token_ids": True})
    lp = out["choices"][0].get("logprobs") if out.get("choices") else None
    if not lp or not (lp.get("token_logprobs") or lp.get("content")):
        raise ValueError(f"vLLM server {base} returned no per-token logprobs for a completion with logprobs=0: "
                         f"ratio_logprobs: sampler cannot form the PPO ratio; {fix}")
    return model


def vllm_context(tokenizer, prompts: list[str], rl, extra_prompt_tokens: int = 0) -> int:
    """vLLM's max model length: the longest prompt (+ room the prompt may grow, e.g. an RC summary) plus the
    completion budget, rounded up to 1024; rl.vllm_max_model_length wins when set. Never the model's own
    context (262k for Qwen3-4B-Thinking-2507, which does not fit next to training)."""
    if rl.vllm_max_model_length:
        return rl.vllm_max_model_length
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    need = longest + extra_prompt_tokens + rl.max_completion_length
    return -(-need // 1024) * 1024
