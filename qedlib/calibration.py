"""Judge calibration: how far a judge (model + prompt + mode) is from reference grades.

Used by notebook 05_eval (the judge-calibration section). QED-Nano chose its RL judge this way.
`load_calibration` reads (problem, proof, reference grade) rows (default: the shipped
qedlib/data/calibration.jsonl joined with the shipped problems); `calibrate(grader, rows)`
grades them and reports mean absolute error, bucket accuracy over {0}, {1-3}, {4-6}, {7},
pairwise ordering agreement within a problem, the error the judge would put into GRPO
advantages, the invalid rate, tokens and cost per grade; `calibration_figures` plots it.
"""
from __future__ import annotations

import itertools
import statistics
from collections import defaultdict

from .data import DataError, Problem, load_problems, read_rows, shipped_path

BUCKETS = ("0", "1-3", "4-6", "7")
CALIBRATION_FIELDS = ("problem_id", "proof", "reference_grade", "kind", "note")


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
    columns = columns or {}
    where = str(path or shipped_path("calibration.jsonl"))
    raw = read_rows(where)
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
                              reference_solution=row.get(col("reference_solution")), rubric=row.get(col("rubric")),
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
    from .grading import invalid_table
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
    import plotly.graph_objects as go
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
