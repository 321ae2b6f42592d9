"""Judge calibration: how far a judge (model + prompt + mode) is from reference grades.

Used by notebook 05_eval (the judge-calibration section). QED-Nano chose its RL judge this way.
`load_calibration` reads (problem, proof, reference grade) rows (default: the shipped
qedlib/data/calibration.jsonl joined with the shipped problems); `calibrate(grader, rows)`
grades them and reports mean absolute error, bucket accuracy over {0}, {1-3}, {4-6}, {7},
pairwise ordering agreement within a problem, the error the judge would put into GRPO
advantages, the invalid rate, tokens and cost per grade, and the four official grader metrics
(`official_metrics`, as the official eval/scripts/stats.py --grader defines them); `calibration_figures`
plots it. Any graded-proof set is read through a column mapping (GRADINGBENCH_COLUMNS: the human-graded
lm-provers/matharena-gradingbench); `comparison_table` / `comparison_figure` set several judges side by side.
"""
from __future__ import annotations

import itertools
import statistics
from collections import defaultdict

from .problem_sets import DataError, Problem, load_problems, read_records, shipped_path
from .verdicts import invalid_table

BUCKETS = ("0", "1-3", "4-6", "7")
# lm-provers/matharena-gradingbench (human points on MathArena proofs): the columns the official
# eval/scripts/grading.py --matharena reads (problem, answer = the proof, details = the marking scheme) and
# stats.py --grader compares with (points; problem_idx groups a problem's proofs).
GRADINGBENCH = "lm-provers/matharena-gradingbench"
GRADINGBENCH_COLUMNS = {"problem": "problem", "proof": "answer", "reference_grade": "points",
                        "problem_id": "problem_idx", "rubric": "details"}


def judge_label(endpoint) -> str:
    """A judge's name in tables: its model, with the reasoning effort when one is set."""
    return f"{endpoint.model} ({endpoint.reasoning_effort})" if endpoint.reasoning_effort else str(endpoint.model)


def rubric_text(value) -> str | None:
    """A marking scheme as text: a string as it is, a list of {title, points | max_points, desc} items one per line."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for item in value:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            pts = item.get("points", item.get("max_points"))
            desc = item.get("desc", item.get("description", ""))
            parts.append(f"{item.get('title', 'Part')} ({pts} points): {desc}")
        return "\n".join(parts)
    return str(value)


def bucket_of(points: float) -> str:
    """The bucket ({0}, {1-3}, {4-6}, {7}) of a score, rounded to the nearest integer first."""
    p = int(round(points))
    return "0" if p <= 0 else "1-3" if p <= 3 else "4-6" if p <= 6 else "7"


def load_calibration(path=None, columns: dict | None = None, problems="shipped") -> list[dict]:
    """Calibration rows {problem, problem_id, proof, reference_grade, kind, note}.

    `path`: a .jsonl/.csv/.parquet of graded proofs (default the shipped set). `columns` maps our
    names (problem_id, proof, reference_grade, kind, note, and optionally problem, rubric,
    reference_solution, answer to give the problem inline) to the file's columns. Rows without an
    inline problem are joined on problem_id with `problems` (a load_problems source or a list).
    """
    if columns is None and path is not None and GRADINGBENCH in str(path):
        columns = GRADINGBENCH_COLUMNS
    columns = columns or {}
    where = str(path or shipped_path("calibration.jsonl"))
    raw = read_records(where)[0]  # a file, a save_to_disk folder or hub:org/name
    col = lambda name: columns.get(name, name)
    pool = None
    out = []
    for i, row in enumerate(raw):
        for need in ("proof", "reference_grade"):
            if col(need) not in row:
                raise DataError(f"{where}: row {i}: column {col(need)!r} is missing (columns present: {sorted(row)}); "
                                f"map it with columns={{{need!r}: <column>}}")
        grade = row[col("reference_grade")]
        try:
            grade = float(grade)
        except (TypeError, ValueError):
            raise DataError(f"{where}: row {i}: reference grade {grade!r} is not a number") from None
        if not 0 <= grade <= 7:
            raise DataError(f"{where}: row {i}: reference grade {grade} is outside 0-7")
        pid = row.get(col("problem_id"))
        if row.get(col("problem")):
            problem = Problem(str(pid if pid is not None else f"row-{i}"), str(row[col("problem")]),
                              reference_solution=row.get(col("reference_solution")), rubric=rubric_text(row.get(col("rubric"))),
                              answer=row.get(col("answer")))
        else:
            if pool is None:
                pool = {p.id: p for p in (load_problems(problems) if isinstance(problems, str) else problems)}
            if pid is None or str(pid) not in pool:
                raise DataError(f"{where}: row {i}: problem id {pid!r} (column {col('problem_id')!r}) is not among the "
                                f"{len(pool)} problems of {problems if isinstance(problems, str) else 'the given list'}; "
                                f"give the problem text inline with columns={{'problem': <column>}}")
            problem = pool[str(pid)]
        out.append({"problem": problem, "problem_id": problem.id, "proof": str(row[col("proof")] or ""),
                    "reference_grade": grade, "kind": row.get(col("kind"), ""), "note": row.get(col("note"), "")})
    if not out:
        raise DataError(f"{where}: no calibration rows")
    return out


def pairwise_agreement(rows: list[dict]) -> tuple[float | None, int]:
    """Fraction of same-problem pairs with different reference grades that the judge orders the same way (ties 1/2)."""
    by_problem = defaultdict(list)
    for r in rows:
        by_problem[r["problem_id"]].append(r)
    agree, pairs = 0.0, 0
    for group in by_problem.values():
        for a, b in itertools.combinations(group, 2):
            if a["reference_grade"] == b["reference_grade"]:
                continue
            pairs += 1
            ref = a["reference_grade"] - b["reference_grade"]
            judge = a["score"] - b["score"]
            agree += 0.5 if judge == 0 else float((judge > 0) == (ref > 0))
    return (agree / pairs if pairs else None), pairs


def advantage_error(rows: list[dict]) -> float | None:
    """Mean |(score - problem mean score) - (reference - problem mean reference)| in points (GRPO advantage error)."""
    by_problem = defaultdict(list)
    for r in rows:
        by_problem[r["problem_id"]].append(r)
    errs = []
    for group in by_problem.values():
        if len(group) < 2:
            continue
        ms = statistics.fmean(r["score"] for r in group)
        mr = statistics.fmean(r["reference_grade"] for r in group)
        errs += [abs((r["score"] - ms) - (r["reference_grade"] - mr)) for r in group]
    return statistics.fmean(errs) if errs else None


# ---------------------------------------------------------------- the official grader metrics
# As CMU-AIRe/QED-Nano eval/scripts/stats.py --grader defines them, on (graded score, human points) pairs.
def official_accuracy(pairs: list[tuple[float, float]]) -> float | None:
    """Share of proofs whose score and points fall in the same bucket 0 / 1-3 / 4-6 / 7, bounds inclusive and
    nothing rounded (a score of 3.5 is in no bucket, so it never matches)."""
    def same(s, p):
        return (s == 0 and p == 0) or (s == 7 and p == 7) or (1 <= s <= 3 and 1 <= p <= 3) or (4 <= s <= 6 and 4 <= p <= 6)
    return sum(same(s, p) for s, p in pairs) / len(pairs) if pairs else None


def _groups(table: list[dict]) -> list[list[dict]]:
    """The rows of each problem with more than one proof, in first-seen problem order."""
    by_problem: dict = {}
    for t in table:
        by_problem.setdefault(t["problem_id"], []).append(t)
    return [g for g in by_problem.values() if len(g) > 1]


def local_consistency(table: list[dict]) -> float | None:
    """Per problem, the share of proof pairs i < j with (score_i <= score_j) == (points_i <= points_j) (equal
    points and ties included), averaged over problems with two or more proofs."""
    per = []
    for g in _groups(table):
        pairs = list(itertools.combinations(g, 2))
        per.append(statistics.fmean(float((a["score"] <= b["score"]) == (a["reference_grade"] <= b["reference_grade"]))
                                    for a, b in pairs))
    return statistics.fmean(per) if per else None


def advantage_diff(table: list[dict]) -> float | None:
    """Per problem, mean |(score - problem mean score) - (points - problem mean points)|, averaged over problems
    with two or more proofs (the error the judge would put into a GRPO advantage)."""
    per = []
    for g in _groups(table):
        ms = statistics.fmean(t["score"] for t in g)
        mp = statistics.fmean(t["reference_grade"] for t in g)
        per.append(statistics.fmean(abs((t["score"] - ms) - (t["reference_grade"] - mp)) for t in g))
    return statistics.fmean(per) if per else None


def official_metrics(table: list[dict]) -> dict:
    """MAE, bucketed accuracy, local (within-problem pairwise) consistency and advantage error over graded rows
    ({problem_id, score, reference_grade}). The official script fills a missing grade with 0; we pass only
    valid grades (a failed judge call is no grade, and is retried on rerun) and report the invalid rate apart."""
    pairs = [(t["score"], t["reference_grade"]) for t in table]
    return {"mae": statistics.fmean(abs(s - p) for s, p in pairs) if pairs else None,
            "accuracy": official_accuracy(pairs), "local_consistency": local_consistency(table),
            "advantage_diff": advantage_diff(table)}


def calibrate(grader, rows: list[dict]) -> dict:
    """Grade the rows with `grader` and measure it against the reference grades (metrics + per-row table)."""
    grades = grader.grade([r["problem"] for r in rows], [r["proof"] for r in rows])
    table = []
    for r, g in zip(rows, grades):
        table.append({"problem_id": r["problem_id"], "kind": r["kind"], "reference_grade": r["reference_grade"],
                      "score": g.points, "valid": g.valid, "reason": g.reason,
                      "reference_bucket": bucket_of(r["reference_grade"]),
                      "bucket": bucket_of(g.points) if g.valid else None,
                      "abs_error": abs(g.points - r["reference_grade"]) if g.valid else None,
                      "mass": g.mass, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                      "cost": g.cost, "cached": g.cached})
    valid = [t for t in table if t["valid"]]
    n = len(table)
    agreement, pairs = pairwise_agreement(valid)
    result = {
        "judge": grader.settings(),
        "rows": n,
        "valid": len(valid),
        "invalid_rate": (n - len(valid)) / n if n else 0.0,
        "invalid_by_reason": invalid_table(grades),
        "mae": statistics.fmean(t["abs_error"] for t in valid) if valid else None,
        "bucket_accuracy": statistics.fmean(t["bucket"] == t["reference_bucket"] for t in valid) if valid else None,
        "pairwise_agreement": agreement,
        "pairs": pairs,
        "advantage_error": advantage_error(valid),
        "official": official_metrics(valid),
        "mean_score": statistics.fmean(t["score"] for t in valid) if valid else None,
        "mean_reference": statistics.fmean(t["reference_grade"] for t in table) if table else None,
        "prompt_tokens_per_grade": statistics.fmean(t["prompt_tokens"] for t in table) if table else 0.0,
        "completion_tokens_per_grade": statistics.fmean(t["completion_tokens"] for t in table) if table else 0.0,
        "cost_per_grade": statistics.fmean(t["cost"] for t in table) if table else 0.0,
        "table": table,
    }
    return result


def bucket_confusion(result: dict) -> list[list[int]]:
    """Counts[reference bucket][judge bucket] over the valid rows, in BUCKETS order."""
    idx = {b: k for k, b in enumerate(BUCKETS)}
    m = [[0] * len(BUCKETS) for _ in BUCKETS]
    for t in result["table"]:
        if t["valid"]:
            m[idx[t["reference_bucket"]]][idx[t["bucket"]]] += 1
    return m


def calibration_figures(result: dict) -> dict:
    """Plotly figures: "confusion" (reference vs judge buckets) and "scatter" (judge score vs reference grade)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    m = bucket_confusion(result)
    confusion = go.Figure(go.Heatmap(z=m, x=[f"judge {b}" for b in BUCKETS], y=[f"reference {b}" for b in BUCKETS],
                                     text=m, texttemplate="%{text}", colorscale="Blues", showscale=False))
    acc = result["bucket_accuracy"]
    confusion.update_layout(title=f"Score buckets: judge vs reference (accuracy {acc:.0%})" if acc is not None
                            else "Score buckets: no valid grades", width=520, height=460)
    valid = [t for t in result["table"] if t["valid"]]
    scatter = go.Figure()
    for kind in sorted({t["kind"] for t in valid}):
        pts = [t for t in valid if t["kind"] == kind]
        scatter.add_trace(go.Scatter(x=[t["reference_grade"] for t in pts], y=[t["score"] for t in pts], mode="markers",
                                     name=kind or "rows", text=[t["problem_id"] for t in pts],
                                     marker=dict(size=9, opacity=0.75)))
    scatter.add_trace(go.Scatter(x=[0, 7], y=[0, 7], mode="lines", name="perfect judge", line=dict(dash="dot", color="gray")))
    mae = result["mae"]
    scatter.update_layout(title=f"Judge score vs reference grade (MAE {mae:.2f})" if mae is not None else "No valid grades",
                          xaxis_title="reference grade", yaxis_title="judge score", width=560, height=460,
                          xaxis=dict(range=[-0.5, 7.5]), yaxis=dict(range=[-0.5, 7.5]))
    return {"confusion": confusion, "scatter": scatter}


# ---------------------------------------------------------------- what the numbers mean
# A judge "beats a constant" when its MAE is at least this share below the best constant's ...
BEATS_CONSTANT_MAE = 0.10
# ... and it orders same-problem proofs better than a coin by at least this much.
BEATS_CHANCE_PAIRWISE = 0.10


def chance_levels() -> dict:
    """What a judge that knows nothing scores: pairwise ordering 0.5 (a coin), bucket accuracy 1 / number of buckets."""
    return {"pairwise_agreement": 0.5, "bucket_accuracy": 1 / len(BUCKETS)}


def constant_baseline(result: dict) -> dict:
    """The judge that always answers one number, on the rows the judge graded validly: the best constant
    (the median of the reference grades minimises MAE) and its MAE, and the MAE of always answering the judge's mean."""
    valid = [t for t in result["table"] if t["valid"]]
    if not valid:
        return {"best_constant": None, "best_constant_mae": None, "judge_mean": None, "judge_mean_mae": None}
    refs = [t["reference_grade"] for t in valid]
    best = statistics.median(refs)
    judge_mean = statistics.fmean(t["score"] for t in valid)
    mae = lambda c: statistics.fmean(abs(c - r) for r in refs)
    return {"best_constant": best, "best_constant_mae": mae(best), "judge_mean": judge_mean, "judge_mean_mae": mae(judge_mean)}


def beats_constant(result: dict) -> bool | None:
    """True when the judge's MAE is clearly below the best constant's and it orders proofs clearly better than chance."""
    base = constant_baseline(result)
    if result.get("mae") is None or base["best_constant_mae"] is None:
        return None
    pairwise = result.get("pairwise_agreement")
    return (result["mae"] <= (1 - BEATS_CONSTANT_MAE) * base["best_constant_mae"]
            and pairwise is not None and pairwise >= chance_levels()["pairwise_agreement"] + BEATS_CHANCE_PAIRWISE)


def judge_vs_baselines(result: dict):
    """MAE, pairwise agreement and bucket accuracy of the judge next to a constant judge and chance (a DataFrame)."""
    import pandas as pd  # heavy: loads only when a table is built
    base, chance = constant_baseline(result), chance_levels()
    return pd.DataFrame([
        {"measure": "mean absolute error (points, lower is better)", "judge": result.get("mae"),
         "constant judge": base["best_constant_mae"], "what the baseline is": f"always answer {_pts(base['best_constant'])}"},
        {"measure": "pairwise ordering within a problem", "judge": result.get("pairwise_agreement"),
         "constant judge": chance["pairwise_agreement"], "what the baseline is": "a coin (a constant ties every pair: 1/2)"},
        {"measure": "bucket accuracy (0 / 1-3 / 4-6 / 7)", "judge": result.get("bucket_accuracy"),
         "constant judge": chance["bucket_accuracy"], "what the baseline is": f"chance: 1 / {len(BUCKETS)} buckets"},
    ]).set_index("measure").round(3)


def proofs_table(rows: list[dict], result: dict | None = None):
    """Every calibration proof (problem, kind, reference grade, note, proof) with the judge's score where it graded it."""
    import pandas as pd  # heavy: loads only when a table is built
    graded = (result or {}).get("table", [])
    out = []
    for k, r in enumerate(rows):
        t = graded[k] if k < len(graded) else None
        judge = "not graded" if t is None else (round(t["score"], 2) if t["valid"] else f"invalid ({t['reason']})")
        out.append({"problem": r["problem_id"], "kind": r["kind"], "reference": r["reference_grade"], "judge": judge,
                    "note": r["note"], "proof": r["proof"]})
    return pd.DataFrame(out)


def _pts(x) -> str:
    return "n/a" if x is None else f"{x:.2f}".rstrip("0").rstrip(".")


def findings(result: dict | None) -> str:
    """What the calibration says, in words, from its own numbers: the judge against a constant and against chance."""
    if not result or result.get("mae") is None:
        return "No calibration proof was graded validly (eval.calibration_limit is 0, or every grade was invalid)."
    base, chance = constant_baseline(result), chance_levels()
    pw, acc = result.get("pairwise_agreement"), result.get("bucket_accuracy")
    lines = [f"On {result['valid']} calibration proofs the judge's mean absolute error is **{result['mae']:.2f} points**; "
             f"always answering {_pts(base['best_constant'])} would give **{base['best_constant_mae']:.2f}**, and always "
             f"answering the judge's own mean ({base['judge_mean']:.2f}) {base['judge_mean_mae']:.2f}.",
             f"It orders two proofs of the same problem correctly {'n/a' if pw is None else f'{pw:.0%}'} of the time "
             f"(a coin: {chance['pairwise_agreement']:.0%}) and puts {acc:.0%} of proofs in the right bucket "
             f"(chance: {chance['bucket_accuracy']:.0%})."]
    if beats_constant(result):
        lines.append("**The judge carries signal**: its grades are closer to the reference than any constant and it "
                     "orders proofs better than chance, so differences in eval scores can reflect proof quality.")
    else:
        lines.append(f"**The judge is no better than a constant.** Its grades say little about the proof: expect every "
                     f"graded proof to score about {base['judge_mean']:.2f} / 7 ({base['judge_mean'] / 7:.0%}) whatever "
                     f"it says, so eval scores mostly measure how often there is a proof to grade at all.")
    return "\n\n".join(lines)


def summary(result: dict | None) -> dict | None:
    """The calibration numbers metrics.json keeps: the judge's measures, the constant judge's and whether it beats it."""
    if not result:
        return None
    out = {k: result.get(k) for k in ("rows", "valid", "mae", "bucket_accuracy", "pairwise_agreement", "invalid_rate")}
    return {**out, **constant_baseline(result), "beats_constant": beats_constant(result)}


# ---------------------------------------------------------------- several judges side by side
OFFICIAL_NAMES = {"mae": "MAE (points, lower is better)", "accuracy": "bucket accuracy",
                  "local_consistency": "local consistency", "advantage_diff": "advantage error (points, lower is better)"}


def comparison_records(results: dict) -> list[dict]:
    """One record per judge (label -> calibrate result): the official metrics, invalid rate, tokens and cost per grade."""
    out = []
    for label, r in results.items():
        off = r.get("official") or {}
        out.append({"judge": label, "graded": r["valid"], "of": r["rows"], "invalid_rate": r["invalid_rate"],
                    **{k: off.get(k) for k in OFFICIAL_NAMES},
                    "tokens_per_grade": r["prompt_tokens_per_grade"] + r["completion_tokens_per_grade"],
                    "cost_per_grade": r["cost_per_grade"]})
    return out


def comparison_table(results: dict):
    """The judges side by side (a DataFrame, one row per judge), to pick a judge as the paper did."""
    import pandas as pd  # heavy: loads only when a table is built
    if not results:
        return None
    table = pd.DataFrame(comparison_records(results)).set_index("judge")
    table = table.round({k: 3 for k in (*OFFICIAL_NAMES, "invalid_rate")})  # cost per grade keeps its small digits
    return table.rename(columns=OFFICIAL_NAMES)


def comparison_figure(results: dict):
    """The four official metrics per judge as grouped bars (one panel per metric: their scales differ)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    from plotly.subplots import make_subplots  # heavy: as above
    recs = comparison_records(results)
    fig = make_subplots(rows=1, cols=len(OFFICIAL_NAMES), subplot_titles=list(OFFICIAL_NAMES.values()))
    for k, key in enumerate(OFFICIAL_NAMES, 1):
        fig.add_trace(go.Bar(x=[r["judge"] for r in recs], y=[r[key] for r in recs], showlegend=False,
                             text=[None if r[key] is None else f"{r[key]:.2f}" for r in recs]), row=1, col=k)
    fig.update_layout(title=f"Judges on the same {recs[0]['of'] if recs else 0} graded proofs (official grader metrics)",
                      height=420, width=300 * len(OFFICIAL_NAMES))
    return fig
