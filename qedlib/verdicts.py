"""What a judge's answer means: the Grade record, the score-tag parser, no-proof rules and short-answer checks.

A building block under qedlib.grading (the Grader), qedlib.scaffolds (self-verification scores),
the RL rewards and evaluation; it calls no model. A `Grade` is either valid (points 0..scale) or
invalid with a reason from `INVALID_REASONS`: invalid is never silently 0, each consumer decides
with `reward_from_grade(grade, judge.invalid)`.

Only the judge's own text decides: the verdict is the LAST numeric score tag of its answer
(after its thinking); a verbatim echo of the whole prompt is ignored, placeholder tags such as
`<score>N</score>` never count, and several different numeric tags are counted by the Grader
(`conflicting_tag_values`), not made invalid. No proof (`no_proof_reason`) is a VALID 0 with no judge
call. Short answers go through `check_answer`: exact match and math-verify decide where they are
reliable, otherwise a judge (or nobody: undecided).
"""
from __future__ import annotations

import dataclasses
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Optional

from .files import settings_hash

INVALID_REASONS = ("no_tag", "out_of_range", "judge_error", "answer_undecided")
RETRYABLE = ("no_tag", "out_of_range", "judge_error")  # a new judge call may fix these
PARSER_VERSION = 2  # part of the grade cache key: grades parsed by older rules are not read back
SCALE = 7


@dataclass
class Grade:
    """One proof's grade: valid with points 0..scale, or invalid with a reason."""
    valid: bool
    points: float | None  # 0..scale when valid (fractional in score_prob mode / combined samples)
    reason: str | None = None  # one of INVALID_REASONS when invalid (with `detail` saying more)
    scale: int = SCALE
    judge_text: str = ""  # the judge's full answer (assessment + errors)
    samples: list = field(default_factory=list)  # individual points when judge.samples > 1 (None = invalid sample)
    spread: float = 0.0  # population std of the valid samples
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # USD
    cached: bool = False  # read back from the grade cache
    detail: str = ""  # why invalid, in words (e.g. the HTTP error), or how it was graded
    mass: float | None = None  # score_prob: raw probability mass the judge put on the allowed values
    probs: dict = field(default_factory=dict)  # score_prob: value -> probability renormalised over allowed values
    method: str = ""  # judge-text | judge-prob | exact | math-verify | no-proof
    no_proof: str = ""  # truncated | empty | no_answer: nothing to grade, a valid 0 with no judge call
    p_correct: float | None = None  # answer prompt: the judge's P(equivalent) (score_prob) or share of "yes" samples

    @property
    def reward(self) -> float | None:
        """points/scale, None when invalid."""
        return None if not self.valid or self.points is None else self.points / self.scale

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready) of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Grade":
        """Inverse of `to_dict` (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def invalid_grade(reason: str, detail: str = "", **kw) -> Grade:
    """An invalid grade with one of INVALID_REASONS."""
    if reason not in INVALID_REASONS:
        raise ValueError(f"unknown invalid reason {reason!r}; use one of {INVALID_REASONS}")
    return Grade(valid=False, points=None, reason=reason, detail=detail, **kw)


# ---------------------------------------------------------------- score parsing
TAG = re.compile(r"<\s*(score|points)\s*>(.*?)<\s*/\s*\1\s*>", re.S | re.I)
NUMBER = re.compile(r"^([+-]?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?$", re.I)


def _tag_value(raw: str) -> tuple[str, float | None, float | None]:
    """Classify a tag's content -> ("number", value, denominator) or ("placeholder", None, None)."""
    s = re.sub(r"[*_`$\\]", "", raw).strip().rstrip(".").strip()
    m = NUMBER.match(s)
    if not m:
        return "placeholder", None, None  # e.g. an echoed "<score>N</score>" from the instructions
    return "number", float(m.group(1)), float(m.group(2)) if m.group(2) else None


def judge_own_text(answer: str, prompt: str = "") -> str:
    """The judge's answer without a verbatim copy of the WHOLE prompt (an echo is not the judge's text).

    Only the complete filled prompt is removed, never single lines: a proof that contains the
    same tag line as the judge's verdict cannot blank that verdict out.
    """
    if prompt and prompt.strip() and prompt.strip() in answer:
        return answer.replace(prompt.strip(), " ")
    return answer


def numeric_tags(text: str, tag: str | None = None) -> list[tuple[float, float | None]]:
    """(value, denominator) of every `<score>`/`<points>` tag (or just `tag`) holding a number, in order."""
    out = []
    for m in TAG.finditer(text or ""):
        if tag and m.group(1).lower() != tag:
            continue
        kind, v, denom = _tag_value(m.group(2))
        if kind == "number":
            out.append((v, denom))
    return out


def parse_score(text: str, scale: int = SCALE, allowed: tuple | None = None, tag: str | None = None,
                prompt: str = "") -> tuple[float | None, str | None]:
    """The judge's score from its answer -> (points, None) or (None, invalid_reason).

    Rules: only `<score>` / `<points>` tags (or just `tag`) count; whitespace inside the tag, markdown
    around the number, "N out of 7" and "N/7" are accepted; tags whose content is not a number (an
    echoed format example such as `<score>N</score>`) are ignored; a verbatim echo of the whole
    `prompt` is not the judge's text (`judge_own_text`). The LAST numeric tag is the verdict: the
    instructions ask for it once, at the end, so an earlier tag is the judge quoting the proof or
    changing its mind (the Grader counts such conflicts and logs a warning; see `conflicting_tag_values`).
    A verdict that is not an allowed integer (0..scale, or `allowed`) or has a denominator other
    than `scale` -> "out_of_range"; no numeric tag -> "no_tag".
    """
    values = numeric_tags(judge_own_text(text or "", prompt), tag)
    if not values:
        return None, "no_tag"
    v, denom = values[-1]
    ok = set(allowed) if allowed is not None else set(range(scale + 1))
    if (denom is not None and denom != scale) or v != int(v) or int(v) not in ok:
        return None, "out_of_range"
    return float(int(v)), None


def conflicting_tag_values(text: str, tag: str | None = None, prompt: str = "") -> list[float]:
    """The distinct numeric tag values of the judge's answer when there is more than one ([] otherwise)."""
    values = list(dict.fromkeys(v for v, _ in numeric_tags(judge_own_text(text or "", prompt), tag)))
    return values if len(values) > 1 else []


# ---------------------------------------------------------------- no proof, no answer
def no_proof_reason(final: str, think_closed: bool = True) -> str | None:
    """Why a completion has no proof to grade: "truncated" (its thinking never closed), "empty"
    (nothing after `</think>`), or None when there is one. The one rule RL, distillation and
    evaluation share (through the Grader): no proof scores 0, with no judge call."""
    if not think_closed:
        return "truncated"
    if not (final or "").strip():
        return "empty"
    return None


def no_proof_grade(why: str) -> Grade:
    """A VALID grade of 0 for a completion with nothing to grade (`no_proof_reason`, or no final answer)."""
    text = {"truncated": "no </think>: the thinking never closed, so there is no proof",
            "empty": "nothing after </think>: the proof is empty",
            "no_answer": "no final \\boxed{} answer"}[why]
    return Grade(True, 0.0, method="no-proof", no_proof=why, detail=f"scored 0 without a judge call: {text}")


# ---------------------------------------------------------------- short answers
def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text (nested braces allowed), None when absent."""
    text = text or ""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, i = 0, text.index("{", start)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textit|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\(?:left|right|displaystyle|[,;:! ])|\s+")
# What math-verify decides reliably: numbers and arithmetic in numbers or single-letter variables,
# with no relation (=, <), no list/tuple/interval punctuation, and no text.
_SIMPLE = re.compile(r"^(?:[0-9a-zA-Z.+\-*/^(){}]|\\(?:frac|sqrt|pi|cdot|times))+$")


def _bare_answer(s: str) -> str:
    """The answer itself: the content of a \\boxed{} if any, without $ / \\( \\) delimiters or a final period."""
    s = (s or "").strip()
    b = extract_boxed(s)
    s = b if b is not None else s
    return s.replace("\\(", "").replace("\\)", "").replace("$", "").strip().rstrip(".").strip()


def normalise_answer(s: str) -> str:
    """A short answer reduced to compare as text: no $ or \\( \\), spacing, \\left/\\right, text wrappers or final period."""
    s = _bare_answer(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for _ in range(3):
        s = _TEXT_CMD.sub(r"\1", s)
    s = _SPACING.sub("", s)
    return s.rstrip(".")


# Towers and huge exponents (2^{2^{100}}): sympy would try to evaluate them, with no timeout here.
_HUGE_POWER = re.compile(r"\^\{?[^}]*\^|\^\{?\d{4,}")


def is_simple_answer(s: str) -> bool:
    """True for a plain number or a simple expression (what exact match / math-verify judge reliably)."""
    n = normalise_answer(s)
    return bool(n) and bool(_SIMPLE.match(n)) and not re.search(r"[a-zA-Z]{2,}", re.sub(r"\\[a-z]+", "", n)) \
        and not _HUGE_POWER.search(n)


def _math_verify(reference: str, answer: str) -> bool | None:
    from math_verify import parse, verify  # heavy: math-verify loads sympy
    try:
        gold = parse(f"${_bare_answer(reference)}$", parsing_timeout=None)
        pred = parse(f"${_bare_answer(answer)}$", parsing_timeout=None)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=None))
    except Exception:  # an unparsable expression is undecided, not wrong
        return None


def check_answer(reference: str | None, response: str, judge=None) -> tuple[bool | None, str]:
    """Is the response's final answer equivalent to the reference? -> (True/False/None, how).

    The final answer is the last \\boxed{} after the last `</think>`; none -> (False, "no_answer").
    Decided without a model only where that is reliable: equal after `normalise_answer`
    ("exact"), or math-verify when BOTH sides are plain numbers / simple expressions
    ("math-verify"). Otherwise `judge(reference, answer) -> bool | None` decides ("judge");
    with no judge the result is (None, "undecided"): never a guess.
    """
    if reference is None or not str(reference).strip():
        return None, "no_reference"
    final = (response or "").rpartition("</think>")[2]
    answer = extract_boxed(final)
    if answer is None or not answer.strip():
        return False, "no_answer"
    if normalise_answer(answer) == normalise_answer(reference):
        return True, "exact"
    if is_simple_answer(reference) and is_simple_answer(answer):
        verdict = _math_verify(reference, answer)
        if verdict is not None:
            return verdict, "math-verify"
    if judge is None:
        return None, "undecided"
    return judge(reference, answer), "judge"


def invalid_table(grades: list[Grade]) -> dict[str, int]:
    """Counts of invalid grades by reason (every reason listed, zeros included)."""
    c = Counter(g.reason for g in grades if not g.valid)
    return {r: c.get(r, 0) for r in INVALID_REASONS}


def reward_from_grade(grade: Grade, invalid: str = "drop") -> float | None:
    """Reward in [0, 1] from a grade; an invalid one gives None ("drop") or 0.0 ("zero" / after "retry")."""
    if grade.valid:
        return grade.reward
    if invalid == "drop":
        return None
    if invalid in ("zero", "retry"):  # retry already happened inside the Grader
        return 0.0
    raise ValueError(f"invalid={invalid!r}: use drop, zero or retry")


def combine_points(points: list[float], how: str = "mean") -> tuple[float, float]:
    """Combine several grades of one proof -> (mean or median, population std)."""
    if not points:
        raise ValueError("no points to combine")
    mid = statistics.median(points) if how == "median" else statistics.fmean(points)
    return float(mid), float(statistics.pstdev(points)) if len(points) > 1 else 0.0



def binary_answer_grade(g: Grade) -> Grade:
    """A judge's answer verdict made binary: P(equivalent) >= 0.5 -> 7 points, else 0 (P kept in `p_correct`).

    P is the score-probability judge's probability, or the share of samples / panel judges that
    said "equivalent". Deterministic grades (exact, math-verify, no answer) are binary already.
    """
    if not g.valid or g.method not in ("judge-text", "judge-prob"):
        return g
    p = g.points / SCALE
    verdict = p >= 0.5
    why = f"binary verdict: P(equivalent) = {p:.3f} {'>=' if verdict else '<'} 0.5"
    return replace(g, points=float(SCALE if verdict else 0), p_correct=p, detail=f"{g.detail}; {why}" if g.detail else why)


def judge_hash(judge) -> str:
    """Hash of what a grade depends on besides the proof: the judge settings and this parser's version.

    Distillation (grades.jsonl) and evaluation (results.jsonl) key their grades with it, so a grade
    written under other judge settings or older parsing rules is never read back as current.
    """
    return settings_hash({"judge": judge, "parser": PARSER_VERSION})
