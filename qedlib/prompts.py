"""Prompt templates (package data in qedlib/prompt_templates/*.md) and the parsers of their answers.

Used by notebooks 01_distill (rubric writing, problem screening, teacher-proof grading),
03_rubric_rl / 04_reasoning_cache_rl (the RL judge) and 05_eval (ProofBench and answer grading)
through `qedlib.grading`. A template declares its fields as `{name}` placeholders; `fill` refuses
a missing, empty or unexpected field, so a prompt can never mention a reference solution it did
not receive.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class PromptError(ValueError):
    """A template is unknown or was filled wrongly; the message names the template and field."""


def templates_dir() -> Path:
    """Folder of the shipped templates."""
    return Path(str(resources.files("qedlib") / "prompt_templates"))


def template_names() -> list[str]:
    """Names of the shipped templates (without .md)."""
    return sorted(p.stem for p in templates_dir().glob("*.md") if p.stem != "response_formats")


@lru_cache(maxsize=None)
def load_prompt(name: str) -> str:
    """The raw text of template `name` (qedlib/prompt_templates/<name>.md)."""
    path = templates_dir() / f"{name}.md"
    if not path.exists():
        raise PromptError(f"unknown prompt template {name!r} ({path} not found); available: {', '.join(template_names())}")
    return path.read_text()


def fields_of(name: str) -> list[str]:
    """The fields template `name` declares, in order of first appearance."""
    seen: list[str] = []
    for m in PLACEHOLDER.finditer(load_prompt(name)):
        if m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def fill(name: str, **fields) -> str:
    """Fill template `name`; every declared field must be given, non-empty, and nothing else.

    Substitution is one pass: a value that itself contains `{proof}` is left as it is.
    """
    declared = fields_of(name)
    missing = [f for f in declared if fields.get(f) is None or not str(fields[f]).strip()]
    if missing:
        raise PromptError(f"prompt {name!r} needs field(s) {missing} but they are missing, None or empty "
                          f"(it declares {declared}); pass them, or choose a template that does not use them")
    unexpected = sorted(set(fields) - set(declared))
    if unexpected:
        raise PromptError(f"prompt {name!r} does not use field(s) {unexpected} (it declares {declared}); "
                          f"choose the template variant that uses them")
    return PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]).strip(), load_prompt(name))


@lru_cache(maxsize=None)
def response_formats() -> dict[str, str]:
    """The answer-format paragraphs (response_formats.md, one `## name` section each)."""
    text = load_prompt("response_formats")
    out: dict[str, str] = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        out[head.strip()] = body.strip()
    return out


def response_format(kind: str) -> str:
    """One answer-format paragraph: score_text, score_prob, points_text, points_prob, answer_text, answer_prob."""
    formats = response_formats()
    if kind not in formats:
        raise PromptError(f"unknown response format {kind!r}; available: {', '.join(formats)}")
    return formats[kind]


# ---------------------------------------------------------------- rubric writing
RUBRIC_BLOCK = re.compile(r"<rubric>(.*?)</rubric>", re.S | re.I)
POINTS_ITEM = re.compile(r"^\s*[-*]\s*\[\s*(\d+)\s*(?:pts?|points?)?\s*\]\s*(.+)$", re.I)
DEDUCTION_ITEM = re.compile(r"^\s*[-*]\s*\[\s*(-\s*\d+|cap\s*\d+)\s*\]\s*(.+)$", re.I)
PLAIN_ITEM = re.compile(r"^\s*[-*]\s*(.+)$")


def parse_rubric(text: str) -> tuple[dict | None, str | None]:
    """Parse a rubric-writing answer -> ({text, checkpoints, zero_credit, deductions, total}, None) or (None, reason).

    The LAST <rubric> block counts (a model that echoes the layout first is fine); checkpoints of
    an alternative path are kept but the total is that of the first path, which must be 7.
    """
    blocks = RUBRIC_BLOCK.findall(text or "")
    if not blocks:
        return None, "no <rubric>...</rubric> block"
    body = blocks[-1].strip()
    section, checkpoints, zero, deductions = None, [], [], []
    alt_total, main_total = 0, 0
    for line in body.splitlines():
        low = line.strip().lower()
        if not low:
            continue
        if low.startswith("checkpoints"):
            section = "checkpoints"
            continue
        if low.startswith("alternative"):
            section = "alternative"
            continue
        if low.startswith("zero-credit") or low.startswith("zero credit"):
            section = "zero"
            continue
        if low.startswith("deductions"):
            section = "deductions"
            continue
        if section in ("checkpoints", "alternative"):
            m = POINTS_ITEM.match(line)
            if m:
                pts = int(m.group(1))
                checkpoints.append({"points": pts, "description": m.group(2).strip(), "path": section})
                if section == "checkpoints":
                    main_total += pts
                else:
                    alt_total += pts
        elif section == "zero":
            m = PLAIN_ITEM.match(line)
            if m:
                zero.append(m.group(1).strip())
        elif section == "deductions":
            m = DEDUCTION_ITEM.match(line)
            if m:
                deductions.append({"penalty": re.sub(r"\s+", " ", m.group(1).lower()), "description": m.group(2).strip()})
    if not any(c["path"] == "checkpoints" for c in checkpoints):
        return None, "no checkpoint lines of the form '- [N pts] description'"
    if main_total != 7:
        return None, f"checkpoints total {main_total} points, not 7"
    if alt_total not in (0, 7):
        return None, f"alternative-path checkpoints total {alt_total} points, not 7"
    return {"text": body, "checkpoints": checkpoints, "zero_credit": zero, "deductions": deductions,
            "total": main_total}, None


# ---------------------------------------------------------------- problem screening
SCREEN_BLOCK = re.compile(r"<screening>(.*?)</screening>", re.S | re.I)
SCREEN_FLAGS = ("incomplete", "wrong_statement", "purely_computational")
YES, NO = {"yes", "y", "true"}, {"no", "n", "false"}


def parse_screening(text: str) -> tuple[dict | None, str | None]:
    """Parse a screening answer -> ({incomplete, wrong_statement, purely_computational, difficulty, keep}, None) or (None, reason)."""
    blocks = SCREEN_BLOCK.findall(text or "")
    if not blocks:
        return None, "no <screening>...</screening> block"
    got: dict = {}
    for line in blocks[-1].splitlines():
        key, sep, val = line.partition(":")
        if not sep:
            continue
        key = re.sub(r"[\s-]+", "_", key.strip().lower())
        val = val.strip().strip("*").strip().lower().rstrip(".")
        if key in SCREEN_FLAGS:
            if val in YES:
                got[key] = True
            elif val in NO:
                got[key] = False
            else:
                return None, f"{key}: expected yes or no, got {val!r}"
        elif key == "difficulty":
            m = re.fullmatch(r"(\d+)(?:\s*/\s*10)?", val)
            if not m or not 1 <= int(m.group(1)) <= 10:
                return None, f"difficulty: expected an integer from 1 to 10, got {val!r}"
            got[key] = int(m.group(1))
    missing = [k for k in (*SCREEN_FLAGS, "difficulty") if k not in got]
    if missing:
        return None, f"missing {missing}"
    got["keep"] = not any(got[k] for k in SCREEN_FLAGS)
    return got, None
