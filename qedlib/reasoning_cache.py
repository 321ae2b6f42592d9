"""The reasoning cache (RC): bounded reasoning turns joined by summaries. One loop for training and eval.

Used by 04_reasoning_cache_rl (RC-RL trains on the cache states) and 05_eval (the RC test-time
scaffold). Turn k: the policy reasons on (problem + current summary) within `reasoning_budget`
tokens; a summariser condenses the latest attempt in light of the previous summary; the new
summary replaces the old one (or accumulates, as an option); the trace is discarded.
First turn, documented once: turn 0 uses the `rc_reason_first` prompt (no summary block at
all, never an empty summary). All problems' turn k are generated in one batch, then all
summaries in one batch.

Summaries of thinking models: a thinking template (Qwen3-4B-Thinking-2507's always opens
`<think>`) makes the summariser reason first, so it runs with thinking on
(`summary_thinking`) and a budget of `summary.max_new_tokens + summary_thinking_budget`, and the
summary is the text after `</think>`. The rule for a summary that never closed its thinking (or
is empty after it): it is NOT used; the cache keeps the previous summary (none at turn 0, so the
next turn starts from scratch), and the turn records `summary_status = "unclosed"` / "empty"
(counted as `summary_unclosed_rate` by RC-RL and by the eval's rc scaffold).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .prompts import fill


@dataclass
class CacheState:
    """One RC turn: the prompt it reasoned on and what came out."""
    turn: int
    prompt: list  # chat messages of this turn's reasoning prompt
    summary_in: str  # the summary this turn started from ("" at turn 0)
    reasoning: str = ""  # raw reasoning text (all of it when the turn was cut off)
    final: str = ""  # the proof after </think> ("" when the turn never closed its thinking)
    think_closed: bool = False
    finish_reason: str = ""  # stop | length | error
    summary_out: str = ""  # the cache after this turn: the summary the next turn starts from ("" if none)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    summary_tokens: int = 0
    summary_status: str = ""  # ok | unclosed | empty (not used: the previous summary is kept) | "" no summary made
    summary_finish: str = ""  # the summariser's finish reason: stop (ended on its own) | length (cut at its budget)

    def to_dict(self) -> dict:
        return asdict(self)


def reasoning_messages(problem: str, summary: str) -> list[dict]:
    """The policy's prompt for one turn: the problem alone at first, then problem + summary."""
    if not summary:
        return [{"role": "user", "content": fill("rc_reason_first", problem=problem).strip()}]
    return [{"role": "user", "content": fill("rc_reason", problem=problem, summary=summary).strip()}]


def summary_messages(problem: str, previous_summary: str, attempt: str, length: str) -> list[dict]:
    """The summariser's prompt: the latest attempt in light of the previous summary, in `length` (rc.summary_length)."""
    return [{"role": "user", "content": fill(
        "rc_summarise", problem=problem, previous_summary=previous_summary or "(none)", attempt=attempt or "(empty)",
        length=length).strip()}]


def attempt_text(c) -> str:
    """The attempt a summariser reads: reasoning and proof of a closed turn; of a turn cut off mid-thought, its raw
    reasoning (never ""). Used by rc_rollout and by notebook 04's "The summary and the summariser's prompt"."""
    if c.think_closed:
        return (c.reasoning + "\n\n" + c.final).strip()
    return (c.reasoning or c.text).strip()


def summary_thinking(rc, policy, summariser, thinking: bool) -> bool:
    """Whether the summariser reasons in <think> first: `rc.summary_thinking` when set; else on when the
    policy summarises itself with thinking on, or when the summariser's chat template opens <think> by itself."""
    if getattr(rc, "summary_thinking", None) is not None:
        return bool(rc.summary_thinking)
    if summariser is policy and thinking:
        return True
    return template_opens_think(getattr(summariser, "tokenizer", None))


def check_summariser(rc, thinking: bool, where: str) -> None:
    """Refuse a summariser that reasons in <think> with no thinking budget: its summary would have to close
    </think> inside `summary.max_new_tokens`, rarely does, and an unclosed summary is discarded, so every
    cache state falls back to the first prompt. Set `summary_thinking_budget`, or `summary_thinking: false`
    where the summariser's chat template allows thinking off."""
    thinks = rc.summary_thinking if rc.summary_thinking is not None else (rc.summariser == "policy" and thinking)
    if thinks and rc.summary_thinking_budget <= 0:
        raise ValueError(f"{where}: the {rc.summariser} summariser reasons in <think> first (summary_thinking "
                         f"{rc.summary_thinking if rc.summary_thinking is not None else 'null: the policy thinks'}) "
                         f"but summary_thinking_budget is {rc.summary_thinking_budget}: its summaries rarely close "
                         "and are discarded (every cache state is the first prompt again). Set "
                         f"{where}.summary_thinking_budget (e.g. 4096), or {where}.summary_thinking: false when the "
                         "chat template allows thinking off")


def template_opens_think(tokenizer) -> bool:
    """True when the tokenizer's chat template ends its generation prompt with <think> (a thinking-only template)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return text.rstrip().endswith("<think>")


def summary_cut_rate(finishes) -> float | None:
    """Share of written summaries cut at the summariser's token budget (finish "length"; "" = no summary made, not
    counted); None if none. A cut summary is still used when it closed: it ends mid-sentence."""
    made = [f for f in finishes if f]
    return sum(f == "length" for f in made) / len(made) if made else None


def summary_unclosed_rate(statuses) -> float | None:
    """Share of written summaries whose thinking never closed ("" = no summary made, not counted); None if none."""
    made = [s for s in statuses if s]
    return sum(s == "unclosed" for s in made) / len(made) if made else None


def _seed(seed: int | None, turn: int, role: int) -> None:
    """Seed every generator for one turn's reasoning (role 0) or summary (role 1): a fixed derivation, so reruns match."""
    if seed is not None:
        from transformers import set_seed  # heavy: transformers loads only when a seeded rollout runs
        set_seed(seed * 1000 + turn * 10 + role)


def rc_rollout(problems, policy, summariser, rc, sampling, thinking: bool = True, seed: int | None = None,
               final_summary: bool = True) -> list[list[CacheState]]:
    """Run one RC trajectory per problem; return each trajectory's turns (the answer is the last turn's `final`).

    `policy`/`summariser` are generators (generation.make_generator); pass the same object to let
    the policy summarise itself (test time). `final_summary` also summarises the last turn (training
    needs it: N turns give N+1 cache states; evaluation can skip it).
    """
    reason_sampling = replace(sampling, n=1, max_new_tokens=rc.reasoning_budget)
    summ_thinking = summary_thinking(rc, policy, summariser, thinking)
    summ_sampling = replace(rc.summary, n=1, max_new_tokens=rc.summary.max_new_tokens
                            + (getattr(rc, "summary_thinking_budget", 0) if summ_thinking else 0))
    summaries = [""] * len(problems)
    trajs: list[list[CacheState]] = [[] for _ in problems]
    for turn in range(rc.turns):
        prompts = [reasoning_messages(p.problem, s) for p, s in zip(problems, summaries)]
        _seed(seed, turn, 0)
        outs = policy.generate(prompts, reason_sampling, thinking=thinking)
        for i, (msgs, group) in enumerate(zip(prompts, outs)):
            c = group[0]
            # a closed turn's reasoning is what came before </think> (often nothing); only an unclosed turn's is all text
            reasoning = c.reasoning if c.think_closed else (c.reasoning or c.text)
            trajs[i].append(CacheState(turn, msgs, summaries[i], reasoning, c.final,
                                       c.think_closed, c.finish_reason, "", c.prompt_tokens, c.completion_tokens))
        if turn == rc.turns - 1 and not final_summary:
            break
        sprompts = [summary_messages(p.problem, summaries[i], attempt_text(outs[i][0]), rc.summary_length)
                    for i, p in enumerate(problems)]
        _seed(seed, turn, 1)
        souts = summariser.generate(sprompts, summ_sampling, thinking=summ_thinking)
        for i, group in enumerate(souts):
            c = group[0]
            new = c.final.strip() if c.think_closed else ""
            status = "ok" if new else ("unclosed" if not c.think_closed else "empty")
            if new:  # an unclosed or empty summary is never used: the previous summary stays the cache
                summaries[i] = (summaries[i] + "\n\n" + new).strip() if rc.accumulate else new
            trajs[i][-1].summary_out, trajs[i][-1].summary_tokens = summaries[i], c.completion_tokens
            trajs[i][-1].summary_status, trajs[i][-1].summary_finish = status, c.finish_reason
    return trajs


def cache_state_prompts(problem, trajectory: list[CacheState]) -> list[list[dict]]:
    """The N+1 cache-state prompts of a trajectory: each turn's prompt, plus the one after the last summary."""
    prompts = [s.prompt for s in trajectory]
    if trajectory and trajectory[-1].summary_out:
        # Built by the same function the next turn would use, so training states match evaluation.
        prompts.append(reasoning_messages(problem.problem, trajectory[-1].summary_out))
    return prompts

