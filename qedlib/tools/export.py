"""Stage-5 results in the official QED-Nano evaluation format: one JSONL file per run, one row per problem.

Used by notebooks/05_eval.ipynb (section "Export for the official QED-Nano tools") and
`python -m qedlib export-official RUN_DIR [--out DIR]`.
`05_eval/results.jsonl` mixes checkpoints, benchmarks, scaffolds and samples; the official tools (the
`stats` aggregator, the results viewer, the re-grading script) read one file per run of one model
configuration, runs as separate files of equal length in the same problem order. So the export writes
`DIR/<checkpoint>/<benchmark>/<scaffold>/run-<k>.jsonl` (run k = our sample k), every problem of the
benchmark in the benchmark's order, with the official fields (documented in the QED-Nano eval README
and its viewer's README): `problem_id`, `problem`, `model_solution`, `score` (0-7 points; 0/1 on
answer benchmarks), `grade` = [{points, desc}], `schema_0` = [{title, desc, points}], `cost_run` and
`grade_cost` = {input_tokens, output_tokens, cost, time}, and the columns re-grading reads (`solution` +
`grading_guidelines`, `answer`, or `solution` + `grading_scheme`, by the benchmark's judge prompt).
Ours ride along as metadata (`checkpoint`, `benchmark`, `scaffold`, `run`, `split`, `evaluated`,
`truncated`, `invalid_reason`, `tokens`). `read_export` turns the files back into our rows, so
`evaluation.summary_table` runs on an export too.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

from .. import stats
from ..config import load_config
from ..files import JsonlLog, read_jsonl, write_jsonl
from ..grading import Grader, build_prompt
from ..layout import CONFIG_FILE, EVAL
from ..prompts import parse_rubric
from ..stages.evaluation import load_benchmarks, read_results, result_key

ANSWER_SCHEMA = [{"title": "Final answer", "desc": "1 point when the final answer is equivalent to the reference "
                  "answer, 0 otherwise.", "points": 1}]


class ExportError(RuntimeError):
    """The results cannot be exported as they are; the message names the row or file and the fix."""


def eval_config(run_dir):
    """The config stage 5 ran with: RUN_DIR/05_eval/config.yaml, else RUN_DIR/config.yaml."""
    for path in (Path(run_dir) / EVAL / CONFIG_FILE, Path(run_dir) / CONFIG_FILE):
        if path.exists():
            return load_config(path)
    raise FileNotFoundError(f"{run_dir}: no {EVAL}/{CONFIG_FILE} or {CONFIG_FILE}: is this a run folder "
                            f"(python -m qedlib run PARAMS writes one under outputs/)?")


def folder_name(name: str) -> str:
    """A file-system-safe folder name for a checkpoint, benchmark or scaffold (hub ids and paths hold '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "_"


def regrade_kind(bench) -> str:
    """Which official re-grading inputs a benchmark gets: answer | proofbench | rubric."""
    return "answer" if bench.task == "answer" else bench.judge_prompt


def schema_items(bench, problem) -> list[dict]:
    """schema_0: one item per checkpoint line of the rubric ('- [N pts] ...'), else one 7-point item for the whole."""
    if regrade_kind(bench) == "answer":
        return [dict(item) for item in ANSWER_SCHEMA]
    rubric = problem.rubric if isinstance(problem.rubric, str) else None
    parsed, _ = parse_rubric(f"<rubric>{rubric}</rubric>") if rubric else (None, None)
    if parsed:  # parse_rubric only accepts checkpoint lines that total 7 points
        main = [c for c in parsed["checkpoints"] if c["path"] == "checkpoints"]
        return [{"title": f"Checkpoint {i}", "desc": c["description"], "points": int(c["points"])}
                for i, c in enumerate(main, 1)]
    desc = rubric or "The judge's 0-7 grade of the whole proof (this benchmark has no rubric)."
    return [{"title": "Proof grade", "desc": desc, "points": stats.MAX_POINTS}]


def regrade_inputs(bench, problem) -> dict:
    """The columns the official re-grading script reads for this benchmark's kind."""
    kind = regrade_kind(bench)
    if kind == "answer":
        return {"answer": problem.answer}
    guide = "grading_guidelines" if kind == "proofbench" else "grading_scheme"
    return {"solution": problem.reference_solution, guide: problem.rubric}


def answer_verdict(score: Optional[float]) -> Optional[int]:
    """0/1 from an answer row's score, whichever scale the row used.

    0 is wrong; 1 (rows scored 0/1) and 7 (rows scored 0/7) are right; any other value is the expected
    points of a score-probability judge (7 x P(correct)) and counts as right at P(correct) >= 0.5.
    """
    if score is None:
        return None
    if score in (0, 1, stats.MAX_POINTS):
        return int(score > 0)
    return int(score >= stats.MAX_POINTS / 2)


def _number(x):
    """An int when the value is whole (JSON `7`, not `7.0`), else the float unchanged."""
    return None if x is None else (int(x) if float(x).is_integer() else float(x))


def _cost(block) -> dict:
    """An official cost block from ours (missing numbers are 0: nothing was recorded as spent)."""
    block = block if isinstance(block, dict) else {}
    return {"input_tokens": int(block.get("input_tokens") or 0), "output_tokens": int(block.get("output_tokens") or 0),
            "cost": float(block.get("cost") or 0.0), "time": None}  # seconds there; our eval does not time each problem


def _row_desc(row: dict) -> str:
    """The desc of a row's own grade (text-mode judge answer or invalid reason); '' when missing or malformed."""
    grade = row.get("grade")
    if isinstance(grade, list) and grade and isinstance(grade[0], dict):
        return str(grade[0].get("desc") or "")
    return ""


class JudgeCache:
    """Read-only view of 05_eval/judge_cache: the score-probability distribution behind a row's grade."""

    def __init__(self, cfg, stage_folder):
        self.cfg, self.path = cfg, Path(stage_folder) / "judge_cache"
        self.graders: dict[str, list] = {}

    def _graders(self, prompt: str) -> list:
        if prompt not in self.graders:
            judge = dataclasses.replace(self.cfg.eval.judge, prompt=prompt)  # as Evaluation.grader builds it
            main = Grader(judge, cache_dir=self.path)
            self.graders[prompt] = [main, *main.panel]
        return self.graders[prompt]

    def distribution_text(self, bench, problem, proof: str) -> str:
        """'P(0)=0.12 P(1)=...' per judge for this proof, '' when the cache does not hold its grade."""
        judge = self.cfg.eval.judge
        if judge.mode != "score_prob" or not judge.cache or not (self.path / "grades.jsonl").exists() or not proof:
            return ""
        text = build_prompt(bench.judge_prompt, judge.mode, problem, proof).text
        parts = []
        for grader in self._graders(bench.judge_prompt):
            for attempt in range(1 + (judge.retries_on_invalid if judge.invalid == "retry" else 0)):
                rec = grader.cache.records.get(grader.cache_key(text, 0, attempt))
                if rec and rec["grade"].get("probs"):
                    g = rec["grade"]
                    dist = " ".join(f"P({v})={p:.3f}" for v, p in g["probs"].items())
                    mass = "" if g.get("mass") is None else f"; mass on the allowed values {g['mass']:.3f}"
                    parts.append(f"score-probability judge {grader.judge.endpoint.model}: {dist}{mass}; "
                                 f"expected points {g['points']:.3f} of {stats.MAX_POINTS}")
                    break
        return "\n".join(parts)


def official_row(checkpoint: str, bench, scaffold: str, problem, run: int, row: Optional[dict], gen: Optional[dict],
                 judge_cache: Optional[JudgeCache] = None) -> dict:
    """One official row for (problem, run k): from our result row, or with score null when there is none."""
    kind = regrade_kind(bench)
    if row is None:  # never graded: keep the problem (equal-length runs), say why, spend nothing
        gen = gen or {}
        out = {"model_solution": gen.get("final"), "score": None,
               "grade": [{"points": None, "desc": "not graded: results.jsonl has no row for this problem and run ("
                          + ("generated, never graded)" if gen else "never generated)")}],
               "cost_run": _cost({"input_tokens": gen.get("prompt_tokens"), "output_tokens": gen.get("completion_tokens"),
                                  "cost": gen.get("cost")}),
               "grade_cost": _cost(None)}
        meta = {"split": str(problem.extra.get("split") or ""), "evaluated": False,
                "truncated": None if not gen else not gen.get("think_closed"), "invalid_reason": "not_graded",
                "tokens": gen.get("completion_tokens")}
    else:
        ours = stats.effective_score(row, "drop")  # 0 for no final proof, None for a failed grade
        score = answer_verdict(ours) if kind == "answer" else _number(ours)
        desc = (_row_desc(row) or (judge_cache.distribution_text(bench, problem, row.get("model_solution") or "")
                                   if judge_cache else "") or str(row.get("judge_text") or ""))
        if not desc and row.get("invalid_reason"):
            desc = f"no valid grade ({row['invalid_reason']})"
        if not desc and kind == "answer":
            desc = (f"no judge text (decided without a judge call): extracted answer {row.get('extracted_answer')!r}, "
                    f"reference answer {problem.answer!r}")
        # points: the nearest whole point (a score-probability judge's expected points are fractional; `score` keeps them)
        out = {"model_solution": row.get("model_solution"), "score": score,
               "grade": [{"points": None if score is None else int(round(score)), "desc": desc or "no judge text recorded"}],
               "cost_run": _cost(row.get("cost_run")), "grade_cost": _cost(row.get("grade_cost"))}
        meta = {"split": str(row.get("split") or ""), "evaluated": True, "truncated": bool(row.get("truncated")),
                "invalid_reason": row.get("invalid_reason"), "tokens": row.get("tokens")}
        if kind == "answer" and "extracted_answer" in row:
            meta["extracted_answer"] = row["extracted_answer"]
    return {"problem_id": problem.id, "problem": problem.problem, **out, "schema_0": schema_items(bench, problem),
            **regrade_inputs(bench, problem), "checkpoint": checkpoint, "benchmark": bench.name, "scaffold": scaffold,
            "run": run, **meta}


def _group_rows(rows: list[dict], path: Path) -> dict:
    groups: dict[tuple, dict] = {}
    for i, r in enumerate(rows):
        missing = [k for k in ("checkpoint", "benchmark", "scaffold", "problem_id", "sample") if k not in r]
        if missing:
            raise ExportError(f"{path}: row {i} (key {r.get('key')!r}) has no {missing}: not a 05_eval result row")
        groups.setdefault((str(r["checkpoint"]), str(r["benchmark"]), str(r["scaffold"])), {})[
            (str(r["problem_id"]), int(r["sample"]))] = r
    return groups


def default_out(run_dir) -> Path:
    """Where the export goes unless told: RUN_DIR/05_eval/official."""
    return Path(run_dir) / EVAL / "official"


def export_official(run_dir, out=None) -> list[Path]:
    """Write DIR/<checkpoint>/<benchmark>/<scaffold>/run-<k>.jsonl from RUN_DIR/05_eval/results.jsonl; return the files.

    DIR defaults to RUN_DIR/05_eval/official. Every benchmark problem is in every run file, in the
    benchmark's order; a problem with no result row is written with score null, never dropped.
    """
    stage = Path(run_dir) / EVAL
    cfg = eval_config(run_dir)
    rows = read_results(stage)
    if not rows:
        raise ExportError(f"{stage / 'results.jsonl'} has no rows: run {EVAL} first")
    out = Path(out) if out is not None else default_out(run_dir)
    gens_path = stage / "generations.jsonl"
    gens = JsonlLog(gens_path, key="key").records if gens_path.exists() else {}
    groups = _group_rows(rows, stage / "results.jsonl")
    benches = {b.name: b for b in load_benchmarks(cfg.eval.benchmarks, cfg.eval.benchmark_limit, cfg.eval.judge.prompt)}
    cache = JudgeCache(cfg, stage)
    folders: dict[Path, tuple] = {}
    written = []
    for (ck, bname, sc), by_key in groups.items():
        bench = benches.get(bname)
        if bench is None:
            raise ExportError(f"{stage / 'results.jsonl'} has rows of benchmark {bname!r}, but {stage / 'config.yaml'} "
                              f"loads only {sorted(benches)}: put it back in eval.benchmarks, or for imo-* set "
                              f"QED_IMOBENCH to the folder holding the IMO-Bench CSVs")
        ids = {p.id for p in bench.problems}
        stray = sorted({pid for pid, _ in by_key if pid not in ids})
        if stray:
            raise ExportError(f"{stage / 'results.jsonl'}: {ck} / {bname} / {sc} has rows of problems {stray[:5]} that "
                              f"benchmark {bname!r} (as eval.benchmarks and eval.benchmark_limit load it now) does not "
                              f"hold: restore the settings the eval ran with")
        folder = out / folder_name(ck) / folder_name(bname) / folder_name(sc)
        if folder in folders and folders[folder] != (ck, bname, sc):
            raise ExportError(f"{folders[folder]} and {(ck, bname, sc)} both map to folder {folder}: rename one")
        folders[folder] = (ck, bname, sc)
        for stale in folder.glob("run-*.jsonl"):  # a smaller re-export must not leave runs the aggregator would read
            stale.unlink()
        runs = max(cfg.eval.samples, 1 + max(s for _, s in by_key))
        for k in range(runs):
            recs = [official_row(ck, bench, sc, p, k, by_key.get((p.id, k)), gens.get((by_key.get((p.id, k)) or {}).get("generation_key")
                                                                            or result_key(ck, bname, sc, p.id, k)),
                                 cache) for p in bench.problems]
            written.append(write_jsonl(folder / f"run-{k}.jsonl", recs))
    return written


def read_export(out) -> list[dict]:
    """Our result rows back from an export (evaluated rows only, scores as points of 7), for evaluation.summary_table."""
    files = sorted(Path(out).glob("*/*/*/run-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{out}: no */*/*/run-*.jsonl files: run python -m qedlib export-official RUN_DIR first")
    rows = []
    for path in files:
        for rec in read_jsonl(path):
            if not rec.get("evaluated"):
                continue  # a problem the eval never graded has no row in results.jsonl either
            full = sum(item["points"] for item in rec["schema_0"])  # 1 on answer benchmarks, 7 on proofs
            score = None if rec["score"] is None else rec["score"] * stats.MAX_POINTS / full
            rows.append({"checkpoint": rec["checkpoint"], "benchmark": rec["benchmark"], "scaffold": rec["scaffold"],
                         "problem_id": rec["problem_id"], "sample": rec["run"], "split": rec.get("split"),
                         "score": score, "truncated": rec["truncated"], "tokens": rec.get("tokens") or 0,
                         "cost_run": rec["cost_run"], "grade_cost": rec["grade_cost"]})
    return rows
