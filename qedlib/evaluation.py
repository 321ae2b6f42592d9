"""Stage 5: evaluate checkpoints (or any model / served endpoint) on benchmarks, with test-time scaffolds.

Used by notebooks/05_eval.ipynb. For every (checkpoint, benchmark, scaffold, problem, sample) the
policy runs a scaffold (qedlib.scaffolds), the proof is graded with the benchmark's own judge
prompt (qedlib.grading), and one result row is appended to `05_eval/results.jsonl`. Rows keep the
official IMO-ProofBench columns (`model_solution`, `score`, `grade`, `cost_run`, `grade_cost`)
plus ours. Generations are logged first (`generations.jsonl`), so a killed run resumes without
regenerating or regrading anything finished. Statistics are in qedlib.stats, the report in
qedlib.report.

Scoring: a missing proof (truncated thinking, nothing after `</think>`) or a missing final answer
is a valid 0 (grading.no_proof_reason); answer benchmarks score 7 (equivalent) or 0 through
grading.check_answer. An invalid grade (the judge failed, or an answer nobody could decide) has
no score; summaries show the mean with invalid grades dropped AND with them counted as 0.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import scaffolds as scaffold_lib
from . import stats
from .data import DataError, Problem, load_problems
from .grading import extract_boxed  # noqa: F401  (kept importable from here)
from .io import JsonlLog, read_json, read_jsonl, write_json

# benchmark name -> (judge prompt, task). Any other name is a file path or hub:org/name (rubric prompt).
BENCHMARK_KINDS = {
    "shipped": (None, "proof"),  # held-out split of qedlib/data/problems.jsonl, graded with eval.judge.prompt
    "imo-proofbench": ("proofbench", "proof"),  # 60 problems, reference + guidelines, 7/6/1/0
    "imo-answerbench": ("answer", "answer"),  # 400 short-answer problems, equivalence of the boxed answer
    "proofbench": ("rubric", "proof"),  # 145 problems, 0-7 marking schemes (hub: wenjiema02/ProofBench)
}
CURRENT_KEYS = "current_keys.json"  # the row keys the last evaluation's settings produce (read_results returns those)
KEY_FIELDS = ("checkpoint", "benchmark", "scaffold", "problem_id", "sample")


@dataclass
class Benchmark:
    """A named problem set with its grading prompt and task kind."""
    name: str
    problems: list
    judge_prompt: str  # rubric | proofbench | answer
    task: str = "proof"  # proof | answer (final boxed answer)
    skipped: list = dataclasses.field(default_factory=list)  # bad rows skipped while loading ({row, reason})


def load_benchmark(spec, limit: Optional[int] = None, default_prompt: str = "rubric") -> Benchmark:
    """A Benchmark from a name ("shipped", "imo-proofbench", "imo-answerbench", "proofbench"), a path,
    hub:org/name, or a mapping {name, path, prompt, task, + ProblemSource keys (columns, duplicates, ...)}."""
    from .data import load_source, problem_source
    if isinstance(spec, dict):
        src = problem_source(spec, "eval.benchmarks", extra=("name", "prompt", "task"))
        if src.limit is None:
            src = dataclasses.replace(src, limit=limit)
        probs = load_source(src)
        return Benchmark(spec.get("name", Path(str(spec["path"])).stem), probs, spec.get("prompt", default_prompt),
                         spec.get("task", "proof"), list(getattr(probs, "skipped", [])))
    name = str(spec)
    prompt, task = BENCHMARK_KINDS.get(name, (default_prompt, "proof"))
    probs = load_problems("shipped", split="eval", limit=limit) if name == "shipped" else load_problems(name, limit=limit)
    return Benchmark(name, probs, prompt or default_prompt, task, list(getattr(probs, "skipped", [])))


def load_benchmarks(specs: list, limit: Optional[int] = None, default_prompt: str = "rubric") -> list[Benchmark]:
    """Load every listed benchmark; a missing one is an error that says how to get it (never silently skipped)."""
    return [load_benchmark(spec, limit, default_prompt) for spec in specs]


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


def result_key(checkpoint: str, benchmark: str, scaffold: str, problem_id: str, sample: int, settings: str = "") -> str:
    """The resume key of one generation or result row; `settings` is the hash of what produced it."""
    return "|".join(str(x) for x in (checkpoint, benchmark, scaffold, problem_id, sample)) + (f"|{settings}" if settings else "")


# eval keys that only choose what is evaluated or how it is summarised, not what one generation is
_NOT_GENERATION = ("checkpoints", "benchmarks", "benchmark_limit", "samples", "success_threshold", "pass_k",
                   "bootstrap", "chunk", "calibration_limit", "judge", "endpoint")


def weights_fingerprint(model_ref: str) -> str:
    """The resolved model folder with its weight files' sizes and mtimes (the reference itself when it is no folder)."""
    path = Path(str(model_ref))
    if not path.is_dir():
        return str(model_ref)
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf") or f.name == "config.json")
    return str(path.resolve()) + ";" + ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def generation_hash(cfg, endpoint) -> str:
    """Hash of what one eval generation depends on: the model (path and weights), the endpoint, sampling, scaffold settings, thinking."""
    from .io import settings_hash
    ev = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in _NOT_GENERATION}
    return settings_hash({"weights": weights_fingerprint(endpoint.model), "endpoint": endpoint, "eval": ev,
                          "thinking": cfg.thinking})


def make_row(name: str, bench: Benchmark, scaffold: str, problem: Problem, sample: int, gen: dict, grade,
             key: str | None = None) -> dict:
    """One result row: the official columns plus ours (`key`: the settings-hashed key, default the bare one)."""
    truncated = not gen["think_closed"]
    valid = bool(grade.valid)
    scale = getattr(grade, "scale", 7) or 7
    # no proof / no final answer is a valid 0 (the Grader's rule); a failed judge call is missing, not 0
    score = float(grade.points) * 7.0 / scale if valid else None
    desc = getattr(grade, "judge_text", "") or getattr(grade, "reason", "") or ""
    row = {
        "key": key or result_key(name, bench.name, scaffold, problem.id, sample),
        "generation_key": gen.get("key"), "checkpoint": name, "benchmark": bench.name, "scaffold": scaffold, "problem_id": problem.id,
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
        "no_proof": getattr(grade, "no_proof", "") or None, "graded_by": getattr(grade, "method", ""),
    }
    statuses = [t.get("summary_status", "") for t in gen.get("trace") or [] if isinstance(t, dict)]
    if any(statuses):  # RC: how many summaries were written, and how many never closed their thinking
        row["summaries"] = sum(1 for x in statuses if x)
        row["summaries_unclosed"] = statuses.count("unclosed")
    if bench.task == "answer":
        row["extracted_answer"] = extract_boxed(gen["final"])
        row["reference_answer"] = problem.answer
        row["p_correct"] = getattr(grade, "p_correct", None)  # the judge's P(equivalent), when a judge decided
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
        self._summariser = None
        self._hashes: dict[str, str] = {}  # checkpoint name -> generation settings hash (set by `run`)
        self._current: set | None = None  # the row keys this evaluation's settings produce (set by `run`)

    def gen_key(self, name: str, bench: Benchmark, scaffold: str, problem_id: str, sample: int) -> str:
        """Key of one generation: the bare key | hash of the model's weights and the generation settings."""
        return result_key(name, bench.name, scaffold, problem_id, sample, self._hashes.get(name, ""))

    def row_key(self, name: str, bench: Benchmark, scaffold: str, problem_id: str, sample: int) -> str:
        """Key of one result row: the generation's key ~ hash of the judge settings (with this benchmark's prompt)."""
        from .distill import judge_hash
        judge = dataclasses.replace(self.cfg.eval.judge, prompt=bench.judge_prompt)
        return f"{self.gen_key(name, bench, scaffold, problem_id, sample)}~{judge_hash(judge)}"

    def summariser(self):
        """The RC scaffold's summariser: None (the policy summarises itself, the paper's test-time choice), or
        eval.rc.summariser_endpoint loaded once when eval.rc.summariser is "frozen"."""
        if self.cfg.eval.rc.summariser != "frozen":
            return None
        if self._summariser is None:
            from .generation import make_generator
            self._summariser = make_generator(self.cfg.eval.rc.summariser_endpoint)
        return self._summariser

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
                if self.row_key(name, bench, scaffold, p.id, s) not in self.results]

    def run_group(self, name: str, policy, bench: Benchmark, scaffold: str) -> int:
        """Generate (what is not logged yet) and grade (what has no row yet) one group; return rows written."""
        ev, written = self.cfg.eval, 0
        # the same thinking switch as training; rc comes from eval.rc (a field name ScaffoldSettings shares)
        settings = scaffold_lib.settings_from_config(ev, task=bench.task, thinking=self.cfg.thinking)
        pending = self.todo(name, bench, scaffold)
        for start in range(0, len(pending), max(1, ev.chunk)):
            chunk = pending[start:start + max(1, ev.chunk)]
            keys = [self.gen_key(name, bench, scaffold, p.id, s) for p, s in chunk]
            missing = [(p, s) for (p, s), k in zip(chunk, keys) if k not in self.generations]
            for s in sorted({s for _, s in missing}):
                probs = [p for p, t in missing if t == s]
                seed = self.cfg.seed * 100_003 + s * 1009 + start
                for p, res in zip(probs, scaffold_lib.run_scaffold(scaffold, probs, policy, ev.sampling, settings, seed=seed,
                                                                        summariser=self.summariser())):
                    rec = {k: v for k, v in res.to_dict().items() if k != "reasoning"}
                    self.generations.append({"key": self.gen_key(name, bench, scaffold, p.id, s), **rec})
            gens = [self.generations.records[k] for k in keys]
            grades = self.grader(bench.judge_prompt).grade([p for p, _ in chunk], [g["final"] for g in gens],
                                                           [g["think_closed"] for g in gens])
            for (p, s), g, grade in zip(chunk, gens, grades):
                self.results.append(make_row(name, bench, scaffold, p, s, g, grade, self.row_key(name, bench, scaffold, p.id, s)))
                written += 1
        return written

    def run(self, benchmarks: list[Benchmark], models: list[tuple[str, object]], scaffolds: list[str],
            policy_factory=None) -> list[dict]:
        """Evaluate every model on every benchmark with every scaffold; return all result rows."""
        from .generation import Timer, close_generator, make_generator
        owned = policy_factory is None  # generators from a caller's factory are the caller's to close
        policy_factory = policy_factory or make_generator
        self._hashes.update({name: generation_hash(self.cfg, endpoint) for name, endpoint in models})
        self._set_current(benchmarks, models, scaffolds)
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

    def _set_current(self, benchmarks, models, scaffolds) -> int:
        """Record the row keys these settings produce (for rows() and read_results); say how many others are set aside."""
        self._current = {self.row_key(n, b, sc, p.id, k) for n, _ in models for b in benchmarks for sc in scaffolds
                         for p in b.problems for k in range(self.cfg.eval.samples)}
        n = sum(1 for k in self.results.records if k not in self._current)
        if n:
            print(f"[eval] {self.results.path.name}: {n} rows of other settings, checkpoints or benchmarks are set aside "
                  "(kept in the file, not in this run's tables)")
        write_json(self.folder / CURRENT_KEYS, sorted(self._current))  # what read_results returns
        return n

    def rows(self) -> list[dict]:
        """The result rows of this evaluation's settings once `run` has set them (else every row recorded)."""
        if self._current is None:
            return self.results.values()
        return [r for k, r in self.results.records.items() if k in self._current]


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
    """Result rows of an eval folder (results.jsonl): those of the last evaluation's settings when it recorded them."""
    path = Path(stage_folder) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run 05_eval first")
    records = JsonlLog(path, key="key").records
    current = Path(stage_folder) / CURRENT_KEYS
    if not current.exists():
        return list(records.values())
    return [records[k] for k in read_json(current) if k in records]


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


def both_means(rows: list[dict]) -> dict:
    """Mean score % of 7 with invalid grades dropped, and with invalid grades counted as 0 (side by side)."""
    return {"mean_pct_invalid_dropped": stats.score_pct(stats.effective_score(r, "drop") for r in rows),
            "mean_pct_invalid_as_0": stats.score_pct(stats.effective_score(r, "zero") for r in rows)}


def summary_unclosed_rate(rows: list[dict]):
    """Share of RC summaries whose thinking never closed (None when no row has summaries)."""
    n = sum(r.get("summaries", 0) for r in rows)
    return sum(r.get("summaries_unclosed", 0) for r in rows) / n if n else None


def summary_table(rows: list[dict], cfg) -> "object":
    """stats.summarise over (checkpoint, benchmark, scaffold) with the config's k, threshold and bootstrap,
    plus the two means (invalid dropped / invalid as 0) and the RC summary-unclosed rate."""
    ev = cfg.eval
    ks = [k for k in ev.pass_k if k <= ev.samples]
    by = ("checkpoint", "benchmark", "scaffold")
    table = stats.summarise(rows, by, ks, ev.success_threshold, ev.bootstrap, cfg.seed,
                            "zero" if ev.judge.invalid == "zero" else "drop")
    if len(table):
        groups: dict = {}
        for r in rows:
            groups.setdefault(tuple(r.get(b) for b in by), []).append(r)
        extra = [{**both_means(groups[key]), "summary_unclosed_rate": summary_unclosed_rate(groups[key])}
                 for key in zip(*(table[b] for b in by))]
        for col in extra[0]:
            table[col] = [e[col] for e in extra]
        cols = [c for c in table.columns if c not in extra[0]]
        at = cols.index("mean_score_pct") + 1  # the two means right after the headline mean
        table = table[cols[:at] + ["mean_pct_invalid_dropped", "mean_pct_invalid_as_0"] + cols[at:] + ["summary_unclosed_rate"]]
    return table


def _num(x):
    return None if stats.is_nan(x) else (round(float(x), 4) if isinstance(x, float) else x)


def eval_metrics(rows: list[dict], cfg, benchmarks: Optional[list] = None) -> dict:
    """metrics.json of stage 5: counts, and per checkpoint and scaffold (all benchmarks pooled, and per benchmark).

    `mean_score_pct` follows eval.judge.invalid; `mean_pct_invalid_dropped` / `mean_pct_invalid_as_0`
    show both readings; `skipped_rows` counts benchmark rows skipped while loading, with reasons."""
    ev = cfg.eval
    invalid = "zero" if ev.judge.invalid == "zero" else "drop"
    metrics = {"rows": len(rows), "problems": len({(r["benchmark"], r["problem_id"]) for r in rows}),
               "samples": ev.samples, "checkpoints": sorted({r["checkpoint"] for r in rows}),
               "benchmarks": sorted({r["benchmark"] for r in rows}), "scaffolds": sorted({r["scaffold"] for r in rows}),
               "scores": {}, "by_benchmark": {}}
    cost = stats.total_cost(rows)
    metrics["cost_usd"] = round(cost["total_usd"], 6)
    if benchmarks is not None:
        from .data import skipped_metrics
        metrics["skipped_rows"] = {b.name: skipped_metrics(b) for b in benchmarks}

    def block(grp):
        ci = stats.score_with_ci(grp, ev.bootstrap, cfg.seed, invalid)
        mean, std = stats.runs_mean_std(grp, invalid)
        out = {"mean_score_pct": ci["mean_score_pct"], **both_means(grp), "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
               "summary_unclosed_rate": summary_unclosed_rate(grp), "run_std_pct": std, "truncation_rate": stats.truncation_rate(grp), "tokens_per_problem": stats.tokens_per_problem(grp),
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
