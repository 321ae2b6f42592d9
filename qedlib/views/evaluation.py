"""What notebooks/05_eval.ipynb shows of the evaluation: the settings beside the paper's, the benchmark and model
tables, the pass@k view, the calibration and judge tables, one graded row read in full, the findings in words,
the paper tables, the final table and the results browser.

The stage's steps, rows and metrics are in qedlib.stages.evaluation; the figures shared with the run report in
qedlib.plots. Nothing here computes a result the stage writes.
"""
from __future__ import annotations

import html
from pathlib import Path

from .. import calibration as cal
from .. import stats
from ..display import metrics_table, say
from ..grading import build_prompt
from ..layout import CHECKPOINT_ORDER, MODEL_DIRS
from ..paper import PAPER_RESULTS, PAPER_ROW_OF_CHECKPOINT, comparison
from ..plots import Note, pass_at_k_figure
from ..stages.evaluation import Benchmark, Evaluation


# (label, dotted key in the config): the settings a reader of 05 needs; the paper's values are paper.RECIPE's
# (display.settings_table)
SETTINGS = [
    ("checkpoints", "eval.checkpoints"),
    ("benchmarks", "eval.benchmarks"),
    ("problems per benchmark (cap)", "eval.benchmark_limit"),
    ("runs per problem", "eval.samples"),
    ("sampling temperature", "eval.sampling.temperature"),
    ("max new tokens (single pass)", "eval.sampling.max_new_tokens"),
    ("scaffolds", "eval.scaffolds"),
    ("RC turns", "eval.rc.turns"),
    ("RC reasoning budget per turn", "eval.rc.reasoning_budget"),
    ("RC summary max tokens", "eval.rc.summary.max_new_tokens"),
    ("RC summary asked for", "eval.rc.summary_length"),
    ("RC summariser at test time", "eval.rc.summariser"),
    ("judge model", "eval.judge.endpoint.model"),
    ("judge prompt (shipped set)", "eval.judge.prompt"),
    ("judge mode", "eval.judge.mode"),
]


def benchmarks_table(benchmarks: list[Benchmark]):
    """One row per benchmark: its size, judge prompt, task and splits (section "Benchmarks")."""
    import pandas as pd  # heavy: loads only when a table is shown
    return pd.DataFrame([{"benchmark": b.name, "problems": len(b.problems), "judge prompt": b.judge_prompt, "task": b.task,
                          "splits": sorted({str(p.extra.get("split")) for p in b.problems})} for b in benchmarks])


def models_table(models: list[tuple[str, object]]):
    """One row per model under test: the checkpoint name, the model reference and its backend ("Models under test")."""
    import pandas as pd  # heavy: loads only when a table is shown
    return pd.DataFrame([{"checkpoint": name, "model": ep.model, "backend": ep.backend} for name, ep in models])


def pass_at_k_view(rows: list[dict], cfg):
    """Section "pass@k": pass@k per benchmark, checkpoint and scaffold (plots.pass_at_k_figure), or a Note saying
    why there is none: with one sample per problem pass@k is pass@1."""
    ev = cfg.eval
    curve = stats.pass_at_k_curve(rows, ("benchmark", "checkpoint", "scaffold"), ev.success_threshold, ev.bootstrap, cfg.seed)
    if ev.samples > 1 and len(curve):
        return pass_at_k_figure(curve)
    return Note(f"One sample per problem (eval.samples = {ev.samples}): pass@k is pass@1, the success rate. "
                "See *Try it* below.")



def judge_comparison_figures(judges: dict) -> list:
    """The judges' official metrics side by side as one figure (none when calibration was skipped)."""
    return [cal.comparison_figure(judges)] if judges else []


def judge_comparison_table(judges: dict):
    """The judges side by side (a DataFrame, one row per judge; None when calibration was skipped)."""
    return cal.comparison_table(judges)


def calibration_figures(calibration: dict | None) -> list:
    """The calibration's figures (none when calibration was skipped)."""
    return list(cal.calibration_figures(calibration).values()) if calibration else []


def calibration_table(calibration: dict | None):
    """The judge next to its baselines (a DataFrame); when calibration was skipped, say so and return None."""
    if calibration:
        return cal.judge_vs_baselines(calibration)
    say("eval.calibration_limit is 0: calibration skipped.")
    return None



def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def _share(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def pick_example(rows: list[dict]) -> dict:
    """The row to read in full: a proof the judge actually read (single pass, the latest checkpoint) if there is one."""
    if not rows:
        raise ValueError("no result rows: run the evaluation first")
    judged = [r for r in rows if str(r.get("graded_by", "")).startswith("judge") and r.get("valid")]
    judged = [r for r in judged if "extracted_answer" not in r] or judged  # a proof over a short answer
    pool = [r for r in judged if r["scaffold"] == "single"] or judged or rows
    return pool[-1]


def worked_example(run: "Evaluation", rows: list[dict], benchmarks: list[Benchmark]) -> str:
    """Section "One graded row, read in full" (Markdown): the problem (as a quote, its formulas typeset), the model's
    proof, the judge prompt as sent and the judge's answer (those three exactly as written, in text fences)."""
    row = pick_example(rows)
    bench = next(b for b in benchmarks if b.name == row["benchmark"])
    problem = next(p for p in bench.problems if p.id == row["problem_id"])
    fence = lambda text: f"````text\n{text}\n````"
    head = (f"**Row** `{row['key']}` (checkpoint {row['checkpoint']}, benchmark {row['benchmark']}, "
            f"scaffold {row['scaffold']}, sample {row['sample']}): {row['tokens']} generated tokens.")
    quote = "\n".join("> " + line for line in problem.problem.splitlines())  # the benchmark's text: typeset
    parts = [head, "**The problem**", quote,
             "**The model's proof** (the text after the last `</think>`)", fence(row["model_solution"] or "(nothing)")]
    score = "no score (invalid)" if row["score"] is None else f"**{row['score']:.2f} / 7**"
    if row.get("no_proof"):
        why = {"truncated": "the thinking never closed (truncated)", "empty": "nothing follows `</think>` (empty proof)",
               "no_answer": "no final `\\boxed{}` answer"}.get(row["no_proof"], row["no_proof"])
        parts.append(f"**No judge call**: {why}, so the row scores a valid 0 without asking the judge. Grade: {score}.")
        return "\n\n".join(parts)
    if row.get("graded_by") in ("exact", "math-verify"):
        parts.append(f"**Graded by {row['graded_by']}** (no judge call): {row.get('extracted_answer')!r} against the "
                     f"reference {row.get('reference_answer')!r}. Grade: {score}.")
        return "\n\n".join(parts)
    mode = run.cfg.eval.judge.mode
    sent = row["model_solution"] or ""
    if bench.task == "answer":  # the answer judge sees the extracted answer only (grading.Grader does the same)
        sent = f"\\boxed{{{row.get('extracted_answer') or ''}}}"
    gp = build_prompt(bench.judge_prompt, mode, problem, sent)
    parts += [f"**The judge prompt as sent** (`{bench.judge_prompt}` prompt, one user message)", fence(gp.text)]
    parts.append(_judge_answer(run, bench, gp, row, mode, score))
    return "\n\n".join(parts)


def _judge_answer(run, bench, gp, row, mode, score) -> str:
    """The judge's side of a worked example: its text (text mode) or its probabilities over the allowed values (score_prob)."""
    if mode == "text":
        return f"**The judge's answer**\n\n````text\n{row.get('judge_text') or '(empty)'}\n````\n\nRead from `<{gp.tag}>`: {score}."
    grader = run.grader(bench.judge_prompt)
    rec = grader.cache.records.get(grader.cache_key(gp.text)) if grader.cache is not None else None
    probs = (rec or {}).get("grade", {}).get("probs") or {}
    shown = ", ".join(f"{k}: {v:.2f}" for k, v in probs.items()) or "(not in the judge cache)"
    return (f"**The judge's answer** (score_prob mode: the assistant turn is started with `{gp.prefix}` and the judge "
            f"writes nothing; the grade is the expected value of its next-token probabilities over the allowed values "
            f"{list(gp.allowed)}, renormalised)\n\nprobabilities: {shown}\n\nGrade: {score}.")




def _ordered(checkpoints) -> list:
    """Checkpoint names in pipeline order (any other model after them, in its own order)."""
    rank = {c: k for k, c in enumerate(CHECKPOINT_ORDER)}
    return sorted(checkpoints, key=lambda c: rank.get(c, len(rank)))


def _groups(metrics: dict):
    """(checkpoint, scaffold, block) of metrics["scores"], checkpoints in pipeline order."""
    scores = metrics.get("scores", {})
    return [(ck, sc, b) for ck in _ordered(scores) for sc, b in scores[ck].items()]


def means_findings(metrics: dict) -> str:
    """Why the two means (invalid grades dropped / counted as 0) agree or differ, from this run's numbers."""
    out = []
    for ck, sc, b in _groups(metrics):
        inv, drop, zero = b.get("invalid_rate") or 0.0, b.get("mean_pct_invalid_dropped"), b.get("mean_pct_invalid_as_0")
        if not inv:
            out.append(f"{ck} / {sc}: no invalid grade, so both means are {_pct(drop)}.")
        else:
            out.append(f"{ck} / {sc}: {inv:.0%} of grades are invalid; dropping them gives {_pct(drop)}, counting them "
                       f"as 0 gives {_pct(zero)} (the gap is what the failed grades would be worth if they were all 0).")
    lead = ("An invalid grade is a judge failure (no readable score), not a 0. In score_prob mode the judge always "
            "returns a valid expected score, so invalid grades come only from text mode (or undecidable answers).")
    return lead + "\n\n" + "\n".join(f"- {x}" for x in out)


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def _diff(c: dict) -> str:
    return (f"{_signed(c.get('diff_pct'))} points [{_signed(c.get('ci_low'))}, {_signed(c.get('ci_high'))}]"
            f" over {c.get('problems', 0)} problems")


def ranking_findings(metrics: dict) -> str:
    """Section "Comparison across checkpoints and scaffolds": per scaffold, the checkpoints ranked by mean score,
    then each stage's change over the checkpoint before it read from `metrics["comparisons"]` (paired bootstrap over
    problems, stages.evaluation.paired_difference). Test: a difference is called beyond noise only when its paired
    95% interval excludes 0 with >= 5 problems (`beyond_noise`); every other difference is said to be within noise,
    whatever its sign; a ranking with ties says "=" for equal means."""
    comps = metrics.get("comparisons") or []
    scores = metrics.get("scores", {})
    if not scores:
        return "No result rows: nothing to rank."
    out = []
    scaffolds = sorted({sc for by in scores.values() for sc in by}, key=lambda s: (s != "single", s))
    for sc in scaffolds:
        have = [(ck, scores[ck][sc].get("mean_score_pct")) for ck in _ordered(scores) if sc in scores[ck]]
        have = sorted(have, key=lambda x: -(x[1] if x[1] is not None else -1))
        rank = " > ".join(f"{ck} {_pct(v)}" for ck, v in have)
        for (a, va), (b, vb) in zip(have, have[1:]):  # equal means are ties, not an order
            if va is not None and vb is not None and round(va, 1) == round(vb, 1):
                rank = rank.replace(f"{a} {_pct(va)} > {b}", f"{a} {_pct(va)} = {b}")
        lines = [f"**{sc}**: {rank} (mean score, % of 7)."]
        for c in (c for c in comps if c["kind"] == "checkpoint" and c.get("scaffold") == sc):
            verdict = ("beyond noise" if c.get("beyond_noise") else
                       "within noise: the interval includes 0" if c.get("problems", 0) >= 5 else
                       "not tested: fewer than 5 shared problems")
            lines.append(f"- {c['a']} -> {c['b']}: {_diff(c)}, {verdict}.")
        out.append("\n".join(lines))
    sc_comps = [c for c in comps if c["kind"] == "scaffold"]
    if sc_comps:
        beyond = [c for c in sc_comps if c.get("beyond_noise")]
        lines = ["**Scaffold against single pass** (same checkpoint, same problems):"]
        lines += [f"- {c['checkpoint']}: {c['b']} - single {_diff(c)}, "
                  f"{'beyond noise' if c.get('beyond_noise') else 'within noise'}." for c in sc_comps]
        lines.append(f"\n{len(beyond)} of {len(sc_comps)} checkpoints score differently beyond noise with "
                     f"{'/'.join(sorted({c['b'] for c in sc_comps}))} than with a single pass.")
        out.append("\n".join(lines))
    up = [c for c in comps if c["kind"] == "checkpoint" and c.get("beyond_noise") and (c.get("diff_pct") or 0) > 0]
    down = [c for c in comps if c["kind"] == "checkpoint" and c.get("beyond_noise") and (c.get("diff_pct") or 0) < 0]
    steps = [c for c in comps if c["kind"] == "checkpoint"]
    out.append(f"Of {len(steps)} checkpoint comparisons, {len(up)} rise and {len(down)} fall beyond noise; "
               f"the rest are within noise. Each interval is a paired 95% bootstrap over problems of the difference "
               f"(the same problems resampled for both checkpoints), not two overlapping bars.")
    return "\n\n".join(out)


def paper_table(metrics: dict, scaffold: str = "single"):
    """Section "Next to the paper": the paper's three benchmarks (base -> SFT -> full RL) next to this run's scores
    per benchmark, one row per checkpoint."""
    import pandas as pd  # heavy: loads only when a table is shown
    names = {"imo-proofbench": "IMO-ProofBench", "proofbench": "ProofBench", "imo-answerbench": "IMO-AnswerBench"}
    out = []
    for ck in _ordered(metrics.get("checkpoints", [])):
        paper_row = PAPER_ROW_OF_CHECKPOINT.get(ck)
        row = {"checkpoint": ck}
        for b, label in names.items():
            row[f"paper {label}"] = PAPER_RESULTS[b].get(paper_row) if paper_row else None
        for b, by_ck in metrics.get("by_benchmark", {}).items():
            row[f"this run {b} ({scaffold})"] = by_ck.get(ck, {}).get(scaffold, {}).get("mean_score_pct")
        out.append(row)
    return pd.DataFrame(out).set_index("checkpoint")


def paper_findings() -> str:
    """What the paper's three columns say about each stage, computed from paper.PAPER_RESULTS ("Next to the paper")."""
    rows = [PAPER_ROW_OF_CHECKPOINT[k] for k in ("base", "sft", "rc_rl")]
    parts = []
    for b, label in (("imo-proofbench", "IMO-ProofBench"), ("proofbench", "ProofBench"), ("imo-answerbench", "IMO-AnswerBench")):
        base, sft, rl = (PAPER_RESULTS[b][r] for r in rows)
        parts.append(f"{label} {base} -> {sft} -> {rl} (SFT {sft - base:+.1f}, RL {rl - sft:+.1f})")
    return ("Paper, base -> SFT -> full RL: " + "; ".join(parts) + ". RL barely moves IMO-ProofBench but adds most of "
            "its gain on ProofBench and AnswerBench, so compare runs on all three columns. The paper's rubric RL and "
            "RC RL were trained one after the other and reported together, so `rubric_rl` has no paper row.")


def findings(metrics: dict, calibration: dict | None = None) -> str:
    """What the eval scores mean, from this run's numbers: score vs the share with no proof, and what a constant judge predicts."""
    groups = _groups(metrics)
    if not groups:
        return "No result rows: nothing to interpret."
    verdict = cal.beats_constant(calibration) if calibration else None
    judge_mean = cal.constant_baseline(calibration)["judge_mean"] if calibration else None
    head = ["| checkpoint | scaffold | score | truncated | no proof to grade | " +
            ("constant judge predicts |" if judge_mean is not None else ""),
            "|---|---|---|---|---|" + ("---|" if judge_mean is not None else "")]
    for ck, sc, b in groups:
        line = f"| {ck} | {sc} | {_pct(b.get('mean_score_pct'))} | {_share(b.get('truncation_rate'))} | {_share(b.get('no_proof_rate'))} |"
        if judge_mean is not None:
            pred = None if b.get("no_proof_rate") is None else 100 * judge_mean / 7 * (1 - b["no_proof_rate"])
            line += f" {_pct(pred)} |"
        head.append(line)
    text = ("A row with no proof to grade (truncated: the thinking never closed; or an empty proof) scores a valid 0 "
            "without a judge call; every other row gets the judge's grade.")
    if judge_mean is None:
        why = "Run the judge calibration to see whether those grades carry signal."
    elif verdict:
        why = ("The calibration says the judge carries signal, so differences between rows beyond the no-proof share "
               "reflect proof quality (read them against the intervals).")
    else:
        why = (f"The calibration says the judge is no better than a constant: it gives about {judge_mean:.2f} / 7 "
               f"= {judge_mean / 7:.0%} to anything it reads. So each score is about {judge_mean / 7:.0%} x (1 - the share "
               f"with no proof): compare the last two columns. Differences between checkpoints here measure how often "
               f"a model closes its thinking and writes something, not how good its proofs are.")
    return text + "\n\n" + "\n".join(head) + "\n\n" + why


def final_table(metrics: dict):
    """Section "Metrics and the report": score and truncation per checkpoint (rows) and scaffold (columns), plus
    calibration."""
    import pandas as pd  # heavy: loads only when a table is shown
    scaffolds = metrics.get("scaffolds", [])
    cols = []
    for sc in scaffolds:
        keys = [(f"{ck}: {what}", f"scores.{ck}.{sc}.{key}") for ck in _ordered(metrics.get("checkpoints", []))
                for what, key in (("score % of 7", "mean_score_pct"), ("truncated (share of rows)", "truncation_rate"))]
        keys += [(f"judge calibration: {k}", f"judge_calibration.{k}") for k in ("mae", "pairwise_agreement", "bucket_accuracy")]
        cols.append(metrics_table(metrics, keys, title=sc))
    table = pd.concat(cols, axis=1) if cols else pd.DataFrame()
    calib = [i for i in table.index if i.startswith("judge calibration")]
    for sc in scaffolds[1:]:  # calibration does not depend on the scaffold: show it once
        table.loc[calib, sc] = ""
    return table


# ---------------------------------------------------------------- the paper beside the run (params/paper-table.yaml)
def paper_comparison_table(metrics: dict, cfg):
    """Each released model's published number next to the measured one with its 95% interval, the verdict in
    words, and the cost columns (tokens, wall time, judge tokens, dollars); None when no result has a paper row
    (section "The released models against the published numbers")."""
    import pandas as pd  # heavy: loads only when a table is shown
    recs = comparison(metrics, cfg.eval.paper_rows)
    if not recs:
        return None
    return pd.DataFrame(recs).set_index(["checkpoint", "benchmark", "scaffold"])


def paper_comparison_findings(metrics: dict, cfg) -> str:
    """How the run's numbers are scored for the comparison, and each comparison's verdict, in words."""
    recs = comparison(metrics, cfg.eval.paper_rows)
    if not recs:
        names = ", ".join(metrics.get("checkpoints", [])) or "none"
        return (f"No result has a paper number (checkpoints: {names}). The paper's rows are the released models on "
                "the paper's benchmarks; name the row a checkpoint stands for in `eval.paper_rows`.")
    invalid = cfg.eval.judge.invalid
    how = ("A failed grade counts as 0, as the official `stats.py` counts a null score"
           if invalid == "zero" else
           f"Failed grades are dropped (eval.judge.invalid = {invalid}); the official `stats.py` counts them as 0, "
           "so set eval.judge.invalid: zero to score as the paper does")
    lines = [f"Measured: mean score % of 7 over {cfg.eval.samples} run(s) with a 95% bootstrap interval over "
             f"problems. {how}. IMO-AnswerBench rows score 7 or 0, so its % of 7 is the accuracy the paper reports."]
    for r in recs:
        lines.append(f"- **{r['checkpoint']}** / {r['benchmark']} ({r['scaffold']}): paper {r['paper']:.1f}, "
                     f"measured {_pct(r['measured'])}: {r['verdict']}.")
    n_in = sum(r["verdict"].startswith("reproduces") for r in recs)
    lines.append(f"{n_in} of {len(recs)} published numbers fall inside the measured interval.")
    return "\n".join(lines)


# ---------------------------------------------------------------- Try it (section "Try it")
def _group_seconds(metrics: dict | None, checkpoint: str, scaffold: str) -> float | None:
    """Wall seconds this run spent generating and grading one checkpoint with one scaffold (all benchmarks)."""
    walls = [by_ck.get(checkpoint, {}).get(scaffold, {}).get("wall_s") for by_ck in (metrics or {}).get("by_benchmark", {}).values()]
    walls = [w for w in walls if w is not None]
    return sum(walls) if walls else None


def try_it_seconds(metrics: dict | None, cfg) -> dict:
    """Each experiment's evaluation time, scaled from this run's measured time for the SFT groups (wall_s in
    metrics["by_benchmark"]): matched tokens = single pass x (budget / max_new_tokens) + RC; three samples = 3 x
    single pass; text judge = at least the single pass (its judge writes text, which a score_prob judge does not).
    None where this run did not evaluate the group; the kernel start and model loading come on top."""
    ev = cfg.eval
    single, rc = _group_seconds(metrics, "sft", "single"), _group_seconds(metrics, "sft", "rc")
    budget = ev.rc.turns * (ev.rc.reasoning_budget + ev.rc.summary.max_new_tokens)
    return {"matched": single * budget / ev.sampling.max_new_tokens + rc if single is not None and rc is not None else None,
            "samples": 3 * single if single is not None else None,
            "judge-text": single}


def _reachable_threshold(rows: list[dict]) -> tuple[int, float]:
    """(threshold, highest grade): eval.success_threshold is a whole grade, so the median of the judge's non-zero
    grades on this run rounded down (at least 1): a grade some rows reach and some do not; and the highest grade."""
    graded = sorted(r["score"] for r in rows if r.get("score"))
    if not graded:
        return 1, 0.0
    return max(1, int(graded[len(graded) // 2])), graded[-1]


def try_it(rows: list[dict], cfg, run_dir, metrics: dict | None = None, params_file: str = "params/cpu.yaml") -> str:
    """Section "Try it": experiments that start from this run's own SFT checkpoint (the base model never closes its
    thinking on the laptop, so from it every score is 0), with a pass@k threshold this run's judge reaches and the
    time of each scaled from this run's own measured group times (try_it_seconds)."""
    sft = (Path(run_dir).resolve() / MODEL_DIRS["sft"])
    if not sft.exists():
        return (f"These experiments start from this run's SFT model ({sft}), which does not exist: run 02_sft first "
                f"(`python -m qedlib run {params_file} --stages 02_sft`).")
    thr, top = _reachable_threshold(rows)
    ev = cfg.eval
    budget = ev.rc.turns * (ev.rc.reasoning_budget + ev.rc.summary.max_new_tokens)
    base = f"python -m qedlib run {params_file} --stages 05_eval --set 'eval.checkpoints=[{sft}]'"
    secs = try_it_seconds(metrics, cfg)
    took = lambda name: ("time: run this notebook's evaluation of sft first" if secs.get(name) is None else
                         f"{'at least ' if name == 'judge-text' else ''}about {secs[name]:.0f} s of evaluation on this "
                         f"machine, from this run's own SFT times, plus the start")
    exps = [
        ("Single pass vs the reasoning cache at matched tokens", "matched",
         f"--set 'eval.scaffolds=[single, rc]' --set eval.sampling.max_new_tokens={budget} --set eval.calibration_limit=0",
         f"RC spends at most turns x (reasoning budget + summary) = {ev.rc.turns} x ({ev.rc.reasoning_budget} + "
         f"{ev.rc.summary.max_new_tokens}) = {budget} tokens per problem; the single pass gets the same. Look for: "
         "*tokens per problem* of the two scaffolds (matched?), then in *Comparison across checkpoints and scaffolds* "
         "the paired difference rc - single and whether its interval excludes 0."),
        ("Three samples: the run spread and pass@k", "samples",
         f"--set 'eval.scaffolds=[single]' --set eval.samples=3 --set 'eval.pass_k=[1, 2, 3]' "
         f"--set eval.success_threshold={thr} --set eval.calibration_limit=0",
         f"Success is a grade >= {thr}: the median of this run's non-zero grades, rounded down to a whole grade (the "
         f"highest was {top:.2f} / 7, so the default threshold {ev.success_threshold:g} is never reached). Look for: `run_std_pct` in the "
         "scores table (how far one run's mean moves from another's) and the pass@k figure: does pass@3 exceed "
         "pass@1 by more than its interval?"),
        ("The judge in text mode", "judge-text",
         "--set 'eval.scaffolds=[single]' --set eval.judge.mode=text --set eval.calibration_limit=12",
         "The judge writes an assessment and a `<score>` tag instead of being read off its next-token "
         "probabilities. Look for: the invalid rate and the two means (a forgotten tag is an invalid grade, not a 0), "
         "the judge's own words in *One graded row*, and whether the calibration's MAE beats the constant judge."),
    ]
    out = ["Each command writes a fresh run folder (`--run-name try-<name>` under `outputs/`) and evaluates this "
           f"run's SFT model, `{sft}`. Open `outputs/try-<name>/05_eval/05_eval.ipynb` (or its `.html`) and read the "
           "sections named below."]
    for i, (title, name, sets, look) in enumerate(exps, 1):
        out.append(f"{i}. **{title}** ({took(name)}):\n   ```bash\n   {base} --run-name try-{name} {sets}\n   ```\n"
                   f"   {look}")
    return "\n\n".join(out)


# ---------------------------------------------------------------- results browser (section "Browse the results")
def results_browser(rows: list[dict]):
    """An ipywidgets browser over eval rows: pick checkpoint/scaffold/problem/sample; see problem, proof, grade, judge text."""
    import ipywidgets as W  # optional: widgets only in a notebook
    if not rows:
        return W.HTML("<i>No evaluation rows to browse.</i>")
    pick = lambda field: sorted({str(r[field]) for r in rows})
    ck = W.Dropdown(options=pick("checkpoint"), description="checkpoint")
    sc = W.Dropdown(options=pick("scaffold"), description="scaffold")
    bench = W.Dropdown(options=pick("benchmark"), description="benchmark")
    prob = W.Dropdown(options=pick("problem_id"), description="problem")
    samp = W.Dropdown(options=pick("sample"), description="sample")
    out = W.HTML()
    index = {(str(r["checkpoint"]), str(r["scaffold"]), str(r["benchmark"]), str(r["problem_id"]), str(r["sample"])): r for r in rows}

    def show(*_):
        r = index.get((ck.value, sc.value, bench.value, prob.value, samp.value))
        out.value = _row_html(r) if r else "<i>no row for this choice</i>"

    for w in (ck, sc, bench, prob, samp):
        w.observe(show, names="value")
    show()
    return W.VBox([W.HBox([ck, sc, bench]), W.HBox([prob, samp]), out])


def _row_html(r: dict) -> str:
    pre = lambda t: f"<pre style='white-space:pre-wrap;max-height:300px;overflow:auto'>{html.escape(str(t or ''))}</pre>"
    grade = f"score {r.get('score')} / 7" if r.get("score") is not None else f"invalid ({r.get('invalid_reason')})"
    head = (f"<b>{html.escape(str(r['problem_id']))}</b> · {grade} · tokens {r.get('tokens')} · "
            f"{'truncated (no final proof)' if r.get('truncated') else 'proof present'}")
    return (head + "<h4>Problem</h4>" + pre(r.get("problem")) + "<h4>Proof</h4>" + pre(r.get("model_solution")) +
            "<h4>Judge's reasoning</h4>" + pre(r.get("judge_text")))
