"""Resume keys shared by stages: the hash of what a grade depends on besides the proof.

Distillation (grades.jsonl) and evaluation (results.jsonl) both key their grades with `judge_hash`,
so a grade written under other judge settings or older parsing rules is never read back as current.
"""
from __future__ import annotations

from .io import settings_hash


def judge_hash(judge) -> str:
    """Hash of what a grade depends on besides the proof: the judge settings and the grade parser's version."""
    from .grading import PARSER_VERSION  # lazy: importing distill or evaluation need not load the grading stack
    return settings_hash({"judge": judge, "parser": PARSER_VERSION})
