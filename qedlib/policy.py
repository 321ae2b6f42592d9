"""How the policy is prompted: the proof instruction shared by RL training and evaluation.

Used by 03_rubric_rl, 04_reasoning_cache_rl and 05_eval so that the model is trained and
evaluated on the same prompt. Templates are package data in qedlib/prompts/ (our wording).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def template(name: str) -> str:
    """Text of qedlib/prompts/<name>.md."""
    path = resources.files("qedlib") / "prompts" / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {name!r} not found at {path}")
    return path.read_text().strip()


def fill_template(name: str, **fields: str) -> str:
    """Fill a template; every field must be given and non-None."""
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ValueError(f"prompt {name!r}: field(s) {missing} are None; the template needs them")
    try:
        return template(name).format(**fields)
    except KeyError as e:
        raise ValueError(f"prompt {name!r} needs field {e.args[0]!r}, which was not given") from None


def proof_messages(problem: str) -> list[dict]:
    """One user turn: the proof instruction, then the problem (RECIPE stage 3)."""
    return [{"role": "user", "content": fill_template("policy_proof", problem=problem)}]
