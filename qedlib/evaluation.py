"""Stage 5: evaluate checkpoints (or any model / served endpoint) on benchmarks, with test-time scaffolds.

Used by notebooks/05_eval.ipynb. For every (checkpoint, benchmark, scaffold, problem, sample) the
policy runs a scaffold (qedlib.scaffolds), the proof is graded with the benchmark's own judge
prompt (qedlib.grading), and one result row is appended to `05_eval/results.jsonl`. Rows keep the
official IMO-ProofBench columns (`model_solution`, `score`, `grade`, `cost_run`, `grade_cost`)
plus ours. Generations are logged first (`generations.jsonl`), so a killed run resumes without
regenerating or regrading anything finished. Statistics are in qedlib.stats, the report in
qedlib.report.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import scaffolds as scaffold_lib
from . import stats
from .data import DataError, Problem, imobench_dir, load_problems
from .io import JsonlLog, read_jsonl

# benchmark name -> (judge prompt, task). Any other name is a file path or hub:org/name (rubric prompt).
BENCHMARK_KINDS = {
    "shipped": (None, "proof"),  # held-out split of qedlib/data/problems.jsonl, graded with eval.judge.prompt
    "imo-proofbench": ("proofbench", "proof"),  # 60 problems, reference + guidelines, 7/6/1/0
    "imo-answerbench": ("answer", "answer"),  # 400 short-answer problems, equivalence of the boxed answer
    "proofbench": ("rubric", "proof"),  # 145 problems, 0-7 marking schemes (hub: wenjiema02/ProofBench)
}
PROOFBENCH_HUB = "wenjiema02/ProofBench"
NO_PROOF = ("unclosed_thinking", "empty_proof")  # invalid grades that mean "no proof": score 0
KEY_FIELDS = ("checkpoint", "benchmark", "scaffold", "problem_id", "sample")


@dataclass
class Benchmark:
    """A named problem set with its grading prompt and task kind."""
    name: str
    problems: list
    judge_prompt: str  # rubric | proofbench | answer
    task: str = "proof"  # proof | answer (final boxed answer)


def load_proofbench_hub(limit: Optional[int] = None) -> list[Problem]:
    """ProofBench from the hub: one problem per problem_id (the 435 rows hold 3 graded solutions each)."""
    from datasets import load_dataset
    seen, out = set(), []
    for row in load_dataset(PROOFBENCH_HUB, split="train"):
        if row["problem_id"] in seen:
            continue
        seen.add(row["problem_id"])
        meta = row.get("metadata") or {}
        out.append(Problem(id=row["problem_id"], problem=row["problem"], reference_solution=row.get("reference_solution"),
                           rubric=row.get("marking_scheme"), source=str(meta.get("contest", "")),
                           extra={"split": str(meta.get("contest", "")), "year": meta.get("contest_year")}))
    return out[:limit] if limit else out


def load_benchmark(spec, limit: Optional[int] = None, default_prompt: str = "rubric") -> Benchmark:
    """A Benchmark from a name ("shipped", "imo-proofbench", "imo-answerbench", "proofbench"), a path,
    hub:org/name, or a mapping {name, path, split, columns, prompt, task, hub_split, hub_config}."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "path", "split", "columns", "prompt", "task", "hub_split", "hub_config", "limit"}
        if unknown or "path" not in spec:
            raise DataError(f"eval.benchmarks entry {spec!r}: needs 'path' and may have name, split, columns, prompt, "
                            f"task, hub_split, hub_config, limit (unknown: {sorted(unknown)})")
        probs = load_problems(spec["path"], spec.get("split"), spec.get("columns"), spec.get("limit", limit),
                              spec.get("hub_split", "train"), spec.get("hub_config"))
        return Benchmark(spec.get("name", Path(str(spec["path"])).stem), probs, spec.get("prompt", default_prompt),
                         spec.get("task", "proof"))
    name = str(spec)
    prompt, task = BENCHMARK_KINDS.get(name, (default_prompt, "proof"))
    if name == "shipped":
        probs = load_problems("shipped", split="eval", limit=limit)
    elif name == "proofbench":
        probs = load_proofbench_hub(limit)
    else:
        probs = load_problems(name, limit=limit)
    return Benchmark(name, probs, prompt or default_prompt, task)


def load_benchmarks(specs: list, limit: Optional[int] = None, default_prompt: str = "rubric") -> list[Benchmark]:
    """Load every benchmark that is available; print a note and skip the IMO-Bench ones when their CSVs are absent."""
    out = []
    for spec in specs:
        if spec in ("imo-proofbench", "imo-answerbench") and not imobench_dir().exists():
            print(f"[eval] skipping {spec}: {imobench_dir()} not found (set QED_IMOBENCH to the IMO-Bench CSV folder)")
            continue
        out.append(load_benchmark(spec, limit, default_prompt))
    return out


def models_under_test(cfg, run_dir) -> list[tuple[str, object]]:
    """(name, config.Endpoint) for each model to evaluate: eval.endpoint, else each checkpoint that exists."""
    from .runner import checkpoint
    if cfg.eval.endpoint is not None:
        return [(cfg.eval.endpoint.model, cfg.eval.endpoint)]
    out = []
    for ref in cfg.eval.checkpoints:
        try:
            out.append((ref, dataclasses.replace(cfg.generation, model=checkpoint(cfg, run_dir, ref))))
        except FileNotFoundError as e:
            print(f"[eval] skipping checkpoint {ref!r}: {e}")
    return out


def result_key(checkpoint: str, benchmark: str, scaffold: str, problem_id: str, sample: int) -> str:
    """The resume key of one result row."""
    return "|".join(str(x) for x in (checkpoint, benchmark, scaffold, problem_id, sample))


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} in text (nested braces allowed), None when absent."""
    start = (text or "").rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def make_row(name: str, bench: Benchmark, scaffold: str, problem: Problem, sample: int, gen: dict, grade) -> dict:
    """One result row: the official columns plus ours."""
    truncated = not gen["think_closed"]
    valid = bool(grade.valid)
    scale = getattr(grade, "scale", 7) or 7
    if valid:
        score = float(grade.points) * 7.0 / scale
    else:
        # no final proof scores 0; a failed judge call is missing, not 0
        score = 0.0 if truncated or getattr(grade, "reason", None) in NO_PROOF else None
    desc = getattr(grade, "judge_text", "") or getattr(grade, "reason", "") or ""
    row = {
        "key": result_key(name, bench.name, scaffold, problem.id, sample),
        "checkpoint": name, "benchmark": bench.name, "scaffold": scaffold, "problem_id": problem.id,
        "sample": sample, "split": str(problem.extra.get("split") or ""),
        "problem": problem.problem,
        "model_solution": gen["final"],
        "score": score,
        "grade": [{"points": score, "desc": desc}] if score is not None else [],
        "cost_run": {"input_tokens": gen["prompt_tokens"], "output_tokens": gen["completion_tokens"], "cost": gen["cost"]},
        "grade_cost": {"input_tokens": getattr(grade, "prompt_tokens", 0), "output_tokens": getattr(grade, "completion_tokens", 0),
                       "cost": getattr(grade, "cost", 0.0)},
        "truncated": truncated, "finish_reason": gen["finish_reason"], "tokens": gen["completion_tokens"],
        "calls": gen["calls"], "budget_hit": gen["budget_hit"],
        "valid": valid, "invalid_reason": None if valid else getattr(grade, "reason", "invalid"),
        "judge_text": getattr(grade, "judge_text", None), "judge_cached": getattr(grade, "cached", False),
    }
    if bench.task == "answer":
        row["extracted_answer"] = extract_boxed(gen["final"])
        row["reference_answer"] = problem.answer
    return row


class LazyGenerator:
    """An in-process generator built on first use: a judge shared by several Graders, loaded only if a proof needs it."""

    def __init__(self, endpoint):
        self.endpoint, self._gen = endpoint, None

    def __getattr__(self, name):
        if self._gen is None:
            from .generation import make_generator
            self._gen = make_generator(self.endpoint)
        return getattr(self._gen, name)


class Evaluation:
    """Runs and records one stage-5 evaluation in `<stage_folder>`; resumable at row granularity."""

    def __init__(self, cfg, stage_folder, judge_generator=None):
        self.cfg, self.folder = cfg, Path(stage_folder)
        self.results = JsonlLog(self.folder / "results.jsonl", key="key")
        self.generations = JsonlLog(self.folder / "generations.jsonl", key="key")
        self.judge_generator = judge_generator
        self._graders: dict[str, object] = {}

    def grader(self, prompt: str):
        """The Grader for one judge prompt (the judge model is loaded once and shared)."""
        if prompt not in self._graders:
            from .grading import Grader
            if self.judge_generator is None and self.cfg.eval.judge.endpoint.backend != "openai":
                self.judge_generator = LazyGenerator(self.cfg.eval.judge.endpoint)
            judge = dataclasses.replace(self.cfg.eval.judge, prompt=prompt)
            self._graders[prompt] = Grader(judge, cache_dir=self.folder / "judge_cache", generator=self.judge_generator)
        return self._graders[prompt]

    def todo(self, name: str, bench: Benchmark, scaffold: str) -> list[tuple[Problem, int]]:
        """(problem, sample) pairs of this group with no result row yet."""
        return [(p, s) for s in range(self.cfg.eval.samples) for p in bench.problems
                if result_key(name, bench.name, scaffold, p.id, s) not in self.results]

    def run_group(self, name: str, policy, bench: Benchmark, scaffold: str) -> int:
        """Generate (what is not logged yet) and grade (what has no row yet) one group; return rows written."""
        ev, written = self.cfg.eval, 0
        # the same thinking switch as training; rc comes from eval.rc (a field name ScaffoldSettings shares)
        settings = scaffold_lib.settings_from_config(ev, task=bench.task, thinking=self.cfg.thinking)
        pending = self.todo(name, bench, scaffold)
        for start in range(0, len(pending), max(1, ev.chunk)):
            chunk = pending[start:start + max(1, ev.chunk)]
            keys = [result_key(name, bench.name, scaffold, p.id, s) for p, s in chunk]
            missing = [(p, s) for (p, s), k in zip(chunk, keys) if k not in self.generations]
            for s in sorted({s for _, s in missing}):
                probs = [p for p, t in missing if t == s]
                seed = self.cfg.seed * 100_003 + s * 1009 + start
                for p, res in zip(probs, scaffold_lib.run_scaffold(scaffold, probs, policy, ev.sampling, settings, seed=seed)):
                    rec = {k: v for k, v in res.to_dict().items() if k != "reasoning"}
                    self.generations.append({"key": result_key(name, bench.name, scaffold, p.id, s), **rec})
            gens = [self.generations.records[k] for k in keys]
            grades = self.grader(bench.judge_prompt).grade([p for p, _ in chunk], [g["final"] for g in gens],
                                                           [g["think_closed"] for g in gens])
            for (p, s), g, grade in zip(chunk, gens, grades):
                self.results.append(make_row(name, bench, scaffold, p, s, g, grade))
                written += 1
        return written

    def run(self, benchmarks: list[Benchmark], models: list[tuple[str, object]], scaffolds: list[str],
            policy_factory=None) -> list[dict]:
        """Evaluate every model on every benchmark with every scaffold; return all result rows."""
        from .generation import Timer, close_generator, make_generator
        owned = policy_factory is None  # generators from a caller's factory are the caller's to close
        policy_factory = policy_factory or make_generator
        for name, endpoint in models:
            if not any(self.todo(name, b, sc) for b in benchmarks for sc in scaffolds):
                print(f"[eval] {name}: all rows already in {self.results.path.name}")
                continue
            policy = policy_factory(endpoint)
            for bench in benchmarks:
                for sc in scaffolds:
                    with Timer() as t:
                        n = self.run_group(name, policy, bench, sc)
                    if n:
                        print(f"[eval] {name} / {bench.name} / {sc}: {n} rows in {t.seconds:.0f} s")
            if owned:
                close_generator(policy)  # the engine shuts down and frees its memory before the next model's starts
            del policy
        return self.rows()

    def rows(self) -> list[dict]:
        """Every result row recorded so far (this run and earlier ones)."""
        return self.results.values()


def evaluate(cfg, run_dir, stage_folder=None, judge_generator=None, policy_factory=None) -> list[dict]:
    """Run the whole eval section of a config: its benchmarks, checkpoints (or endpoint) and scaffolds."""
    folder = Path(stage_folder) if stage_folder else Path(run_dir) / "05_eval"
    ev = cfg.eval
    unknown = [s for s in ev.scaffolds if s not in scaffold_lib.SCAFFOLDS]
    if unknown:
        raise ValueError(f"eval.scaffolds: unknown {unknown}; choose from {scaffold_lib.SCAFFOLDS}")
    benches = load_benchmarks(ev.benchmarks, ev.benchmark_limit, ev.judge.prompt)
    run = Evaluation(cfg, folder, judge_generator)
    return run.run(benches, models_under_test(cfg, run_dir), ev.scaffolds, policy_factory)


def read_results(stage_folder) -> list[dict]:
    """Result rows of an eval folder (results.jsonl)."""
    path = Path(stage_folder) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run 05_eval first")
    return list(JsonlLog(path, key="key").values())


def results_frame(rows: list[dict]):
    """Result rows as a DataFrame (the official columns first)."""
    import pandas as pd
    df = pd.DataFrame(rows)
    first = [c for c in ("checkpoint", "benchmark", "scaffold", "problem_id", "sample", "model_solution", "score", "grade",
                         "cost_run", "grade_cost") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_parquet(rows: list[dict], path) -> Path:
    """A parquet copy of the result rows (nested columns stored as JSON text for portability)."""
    import json
    import pandas as pd
    df = results_frame(rows).copy()
    for col in ("grade", "cost_run", "grade_cost"):
        if col in df.columns:
            df[col] = df[col].map(lambda v: json.dumps(v))
    path = Path(path)
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def summary_table(rows: list[dict], cfg) -> "object":
    """stats.summarise over (checkpoint, benchmark, scaffold) with the config's k, threshold and bootstrap."""
    ev = cfg.eval
    ks = [k for k in ev.pass_k if k <= ev.samples]
    return stats.summarise(rows, ("checkpoint", "benchmark", "scaffold"), ks, ev.success_threshold, ev.bootstrap,
                           cfg.seed, "zero" if ev.judge.invalid == "zero" else "drop")


def _num(x):
    return None if stats.is_nan(x) else (round(float(x), 4) if isinstance(x, float) else x)


def eval_metrics(rows: list[dict], cfg) -> dict:
    """metrics.json of stage 5: counts, and per checkpoint and scaffold (all benchmarks pooled, and per benchmark)."""
    ev = cfg.eval
    invalid = "zero" if ev.judge.invalid == "zero" else "drop"
    metrics = {"rows": len(rows), "problems": len({(r["benchmark"], r["problem_id"]) for r in rows}),
               "samples": ev.samples, "checkpoints": sorted({r["checkpoint"] for r in rows}),
               "benchmarks": sorted({r["benchmark"] for r in rows}), "scaffolds": sorted({r["scaffold"] for r in rows}),
               "scores": {}, "by_benchmark": {}}
    cost = stats.total_cost(rows)
    metrics["cost_usd"] = round(cost["total_usd"], 6)

    def block(grp):
        ci = stats.score_with_ci(grp, ev.bootstrap, cfg.seed, invalid)
        mean, std = stats.runs_mean_std(grp, invalid)
        out = {"mean_score_pct": ci["mean_score_pct"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
               "run_std_pct": std, "truncation_rate": stats.truncation_rate(grp), "tokens_per_problem": stats.tokens_per_problem(grp),
               "invalid_rate": stats.invalid_rate(grp), "rows": len(grp)}
        for k in ev.pass_k:
            if k <= ev.samples:
                out[f"pass@{k}"] = stats.pass_at_k_rows(grp, k, ev.success_threshold, invalid)
        return {k: _num(v) for k, v in out.items()}

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["scaffold"]), []).append(r)
    for (ck, sc), grp in groups.items():
        metrics["scores"].setdefault(ck, {})[sc] = block(grp)
    bgroups: dict = {}
    for r in rows:
        bgroups.setdefault((r["benchmark"], r["checkpoint"], r["scaffold"]), []).append(r)
    for (b, ck, sc), grp in bgroups.items():
        metrics["by_benchmark"].setdefault(b, {}).setdefault(ck, {})[sc] = block(grp)
    return metrics


def trajectory_text(stage_folder, key: str) -> dict:
    """The logged generation record (trace, tokens, calls) behind one result row."""
    for rec in read_jsonl(Path(stage_folder) / "generations.jsonl"):
        if rec["key"] == key:
            return rec
    raise KeyError(f"no generation with key {key!r} in {stage_folder}/generations.jsonl")
