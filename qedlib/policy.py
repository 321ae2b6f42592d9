"""How the policy is prompted: the proof instruction shared by RL training and evaluation.

Used by 03_rubric_rl, 04_reasoning_cache_rl and 05_eval so that the model is trained and
evaluated on the same prompt. Templates are package data in qedlib/prompts/ (our wording),
filled by qedlib.prompts.fill.
"""
from __future__ import annotations

from .prompts import fill


def proof_messages(problem: str) -> list[dict]:
    """One user turn: the proof instruction, then the problem (RECIPE stage 3)."""
    return [{"role": "user", "content": fill("policy_proof", problem=problem).strip()}]
