"""One text-generation interface, three backends: in-process transformers, OpenAI-compatible HTTP, vLLM.

Used by every stage (teacher, policy rollouts, judge, summariser, evaluation). `make_generator`
turns a `config.Endpoint` into a generator whose `generate(prompts, sampling)` takes chat
messages and returns `n` `Completion`s per prompt, with the thinking split, token counts,
finish reason and cost. vLLM is imported only when that backend is used (it has no CPU wheel).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from .config import SECRET_ENVS
from .models import load_model, resolve_model

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Completion:
    """One generated answer."""
    text: str  # the raw generated text (for thinking prompts, what follows the opening <think>)
    reasoning: str = ""  # the thinking part
    final: str = ""  # the text after the last </think> ("" when thinking never closed)
    think_closed: bool = True  # False: thinking never closed, so there is no final answer
    finish_reason: str = "stop"  # stop | length | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # USD, from the endpoint's price table
    error: Optional[str] = None  # set when the call failed after retries
    token_ids: list = field(default_factory=list)  # completion token ids incl. EOS when stopped (in-process)
    token_logprobs: Optional[list] = None  # per-token sampler logprobs of token_ids at the sampling temperature (when asked)


def split_thinking(text: str, thinking: bool, reasoning_field: str | None = None) -> tuple[str, str, bool]:
    """Split a generation into (reasoning, final, closed).

    With `thinking`, the prompt already opened `<think>` (or the server returned the reasoning in a
    separate field): the final answer is what follows the LAST `</think>`, and no `</think>` means
    no final answer. Without it, any think block is removed and the rest is the answer.
    """
    if reasoning_field:  # the server split it for us (vLLM/SGLang reasoning parsers, hosted APIs)
        return reasoning_field.strip(), text.replace(THINK_CLOSE, "").strip(), True
    if THINK_CLOSE in text:
        head, _, final = text.rpartition(THINK_CLOSE)
        return head.replace(THINK_OPEN, "", 1).strip(), final.strip(), True
    if thinking or text.lstrip().startswith(THINK_OPEN):
        return text.replace(THINK_OPEN, "", 1).strip(), "", False
    return "", text.strip(), True


def render_prompt(tokenizer, messages: list[dict], thinking: bool) -> str:
    """Chat-template the messages for generation; with `thinking`, make the prompt open `<think>`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if thinking and not text.rstrip().endswith(THINK_OPEN):
        text += THINK_OPEN + "\n"
    return text


def cost_of(endpoint, prompt_tokens: int, completion_tokens: int) -> float:
    """USD cost of one call under the endpoint's price table."""
    return (prompt_tokens * endpoint.price_in_per_mtok + completion_tokens * endpoint.price_out_per_mtok) / 1e6


def eos_token_ids(tokenizer, generation_config) -> list[int]:
    """Every token id that ends a generation: the tokenizer's EOS and the generation config's (an int or a list)."""
    ids = set()
    for cand in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(cand, int):
            ids.add(cand)
        elif isinstance(cand, (list, tuple)):
            ids.update(cand)
    return sorted(ids)


def trim_at_eos(ids: list[int], eos: list[int]) -> tuple[list[int], int, bool]:
    """(token ids kept, tokens counted, stopped at EOS): counts exclude the EOS, the kept ids include it
    (training needs it) and drop anything after it (padding). Both in-process backends count this way."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[:j + 1], j, True
    return ids, len(ids), False


def sampling_settings(sampling, generation_config) -> dict:
    """The sampling one call uses, the same in both in-process backends.

    temperature and top_p come from `sampling` (the params file sets them), top_k too when it sets
    one (RL rollouts set 0: the policy's own distribution, the one the trainer's logprobs describe);
    otherwise top_k, min_p and repetition_penalty come from the model's generation config, with
    transformers' defaults (top_k 50) where the config sets none, so vLLM samples like `model.generate`.
    """
    defaults = {"top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}
    out = {k: getattr(generation_config, k, None) for k in defaults}
    out = {k: d if out[k] is None else out[k] for k, d in defaults.items()}
    if getattr(sampling, "top_k", None) is not None:
        out["top_k"] = sampling.top_k
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, **out}


def model_generation_config(path: str):
    """The model folder's (or hub id's) transformers GenerationConfig; the one built from its config when it has none."""
    from transformers import AutoConfig, GenerationConfig  # heavy: transformers loads torch
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: transformers derives one from config.json the same way
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))


def free_accelerator_memory() -> None:
    """Collect garbage and hand cached CUDA memory back (after an engine, trainer or model is dropped)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # never start CUDA just to free nothing
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def close_generator(generator) -> None:
    """Close a generator (its engine shut down, its memory freed) before the next one starts."""
    close = getattr(generator, "close", None)
    if close is not None:
        close()
    free_accelerator_memory()


def release_trainer(trainer) -> None:
    """Drop a finished trainer's model, optimizer and colocated vLLM engine, and free accelerator memory.

    Call it after training in a notebook's kernel, before the next engine or model starts there.
    """
    vg = getattr(trainer, "vllm_generation", None)
    if getattr(vg, "llm", None) is not None:
        shutdown_vllm(vg.llm)
        vg.llm = None
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    for name in ("model", "model_wrapped", "optimizer", "lr_scheduler", "ref_model", "vllm_generation"):
        if getattr(trainer, name, None) is not None:
            setattr(trainer, name, None)
    free_accelerator_memory()


# ---------------------------------------------------------------- transformers
class SampledLogprobs:
    """A logits processor that records each generated token's logprob under log_softmax(logits / temperature)
    while `generate` runs, holding one step of logits at a time (not batch x length x vocabulary).

    transformers applies custom processors before its temperature / top-k / top-p warpers, so it sees
    the model's logits, the ones TRL's trainer computes its own logprobs from: the two are comparable.
    """

    def __init__(self, temperature: float):
        self.t = temperature if temperature and temperature > 0 else 1.0
        self.prev = None  # log-probabilities of the step whose token is not chosen yet
        self.steps: list = []

    def __call__(self, input_ids, scores):
        import torch  # heavy: torch loads only when a model runs
        if self.prev is not None:  # input_ids now ends with the token sampled from self.prev
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float() / self.t, dim=-1)
        return scores

    def result(self, sequences):
        """(batch, generated tokens) logprobs, once generate has returned its sequences."""
        import torch  # heavy: torch loads only when a model runs
        steps = self.steps + ([self.prev.gather(-1, sequences[:, -1:]).squeeze(-1)] if self.prev is not None else [])
        return torch.stack(steps, dim=1)


class TransformersGenerator:
    """Batched in-process generation with left padding; stops at EOS."""

    def __init__(self, endpoint, model=None, tokenizer=None):
        self.endpoint = endpoint
        self._owns_model = model is None  # a model passed in (e.g. the one being trained) is not ours to drop
        if model is None:
            tokenizer, model = load_model(endpoint.model, endpoint.device, endpoint.dtype)
        self.tokenizer, self.model = tokenizer, model
        self.tokenizer.padding_side = "left"
        self.synced_gpus = False  # sharded training (FSDP / ZeRO-3): every rank decodes until all ranks are done

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[dict]], sampling, thinking: bool = False) -> list[list[Completion]]:
        """n completions for each chat prompt."""
        texts = [render_prompt(self.tokenizer, m, thinking) for m in prompts]
        return self.generate_text(texts, sampling, thinking)

    def generate_text(self, texts: list[str], sampling, thinking: bool = False,
                      logprobs: bool = False) -> list[list[Completion]]:
        """n completions for each already-templated prompt string; `logprobs`: also each sampled token's
        logprob under the model's logits / temperature (what an RL trainer's ratio compares against)."""
        import torch  # heavy: torch loads only when a model runs
        flat = [t for t in texts for _ in range(sampling.n)]
        out: list[Completion] = []
        bs = max(1, self.endpoint.batch_size)
        # Sort by length so each batch pads little; restore order after.
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        results: dict[int, Completion] = {}
        eos = self._eos_ids()
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            enc = self.tokenizer([flat[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                          eos_token_id=eos, use_cache=True, synced_gpus=self.synced_gpus)
            if sampling.temperature > 0:
                kwargs.update(do_sample=True, **sampling_settings(sampling, self.model.generation_config))
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if self.endpoint.static_cache:
                kwargs["cache_implementation"] = "static"
            recorder = SampledLogprobs(sampling.temperature) if logprobs else None
            if recorder is not None:
                kwargs["logits_processor"] = [recorder]
            # FSDP2 keeps the unsharded parameters it gathers; made under inference mode they would be inference
            # tensors the next training forward cannot use, so a sharded model generates under no_grad.
            with torch.no_grad() if hasattr(self.model, "_get_fsdp_state") else torch.inference_mode():
                gen = self.model.generate(**enc, **kwargs)
            lps = recorder.result(gen) if recorder is not None else None
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                ids, n_new, stopped = trim_at_eos(new[row].tolist(), eos)
                text = self.tokenizer.decode(ids[:n_new], skip_special_tokens=True)
                reasoning, final, closed = split_thinking(text, thinking)
                p_tok = int(enc["attention_mask"][row].sum())
                results[i] = Completion(text, reasoning, final, closed, "stop" if stopped else "length",
                                        p_tok, n_new, cost_of(self.endpoint, p_tok, n_new), token_ids=ids,
                                        token_logprobs=lps[row, :len(ids)].tolist() if lps is not None else None)
        out = [results[i] for i in range(len(flat))]
        return [out[k * sampling.n:(k + 1) * sampling.n] for k in range(len(texts))]

    def _eos_ids(self) -> list[int]:
        return eos_token_ids(self.tokenizer, self.model.generation_config)

    def close(self) -> None:
        """Drop the model this generator loaded (not one it was handed) and free its accelerator memory."""
        if self._owns_model:
            self.model = None
        free_accelerator_memory()

    def next_token_probs(self, texts: list[str], candidates: list[str]) -> list[dict]:
        """Probability of each single-token candidate as the next token after each prompt text.

        Returns, per prompt, {"probs": {candidate: p renormalised over candidates}, "mass": total
        raw probability on the candidates}.
        """
        import torch  # heavy: torch loads only when a model runs
        cand_ids = []
        for c in candidates:
            ids = self.tokenizer.encode(c, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"candidate {c!r} is not a single token for this tokenizer ({ids})")
            cand_ids.append(ids[0])
        res = []
        bs = max(1, self.endpoint.batch_size)
        for start in range(0, len(texts), bs):
            enc = self.tokenizer(texts[start:start + bs], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                # only the last position's logits: the full (batch, length, vocab) tensor is large and unused
                logits = self.model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)[:, cand_ids]
            for row in probs:
                mass = float(row.sum())
                res.append({"probs": {c: float(p) / mass for c, p in zip(candidates, row)}, "mass": mass})
        return res


# ---------------------------------------------------------------- OpenAI-compatible HTTP
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
REDACTED = "[redacted]"


class EndpointError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted)."""


def _env(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    val = os.environ.get(name)
    if not val:
        raise EndpointError(f"{what}: environment variable {name} is not set")
    return val


def secret_values(extra: tuple = ()) -> list[str]:
    """The values of every `api_key_env` a loaded config names (config.SECRET_ENVS), plus `extra`, longest first."""
    found = {os.environ.get(name) for name in SECRET_ENVS} | set(extra)
    return sorted((v for v in found if v and len(v) >= 4), key=len, reverse=True)


def redact(text: str, extra: tuple = ()) -> str:
    """`text` with every configured secret and every `Bearer ...` token replaced: what a server echoes never
    reaches a notebook, a log or a results file."""
    for secret in secret_values(extra):
        text = text.replace(secret, REDACTED)
    return BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def call_deadline(endpoint) -> float:
    """Seconds one call may take in all (connect, every read, every retry and back-off): `deadline_s`, else
    (max_retries + 1) x timeout_s plus the longest back-off the retries can sleep."""
    if getattr(endpoint, "deadline_s", None) is not None:
        return float(endpoint.deadline_s)
    backoff = getattr(endpoint, "retry_backoff_s", 0.5)
    sleeps = sum(min(30.0, backoff * 2 ** a) * 1.5 for a in range(endpoint.max_retries))
    return (endpoint.max_retries + 1) * endpoint.timeout_s + sleeps


class OpenAIGenerator:
    """Async client for any OpenAI-compatible server (vLLM, SGLang, hosted APIs).

    Bounded concurrency, per-call timeout, retries with exponential back-off and jitter on
    timeouts, connection errors, 429 and 5xx. A call that still fails yields a Completion with
    `finish_reason="error"` and the reason, never an exception that loses the batch.

    One pooled `httpx.AsyncClient` and one concurrency bound per event loop, shared by every call
    made on that loop (`acomplete` from many coroutines, e.g. TRL's concurrent reward calls, reuse
    its connections). A blocking `generate` runs on a loop of its own and closes that loop's client
    when it returns; `aclose` / `close` (close_generator) close the others.
    """

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.base_url = (endpoint.base_url or _env(endpoint.base_url_env, "endpoint base URL") or "").rstrip("/")
        if not self.base_url:
            raise EndpointError(f"endpoint {endpoint.model!r}: set base_url or base_url_env")
        self._api_key = _env(endpoint.api_key_env, "endpoint API key") if endpoint.api_key_env else None
        if endpoint.api_key_env:
            SECRET_ENVS.add(endpoint.api_key_env)  # an Endpoint built in code, not from a params file
        self.stats = {"requests": 0, "retries": 0, "errors": 0, "clients": 0}
        self._pools: dict = {}  # event loop -> (httpx.AsyncClient, asyncio.Semaphore) used on that loop

    def _pool(self):
        """The client and concurrency bound of the running event loop (made on its first call)."""
        loop = asyncio.get_running_loop()
        for old in [lp for lp in list(self._pools) if lp.is_closed()]:  # a finished asyncio.run's client: drop it
            self._pools.pop(old, None)
        if loop not in self._pools:
            import httpx  # heavy: httpx (~0.1 s) loads only to call a server
            n = self.endpoint.max_concurrency
            self._pools[loop] = (httpx.AsyncClient(limits=httpx.Limits(max_connections=n)), asyncio.Semaphore(n))
            self.stats["clients"] += 1
        return self._pools[loop]

    async def aclose(self) -> None:
        """Close the running event loop's client (a later call on this loop opens a new one)."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool[0].aclose()

    def close(self) -> None:
        """Close the clients of loops that are not running; drop the rest (close_generator calls this)."""
        pools, self._pools = self._pools, {}
        for loop, (client, _) in pools.items():
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(client.aclose())

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _payload(self, messages: list[dict], sampling, extra: dict | None) -> tuple[str, dict]:
        ep = self.endpoint
        if ep.api == "responses":
            body = {"model": ep.model, "input": messages, "max_output_tokens": sampling.max_new_tokens,
                    "temperature": sampling.temperature, "top_p": sampling.top_p}
            if ep.reasoning_effort:
                body["reasoning"] = {"effort": ep.reasoning_effort}
            return "/responses", {**body, **ep.extra_body, **(extra or {})}
        body = {"model": ep.model, "messages": messages, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if ep.reasoning_effort:
            body["reasoning_effort"] = ep.reasoning_effort
        return "/chat/completions", {**body, **ep.extra_body, **(extra or {})}

    def _parse(self, data: dict, thinking: bool) -> Completion:
        if self.endpoint.api == "responses":
            text, reasoning = "", ""
            for item in data.get("output", []):
                if item.get("type") == "message":
                    text += "".join(c.get("text", "") for c in item.get("content", []))
                elif item.get("type") == "reasoning":
                    parts = item.get("content") or item.get("summary") or []
                    reasoning += "".join(c.get("text", "") for c in parts)
            usage = data.get("usage", {})
            p, c = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
            finish = "length" if data.get("status") == "incomplete" else "stop"
        else:
            ch = data["choices"][0]
            msg = ch.get("message", {})
            text = msg.get("content") or ""
            reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
            usage = data.get("usage") or {}
            p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            finish = "length" if ch.get("finish_reason") == "length" else "stop"
        r, final, closed = split_thinking(text, thinking and not reasoning, reasoning or None)
        if finish == "length" and thinking and not text.strip():
            closed = False  # ran out of budget while still reasoning
        return Completion(text, r, final, closed, finish, p, c, cost_of(self.endpoint, p, c))

    async def acomplete(self, messages: list[dict], sampling, thinking: bool = False,
                        extra: dict | None = None) -> Completion:
        """One completion of one chat prompt (`sampling.n` is ignored), retried as the endpoint says,
        under the generator's concurrency bound and within `call_deadline` (counted from the moment it
        holds a slot); a call that fails for good is an error Completion whose text names the endpoint."""
        client, sem = self._pool()
        path, body = self._payload(messages, sampling, extra)
        tried = {"attempts": 0, "last": "no attempt"}  # this call's progress, read when the deadline cuts it
        async with sem:
            deadline, t0 = call_deadline(self.endpoint), time.monotonic()
            try:
                async with asyncio.timeout(deadline):
                    done = await self._attempts(client, path, body, thinking, tried)
                if done is not None:
                    return done
                why = f"{tried['last']} (after {tried['attempts']} attempt(s))"
            except TimeoutError:
                why = (f"TimeoutError: no answer within the call's deadline of {deadline:.1f} s (stopped after "
                       f"{time.monotonic() - t0:.1f} s, {tried['attempts']} attempt(s), last: {tried['last']}); "
                       f"raise deadline_s / timeout_s if the server is just slow")
        self.stats["errors"] += 1
        return Completion("", finish_reason="error", think_closed=False,
                          error=self._redact(f"endpoint {self.endpoint.model!r} at {self.base_url}: {why}"))

    async def _attempts(self, client, path: str, body: dict, thinking: bool, tried: dict) -> Completion | None:
        """The retry loop of one call, each attempt bounded by timeout_s in all: the Completion, or None when every
        attempt failed (`tried` says how many and why the last did)."""
        ep = self.endpoint
        for attempt in range(ep.max_retries + 1):
            self.stats["requests"] += 1
            tried["attempts"] += 1
            if attempt == 0:
                tried["last"] = "the first attempt was still waiting for its whole answer"
            try:
                async with asyncio.timeout(ep.timeout_s):  # httpx's timeout is per read: a trickle never trips it
                    r = await client.post(self.base_url + path, json=body, headers=self._headers(), timeout=ep.timeout_s)
                if r.status_code == 200:
                    try:
                        return self._parse(r.json(), thinking)
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                        last = f"unparseable response ({type(e).__name__}: {str(e)[:80]}; body starts {r.text[:80]!r})"
                elif r.status_code in RETRY_STATUS:
                    last = f"HTTP {r.status_code}"
                else:
                    tried["last"] = self._redact(f"HTTP {r.status_code}: {r.text[:200]}")
                    return None
            except TimeoutError:
                last = f"TimeoutError: no whole answer within timeout_s {ep.timeout_s} s"
            except Exception as e:  # refused connections, dropped sockets, httpx's own timeouts
                last = f"{type(e).__name__}: {str(e)[:120]}"
            tried["last"] = self._redact(last)  # kept while the next attempt runs: the deadline may cut it
            if attempt < ep.max_retries:
                self.stats["retries"] += 1
                await asyncio.sleep(min(30.0, getattr(ep, "retry_backoff_s", 0.5) * 2 ** attempt) * (0.5 + random.random()))
        return None

    def _redact(self, text: str) -> str:
        """`redact` with this endpoint's own key too (an Endpoint built in code may name no params file)."""
        return redact(text, (self._api_key,) if self._api_key else ())

    async def agenerate(self, prompts: list[list[dict]], sampling, thinking: bool = False,
                        extra: dict | None = None) -> list[list[Completion]]:
        """n completions per prompt, all requests concurrently under the concurrency bound."""
        flat = await asyncio.gather(*(self.acomplete(m, sampling, thinking, extra)
                                      for m in prompts for _ in range(sampling.n)))
        return [flat[k * sampling.n:(k + 1) * sampling.n] for k in range(len(prompts))]

    def generate(self, prompts: list[list[dict]], sampling, thinking: bool = False,
                 extra: dict | None = None) -> list[list[Completion]]:
        """Blocking wrapper of `agenerate` (works inside a running Jupyter event loop too)."""
        return run_sync(self.closing(self.agenerate(prompts, sampling, thinking, extra)))

    async def closing(self, coro):
        """Await `coro`, then close this loop's client: for a blocking call whose event loop ends with it."""
        try:
            return await coro
        finally:
            await self.aclose()


def run_sync(coro):
    """Run a coroutine to completion from sync code, also when an event loop is running (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ---------------------------------------------------------------- vLLM (GPU only)
class VLLMGenerator:
    """In-process vLLM engine; imported lazily because vLLM has no CPU wheel.

    Samples like TransformersGenerator (`sampling_settings`: top_k etc. from the model's generation
    config), with a per-call seed drawn from Python's `random` (which the scaffolds seed), and counts
    completion tokens without the EOS while keeping it in `token_ids` (`trim_at_eos`).
    """

    def __init__(self, endpoint, llm=None, tokenizer=None, generation_config=None):
        """Start an engine for endpoint.model, or wrap a running one (`llm`, e.g. TRL's colocated engine)."""
        self.endpoint = endpoint
        self._owns_engine = llm is None  # TRL's colocated engine is TRL's to shut down, not ours
        path = None
        if llm is None:
            try:
                from vllm import LLM  # optional: vLLM, the [gpu] extra
            except ImportError as e:
                raise ImportError("backend 'vllm' needs vLLM on a GPU machine: install the `gpu` extra "
                                  "(see environment.yml) or use backend 'transformers'") from e
            path = resolve_model(endpoint.model)
            llm = LLM(model=path, **endpoint.vllm)
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        if generation_config is None:
            path = path or getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "model", None)
            if path:
                generation_config = model_generation_config(path)
            else:
                from transformers import GenerationConfig  # heavy: transformers loads torch
                generation_config = GenerationConfig()  # unknown model: transformers' defaults, as generate() uses
        self.generation_config = generation_config
        self.eos = eos_token_ids(self.tokenizer, generation_config)

    def generate(self, prompts: list[list[dict]], sampling, thinking: bool = False) -> list[list[Completion]]:
        """n completions for each chat prompt."""
        texts = [render_prompt(self.tokenizer, m, thinking) for m in prompts]
        return self.generate_text(texts, sampling, thinking)

    def sampling_params(self, sampling, logprobs: bool = False):
        """vLLM SamplingParams for one call: `sampling_settings` plus a seed from Python's `random`;
        `logprobs`: also each sampled token's logprob (logprobs=0)."""
        from vllm import SamplingParams  # optional: vLLM, the [gpu] extra
        settings = sampling_settings(sampling, self.generation_config)
        if sampling.temperature <= 0:  # greedy, as the transformers backend (top_k/top_p unused)
            settings.update(temperature=0.0, top_p=1.0, top_k=0)
        return SamplingParams(n=sampling.n, max_tokens=sampling.max_new_tokens, seed=random.getrandbits(31),
                              logprobs=0 if logprobs else None, **settings)

    def generate_text(self, texts: list[str], sampling, thinking: bool = False,
                      logprobs: bool = False) -> list[list[Completion]]:
        """n completions for each already-templated prompt string (`logprobs`: with the sampler's token logprobs)."""
        if self.llm is None:
            raise RuntimeError("this VLLMGenerator was closed: make a new one with make_generator")
        outs = self.llm.generate(texts, self.sampling_params(sampling, logprobs), use_tqdm=False)
        res = []
        for o in outs:
            p = len(o.prompt_token_ids)
            group = []
            for c in o.outputs:
                ids, n, _ = trim_at_eos(list(c.token_ids), self.eos)
                r, final, closed = split_thinking(c.text, thinking)
                group.append(Completion(c.text, r, final, closed, "length" if c.finish_reason == "length" else "stop",
                                        p, n, cost_of(self.endpoint, p, n), token_ids=ids,
                                        token_logprobs=vllm_token_logprobs(c)[:len(ids)] if logprobs else None))
            res.append(group)
        return res

    def close(self) -> None:
        """Shut the engine down (when this generator started it) and free its accelerator memory."""
        llm, self.llm = self.llm, None
        if llm is not None and self._owns_engine:
            shutdown_vllm(llm)
        free_accelerator_memory()


def shutdown_vllm(llm) -> None:
    """Shut a vllm.LLM down: its engine core (weights, KV cache) first, then vLLM's process groups here."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()  # stops the engine-core process that holds the weights and the KV cache
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # optional: vLLM, the [gpu] extra
    except ImportError:
        return
    cleanup_dist_env_and_memory()


def vllm_token_logprobs(output) -> list:
    """The sampled tokens' logprobs from a vLLM CompletionOutput generated with logprobs=0: its
    `logprobs` holds one {token_id: Logprob} dict per generated token (None where vLLM had none)."""
    if output.logprobs is None:
        raise ValueError("vLLM returned no logprobs: generate with SamplingParams(logprobs=0)")
    out = []
    for tok, d in zip(output.token_ids, output.logprobs):
        lp = d.get(tok) if d else None
        out.append(None if lp is None else float(lp.logprob))
    return out


def make_generator(endpoint, model=None, tokenizer=None):
    """Build the generator an Endpoint asks for (pass model/tokenizer to reuse a loaded model)."""
    if endpoint.backend == "transformers":
        return TransformersGenerator(endpoint, model, tokenizer)
    if endpoint.backend == "openai":
        return OpenAIGenerator(endpoint)
    if endpoint.backend == "vllm":
        return VLLMGenerator(endpoint)
    raise ValueError(f"unknown backend {endpoint.backend!r}: use transformers, openai or vllm")


@dataclass
class Timer:
    """Wall-clock timer for metrics (`with Timer() as t: ...; t.seconds`)."""
    seconds: float = 0.0

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t
