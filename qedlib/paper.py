"""The QED-Nano paper's settings (`RECIPE`) and published numbers (`PAPER_RESULTS`) that runs are compared with.

Read by the eval stage (qedlib.stages.evaluation: paper table and findings; `comparison` puts a run beside the paper)
and the run report (qedlib.tools.report).
"""
from __future__ import annotations

import difflib

# The recipe's settings, by the dotted config key they set: defined here once, read by config defaults
# (qedlib.config), the notebooks' settings tables (qedlib.display.settings_table: "paper" column) and the check that
# params/qed-nano.yaml sets them (tests). A key the paper publishes no value for is absent (the tables show "-").
RECIPE = {
    # stage 1: distillation (DeepSeek-Math-V2 teacher, graded, best sample per problem)
    "distill.teacher.model": "DeepSeek-Math-V2", "distill.thinking": True, "distill.sampling.temperature": 1.0,
    "distill.sampling.max_new_tokens": "~125k", "distill.teacher.max_concurrency": 256, "distill.judge.prompt": "rubric",
    "distill.judge.mode": "text", "distill.per_problem": "best", "distill.decontaminate": "the eval benchmarks",
    # stage 2: SFT of Qwen3-4B-Thinking-2507 on FineProofs-SFT
    "base_model": "Qwen3-4B-Thinking-2507", "sft.dataset": "FineProofs-SFT", "sft.one_per_problem": True,
    "sft.lr": 3.0e-5, "sft.max_steps": "~620",
    # stage 3: GRPO with rubric rewards from a gpt-oss-20b judge
    "rubric_rl.num_generations": 16, "rubric_rl.prompts_per_step": 64, "rubric_rl.max_steps": 150,
    "rubric_rl.max_completion_length": 49152, "rubric_rl.temperature": 0.8, "rubric_rl.lr": 1.0e-6,
    "rubric_rl.epsilon": 4.0, "rubric_rl.entropy_coef": 1.0e-4, "rubric_rl.scale_rewards": "none",
    "rubric_rl.max_grad_norm": 0.3, "rubric_rl.steps_per_generation": 1, "rubric_rl.reward": "judge",
    "rubric_rl.judge.endpoint.model": "gpt-oss-20b",
    "rubric_rl.loss_type": "luspo",  # TRL's name for the paper's token sum / sequences, with token-level ratios
    # stage 4: RL with a reasoning cache (3 turns of 49k tokens joined by 2k-token summaries)
    "rc_rl.rc.turns": 3, "rc_rl.rc.reasoning_budget": 49152, "rc_rl.rc.summary.max_new_tokens": 2048,
    "rc_rl.rc.summariser": "frozen",
    "rc_rl.rc.summary_length": "at most two short paragraphs", "rc_rl.rc.accumulate": False, "rc_rl.states_per_trajectory": 2,
    "rc_rl.num_generations": 16, "rc_rl.prompts_per_step": 64, "rc_rl.max_completion_length": 49152,
    "rc_rl.temperature": 0.8, "rc_rl.lr": 1.0e-6, "rc_rl.epsilon": 4.0, "rc_rl.entropy_coef": 1.0e-4,
    "rc_rl.reward": "judge",
    # stage 5: evaluation (3 runs per problem, gpt-oss-20b judge)
    "eval.checkpoints": "base, SFT, SFT + rubric RL + RC RL", "eval.benchmarks": "imo-proofbench, proofbench, imo-answerbench",
    "eval.benchmark_limit": "all: 60 / 145 / 400", "eval.samples": 3, "eval.sampling.temperature": 0.8,
    "eval.sampling.max_new_tokens": 49_152, "eval.scaffolds": "single, rc, dsm, rsa, ...", "eval.rc.turns": 3,
    "eval.rc.reasoning_budget": 49_152, "eval.rc.summary.max_new_tokens": 2_048, "eval.rc.summariser": "policy",
    "eval.rc.summary_length": "at most two short paragraphs",
    "eval.judge.endpoint.model": "gpt-oss-20b", "eval.judge.prompt": "ProofBench-style", "eval.judge.mode": "text",
    "eval.success_threshold": 6,
}
NOT_IN_PAPER = "-"  # what a settings table shows for a key the paper publishes no value for


def recipe_value(key: str):
    """The paper's value for a dotted config key, or NOT_IN_PAPER."""
    return RECIPE.get(key, NOT_IN_PAPER)


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
# The released models on the hub (RECIPE; lm-provers model cards) are the paper's rows themselves.
PAPER_ROW_OF_CHECKPOINT.update({"Qwen/Qwen3-4B-Thinking-2507": "Qwen3-4B-Thinking-2507 (base)",
                                "lm-provers/QED-Nano-SFT": "QED-Nano-SFT",
                                "lm-provers/QED-Nano": "QED-Nano (SFT + rubric RL + RC RL)"})
FULL_MODEL_ROW = "QED-Nano (SFT + rubric RL + RC RL)"
SCAFFOLD_ROW = "QED-Nano + test-time scaffold"  # RECIPE: >1M tokens/problem, the DeepSeek-Math agent or RSA
SCAFFOLDS_OF_SCAFFOLD_ROW = ("dsm", "rsa")
BENCHMARK_LABELS = {"imo-proofbench": "IMO-ProofBench", "proofbench": "ProofBench", "imo-answerbench": "IMO-AnswerBench"}
PAPER_ROWS = sorted({r for by_row in PAPER_RESULTS.values() for r in by_row})


def check_paper_rows(paper_rows: dict) -> None:
    """Reject an eval.paper_rows value that names no row of the paper's table, saying which rows exist."""
    for ck, row in paper_rows.items():
        if row not in PAPER_ROWS:
            close = difflib.get_close_matches(str(row), PAPER_ROWS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"eval.paper_rows.{ck} = {row!r} is no row of the paper's table{hint} "
                             f"(rows: {', '.join(PAPER_ROWS)})")


def paper_row(checkpoint: str, scaffold: str, paper_rows: dict | None = None) -> str | None:
    """The paper's row a (checkpoint, scaffold) result is compared with: eval.paper_rows first, then the defaults;
    the full model under the DeepSeek-Math agent or RSA is the paper's test-time-scaffold row; None: no paper row."""
    row = (paper_rows or {}).get(checkpoint) or PAPER_ROW_OF_CHECKPOINT.get(checkpoint)
    if scaffold == "single":
        return row
    return SCAFFOLD_ROW if row == FULL_MODEL_ROW and scaffold in SCAFFOLDS_OF_SCAFFOLD_ROW else None


def reproduction_verdict(published: float, mean: float | None, low: float | None, high: float | None) -> str:
    """In words: is the published number inside the measured 95% interval, or how far outside it."""
    if mean is None or low is None or high is None:
        return "not measured"
    if low <= published <= high:
        return f"reproduces: {published:.1f} is inside [{low:.1f}, {high:.1f}]"
    side, gap = ("above", published - high) if published > high else ("below", low - published)
    return f"does not reproduce: the paper's {published:.1f} is {gap:.1f} points {side} the interval [{low:.1f}, {high:.1f}]"


def comparison(metrics: dict, paper_rows: dict | None = None) -> list[dict]:
    """One record per (checkpoint, benchmark, scaffold) that has a paper number: published vs measured with its
    interval and the verdict in words, and what it cost (tokens, wall time, judge tokens, dollars, dollars per point)."""
    check_paper_rows(paper_rows or {})
    out = []
    for bench, by_ck in metrics.get("by_benchmark", {}).items():
        for ck, by_sc in by_ck.items():
            for sc, b in by_sc.items():
                row = paper_row(ck, sc, paper_rows)
                published = PAPER_RESULTS.get(bench, {}).get(row) if row else None
                if published is None:
                    continue
                mean, low, high = b.get("mean_score_pct"), b.get("ci_low"), b.get("ci_high")
                usd = (b.get("generation_usd") or 0.0) + (b.get("judge_usd") or 0.0)
                out.append({"checkpoint": ck, "benchmark": BENCHMARK_LABELS.get(bench, bench), "scaffold": sc,
                            "paper row": row, "paper": published, "measured": mean, "ci_low": low, "ci_high": high,
                            "verdict": reproduction_verdict(published, mean, low, high),
                            "tokens per problem": b.get("tokens_per_problem"), "wall s": b.get("wall_s"),
                            "judge tokens per problem": b.get("judge_tokens_per_problem"),
                            "generation $": b.get("generation_usd"), "judge $": b.get("judge_usd"),
                            "$ per point": usd / mean if mean else None})
    return out
