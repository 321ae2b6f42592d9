"""Grading proofs with an LLM judge: the judge prompts, the Grader (concurrent, cached, retried), score-probability mode.

Used by notebooks 01_distill (grading teacher proofs), 03_rubric_rl and 04_reasoning_cache_rl (the
reward) and 05_eval (benchmarks, judge calibration). What a judge's answer means (the `Grade`,
the score-tag parser, the no-proof and short-answer rules) lives in qedlib.verdicts; this module
asks the judge and turns its answers into grades with those rules.

Modes (`judge.mode`): "text" generates an assessment and parses the score tag of the judge's
answer (`verdicts.parse_score`); "score_prob" ends the prompt at the opening score tag and takes
the expected score under the judge's next-token distribution over the allowed values (in-process
logits, or `logprobs` of an OpenAI-compatible server such as vLLM). Grades are cached on disk by
a sha256 of (judge settings, filled prompt), so a rerun never pays twice. Several different
numeric tags in one answer are counted (`stats["conflicting_tags"]`) and logged as a warning.

No proof, no grade call: a completion whose thinking never closed, or with nothing after
`</think>`, gets a VALID grade of 0 (`verdicts.no_proof_grade`), so RL, distillation and
evaluation treat it alike. Short answers (`judge.prompt: answer`) go through
`verdicts.check_answer` first; the judge sees only what it cannot decide, and its verdict is
binary in every mode (points 7 or 0; in score_prob mode P(equivalent) >= 0.5, kept in `p_correct`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from . import prompts as P
from .problem_sets import Problem
from .generation import Completion, OpenAIGenerator, make_generator, render_prompt, run_sync
from .files import JsonlLog
from .verdicts import (INVALID_REASONS, PARSER_VERSION, RETRYABLE, SCALE, Grade, binary_answer_grade, check_answer,
                       combine_points, extract_boxed, invalid_grade, no_proof_grade, no_proof_reason, parse_score,
                       conflicting_tag_values)
from .config import Endpoint, build

log = logging.getLogger(__name__)

def _endpoint_of(e):
    """An Endpoint from a panel entry (a dict of Endpoint fields, validated, or an Endpoint)."""
    return e if isinstance(e, Endpoint) else build(Endpoint, e, "judge.panel")


# ---------------------------------------------------------------- prompts per judge kind
@dataclass
class GradingPrompt:
    """A filled judge prompt plus how to read the answer."""
    text: str  # the filled user message
    tag: str  # score | points
    allowed: tuple  # values the judge may give, in its own units
    factor: float  # judge units -> points out of 7 (answer: 1 -> 7)
    prefix: str  # assistant text the prompt ends with in score_prob mode


def build_prompt(kind: str, mode: str, problem: Problem, proof: str) -> GradingPrompt:
    """Fill the judge template for `kind` (rubric | proofbench | answer) and `mode` (text | score_prob)."""
    suffix = "prob" if mode == "score_prob" else "text"
    try:
        if kind == "rubric":
            if not problem.rubric:
                raise P.PromptError("the problem has no rubric; write rubrics first (distill.write_rubrics: true) "
                                    "or map the dataset's rubric column")
            fields = dict(problem=problem.problem, rubric=problem.rubric, proof=proof,
                          response_format=P.response_format(f"score_{suffix}"))
            name = "grade_rubric"
            if problem.reference_solution:
                name, fields["reference_solution"] = "grade_rubric_reference", problem.reference_solution
            return GradingPrompt(P.fill(name, **fields), "score", tuple(range(SCALE + 1)), 1.0, "<score>")
        if kind == "proofbench":
            text = P.fill("grade_proofbench", problem=problem.problem, reference_solution=problem.reference_solution,
                          guidelines=problem.rubric, proof=proof, response_format=P.response_format(f"points_{suffix}"))
            return GradingPrompt(text, "points", (0, 1, 6, 7), 1.0, "<points>")
        if kind == "answer":
            text = P.fill("grade_answer", problem=problem.problem, reference_answer=problem.answer, response=proof,
                          response_format=P.response_format(f"answer_{suffix}"))
            return GradingPrompt(text, "score", (0, 1), float(SCALE), "<score>")
    except P.PromptError as e:
        raise P.PromptError(f"problem {problem.id!r}, judge prompt {kind!r}: {e}") from None
    raise ValueError(f"unknown judge prompt {kind!r}: use rubric, proofbench or answer")


def expected_from_probs(probs: dict, allowed: tuple, factor: float) -> tuple[float, dict, float]:
    """Expected points from raw candidate probabilities -> (points, renormalised probs, mass)."""
    mass = sum(probs.get(str(a), 0.0) for a in allowed)
    norm = {str(a): probs.get(str(a), 0.0) / mass for a in allowed}
    return factor * sum(a * norm[str(a)] for a in allowed), norm, mass


def probs_from_logprobs(logprobs, allowed: tuple) -> dict | None:
    """Candidate -> probability from an OpenAI-style `logprobs` object of the first generated token."""
    if not logprobs:
        return None
    top = None
    if isinstance(logprobs, dict) and logprobs.get("content"):  # chat completions
        first = logprobs["content"][0]
        top = {t["token"]: t["logprob"] for t in first.get("top_logprobs") or []}
        top.setdefault(first.get("token", ""), first.get("logprob", -math.inf))
    elif isinstance(logprobs, dict) and logprobs.get("top_logprobs"):  # legacy completions
        top = logprobs["top_logprobs"][0]
    if not top:
        return None
    out: dict[str, float] = {}
    for tok, lp in top.items():
        t = tok.strip()
        if t in {str(a) for a in allowed} and lp is not None and lp > -math.inf:
            out[t] = out.get(t, 0.0) + math.exp(lp)
    return out


@dataclass
class _ProbCompletion(Completion):
    """A Completion that keeps the server's `logprobs` object."""
    logprobs: Optional[dict] = None


class _LogprobClient(OpenAIGenerator):
    """OpenAIGenerator that keeps the first choice's `logprobs` (score_prob mode over HTTP)."""

    def _parse(self, data: dict, thinking: bool) -> Completion:
        c = super()._parse(data, thinking)
        lp = (data.get("choices") or [{}])[0].get("logprobs")
        return _ProbCompletion(**{f.name: getattr(c, f.name) for f in dataclasses.fields(Completion)}, logprobs=lp)


# ---------------------------------------------------------------- the grader
@dataclass
class _Job:
    index: int  # which proof
    sample: int  # which of judge.samples
    attempt: int  # 0, then retries when judge.invalid == "retry"
    prompt: GradingPrompt
    key: str = ""
    grade: Grade | None = None


class Grader:
    """Grades proofs with one judge (`config.Judge`), concurrently, with an on-disk cache.

    `generator` reuses an already-built generator (e.g. the in-process policy or teacher);
    otherwise one is made from `judge.endpoint` on first use.
    """

    def __init__(self, judge, cache_dir: str | Path | None = None, generator=None):
        if judge.prompt not in ("rubric", "proofbench", "answer"):
            raise ValueError(f"judge.prompt={judge.prompt!r}: use rubric, proofbench or answer")
        if judge.mode not in ("text", "score_prob"):
            raise ValueError(f"judge.mode={judge.mode!r}: use text or score_prob")
        self.judge = judge
        self._generator = generator
        self._logprob_client: _LogprobClient | None = None  # score_prob over HTTP: made once, its connections reused
        self._lock = threading.Lock()
        self.cache = JsonlLog(Path(cache_dir) / "grades.jsonl", key="key") if cache_dir and judge.cache else None
        # A panel of judges: each extra endpoint is a Grader of its own (own cache key space via settings).
        self.panel = [Grader(replace(judge, endpoint=_endpoint_of(e), panel=[]), cache_dir) for e in judge.panel]
        self.stats = {"calls": 0, "cache_hits": 0, "grades": 0, "conflicting_tags": 0,
                      "no_proof": {"truncated": 0, "empty": 0, "no_answer": 0},
                      "answers": {"exact": 0, "math-verify": 0, "judge": 0, "undecided": 0},
                      "invalid": {r: 0 for r in INVALID_REASONS}, "prompt_tokens": 0, "completion_tokens": 0,
                      "cost": 0.0}

    # -- settings and cache
    def settings(self) -> dict:
        """What a cached grade depends on besides the filled prompt."""
        j, ep = self.judge, self.judge.endpoint
        return {"model": ep.model, "backend": ep.backend, "api": ep.api, "reasoning_effort": ep.reasoning_effort,
                "extra_body": ep.extra_body, "prompt": j.prompt, "mode": j.mode, "parser": PARSER_VERSION,
                "sampling": {"temperature": j.sampling.temperature, "top_p": j.sampling.top_p,
                             "max_new_tokens": j.sampling.max_new_tokens}}

    def cache_key(self, prompt_text: str, sample: int = 0, attempt: int = 0) -> str:
        """sha256 of (judge settings, filled prompt, sample and retry index)."""
        blob = json.dumps({"judge": self.settings(), "prompt": prompt_text, "sample": sample, "attempt": attempt},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _store(self, job: _Job) -> None:
        g = job.grade
        self.stats["calls"] += 1
        self.stats["prompt_tokens"] += g.prompt_tokens
        self.stats["completion_tokens"] += g.completion_tokens
        self.stats["cost"] += g.cost
        # A judge error (timeout, 5xx, dead server) was not a real answer: do not cache it.
        if self.cache is not None and g.reason != "judge_error":
            with self._lock:
                self.cache.append({"key": job.key, "grade": g.to_dict()})

    @property
    def generator(self):
        """The judge's generator (built from judge.endpoint on first use)."""
        if self._generator is None:
            self._generator = make_generator(self.judge.endpoint)
        return self._generator

    # -- one answer -> one grade
    def _grade_text(self, c: Completion, gp: GradingPrompt) -> Grade:
        usage = dict(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, cost=c.cost)
        if c.finish_reason == "error" or c.error:
            return invalid_grade("judge_error", c.error or "judge call failed", judge_text=c.text, method="judge-text", **usage)
        answer = c.final if c.think_closed else ""
        pts, reason = parse_score(answer, SCALE, gp.allowed, gp.tag, prompt=gp.text)
        if reason:
            detail = "the judge's thinking never closed" if not c.think_closed else f"could not read a {gp.tag} tag"
            return invalid_grade(reason, detail, judge_text=c.text, method="judge-text", **usage)
        detail = ""
        conflict = conflicting_tag_values(answer, gp.tag, gp.text)
        if conflict:  # the last tag is the verdict; earlier ones are quotes or second thoughts
            with self._lock:
                self.stats["conflicting_tags"] += 1
            detail = f"several {gp.tag} values {conflict}: the last one counts"
            log.warning("judge answer with %s; graded %s", detail, pts)
        return Grade(True, pts * gp.factor, judge_text=c.text, method="judge-text", detail=detail, **usage)

    def _grade_probs(self, probs: dict | None, gp: GradingPrompt, usage: dict, detail_if_none: str) -> Grade:
        if probs is None:
            return invalid_grade("judge_error", detail_if_none, method="judge-prob", **usage)
        if sum(probs.values()) <= 0:
            return invalid_grade("judge_error", f"no probability on any allowed value {gp.allowed}", method="judge-prob", **usage)
        pts, norm, mass = expected_from_probs(probs, gp.allowed, gp.factor)
        return Grade(True, pts, mass=mass, probs=norm, method="judge-prob",
                     detail=f"expected score over {gp.allowed}; mass on allowed values {mass:.3f}", **usage)

    # -- judge calls for a list of jobs
    async def _run_jobs(self, jobs: list[_Job]) -> None:
        gen = self.generator
        if self.judge.mode == "text":
            await self._run_text(gen, jobs)
        else:
            await self._run_prob(gen, jobs)

    def _messages(self, gp: GradingPrompt) -> list[dict]:
        return [{"role": "user", "content": gp.text}]

    def _sampling(self, max_new_tokens: int | None = None):
        return dataclasses.replace(self.judge.sampling, n=1,
                                   **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))

    async def _run_http(self, client_gen: OpenAIGenerator, jobs: list[_Job], sampling, extra: dict | None,
                        messages_of, to_grade) -> None:
        """Every job concurrently under the endpoint's bound; each grade is cached the moment it arrives."""
        async def one(job: _Job):
            c = await client_gen.acomplete(messages_of(job), sampling, False, extra)
            job.grade = to_grade(c, job)
            self._store(job)
        await asyncio.gather(*(one(j) for j in jobs))

    async def _run_text(self, gen, jobs: list[_Job]) -> None:
        sampling = self._sampling()
        if isinstance(gen, OpenAIGenerator):
            await self._run_http(gen, jobs, sampling, None, lambda j: self._messages(j.prompt),
                                 lambda c, j: self._grade_text(c, j.prompt))
            return
        for chunk in _chunks(jobs, _chunk_size(gen)):  # cache each batch as soon as it is graded
            outs = await asyncio.to_thread(gen.generate, [self._messages(j.prompt) for j in chunk], sampling, False)
            for job, group in zip(chunk, outs):
                job.grade = self._grade_text(group[0], job.prompt)
                self._store(job)

    async def _run_prob(self, gen, jobs: list[_Job]) -> None:
        if isinstance(gen, OpenAIGenerator):
            if isinstance(gen, _LogprobClient):
                client = gen
            else:
                client = self._logprob_client = self._logprob_client or _LogprobClient(gen.endpoint)
            extra = {"logprobs": True, "top_logprobs": 20, "continue_final_message": True,
                     "add_generation_prompt": False}
            sampling = dataclasses.replace(self.judge.sampling, n=1, max_new_tokens=1, temperature=1.0, top_p=1.0)

            def to_grade(c, job):
                usage = dict(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, cost=c.cost)
                if c.finish_reason == "error" or c.error:
                    return invalid_grade("judge_error", c.error or "judge call failed", method="judge-prob", **usage)
                g = self._grade_probs(probs_from_logprobs(getattr(c, "logprobs", None), job.prompt.allowed), job.prompt,
                                      usage, "the server returned no logprobs: score_prob over HTTP needs a server that "
                                      "supports logprobs/top_logprobs and continue_final_message (vLLM does); "
                                      "use mode: text for this judge")
                g.judge_text = c.text
                return g
            await self._run_http(client, jobs, sampling, extra,
                                 lambda j: self._messages(j.prompt) + [{"role": "assistant", "content": j.prompt.prefix}],
                                 to_grade)
            return
        texts = [render_prompt(gen.tokenizer, self._messages(j.prompt), False) + j.prompt.prefix for j in jobs]
        by_allowed: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            by_allowed.setdefault(j.prompt.allowed, []).append(i)
        for allowed, all_idx in by_allowed.items():
            cands = [str(a) for a in allowed]
            for idx in _chunks(all_idx, _chunk_size(gen)):  # cache each batch as soon as it is graded
                batch = [texts[i] for i in idx]
                if hasattr(gen, "next_token_probs"):
                    res = await asyncio.to_thread(gen.next_token_probs, batch, cands)
                elif hasattr(gen, "llm"):
                    res = await asyncio.to_thread(_vllm_next_token_probs, gen, batch, cands)
                else:
                    raise TypeError(f"score_prob mode needs next-token probabilities; {type(gen).__name__} has none")
                for i, r in zip(idx, res):
                    n_tok = len(gen.tokenizer(texts[i], add_special_tokens=False)["input_ids"])
                    raw = {c: p * r["mass"] for c, p in r["probs"].items()}
                    jobs[i].grade = self._grade_probs(raw, jobs[i].prompt, dict(prompt_tokens=n_tok), "")
                    self._store(jobs[i])

    # -- public
    async def agrade(self, problems: list[Problem], proofs: list[str], closed: list[bool] | None = None) -> list[Grade]:
        """Grade proofs[i] of problems[i] concurrently; every proof gets a valid or invalid Grade.

        With a panel (`judge.panel`), every judge grades every proof and the grades are combined
        per proof (`judge.combine`), the spread recorded.
        """
        if not self.panel:
            grades = await self._agrade_one_judge(problems, proofs, closed)
        else:
            per_judge = await asyncio.gather(self._agrade_one_judge(problems, proofs, closed),
                                             *[g.agrade(problems, proofs, closed) for g in self.panel])
            grades = [self._combine(list(gs)) for gs in zip(*per_judge)]
        return [binary_answer_grade(g) for g in grades] if self.judge.prompt == "answer" else grades

    async def _agrade_one_judge(self, problems: list[Problem], proofs: list[str],
                                closed: list[bool] | None = None) -> list[Grade]:
        if len(problems) != len(proofs) or (closed is not None and len(closed) != len(proofs)):
            raise ValueError(f"agrade: {len(problems)} problems, {len(proofs)} proofs"
                             f"{'' if closed is None else f', {len(closed)} closed flags'}: they must match")
        j = self.judge
        final: list[Grade | None] = [None] * len(proofs)
        per_proof: dict[int, list[_Job]] = {}
        pending: list[_Job] = []
        samples = 1 if j.mode == "score_prob" else max(1, j.samples)  # score_prob is deterministic
        for i, (prob, proof) in enumerate(zip(problems, proofs)):
            proof = proof or ""
            why = no_proof_reason(proof, closed is None or closed[i])
            if why is None and j.prompt == "answer" and prob.answer:
                verdict, how = check_answer(prob.answer, proof)
                if how == "no_answer":
                    why = how
                elif verdict is not None:
                    self.stats["answers"][how] += 1
                    final[i] = Grade(True, float(SCALE if verdict else 0), method=how,
                                     detail=f"{how}: {'equivalent' if verdict else 'not equivalent'} to {prob.answer!r}")
                    continue
                elif not j.answer_judge:
                    self.stats["answers"]["undecided"] += 1
                    final[i] = invalid_grade("answer_undecided", "exact match and math-verify cannot decide this "
                                             "answer and judge.answer_judge is off", method="none")
                    continue
                else:
                    self.stats["answers"]["judge"] += 1
                    proof = f"\\boxed{{{extract_boxed(proof.rpartition('</think>')[2])}}}"  # the judge sees the answer only
            if why is not None:
                self.stats["no_proof"][why] += 1
                final[i] = no_proof_grade(why)
                continue
            gp = build_prompt(j.prompt, j.mode, prob, proof)  # raises before any judge call on a bad problem
            per_proof[i] = [_Job(i, s, 0, gp) for s in range(samples)]
            pending += per_proof[i]
        attempt = 0
        while pending:
            todo = []
            for job in pending:
                job.key = self.cache_key(job.prompt.text, job.sample, job.attempt)
                rec = self.cache.records.get(job.key) if self.cache is not None else None
                if rec is not None:
                    job.grade = dataclasses.replace(Grade.from_dict(rec["grade"]), cached=True)
                    self.stats["cache_hits"] += 1
                else:
                    todo.append(job)
            if todo:
                await self._run_jobs(todo)
            attempt += 1
            if j.invalid != "retry" or attempt > j.retries_on_invalid:
                break
            retry = [jb for jb in pending if not jb.grade.valid and jb.grade.reason in RETRYABLE]
            pending = []
            for jb in retry:
                new = _Job(jb.index, jb.sample, attempt, jb.prompt)
                per_proof[jb.index][jb.sample] = new
                pending.append(new)
        for i, jobs in per_proof.items():
            final[i] = self._combine([jb.grade for jb in jobs])
        for g in final:
            self.stats["grades"] += 1
            if not g.valid:
                self.stats["invalid"][g.reason] += 1
        return final

    def _combine(self, grades: list[Grade]) -> Grade:
        if len(grades) == 1:
            return grades[0]
        valid = [g for g in grades if g.valid]
        usage = dict(prompt_tokens=sum(g.prompt_tokens for g in grades),
                     completion_tokens=sum(g.completion_tokens for g in grades), cost=sum(g.cost for g in grades))
        samples = [g.points if g.valid else None for g in grades]
        text = "\n\n".join(f"--- sample {k} ---\n{g.judge_text}" for k, g in enumerate(grades))
        cached = all(g.cached for g in grades)
        if not valid:
            reason = Counter(g.reason for g in grades).most_common(1)[0][0]
            return invalid_grade(reason, f"all {len(grades)} samples invalid", judge_text=text, samples=samples,
                                 cached=cached, method=grades[0].method, **usage)
        pts, spread = combine_points([g.points for g in valid], self.judge.combine)
        return Grade(True, pts, judge_text=text, samples=samples, spread=spread, cached=cached, method=grades[0].method,
                     detail=f"{self.judge.combine} of {len(valid)}/{len(grades)} valid samples", **usage)

    def grade(self, problems: list[Problem], proofs: list[str], closed: list[bool] | None = None) -> list[Grade]:
        """Blocking `agrade` (works inside Jupyter's running loop too)."""
        return run_sync(self._closing(self.agrade(problems, proofs, closed)))

    async def _closing(self, coro):
        # A blocking grade runs on an event loop of its own: close the HTTP clients it opened there.
        try:
            return await coro
        finally:
            for g in [self, *self.panel]:
                for gen in (g._generator, g._logprob_client):
                    if isinstance(gen, OpenAIGenerator):
                        await gen.aclose()


def _chunks(items: list, size: int):
    """Consecutive slices of `items` of length `size`."""
    for k in range(0, len(items), size):
        yield items[k:k + size]


def _chunk_size(gen) -> int:
    """Prompts per in-process judge call: a few forward batches, so the cache fills as grading goes."""
    return 4 * max(1, getattr(getattr(gen, "endpoint", None), "batch_size", 8))


def _vllm_next_token_probs(gen, texts: list[str], candidates: list[str]) -> list[dict]:
    """Next-token probabilities of single-token candidates from an in-process vLLM engine (top-20 logprobs)."""
    from vllm import SamplingParams  # optional: vLLM, the [gpu] extra
    outs = gen.llm.generate(texts, SamplingParams(max_tokens=1, temperature=1.0, logprobs=20))
    res = []
    for o in outs:
        top = o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}
        probs = {c: 0.0 for c in candidates}
        for lp in top.values():
            tok = (lp.decoded_token or "").strip()
            if tok in probs:
                probs[tok] += math.exp(lp.logprob)
        mass = sum(probs.values())
        res.append({"probs": {c: (p / mass if mass else 0.0) for c, p in probs.items()}, "mass": mass})
    return res


def grade_completions(grader: Grader, problems: list[Problem], completions: list[Completion]) -> list[Grade]:
    """Grade each completion's final proof; unclosed thinking or an empty final makes no judge call."""
    return grader.grade(problems, [c.final for c in completions], [c.think_closed for c in completions])


# ---------------------------------------------------------------- faults: a failed call is never a result
class InvalidRateError(RuntimeError):
    """A stage stopped because too many of its calls failed or gave no valid grade (the endpoint is named)."""


def describe_endpoint(endpoint) -> str:
    """The endpoint as a reader can find it: backend, model, and where its URL comes from (never a key)."""
    if endpoint is None:
        return "reward checker (no endpoint: answers checked in-process)"
    where = ""
    if endpoint.backend == "openai":
        where = f" at ${endpoint.base_url_env}" if endpoint.base_url_env else f" at {endpoint.base_url}"
    return f"{endpoint.backend} model {endpoint.model!r}{where}"


def check_invalid_rate(what: str, endpoint, failed: int, attempted: int, limit: float, key: str,
                       first_error: str | None = None) -> None:
    """Stop the stage (InvalidRateError) when failed / attempted passes `limit` (the params key `key`)."""
    if attempted and failed / attempted > limit:
        first = f" (first error: {first_error})" if first_error else ""
        raise InvalidRateError(
            f"{what}: {failed} of {attempted} calls to the {describe_endpoint(endpoint)} failed or gave no valid "
            f"grade ({failed / attempted:.0%} > {key} = {limit:g}){first}. Stopped before writing anything from "
            f"them; the previous output is left as it was. Fix the endpoint and rerun: finished records are kept "
            f"and only the missing ones are redone.")


# fields a problem needs for each judge prompt (and for the verifiable answer reward)
NEEDED_FIELDS = {"rubric": ("rubric",), "proofbench": ("rubric", "reference_solution"), "answer": ("answer",)}


def check_gradable(problems: list, reward: str, judge_prompt: str, where: str, section: str) -> None:
    """Fail before any training when a problem lacks what its reward needs (a rubric for the judge's rubric
    prompt, an answer for the answer reward), naming the file, the row and the fix."""
    need = NEEDED_FIELDS[judge_prompt] if reward == "judge" else ("answer",) if reward == "answer" else ()
    for row, p in enumerate(problems):
        missing = [f for f in need if not getattr(p, f)]
        if missing:
            raise ValueError(
                f"{where}: row {row} (problem {p.id!r}) has no {' / '.join(missing)}, which {section}.reward = "
                f"{reward!r}" + (f" with judge prompt {judge_prompt!r}" if reward == "judge" else "") + " needs: map the "
                f"column in {section}.problems.columns, fix or remove that row, or choose another reward. Nothing was trained.")
