"""How the policy is prompted and what it is taught to write: the proof instruction and the SFT target.

The proof instruction is shared by RL training and evaluation (03_rubric_rl, 04_reasoning_cache_rl,
05_eval) so that the model is trained and evaluated on the same prompt. The SFT target (the
FineProofs-SFT row and its two-turn chat) is shared by 01_distill, which writes it and counts its
tokens, and 02_sft, which trains on it: one definition, so both see the same text. Templates are
package data in qedlib/prompt_templates/ (our wording), filled by qedlib.prompts.fill.
"""
from __future__ import annotations

from .prompts import fill

# The FineProofs-SFT schema: what stage 1 writes and stage 2 reads.
SFT_COLUMNS = ["problem", "reasoning_content", "proof", "category", "competition", "grade", "source", "messages"]


def proof_messages(problem: str) -> list[dict]:
    """One user turn: the proof instruction, then the problem (RECIPE stage 3)."""
    return [{"role": "user", "content": fill("policy_proof", problem=problem).strip()}]


def assistant_text(reasoning: str, proof: str) -> str:
    """The SFT target: `<think>\\n{reasoning}\\n</think>\\n\\n{proof}`, both parts stripped of outer whitespace."""
    return f"<think>\n{(reasoning or '').strip()}\n</think>\n\n{(proof or '').strip()}"


def sft_messages(problem: str, reasoning: str, proof: str) -> list[dict]:
    """The two-turn conversation one SFT row trains on: the bare problem, then `assistant_text`."""
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": assistant_text(reasoning, proof)}]


def sft_row(problem: str, reasoning: str, proof: str, **extra) -> dict:
    """One row in the FineProofs-SFT schema (`SFT_COLUMNS`), its messages built by `sft_messages`."""
    row = {"problem": problem, "reasoning_content": reasoning, "proof": proof, "category": "",
           "competition": "", "grade": None, "source": ""}
    row.update(extra)
    row["messages"] = sft_messages(problem, reasoning, proof)
    return row
