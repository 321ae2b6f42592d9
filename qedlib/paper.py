"""The QED-Nano paper's published numbers (RECIPE "Headline results") that runs are compared with.

Read by the eval stage (qedlib.evaluation: paper table and findings) and the run report (qedlib.report).
"""
from __future__ import annotations

# Grade % (mean points/7, average of 3 runs); IMO-AnswerBench is accuracy %.
PAPER_RESULTS = {
    "imo-proofbench": {"Qwen3-4B-Thinking-2507 (base)": 20.4, "QED-Nano-SFT": 39.5, "QED-Nano (SFT + rubric RL + RC RL)": 40.0,
                       "QED-Nano + test-time scaffold": 54.0, "GPT-OSS-120B": 43.1, "DeepSeek-Math-V2": 57.9, "Gemini 3 Pro": 58.7},
    "proofbench": {"Qwen3-4B-Thinking-2507 (base)": 19.5, "QED-Nano-SFT": 33.3, "QED-Nano (SFT + rubric RL + RC RL)": 44.9,
                   "QED-Nano + test-time scaffold": 54.4, "GPT-OSS-120B": 47.5, "DeepSeek-Math-V2": 60.6, "Gemini 3 Pro": 66.7},
    "imo-answerbench": {"Qwen3-4B-Thinking-2507 (base)": 55.8, "QED-Nano-SFT": 57.5, "QED-Nano (SFT + rubric RL + RC RL)": 67.5,
                        "GPT-OSS-120B": 70.5, "DeepSeek-Math-V2": 75.8, "Gemini 3 Pro": 83.2},
}
# Which of our checkpoints corresponds to which paper row.
PAPER_ROW_OF_CHECKPOINT = {"base": "Qwen3-4B-Thinking-2507 (base)", "sft": "QED-Nano-SFT",
                           "rc_rl": "QED-Nano (SFT + rubric RL + RC RL)"}
