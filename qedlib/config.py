"""Typed, validated configs built from a params YAML plus overrides; used by every notebook.

A params file is a whole-pipeline recipe: common keys, then one section per stage
(`distill`, `sft`, `rubric_rl`, `rc_rl`, `eval`). `load_config(path, overrides)` returns a
`Config`; unknown keys and values of the wrong type are rejected with the file, the dotted key
and what is allowed. Overrides are dotted keys (`{"sft.lr": 1e-5}` or `--set sft.lr=1e-5`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .paper import RECIPE


class ConfigError(ValueError):
    """A params file or override is wrong; the message names the file, key and fix."""


# ---------------------------------------------------------------- building blocks
@dataclass
class Endpoint:
    """How to reach one model: in-process transformers/vLLM or an OpenAI-compatible server."""
    model: str = "smollm2-135m"  # model reference: embedded name, folder, hub id, or served model name
    backend: Literal["transformers", "openai", "vllm"] = "transformers"  # where generation runs
    base_url: Optional[str] = None  # OpenAI-compatible base URL (…/v1); or use base_url_env
    base_url_env: Optional[str] = None  # environment variable holding the base URL
    api_key_env: Optional[str] = None  # environment variable holding the API key (never the key)
    api: Literal["chat", "responses"] = "chat"  # chat completions, or the Responses API (gpt-oss effort)
    reasoning_effort: Optional[str] = None  # low|medium|high for reasoning models that accept it
    max_concurrency: int = 8  # requests in flight (openai backend)
    timeout_s: float = 600.0  # per request: connect + sending + the whole answer (not per read)
    max_retries: int = 5  # on timeouts, 429 and 5xx, exponential back-off with jitter
    deadline_s: Optional[float] = None  # whole call incl. retries and back-off; None: (max_retries + 1) x timeout_s + the longest back-off
    retry_backoff_s: float = 0.5  # first back-off delay; doubles per retry (x0.5-1.5 jitter), capped at 30 s
    batch_size: int = 8  # prompts per forward batch (transformers backend)
    device: str = "auto"  # cuda|mps|cpu|auto
    dtype: str = "auto"  # bfloat16|float16|float32|auto
    static_cache: bool = False  # transformers on GPU: compiled static KV cache (much faster decode)
    vllm: dict = field(default_factory=dict)  # extra vllm.LLM(...) kwargs, e.g. gpu_memory_utilization
    extra_body: dict = field(default_factory=dict)  # extra JSON for the server (e.g. chat_template_kwargs)
    price_in_per_mtok: float = 0.0  # USD per million input tokens (cost accounting)
    price_out_per_mtok: float = 0.0  # USD per million output tokens


@dataclass
class Sampling:
    """Sampling parameters for one generation role."""
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 256  # generation budget
    n: int = 1  # samples per prompt
    top_k: Optional[int] = None  # None: the model's generation config (transformers' 50 where it sets none); 0: off


@dataclass
class Judge:
    """The LLM judge: which model, prompt and mode, and what an invalid grade means."""
    endpoint: Endpoint = field(default_factory=Endpoint)  # the judge model
    prompt: Literal["rubric", "proofbench", "answer"] = "rubric"  # grading template
    mode: Literal["text", "score_prob"] = "text"  # parse a score tag, or expected score from logprobs
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, max_new_tokens=1024))
    samples: int = 1  # grades per proof, combined below
    combine: Literal["mean", "median"] = "mean"  # how several grades of one proof are combined
    invalid: Literal["drop", "zero", "retry"] = "drop"  # what a consumer does with an invalid grade
    retries_on_invalid: int = 1  # extra judge calls when invalid == "retry"
    cache: bool = True  # cache grades on disk by hash of (judge settings, filled prompt)
    panel: list = field(default_factory=list)  # more judges (Endpoint fields each); grades combined with `combine`
    answer_judge: bool = True  # answer prompt: ask this judge when exact match / math-verify cannot decide (false: undecided = invalid)


@dataclass
class ProblemSource:
    """Where problems come from: the shipped set, a local file, or a hub dataset."""
    path: str = "shipped"  # "shipped", a .jsonl/.csv/.parquet file, or hub:org/name
    split: Optional[str] = None  # shipped/own split column: train | eval | None for all
    hub_split: str = "train"  # split of a hub dataset
    hub_config: Optional[str] = None  # config name of a hub dataset
    hub_revision: Optional[str] = None  # a hub dataset's commit (or tag) to pin; None: its main branch
    columns: dict = field(default_factory=dict)  # our field -> the file's column
    limit: Optional[int] = None  # keep the first N problems (smoke runs)
    on_bad_row: Literal["error", "skip"] = "error"  # a row with no problem text or a non-text problem/rubric: stop, or skip it (counted with its reason)
    duplicates: Literal["error", "first"] = "error"  # rows sharing an id: an error, or keep the first (ProofBench: 3 graded solutions per problem)


@dataclass
class Lora:
    """LoRA adapter settings (peft)."""
    enabled: bool = False  # train an adapter instead of all weights
    r: int = 16  # rank
    alpha: int = 32  # scaling
    dropout: float = 0.05  # adapter dropout
    target_modules: Any = "all-linear"  # which modules get adapters
    merge: bool = True  # merge the adapter into the weights when saving for the next stage


@dataclass
class Launch:
    """How training runs: in the notebook's kernel, or `accelerate launch` in a subprocess."""
    num_processes: int = 1  # >1 launches accelerate with that many processes
    accelerate_config: Optional[str] = None  # path of an accelerate config (DeepSpeed/FSDP)
    extra_args: list = field(default_factory=list)  # more `accelerate launch` flags
    num_machines: int = 1  # nodes; > 1 adds accelerate's multi-node flags (num_processes counts all nodes' processes)
    machine_rank: Optional[int] = None  # this node's rank; None: $SLURM_NODEID, else 0
    main_process_ip: Optional[str] = None  # rendezvous host; None: the first node of $SLURM_JOB_NODELIST
    main_process_port: int = 29500  # rendezvous port on the first node (multi-node only)
    mode: Literal["here", "external"] = "here"  # here: the notebook trains (or launches); external: a batch job trains, the notebook waits for its completion record
    wait_s: float = 0.0  # external: how long the notebook waits for the batch job's record before refusing with its command


# ---------------------------------------------------------------- stages
@dataclass
class DistillConfig:
    """Stage 1: teacher proofs -> graded, filtered SFT data."""
    problems: ProblemSource = field(default_factory=lambda: ProblemSource(split="train"))
    teacher: Endpoint = field(default_factory=Endpoint)  # the teacher model
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, max_new_tokens=512, n=2))
    thinking: bool = True  # ask for / parse <think> reasoning
    system_prompt: Optional[str] = None  # teacher system prompt; None sends the bare problem
    judge: Judge = field(default_factory=Judge)
    min_grade: float = 0.0  # keep samples graded at least this (0-7)
    per_problem: Literal["best", "all"] = "best"  # one best sample per problem, or all passing
    drop_truncated: bool = True  # drop samples whose generation hit the token budget
    max_sft_tokens: Optional[int] = None  # drop samples longer than this (SFT max length)
    decontaminate: list = field(default_factory=list)  # benchmark files/names to decontaminate against
    decontaminate_missing: Literal["error", "skip"] = "skip"  # a listed benchmark that cannot be loaded: fail the stage, or skip it with a note
    ngram: int = 8  # n-gram size for decontamination
    overlap_threshold: float = 0.5  # fraction of problem n-grams found in a benchmark -> removed
    screen: bool = False  # screen problems with the screening prompt first
    write_rubrics: bool = False  # write rubrics for problems with a reference solution but no rubric
    screen_difficulty: list = field(default_factory=lambda: [1, 10])  # keep screened problems rated in [low, high] (1-10)
    helper: Literal["judge", "teacher"] = "judge"  # which endpoint screens problems and writes rubrics
    max_invalid_rate: float = 0.5  # stop the stage when more than this share of teacher or judge calls fail or grade invalid (workbook default)


@dataclass
class SFTConfig:
    """Stage 2: supervised fine-tuning on the distilled proofs."""
    model: str = "base"  # "base" (the run's base model) or a model reference
    dataset: str = "distill"  # "distill" (this run's stage 1) or hub:HuggingFaceH4/... / a path
    dataset_config: Optional[str] = None  # hub dataset config
    one_per_problem: bool = True  # keep one sample per unique problem (the paper's best setting)
    eval_fraction: float = 0.1  # held-out fraction for eval loss
    max_length: int = 1024  # tokens per example
    overlong: Literal["drop", "truncate"] = "drop"  # what to do with longer examples (counted)
    packing: bool = False  # pack examples into max_length rows (padding-free when supported)
    padding_free: bool = False  # flatten batches without padding (flash-attention style)
    lora: Lora = field(default_factory=Lora)
    lr: float = RECIPE["sft.lr"]  # peak learning rate (the paper's)
    lr_scheduler: str = "cosine"  # workbook default, not from the paper
    warmup_ratio: float = 0.03  # workbook default, not from the paper
    weight_decay: float = 0.0  # workbook default, not from the paper
    epochs: float = 1.0  # passes over the data (max_steps wins when > 0)
    max_steps: int = -1  # stop after this many optimizer steps
    batch_size: int = 4  # per device
    grad_accum: int = 1  # gradient accumulation steps
    max_grad_norm: float = 1.0  # workbook default, not from the paper
    gradient_checkpointing: bool = False  # trade compute for memory
    save_steps: int = 50  # checkpoint every N steps
    resume: bool = False  # continue from the last checkpoint in the stage folder
    logging_steps: int = 1  # log every N steps
    report_to: list = field(default_factory=list)  # trackio | tensorboard | wandb
    launch: Launch = field(default_factory=Launch)
    sample_problems: int = 4  # held-out problems shown before/after
    sample_sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_new_tokens=128))
    dataset_split: str = "train"  # split of a hub dataset (sft.dataset: hub:org/name)
    weights_dtype: str = "auto"  # trained weights: auto = float32 master weights everywhere (bf16 autocast computes in bf16)
    qlora: bool = False  # load the base in 4-bit (bitsandbytes, CUDA only) and train the LoRA adapter (needs lora.enabled)
    eval_steps: Optional[int] = None  # eval loss every N steps (None: every save_steps); final eval always runs
    save_total_limit: Optional[int] = 2  # keep only the newest N checkpoints (workbook default)
    keep_checkpoints: Literal["last", "all", "none"] = "last"  # once the stage has finished: last = the final checkpoint's weights and trainer state (hard-linked to model/, no optimizer state), all = every checkpoint as saved, none = no checkpoints
    save_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the saved model/ that RL starts from (training keeps fp32 masters either way); bfloat16 halves it, rounding each weight to bf16
    chat_template: Optional[str] = None  # Jinja file with {% generation %} markers, for a model whose template qedlib does not know
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 | qed_varlen_sdpa; auto: see sft.attention_for


@dataclass
class RLConfig:
    """GRPO settings shared by the two RL stages (rubric rewards and reasoning cache)."""
    model: str = "previous"  # "previous" (the last trained checkpoint of the run) or a reference
    problems: ProblemSource = field(default_factory=lambda: ProblemSource(split="train"))
    min_reward_mean: Optional[float] = None  # drop hopeless problems (needs a reward_mean column)
    max_reward_mean: Optional[float] = None  # drop too-easy problems (paper: 0.7)
    reward: Literal["judge", "format", "opening", "answer"] = "judge"  # judge score/7, or verifiable rewards (opening: a cheap grader of the proof's first words)
    judge: Judge = field(default_factory=Judge)
    num_generations: int = 4  # rollouts per problem (group size; paper 16)
    prompts_per_step: int = 2  # problems per optimizer step (paper 64)
    max_steps: int = 4  # optimizer steps (paper 150)
    temperature: float = RECIPE["rubric_rl.temperature"]  # rollout temperature (the paper's)
    top_p: float = 1.0  # rollout nucleus sampling
    max_completion_length: int = 128  # new tokens per rollout (paper 49,152)
    lr: float = RECIPE["rubric_rl.lr"]  # constant AdamW learning rate (the paper's)
    weight_decay: float = 0.01  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1 (workbook default = torch's; the paper does not say)
    adam_beta2: float = 0.999  # AdamW beta2 (workbook default = torch's; the paper does not say)
    max_grad_norm: float = RECIPE["rubric_rl.max_grad_norm"]  # gradient clipping (the paper's)
    weights_dtype: Literal["float32", "bfloat16"] = "float32"  # trained weights: fp32 master weights + bf16 autocast; bfloat16 only under DeepSpeed, whose optimizer keeps fp32 masters
    loss_type: str = "luspo"  # TRL loss aggregation: luspo = token sum / number of sequences (the paper's; with our token-level ratios this is QED-Nano's PPO-clip, not LUSPO's sequence-level objective)
    loss_divisor: Optional[int] = None  # official gradient scale (loss_type luspo): the token-sum / sequences-per-step loss is divided by this, as the paper's DeepSpeed divided by its accumulation steps and averaged over ranks (paper 64 rubric RL, 256 RC RL); None: this run's processes x accumulation steps; 1: TRL's luspo unscaled
    scale_rewards: Literal["none", "group", "batch"] = RECIPE["rubric_rl.scale_rewards"]  # paper: no std normalisation
    epsilon: float = RECIPE["rubric_rl.epsilon"]  # PPO clip (paper: very loose, 4)
    epsilon_high: Optional[float] = None  # asymmetric upper clip (DAPO)
    beta: float = 0.0  # KL coefficient (paper: no KL)
    entropy_coef: float = RECIPE["rubric_rl.entropy_coef"]  # entropy bonus (the paper's)
    entropy_weighting: Literal["policy", "token_mean"] = "policy"  # bonus aggregated like the policy term (paper) or TRL's per-token mean
    ratio_logprobs: Literal["sampler", "trainer"] = "sampler"  # PPO ratio = policy / sampler's logprobs (paper) or / the trainer's recomputed ones (TRL)
    sampling_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "none"  # TRL's vLLM importance-sampling correction (paper: none; the ratio already uses the sampler)
    sampling_correction_cap: float = 3.0  # upper bound of the IS ratio when sampling_correction is on (TRL's default 3)
    steps_per_generation: int = 1  # optimizer steps per generated batch (paper: 1; >1 = off-policy lag, what epsilon bounds)
    mask_truncated_completions: bool = False  # DAPO-style: no loss on truncated rollouts
    overlong_penalty: Optional[int] = None  # soft penalty over the last N tokens of the budget
    micro_batch_size: Optional[int] = None  # completions per forward per device (None: whole batch at once)
    rollout_batch_size: int = 16  # sequences per generate() call when rolling out with transformers
    static_cache: bool = False  # transformers rollouts on GPU: compiled static KV cache (8-27x faster decode)
    gradient_checkpointing: bool = False  # trade compute for memory
    shuffle: bool = True  # shuffle problems between epochs
    use_vllm: bool = False  # vLLM generation on GPU
    vllm_mode: Literal["colocate", "server"] = "colocate"  # vLLM in-process or `trl vllm-serve`
    vllm_gpu_memory_utilization: float = 0.3  # colocate: share of GPU memory vLLM takes (weights + KV cache)
    vllm_max_model_length: Optional[int] = None  # vLLM context; None: longest prompt + completion budget, rounded up to 1024
    vllm_enable_sleep_mode: bool = False  # colocate: vLLM frees its memory during the optimizer step (not with rc_rl)
    vllm_tensor_parallel_size: int = 1  # colocate: GPUs per vLLM engine
    vllm_server_host: str = "127.0.0.1"  # server mode: host of `trl vllm-serve`
    vllm_server_port: int = 8000  # server mode: its port
    vllm_server_host_env: Optional[str] = None  # server mode: environment variable holding the host (wins over vllm_server_host)
    vllm_server_port_env: Optional[str] = None  # server mode: environment variable holding the port (wins over vllm_server_port)
    vllm_server_timeout: float = 240.0  # server mode: seconds to wait for the server to come up
    lora: Lora = field(default_factory=Lora)
    save_steps: int = 50  # checkpoint every N steps
    resume: bool = False  # continue from the last checkpoint
    keep_checkpoints: Literal["last", "all", "none"] = "last"  # once the stage has finished: last = the final checkpoint's weights and trainer state (hard-linked to model/, no optimizer state), all = every checkpoint as saved, none = no checkpoints
    logging_steps: int = 1
    report_to: list = field(default_factory=list)
    launch: Launch = field(default_factory=Launch)
    max_invalid_rate: float = 0.5  # stop training, before any save, at the first step where more than this share of rollouts got no valid reward (workbook default)


@dataclass
class RCSettings:
    """The reasoning cache: bounded reasoning turns joined by summaries."""
    turns: int = 3  # reasoning turns (paper 3)
    reasoning_budget: int = 128  # new tokens per reasoning turn (paper 49,152)
    summary: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.8, max_new_tokens=64))
    summariser: str = "policy"  # "policy" (test time) or "frozen" (training, a separate model)
    summariser_endpoint: Endpoint = field(default_factory=Endpoint)  # the frozen summariser
    accumulate: bool = False  # append summaries instead of replacing (paper: replace)
    summary_thinking: Optional[bool] = None  # summariser reasons in <think> first; None: when the policy summarises itself with thinking, or its template opens <think>
    summary_thinking_budget: int = 0  # extra summariser tokens for that thinking (added to summary.max_new_tokens; workbook default)
    summary_length: str = RECIPE["rc_rl.rc.summary_length"]  # how long the summariser is asked to write, in the prompt's words (paper: at most two short paragraphs)


@dataclass
class RCRLConfig(RLConfig):
    """Stage 4: GRPO on reasoning-cache states."""
    rc: RCSettings = field(default_factory=RCSettings)
    states_per_trajectory: int = 2  # cache states sampled per trajectory (paper 2 of 4)
    check_problems: int = 4  # reward check after training: the starting vs the trained policy on the cache states of this many problems (workbook default, not from the paper; 0 skips it)


@dataclass
class CalibrationSet:
    """Graded proofs the judges are measured on (05_eval, judge calibration), and the judges compared."""
    path: Optional[str] = None  # a .jsonl/.csv/.parquet of graded proofs or hub:org/name; None: the 36 shipped proofs
    columns: dict = field(default_factory=dict)  # our name -> the file's column (problem_id, problem, proof, reference_grade, rubric, ...)
    prompt: Optional[str] = None  # judge prompt for these proofs (rubric | proofbench); None: the benchmarks' proof prompt
    judges: list = field(default_factory=list)  # more judge endpoints (Endpoint fields each) graded side by side with eval.judge


@dataclass
class EvalEstimate:
    """What `python -m qedlib plan` assumes to price an evaluation before it starts."""
    tokens_per_problem: dict = field(default_factory=dict)  # benchmark -> mean generated tokens per problem and run (unlisted: eval.sampling.max_new_tokens)
    generation_tokens_per_s: float = 2000.0  # policy tokens per second per GPU (workbook default, not from the paper)
    judge_input_tokens: int = 4000  # judge prompt tokens per grade (workbook default, not from the paper)
    judge_output_tokens: int = 8000  # judge output tokens per grade (workbook default, not from the paper)


@dataclass
class EvalConfig:
    """Stage 5: evaluation of the run's checkpoints on benchmarks, with scaffolds."""
    checkpoints: list = field(default_factory=lambda: ["base", "sft", "rubric_rl", "rc_rl"])
    benchmarks: list = field(default_factory=lambda: ["shipped"])  # shipped | imo-proofbench | imo-answerbench | a path
    benchmark_limit: Optional[int] = None  # first N problems per benchmark
    samples: int = 1  # runs per problem (paper 3)
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.8, max_new_tokens=256))
    scaffolds: list = field(default_factory=lambda: ["single", "rc"])  # single | rc | self_check | rsa | dsm | nomos
    rc: RCSettings = field(default_factory=RCSettings)
    judge: Judge = field(default_factory=Judge)
    success_threshold: int = 6  # pass@k counts score >= this as a success
    pass_k: list = field(default_factory=lambda: [1])
    bootstrap: int = 1000  # bootstrap resamples for 95% intervals
    endpoint: Optional[Endpoint] = None  # evaluate a served model instead of checkpoints
    chunk: int = 8  # problems generated + graded per write to results.jsonl (resume granularity)
    self_check_passes: int = 5  # self_check: accept after this many consecutive passing self-verifications (paper 5)
    self_check_failures: int = 10  # self_check: give up after this many failed self-verifications (paper 10)
    self_check_pass_score: int = 6  # self_check: a self-verification scoring at least this (0-7) is a pass
    rsa_population: int = 8  # rsa: solutions per round (paper 8)
    rsa_merge: int = 3  # rsa: solutions merged into each new one (paper 3)
    rsa_rounds: int = 3  # rsa: merge rounds before pairwise selection (paper 3)
    dsm_proofs: int = 4  # dsm: proofs per pool (paper 4)
    dsm_verifications: int = 4  # dsm: self-verifications per proof (paper 4)
    dsm_rounds: int = 2  # dsm: refinement rounds of the best proof (paper 2)
    nomos_samples: int = 16  # nomos: samples per problem, each self-scored once (paper 16)
    nomos_keep: int = 4  # nomos: best self-scored samples that are consolidated (workbook default)
    nomos_consolidated: int = 4  # nomos: consolidated proofs written from them (workbook default)
    max_calls: Optional[int] = None  # scaffold budget: model calls per problem and sample (None: unlimited)
    max_tokens: Optional[int] = None  # scaffold budget: generated tokens per problem and sample (None: unlimited)
    calibration_limit: Optional[int] = None  # judge calibration: grade the first N calibration proofs (0 skips it; None: all)
    calibration: CalibrationSet = field(default_factory=CalibrationSet)  # which graded proofs, which judges
    paper_rows: dict = field(default_factory=dict)  # checkpoint -> the paper's row it is compared with (qedlib.paper); base/sft/rc_rl and the released hub ids need none
    estimate: EvalEstimate = field(default_factory=EvalEstimate)  # assumptions of the plan's GPU-hours and judge cost
    max_invalid_rate: float = 0.5  # stop the evaluation when more than this share of its policy or judge calls fail or grade invalid (workbook default)


@dataclass
class Config:
    """A whole-pipeline recipe."""
    run_name: str = "default"  # outputs/<run_name>
    seed: int = 0  # global seed
    base_model: str = "smollm2-135m"  # the student before any training
    thinking: bool = True  # the policy reasons in <think>...</think> before its proof
    device: str = "auto"  # device for in-process models
    stages: Optional[list] = None  # the stages `python -m qedlib run` executes (e.g. [05_eval]); None: all; --stages overrides
    gpu_memory_gib: Optional[float] = None  # memory of one GPU the recipe is planned for (`python -m qedlib plan`); null = no GPU planned
    gpu: Optional[str] = None  # card model (plan.USABLE_GIB, e.g. H100-80GB): plan against the GiB torch reports for it; gpu_memory_gib, when set, wins
    generation: Endpoint = field(default_factory=Endpoint)  # how the policy generates (backend, batch)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rubric_rl: RLConfig = field(default_factory=RLConfig)
    rc_rl: RCRLConfig = field(default_factory=RCRLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and validation
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, dict, str, bool):
        return isinstance(value, tp)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _dataclass_of(tp: Any):
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def build(cls, data: dict, where: str, key: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {key or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        dotted = f"{key}.{k}" if key else k
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {dotted!r}{hint} (allowed here: {', '.join(names)})")
        tp = hints[k]
        sub = _dataclass_of(tp)
        if sub is not None and isinstance(v, dict):
            # Start from this field's own default (e.g. distill.problems has split: train), not the class's.
            base = _field_default(cls, k)
            built = build(sub, v, where, dotted)
            kwargs[k] = dataclasses.replace(base, **{f: getattr(built, f) for f in v}) if dataclasses.is_dataclass(base) \
                and type(base) is sub else built
        elif not _type_ok(v, tp):
            raise ConfigError(f"{where}: {dotted} = {v!r} is not valid: expected {_describe(tp)}")
        else:
            kwargs[k] = float(v) if tp is float else v
    return cls(**kwargs)


def _field_default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `key.sub=value` (value as YAML: 1e-5, true, [a, b], null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set sft.lr=1.0e-5")
    k, v = text.split("=", 1)
    try:
        return k.strip(), yaml.safe_load(v)
    except yaml.YAMLError as e:
        why = " ".join(str(getattr(e, "problem", None) or "not valid YAML").split())
        raise ConfigError(f"--set {k.strip()}={v}: the value is not valid YAML ({why}); quote a string "
                          f"(--set '{k.strip()}=\"...\"') or write a number, true/false, null or [a, b]") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


# Every `api_key_env` a loaded params tree names: generation.redact hides their values in error texts.
SECRET_ENVS: set = set()


def remember_secret_envs(tree: Any) -> None:
    """Note every `api_key_env` named anywhere in a params tree (endpoints, judge panels, benchmark entries)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "api_key_env" and isinstance(v, str) and v:
                SECRET_ENVS.add(v)
            remember_secret_envs(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            remember_secret_envs(v)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load a params YAML, apply dotted overrides, validate, and return the Config."""
    tree: dict = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"params file {p} does not exist (see params/ for the shipped recipes)")
        where = str(p)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    for k, v in (overrides or {}).items():
        _set_dotted(tree, k, v)
        where = where if not overrides else f"{where} (+ overrides)"
    remember_secret_envs(tree)
    return build(Config, tree, where)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the record of what ran)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
