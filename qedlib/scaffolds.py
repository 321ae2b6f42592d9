"""Test-time scaffolds: single pass, reasoning cache, self-check, RSA, DeepSeek-Math-style refinement, Nomos.

Used by notebooks/05_eval.ipynb through qedlib.stages.evaluation. Every scaffold takes a batch of
problems and a policy generator (generation.make_generator) and returns one `ScaffoldResult` per
problem: the final proof, whether it exists (thinking closed), and the calls, tokens and cost it
took. Each step is batched over all problems still running. Defaults are the paper's (RECIPE,
stage 5); a per-problem budget (`max_calls`, `max_tokens`) stops a scaffold early, keeping its
best proof so far. The prompts are qedlib/prompt_templates/scaffold_*.md (our wording); the proof prompt
is the one RL trained on (qedlib.proof_chat), and "rc" calls reasoning_cache.rc_rollout, the same
loop RC-RL trains with.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

from .generation import Completion, cost_of
from .proof_chat import proof_messages
from .prompts import fill
from .reasoning_cache import rc_rollout
from .verdicts import SCALE, parse_score

SCAFFOLDS = ["single", "rc", "self_check", "rsa", "dsm", "nomos"]


@dataclass
class ScaffoldSettings:
    """Knobs of every scaffold (built from EvalConfig by `settings_from_config`)."""
    thinking: bool = True  # open <think>; the proof is the text after </think>
    task: str = "proof"  # "proof" or "answer" (final \\boxed{} answer)
    max_calls: Optional[int] = None  # per problem: model calls
    max_tokens: Optional[int] = None  # per problem: generated tokens
    self_check_passes: int = 5
    self_check_failures: int = 10
    self_check_pass_score: int = 6
    rsa_population: int = 8
    rsa_merge: int = 3
    rsa_rounds: int = 3
    dsm_proofs: int = 4
    dsm_verifications: int = 4
    dsm_rounds: int = 2
    nomos_samples: int = 16
    nomos_keep: int = 4
    nomos_consolidated: int = 4
    rc: object = None  # config.RCSettings for the "rc" scaffold


@dataclass
class ScaffoldResult:
    """What a scaffold produced for one problem, and what it cost."""
    final: str = ""  # the proof to grade ("" when there is none)
    think_closed: bool = False  # False: the chosen generation never closed its thinking
    finish_reason: str = ""  # of the generation that produced `final`
    reasoning: str = ""  # that generation's reasoning
    calls: int = 0  # model calls spent on this problem
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated tokens, every call included (tokens per problem)
    cost: float = 0.0  # USD under the policy endpoint's prices
    budget_hit: bool = False  # stopped early by max_calls / max_tokens
    trace: list = field(default_factory=list)  # small per-step notes (scores, choices, summaries)

    def charge(self, c) -> None:
        """Add one Completion's usage."""
        self.calls += 1
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.cost += c.cost

    def take(self, c) -> None:
        """Make Completion `c` the current answer."""
        self.final, self.think_closed, self.finish_reason, self.reasoning = c.final, c.think_closed, c.finish_reason, c.reasoning

    def to_dict(self) -> dict:
        """Plain dict of every field (what generations.jsonl stores)."""
        return asdict(self)


def settings_from_config(ev, task: str = "proof", thinking: bool = True) -> ScaffoldSettings:
    """ScaffoldSettings from a config.EvalConfig (its rc section and scaffold knobs) and the run's thinking switch."""
    names = [f for f in ScaffoldSettings.__dataclass_fields__ if hasattr(ev, f) and f not in ("task", "thinking")]
    return ScaffoldSettings(task=task, thinking=thinking, **{n: getattr(ev, n) for n in names})


# ---------------------------------------------------------------- prompts
def solve_messages(problem: str, task: str = "proof") -> list[dict]:
    """The policy's first prompt: the RL proof prompt, or the boxed-answer prompt for answer benchmarks."""
    if task == "answer":
        return [{"role": "user", "content": fill("scaffold_answer", problem=problem)}]
    return proof_messages(problem)


def _user(name: str, **fields) -> list[dict]:
    return [{"role": "user", "content": fill(name, **fields)}]


def parse_tag(text: str, tag: str) -> Optional[str]:
    """Content of the last <tag>...</tag> in text (None when absent)."""
    found = re.findall(rf"<{tag}>\s*(.*?)\s*</{tag}>", text or "", flags=re.S)
    return found[-1] if found else None


def verify_score(c, messages: list[dict]) -> Optional[int]:
    """The 0-7 rating of a self-verification answer `c` to `messages`, read by the judge's rules
    (`verdicts.parse_score`: the last numeric `<score>` tag, an echo of the prompt ignored); None when
    missing or not an integer 0-7."""
    points, _ = parse_score(c.final or c.text, SCALE, tag="score", prompt=messages[-1]["content"])
    return None if points is None else int(points)


def parse_choice(text: str) -> Optional[str]:
    """'A' or 'B' from `<choice>X</choice>`, None otherwise."""
    raw = (parse_tag(text, "choice") or "").strip().upper()
    return raw if raw in ("A", "B") else None


def _answer_text(c) -> str:
    # What a verifier/merger reads of a generation: the final proof, or the cut-off reasoning.
    return c.final if c.think_closed and c.final else "(no final proof: the attempt was cut off)\n" + (c.reasoning or c.text)[-2000:]


# ---------------------------------------------------------------- helpers
def _seed(seed: Optional[int], step: int) -> None:
    """Seed every generator for scaffold step `step` (a fixed derivation, so a rerun samples the same)."""
    if seed is not None:
        from transformers import set_seed  # heavy: only an in-process model needs its seed set
        set_seed(seed * 7919 + step)


def _within_budget(r: ScaffoldResult, s: ScaffoldSettings, calls: int = 1) -> bool:
    ok = (s.max_calls is None or r.calls + calls <= s.max_calls) and (s.max_tokens is None or r.completion_tokens < s.max_tokens)
    if not ok:
        r.budget_hit = True
    return ok


def _batch(policy, requests: list[tuple[int, list[dict]]], sampling, n: int, thinking: bool, results, seed, step):
    """Generate n completions for each (problem index, messages) request; charge each to its problem."""
    if not requests:
        return []
    _seed(seed, step)
    outs = policy.generate([m for _, m in requests], replace(sampling, n=n), thinking=thinking)
    for (i, _), group in zip(requests, outs):
        for c in group:
            results[i].charge(c)
    return outs


# ---------------------------------------------------------------- scaffolds
def single_pass(problems, policy, sampling, settings: ScaffoldSettings, seed=None, **_) -> list[ScaffoldResult]:
    """One generation per problem."""
    results = [ScaffoldResult() for _ in problems]
    outs = _batch(policy, [(i, solve_messages(p.problem, settings.task)) for i, p in enumerate(problems)],
                  sampling, 1, settings.thinking, results, seed, 0)
    for r, group in zip(results, outs):
        r.take(group[0])
    return results


def reasoning_cache(problems, policy, sampling, settings: ScaffoldSettings, seed=None, summariser=None, **_):
    """RC at test time via reasoning_cache.rc_rollout (the policy summarises itself unless given a summariser)."""
    if settings.rc is None:
        raise ValueError("scaffold 'rc' needs settings.rc (config.RCSettings, eval.rc in params)")
    trajs = rc_rollout(problems, policy, summariser or policy, settings.rc, sampling, thinking=settings.thinking,
                       seed=seed, final_summary=False)
    endpoint = getattr(policy, "endpoint", None)
    results = []
    for traj in trajs:
        last = traj[-1]
        p_tok = sum(s.prompt_tokens for s in traj)
        c_tok = sum(s.completion_tokens + s.summary_tokens for s in traj)
        results.append(ScaffoldResult(
            final=last.final, think_closed=last.think_closed, finish_reason=last.finish_reason, reasoning=last.reasoning,
            calls=len(traj) + sum(1 for s in traj if s.summary_status), prompt_tokens=p_tok, completion_tokens=c_tok,
            cost=cost_of(endpoint, p_tok, c_tok) if endpoint is not None else 0.0,
            trace=[{"turn": s.turn, "closed": s.think_closed, "tokens": s.completion_tokens,
                    "summary": s.summary_out[:500], "summary_status": s.summary_status} for s in traj]))
    return results


def self_check(problems, policy, sampling, settings: ScaffoldSettings, seed=None, **_) -> list[ScaffoldResult]:
    """Generate, self-verify, correct with the critique; stop at `passes` consecutive passes or `failures` failures."""
    results = single_pass(problems, policy, sampling, settings, seed)
    passes, failures = [0] * len(problems), [0] * len(problems)
    step = 1
    while True:
        active = [i for i in range(len(problems)) if passes[i] < settings.self_check_passes
                  and failures[i] < settings.self_check_failures and _within_budget(results[i], settings)]
        if not active:
            return results
        reqs = [(i, _user("scaffold_verify", problem=problems[i].problem, proof=_answer_text(_as_completion(results[i]))))
                for i in active]
        verdicts = _batch(policy, reqs, sampling, 1, settings.thinking, results, seed, step)
        step += 1
        to_fix = []
        for (i, msgs), group in zip(reqs, verdicts):
            score = verify_score(group[0], msgs)
            ok = score is not None and score >= settings.self_check_pass_score and results[i].think_closed
            results[i].trace.append({"step": "verify", "score": score, "pass": ok})
            if ok:
                passes[i] += 1
            else:
                passes[i], failures[i] = 0, failures[i] + 1
                if failures[i] < settings.self_check_failures and _within_budget(results[i], settings):
                    to_fix.append((i, _user("scaffold_refine", problem=problems[i].problem,
                                            proof=_answer_text(_as_completion(results[i])),
                                            critique=(group[0].final or group[0].text).strip()
                                            or "(the reviewer wrote nothing)")))
        fixed = _batch(policy, to_fix, sampling, 1, settings.thinking, results, seed, step)
        step += 1
        for (i, _), group in zip(to_fix, fixed):
            results[i].take(group[0])
            results[i].trace.append({"step": "refine", "closed": group[0].think_closed})


def _as_completion(r: ScaffoldResult):
    return Completion(text=r.final, reasoning=r.reasoning, final=r.final, think_closed=r.think_closed,
                      finish_reason=r.finish_reason)


def _candidates_block(proofs: list) -> str:
    return "\n\n".join(f"Attempt {j + 1}:\n{_answer_text(c)}" for j, c in enumerate(proofs))


def rsa(problems, policy, sampling, settings: ScaffoldSettings, seed=None, **_) -> list[ScaffoldResult]:
    """Recursive self-aggregation: a population, merged k at a time for r rounds, then a pairwise tournament."""
    results = [ScaffoldResult() for _ in problems]
    rng = random.Random(seed)
    n, k = settings.rsa_population, min(settings.rsa_merge, settings.rsa_population)
    pops = _batch(policy, [(i, solve_messages(p.problem, settings.task)) for i, p in enumerate(problems)],
                  sampling, n, settings.thinking, results, seed, 0)
    pops = [list(g) for g in pops]
    for rnd in range(settings.rsa_rounds):
        reqs = [(i, _user("scaffold_merge", problem=problems[i].problem, candidates=_candidates_block(rng.sample(pops[i], k))))
                for i in range(len(problems)) for _ in range(n) if _within_budget(results[i], settings, n)]
        outs = _batch(policy, reqs, sampling, 1, settings.thinking, results, seed, 1 + rnd)
        new: dict[int, list] = {}
        for (i, _), group in zip(reqs, outs):
            new.setdefault(i, []).append(group[0])
        for i, members in new.items():
            pops[i] = members
            results[i].trace.append({"step": f"merge round {rnd + 1}", "closed": sum(c.think_closed for c in members)})
    _tournament(problems, pops, policy, sampling, settings, results, rng, seed, 100)
    for r, pop in zip(results, pops):
        r.take(pop[0])
    return results


def _tournament(problems, pops, policy, sampling, settings, results, rng, seed, step) -> None:
    """Pairwise knock-out (scaffold_compare) until one proof per problem is left in pops[i][0]."""
    for i in range(len(problems)):  # only proofs that exist enter the tournament
        pops[i] = [c for c in pops[i] if c.think_closed and c.final] or pops[i][:1]
    while any(len(p) > 1 for p in pops):
        reqs, pairs = [], []
        for i, pop in enumerate(pops):
            if len(pop) > 1 and not _within_budget(results[i], settings, len(pop) // 2):
                pops[i] = pop[:1]  # out of budget: keep the first survivor
                continue
            rng.shuffle(pop)
            for j in range(0, len(pop) - 1, 2):
                reqs.append((i, _user("scaffold_compare", problem=problems[i].problem,
                                      proof_a=_answer_text(pop[j]), proof_b=_answer_text(pop[j + 1]))))
                pairs.append((i, pop[j], pop[j + 1]))
        outs = _batch(policy, reqs, sampling, 1, settings.thinking, results, seed, step)
        step += 1
        survivors: dict[int, list] = {i: ([pops[i][-1]] if len(pops[i]) % 2 else []) for i in {p[0] for p in pairs}}
        for (i, a, b), group in zip(pairs, outs):
            choice = parse_choice(group[0].final or group[0].text)
            survivors[i].append(b if choice == "B" else a)  # unparseable verdicts keep A (order is shuffled)
            results[i].trace.append({"step": "compare", "choice": choice})
        for i, s in survivors.items():
            pops[i] = s


def dsm(problems, policy, sampling, settings: ScaffoldSettings, seed=None, **_) -> list[ScaffoldResult]:
    """DeepSeek-Math style: a pool of proofs, several self-verifications each, the best refined with its critiques."""
    results = [ScaffoldResult() for _ in problems]
    npf, nv = settings.dsm_proofs, settings.dsm_verifications
    pools: list[list[dict]] = [[] for _ in problems]  # {"c": Completion, "scores": [...], "critiques": [...]}

    def verify(new: dict[int, list], step: int) -> None:
        reqs, owners = [], []  # owners[k]: the pool entry verified by reqs[k]
        for i, comps in new.items():
            planned = 0  # verifications of this problem already queued (charged only after the batch)
            for c in comps:
                entry = {"c": c, "scores": [], "critiques": []}
                pools[i].append(entry)
                if c.think_closed and c.final and _within_budget(results[i], settings, planned + nv):
                    reqs.append((i, _user("scaffold_verify", problem=problems[i].problem, proof=c.final)))
                    owners.append(entry)
                    planned += nv
        outs = _batch(policy, reqs, sampling, nv, settings.thinking, results, seed, step)
        for entry, (_, msgs), group in zip(owners, reqs, outs):
            for v in group:
                entry["scores"].append(verify_score(v, msgs))
                entry["critiques"].append(v.final or v.text)

    outs = _batch(policy, [(i, solve_messages(p.problem, settings.task)) for i, p in enumerate(problems)],
                  sampling, npf, settings.thinking, results, seed, 0)
    verify({i: list(g) for i, g in enumerate(outs)}, 1)
    for rnd in range(settings.dsm_rounds):
        reqs = []
        for i in range(len(problems)):
            best = max(pools[i], key=_dsm_rank)
            if best["c"].think_closed and _within_budget(results[i], settings, npf):
                critique = "\n\n---\n\n".join(t for t in best["critiques"] if t)[:6000] or "(no critique was produced)"
                reqs.append((i, _user("scaffold_refine", problem=problems[i].problem, proof=_answer_text(best["c"]), critique=critique)))
        outs = _batch(policy, reqs, sampling, npf, settings.thinking, results, seed, 2 + 2 * rnd)
        verify({i: list(g) for (i, _), g in zip(reqs, outs)}, 3 + 2 * rnd)
    for i, r in enumerate(results):
        best = max(pools[i], key=_dsm_rank)
        r.take(best["c"])
        r.trace = [{"pool": len(pools[i]), "best_scores": best["scores"],
                    "mean_scores": [round(_dsm_rank(e)[1], 2) for e in pools[i]]}]
    return results


def nomos(problems, policy, sampling, settings: ScaffoldSettings, seed=None, **_) -> list[ScaffoldResult]:
    """Nomos-style: many samples, each self-scored; the best few consolidated; a pairwise tournament picks one.

    RECIPE names the steps (16 samples, self-score, consolidate, tournament). How many samples go on
    to consolidation (`nomos_keep`) and how many consolidated proofs are written
    (`nomos_consolidated`) are workbook defaults. The finalists are the kept proofs and the
    consolidated ones, so consolidation can only add candidates, never lose the best sample.
    """
    results = [ScaffoldResult() for _ in problems]
    rng = random.Random(seed)
    samples = _batch(policy, [(i, solve_messages(p.problem, settings.task)) for i, p in enumerate(problems)],
                     sampling, settings.nomos_samples, settings.thinking, results, seed, 0)
    samples = [list(g) for g in samples]
    reqs, owners = [], []
    for i, group in enumerate(samples):
        planned = 0  # verifications of this problem already queued (charged only after the batch)
        for j, c in enumerate(group):
            if c.think_closed and c.final and _within_budget(results[i], settings, planned + 1):
                reqs.append((i, _user("scaffold_verify", problem=problems[i].problem, proof=c.final)))
                owners.append((i, j))
                planned += 1
    scores = [[None] * len(g) for g in samples]
    for (i, j), (_, msgs), group in zip(owners, reqs, _batch(policy, reqs, sampling, 1, settings.thinking, results, seed, 1)):
        scores[i][j] = verify_score(group[0], msgs)
    kept = []
    for i, group in enumerate(samples):
        # existing proofs first, then self-score (missing counts as -1), then sample order
        order = sorted(range(len(group)), key=lambda j: (not (group[j].think_closed and group[j].final),
                                                         -(scores[i][j] if scores[i][j] is not None else -1), j))
        kept.append([group[j] for j in order[:settings.nomos_keep]])
        results[i].trace.append({"step": "self-score", "scores": scores[i],
                                 "kept": [order[k] for k in range(min(settings.nomos_keep, len(order)))]})
    reqs = [(i, _user("scaffold_merge", problem=problems[i].problem, candidates=_candidates_block(kept[i])))
            for i in range(len(problems)) if settings.nomos_consolidated > 0 and len(kept[i]) > 1
            and any(c.think_closed for c in kept[i]) and _within_budget(results[i], settings, settings.nomos_consolidated)]
    finalists = [list(k) for k in kept]
    for (i, _), group in zip(reqs, _batch(policy, reqs, sampling, settings.nomos_consolidated, settings.thinking,
                                          results, seed, 2)):
        finalists[i].extend(group)
        results[i].trace.append({"step": "consolidate", "closed": sum(c.think_closed for c in group)})
    _tournament(problems, finalists, policy, sampling, settings, results, rng, seed, 100)
    for r, pop in zip(results, finalists):
        r.take(pop[0])
    return results


def _dsm_rank(entry: dict) -> tuple:
    # Existing proofs first, then mean self-verification score (missing scores count as 0).
    scores = [s if s is not None else 0 for s in entry["scores"]]
    return (bool(entry["c"].think_closed and entry["c"].final), sum(scores) / len(scores) if scores else -1.0)


SCAFFOLD_FUNCTIONS: dict[str, Callable] = {"single": single_pass, "rc": reasoning_cache, "self_check": self_check,
                                           "rsa": rsa, "dsm": dsm, "nomos": nomos}


def run_scaffold(name: str, problems, policy, sampling, settings: ScaffoldSettings, seed: Optional[int] = None,
                 summariser=None) -> list[ScaffoldResult]:
    """Run scaffold `name` on a batch of problems; one ScaffoldResult per problem."""
    if name not in SCAFFOLD_FUNCTIONS:
        raise ValueError(f"unknown scaffold {name!r}: use one of {', '.join(SCAFFOLDS)} (eval.scaffolds in params)")
    return SCAFFOLD_FUNCTIONS[name](problems, policy, replace(sampling, n=1), settings, seed=seed, summariser=summariser)
