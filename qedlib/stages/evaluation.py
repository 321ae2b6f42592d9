"""Stage 5 (notebook 05_eval): evaluate checkpoints (or any model / endpoint) on benchmarks with test-time scaffolds.

The entry is `run_stage(cfg, run_dir)`; its steps (load_benchmarks, models_under_test, Evaluation.run), the
summary and metrics (summary_table, eval_metrics, stage_metrics) and the judge calibration are here; what the
notebook shows of them (settings, tables, figures, findings) is in qedlib.views.evaluation.

For every (checkpoint, benchmark, scaffold, problem, sample) the policy runs a scaffold (qedlib.scaffolds), the
proof is graded with the benchmark's own judge prompt (qedlib.grading), and one result row is appended to
`05_eval/results.jsonl`. Rows keep the official IMO-ProofBench columns (`model_solution`, `score`, `grade`,
`cost_run`, `grade_cost`) plus ours. Generations are logged first (`generations.jsonl`), so a killed run resumes
without regenerating or regrading anything finished. Statistics are in qedlib.stats, the figures in
qedlib.plots, the report in qedlib.tools.report.

Scoring: a missing proof (truncated thinking, nothing after `</think>`) or a missing final answer
is a valid 0 (verdicts.no_proof_reason); answer benchmarks score 7 (equivalent) or 0 through
verdicts.check_answer. An invalid grade (the judge failed, or an answer nobody could decide) has
no score; summaries show the mean with invalid grades dropped AND with them counted as 0.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import calibration as cal
from .. import scaffolds as scaffold_lib
from .. import stats
from ..config import ConfigError, Endpoint, build
from ..files import JsonlLog, atomic_write, read_json, settings_hash, write_json
from ..generation import Timer, close_generator, make_generator
from ..grading import Grader, check_invalid_rate
from ..layout import CHECKPOINT_ORDER, EVAL, named_model
from ..models import content_fingerprint, stable_seed
from ..paper import comparison
from ..problem_sets import Problem, load_problems, load_source, problem_source, skipped_metrics
from ..run_state import note_open_work
from ..verdicts import extract_boxed, judge_hash

# benchmark name -> (judge prompt, task). Any other name is a file path or hub:org/name (rubric prompt).
BENCHMARK_KINDS = {
    "shipped": (None, "proof"),  # held-out split of qedlib/data/problems.jsonl, graded with eval.judge.prompt
    "imo-proofbench": ("proofbench", "proof"),  # 60 problems, reference + guidelines, 7/6/1/0
    "imo-answerbench": ("answer", "answer"),  # 400 short-answer problems, equivalence of the boxed answer
    "proofbench": ("rubric", "proof"),  # 145 problems, 0-7 marking schemes (hub: wenjiema02/ProofBench)
}
FAILURES_FILE = "failures.jsonl"  # failed policy or judge calls: outside the results, retried by a rerun
CURRENT_KEYS = "current_keys.json"  # the row keys the last evaluation's settings produce (read_results returns those)
KEY_FIELDS = ("checkpoint", "benchmark", "scaffold", "problem_id", "sample")
WALL_TIMES = "wall_times.json"  # seconds spent generating + grading per checkpoint|benchmark|scaffold group


def group_key(checkpoint: str, benchmark: str, scaffold: str) -> str:
    """The key of one (checkpoint, benchmark, scaffold) group in WALL_TIMES."""
    return f"{checkpoint}|{benchmark}|{scaffold}"


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
    if cfg.eval.endpoint is not None:
        return [(cfg.eval.endpoint.model, cfg.eval.endpoint)]
    out = []
    for ref in cfg.eval.checkpoints:
        try:
            out.append((ref, dataclasses.replace(cfg.generation, model=named_model(cfg, run_dir, ref))))
        except FileNotFoundError as e:
            print(f"[eval] skipping checkpoint {ref!r}: {e}")
    return out


def result_key(checkpoint: str, benchmark: str, scaffold: str, problem_id: str, sample: int, settings: str = "") -> str:
    """The resume key of one generation or result row; `settings` is the hash of what produced it."""
    return "|".join(str(x) for x in (checkpoint, benchmark, scaffold, problem_id, sample)) + (f"|{settings}" if settings else "")


# eval keys that only choose what is evaluated or how it is summarised, not what one generation is
_NOT_GENERATION = ("checkpoints", "benchmarks", "benchmark_limit", "samples", "success_threshold", "pass_k",
                   "bootstrap", "chunk", "calibration_limit", "judge", "endpoint", "max_invalid_rate")


def generation_hash(cfg, endpoint) -> str:
    """Hash of what one eval generation depends on: the model's content (models.content_fingerprint, not its path),
    the endpoint, sampling, scaffold settings, thinking and the seed."""
    ev = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in _NOT_GENERATION}
    # None: a policy passed in; the endpoint's model path is replaced by the content, so a moved run keeps its rows
    weights = content_fingerprint(endpoint.model) if endpoint is not None else None
    ep = dataclasses.replace(endpoint, model=weights) if endpoint is not None else None
    return settings_hash({"weights": weights, "endpoint": ep, "eval": ev, "thinking": cfg.thinking, "seed": cfg.seed})


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
            self._gen = make_generator(self.endpoint)
        return getattr(self._gen, name)


class Evaluation:
    """Runs and records one stage-5 evaluation in `<stage_folder>`; resumable at row granularity."""

    def __init__(self, cfg, stage_folder, judge_generator=None):
        self.cfg, self.folder = cfg, Path(stage_folder)
        self.results = JsonlLog(self.folder / "results.jsonl", key="key")
        self.generations = JsonlLog(self.folder / "generations.jsonl", key="key")
        self.failures = JsonlLog(self.folder / FAILURES_FILE, key="id")  # every failed call, one record per attempt
        # this run's rows tried (each ends in a failed policy call, a failed judge call or a grade) and failed
        self.calls = {"attempted": 0, "failed": 0, "first_error": None, "done_before": 0}
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
        judge = dataclasses.replace(self.cfg.eval.judge, prompt=bench.judge_prompt)
        return f"{self.gen_key(name, bench, scaffold, problem_id, sample)}~{judge_hash(judge)}"

    def summariser(self):
        """The RC scaffold's summariser: None (the policy summarises itself, the paper's test-time choice), or
        eval.rc.summariser_endpoint loaded once when eval.rc.summariser is "frozen"."""
        if self.cfg.eval.rc.summariser != "frozen":
            return None
        if self._summariser is None:
            self._summariser = make_generator(self.cfg.eval.rc.summariser_endpoint)
        return self._summariser

    def grader(self, prompt: str):
        """The Grader for one judge prompt (the judge model is loaded once and shared)."""
        if prompt not in self._graders:
            if self.judge_generator is None and self.cfg.eval.judge.endpoint.backend != "openai":
                self.judge_generator = LazyGenerator(self.cfg.eval.judge.endpoint)
            judge = dataclasses.replace(self.cfg.eval.judge, prompt=prompt)
            self._graders[prompt] = Grader(judge, cache_dir=self.folder / "judge_cache", generator=self.judge_generator)
        return self._graders[prompt]

    def todo(self, name: str, bench: Benchmark, scaffold: str) -> list[tuple[Problem, int]]:
        """(problem, sample) pairs of this group with no result row yet."""
        return [(p, s) for s in range(self.cfg.eval.samples) for p in bench.problems
                if self.row_key(name, bench, scaffold, p.id, s) not in self.results]

    def run_group(self, name: str, policy, bench: Benchmark, scaffold: str, endpoint=None) -> int:
        """Generate (what is not logged yet) and grade (what has no row yet) one group, chunk by chunk; return rows
        written. A failed policy or judge call is logged to failures.jsonl, never as a result, so a rerun redoes it."""
        ev, written = self.cfg.eval, 0
        # the same thinking switch as training; rc comes from eval.rc (a field name ScaffoldSettings shares)
        settings = scaffold_lib.settings_from_config(ev, task=bench.task, thinking=self.cfg.thinking)
        size = max(1, ev.chunk)
        for s in range(ev.samples):
            # chunks are cut from the whole problem list, not from what is left, so a resumed run generates
            # every chunk exactly as an uninterrupted one (same batch, same seed)
            for start in range(0, len(bench.problems), size):
                chunk = bench.problems[start:start + size]
                todo = [p for p in chunk if self.row_key(name, bench, scaffold, p.id, s) not in self.results]
                if todo:
                    self._generate(name, policy, bench, scaffold, chunk, s, settings, endpoint)
                    written += self._grade(name, bench, scaffold, todo, s)
        return written

    def _generate(self, name, policy, bench, scaffold, chunk, s, settings, endpoint) -> None:
        """Generate one chunk for sample `s` when any of its generations is missing; log the ones that are missing."""
        keys = [self.gen_key(name, bench, scaffold, p.id, s) for p in chunk]
        if all(k in self.generations for k in keys):
            return
        # scaffolds derive their step seeds as seed * 7919 + step, which must stay below 2**32
        seed = stable_seed(self.cfg.seed, name, bench.name, scaffold, s, *(p.id for p in chunk), limit=500_000)
        results = scaffold_lib.run_scaffold(scaffold, chunk, policy, self.cfg.eval.sampling, settings, seed=seed,
                                            summariser=self.summariser())
        for p, k, res in zip(chunk, keys, results):
            if k in self.generations:
                continue
            rec = {k2: v for k2, v in res.to_dict().items() if k2 != "reasoning"}
            if rec.get("finish_reason") == "error":  # the policy call failed: not a generation (a row that ends here)
                self.calls["attempted"] += 1
                self._fail(k, "policy", "the policy call failed (finish_reason error) after the endpoint's retries")
                continue
            self.generations.append({"key": k, **rec})
        self._check_rate("policy", endpoint or self.cfg.generation)

    def _grade(self, name, bench, scaffold, todo, s) -> int:
        """Grade the generated problems of `todo` (sample `s`); append one result row per valid or invalid grade."""
        gens = [(p, self.generations.records.get(self.gen_key(name, bench, scaffold, p.id, s))) for p in todo]
        gens = [(p, g) for p, g in gens if g is not None]
        if not gens:
            return 0
        grades = self.grader(bench.judge_prompt).grade([p for p, _ in gens], [g["final"] for _, g in gens],
                                                       [g["think_closed"] for _, g in gens])
        written = 0
        for (p, g), grade in zip(gens, grades):
            key = self.row_key(name, bench, scaffold, p.id, s)
            self.calls["attempted"] += 1
            if getattr(grade, "reason", None) == "judge_error":  # the judge call failed: not a grade
                self._fail(key, "judge", getattr(grade, "detail", None) or getattr(grade, "judge_text", None) or "judge call failed")
                continue
            if not grade.valid:
                self.calls["failed"] += 1  # an unreadable grade is stored (a rerun would read the same) but counted
            self.results.append(make_row(name, bench, scaffold, p, s, g, grade, key))
            written += 1
        self._check_rate("judge", self.cfg.eval.judge.endpoint)
        return written

    def _fail(self, key: str, role: str, error: str) -> None:
        """Log one failed call outside the results and count it."""
        self.calls["failed"] += 1
        self.calls["first_error"] = self.calls["first_error"] or error
        self.failures.append({"id": f"{key}#{len(self.failures.records)}", "key": key, "role": role, "error": error})

    def _check_rate(self, role: str, endpoint) -> None:
        """Stop the evaluation once this run's failed or invalid share passes eval.max_invalid_rate."""
        c = self.calls
        # the share among this evaluation's rows (finished before + tried now), so a rerun of a few failures is not 100%
        check_invalid_rate(f"05_eval ({role} calls)", endpoint, c["failed"], c["attempted"] + c["done_before"], self.cfg.eval.max_invalid_rate,
                           "eval.max_invalid_rate", c["first_error"])

    def open_failures(self) -> list[dict]:
        """The latest failed call of each key not redone since (a policy failure with no generation, a judge
        failure with no row): what a rerun will redo."""
        latest = {r["key"]: r for r in self.failures.values()}
        return [r for k, r in latest.items() if k not in (self.generations if r["role"] == "policy" else self.results)]

    def run(self, benchmarks: list[Benchmark], models: list[tuple[str, object]], scaffolds: list[str],
            policy_factory=None) -> list[dict]:
        """Evaluate every model on every benchmark with every scaffold; return all result rows."""
        unknown = [s for s in scaffolds if s not in scaffold_lib.SCAFFOLDS]
        if unknown:
            raise ValueError(f"eval.scaffolds: unknown {unknown}; choose from {scaffold_lib.SCAFFOLDS}")
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
                        n = self.run_group(name, policy, bench, sc, endpoint)
                    if n:
                        print(f"[eval] {name} / {bench.name} / {sc}: {n} rows in {t.seconds:.0f} s")
                        self.add_wall_time(name, bench.name, sc, t.seconds)
            if owned:
                close_generator(policy)  # the engine shuts down and frees its memory before the next model's starts
            del policy
        missing = self.open_failures()
        if missing:
            print(f"[eval] {len(missing)} calls failed (first: {missing[0]['error']}); they are in {FAILURES_FILE}, not in "
                  f"{self.results.path.name}: rerun the stage when the endpoint is back to complete exactly those rows")
        absent = sum(k not in self.results for k in self._current)
        note_open_work(self.folder, "eval", f"{absent} of {len(self._current)} result rows missing after failed calls "
                       f"({self.folder / FAILURES_FILE})" if absent else None)
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
        self.calls["done_before"] = sum(1 for k in self._current if k in self.results)
        return n

    def add_wall_time(self, name: str, bench: str, scaffold: str, seconds: float) -> None:
        """Add the seconds one group spent generating and grading to WALL_TIMES (summed over resumed runs)."""
        times = self.wall_times()
        key = group_key(name, bench, scaffold)
        times[key] = round(times.get(key, 0.0) + seconds, 3)
        write_json(self.folder / WALL_TIMES, times)

    def wall_times(self) -> dict:
        """Seconds spent per group (checkpoint|benchmark|scaffold), from WALL_TIMES."""
        path = self.folder / WALL_TIMES
        return read_json(path) if path.exists() else {}

    def rows(self) -> list[dict]:
        """The result rows of this evaluation's settings once `run` has set them (else every row recorded)."""
        if self._current is None:
            return self.results.values()
        return [r for k, r in self.results.records.items() if k in self._current]


def run_stage(cfg, run_dir, params_file=None, overrides=None, *, stage_folder=None, judge_generator=None,
              policy_factory=None) -> list[dict]:
    """Stage 5's entry: evaluate the config's checkpoints (or endpoint) on its benchmarks with its scaffolds, in
    `<run_dir>/05_eval` (or `stage_folder`), and return this evaluation's result rows. Its steps, in the order
    notebook 05 calls them (tests/test_evaluation.py checks the notebook): load_benchmarks, models_under_test,
    Evaluation, Evaluation.run. `params_file` and `overrides` are the stages' common signature: evaluation
    always runs in this process (cfg already holds them). `judge_generator` / `policy_factory`: engines passed
    in (tests), else built from the config's endpoints."""
    folder = Path(stage_folder) if stage_folder else Path(run_dir) / EVAL
    ev = cfg.eval
    benches = load_benchmarks(ev.benchmarks, ev.benchmark_limit, ev.judge.prompt)
    models = models_under_test(cfg, run_dir)
    return Evaluation(cfg, folder, judge_generator).run(benches, models, ev.scaffolds, policy_factory)


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
    """Result rows as a DataFrame (the official columns first); notebook 05, "Run the evaluation"."""
    import pandas as pd  # heavy: loads only when rows become a table
    df = pd.DataFrame(rows)
    first = [c for c in ("checkpoint", "benchmark", "scaffold", "problem_id", "sample", "model_solution", "score", "grade",
                         "cost_run", "grade_cost") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def write_parquet(rows: list[dict], path) -> Path:
    """A parquet copy of the result rows (nested columns stored as JSON text for portability); notebook 05, "The run report"."""
    df = results_frame(rows).copy()
    for col in ("grade", "cost_run", "grade_cost"):
        if col in df.columns:
            df[col] = df[col].map(lambda v: json.dumps(v))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        df.to_parquet(f, index=False)
    return path


def both_means(rows: list[dict]) -> dict:
    """Mean score % of 7 with invalid grades dropped, and with invalid grades counted as 0 (side by side)."""
    return {"mean_pct_invalid_dropped": stats.score_pct(stats.effective_score(r, "drop") for r in rows),
            "mean_pct_invalid_as_0": stats.score_pct(stats.effective_score(r, "zero") for r in rows)}


def no_proof_rate(rows: list[dict]):
    """Share of rows with nothing to grade (truncated, empty proof, or no final answer): valid 0s with no judge call."""
    return sum(1 for r in rows if r.get("no_proof")) / len(rows) if rows else None


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


def judge_tokens_per_problem(rows: list[dict]) -> float | None:
    """Mean judge tokens (prompt + output) per (problem, sample) attempt: 0 where no judge was called."""
    if not rows:
        return None
    return sum((r.get("grade_cost") or {}).get("input_tokens", 0) + (r.get("grade_cost") or {}).get("output_tokens", 0)
               for r in rows) / len(rows)


def eval_metrics(rows: list[dict], cfg, benchmarks: Optional[list] = None, wall_times: Optional[dict] = None) -> dict:
    """metrics.json of stage 5: counts, and per checkpoint and scaffold (all benchmarks pooled, and per benchmark).

    `mean_score_pct` follows eval.judge.invalid; `mean_pct_invalid_dropped` / `mean_pct_invalid_as_0`
    show both readings; `skipped_rows` counts benchmark rows skipped while loading, with reasons. Per benchmark,
    `wall_s` is the group's time from `wall_times` (Evaluation.wall_times) and the cost columns are summed USD."""
    ev = cfg.eval
    invalid = "zero" if ev.judge.invalid == "zero" else "drop"
    metrics = {"rows": len(rows), "problems": len({(r["benchmark"], r["problem_id"]) for r in rows}),
               "samples": ev.samples, "checkpoints": sorted({r["checkpoint"] for r in rows}),
               "benchmarks": sorted({r["benchmark"] for r in rows}), "scaffolds": sorted({r["scaffold"] for r in rows}),
               "scores": {}, "by_benchmark": {}}
    cost = stats.total_cost(rows)
    metrics["cost_usd"] = round(cost["total_usd"], 6)
    if benchmarks is not None:
        metrics["skipped_rows"] = {b.name: skipped_metrics(b) for b in benchmarks}

    def block(grp):
        ci = stats.score_with_ci(grp, ev.bootstrap, cfg.seed, invalid)
        mean, std = stats.runs_mean_std(grp, invalid)
        out = {"mean_score_pct": ci["mean_score_pct"], **both_means(grp), "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
               "summary_unclosed_rate": summary_unclosed_rate(grp), "run_std_pct": std, "truncation_rate": stats.truncation_rate(grp), "tokens_per_problem": stats.tokens_per_problem(grp),
               "invalid_rate": stats.invalid_rate(grp), "no_proof_rate": no_proof_rate(grp), "rows": len(grp)}
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
        cost = stats.total_cost(grp)
        metrics["by_benchmark"].setdefault(b, {}).setdefault(ck, {})[sc] = {
            **block(grp), "judge_tokens_per_problem": _num(judge_tokens_per_problem(grp)),
            "generation_usd": round(cost["generation_usd"], 6), "judge_usd": round(cost["grading_usd"], 6),
            "wall_s": (wall_times or {}).get(group_key(ck, b, sc))}
    metrics["comparisons"] = comparisons(rows, cfg)
    return metrics


def _problem_scores(rows: list[dict], invalid: str) -> dict:
    """(benchmark, problem_id) -> mean score (0-7) over its samples (rows with no usable score are left out)."""
    acc: dict = {}
    for r in rows:
        s = stats.effective_score(r, invalid)
        if s is not None:
            acc.setdefault((r["benchmark"], str(r["problem_id"])), []).append(s)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def paired_difference(rows_a: list[dict], rows_b: list[dict], n_boot: int = 1000, seed: int = 0,
                      invalid: str = "drop", level: float = 0.95) -> dict:
    """Score % of 7 of B minus A on the problems both were graded on, with a paired percentile bootstrap over
    problems (one resample of problems drawn for both, so what the problems share cancels). Two overlapping
    intervals can still hide a real paired difference, and two separate ones can come from a shared hard problem:
    this is the interval to read. `beyond_noise` is True only when the interval excludes 0 and there are
    >= stats.MIN_VERDICT_N (5) problems; with fewer the interval is not trusted and `beyond_noise` is False."""
    a, b = _problem_scores(rows_a, invalid), _problem_scores(rows_b, invalid)
    keys = sorted(set(a) & set(b))
    out = {"problems": len(keys)}
    if not keys:
        return {**out, "diff_pct": None, "ci_low": None, "ci_high": None, "beyond_noise": False}
    d = 100.0 / 7.0 * (np.array([b[k] for k in keys]) - np.array([a[k] for k in keys]))
    out["diff_pct"] = float(d.mean())
    if len(keys) < 2 or n_boot <= 0:
        lo = hi = out["diff_pct"]
    else:
        boots = d[np.random.default_rng(seed).integers(0, len(keys), (n_boot, len(keys)))].mean(1)
        lo, hi = (float(x) for x in np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2]))
    out.update(ci_low=lo, ci_high=hi, beyond_noise=bool(len(keys) >= stats.MIN_VERDICT_N and (lo > 0 or hi < 0)))
    return out


def _checkpoint_order(names) -> list:
    rank = {c: k for k, c in enumerate(CHECKPOINT_ORDER)}
    return sorted(names, key=lambda c: rank.get(c, len(rank)))


def comparisons(rows: list[dict], cfg) -> list[dict]:
    """The paired differences a reader asks about (metrics.json `comparisons`): per scaffold, each checkpoint
    against the one before it in the pipeline (what that stage added) and, when they are not neighbours, the last
    against the first; per checkpoint, every other scaffold against `single`. Each is `paired_difference`'s record
    plus {kind, scaffold | checkpoint, a, b}."""
    ev = cfg.eval
    invalid = "zero" if ev.judge.invalid == "zero" else "drop"
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["scaffold"]), []).append(r)
    cks = _checkpoint_order({c for c, _ in groups})
    scs = sorted({s for _, s in groups}, key=lambda s: (s != "single", s))
    out = []
    for sc in scs:
        have = [c for c in cks if (c, sc) in groups]
        pairs = list(zip(have, have[1:])) + ([(have[0], have[-1])] if len(have) > 2 else [])
        for a, b in pairs:
            out.append({"kind": "checkpoint", "scaffold": sc, "a": a, "b": b,
                        **paired_difference(groups[(a, sc)], groups[(b, sc)], ev.bootstrap, cfg.seed, invalid)})
    for ck in cks:
        for sc in scs[1:]:
            if (ck, "single") in groups and (ck, sc) in groups:
                out.append({"kind": "scaffold", "checkpoint": ck, "a": "single", "b": sc,
                            **paired_difference(groups[(ck, "single")], groups[(ck, sc)], ev.bootstrap, cfg.seed, invalid)})
    return [{k: _num(v) for k, v in c.items()} for c in out]


def calibration_rows(cfg) -> list[dict]:
    """The graded proofs of eval.calibration (default: the 36 shipped ones), read through its column mapping."""
    c = cfg.eval.calibration
    return cal.load_calibration(c.path, c.columns or None)


def _calibration_prompt(cfg, benchmarks: list[Benchmark]) -> str:
    """eval.calibration.prompt, else the proof judge prompt used on the benchmarks."""
    return cfg.eval.calibration.prompt or next((b.judge_prompt for b in benchmarks if b.task == "proof"), "rubric")


def judge_calibration(run: "Evaluation", benchmarks: list[Benchmark], cfg) -> dict | None:
    """Grade the first `eval.calibration_limit` calibration proofs with the proof judge used on the benchmarks
    (0: None, no calibration; None: all of them) and compare with the reference grades (qedlib.calibration)."""
    if cfg.eval.calibration_limit == 0:
        return None
    graded = calibration_rows(cfg)[:cfg.eval.calibration_limit]
    return cal.calibrate(run.grader(_calibration_prompt(cfg, benchmarks)), graded) if graded else None


def calibration_judges(cfg) -> list[tuple[str, object]]:
    """(label, config.Endpoint) of each extra judge in eval.calibration.judges (an optional `label` key names it)."""
    out = []
    for i, spec in enumerate(cfg.eval.calibration.judges):
        if not isinstance(spec, dict):
            raise ConfigError(f"eval.calibration.judges[{i}] = {spec!r}: expected a mapping of Endpoint fields")
        fields = {k: v for k, v in spec.items() if k != "label"}
        ep = build(Endpoint, fields, "params", f"eval.calibration.judges[{i}]")
        out.append((str(spec.get("label") or cal.judge_label(ep)), ep))
    return out


def judge_comparison(run: "Evaluation", benchmarks: list[Benchmark], cfg, calibration: dict | None) -> dict:
    """label -> calibration result for eval.judge (its result `calibration`) and every eval.calibration.judges
    endpoint, each grading the same proofs with the same prompt, mode and sampling (qedlib.calibration)."""
    if calibration is None:
        note_open_work(run.folder, "calibration", None)
        return {}
    out = {cal.judge_label(cfg.eval.judge.endpoint): calibration}
    graded = calibration_rows(cfg)[:cfg.eval.calibration_limit]
    prompt = _calibration_prompt(cfg, benchmarks)
    for label, ep in calibration_judges(cfg):
        label = label if label not in out else f"{label} #{len(out) + 1}"  # two judges never share a row
        judge = dataclasses.replace(cfg.eval.judge, endpoint=ep, prompt=prompt, panel=[])
        gen = None if ep.backend == "openai" else LazyGenerator(ep)
        out[label] = cal.calibrate(Grader(judge, cache_dir=run.folder / "judge_cache", generator=gen), graded)
    failed = sum(r.get("invalid_by_reason", {}).get("judge_error", 0) for r in out.values())
    # a failed call is no grade and is not cached: the stage stays open until a rerun made it
    note_open_work(run.folder, "calibration", f"{failed} calibration judge call{'s' if failed > 1 else ''} failed"
                   if failed else None)
    return out


def stage_metrics(metrics: dict, calibration: dict | None, export_files: list, cfg=None,
                  judges: dict | None = None) -> dict:
    """metrics.json of the stage: `eval_metrics` plus the judge calibration's summary and the official export's
    file count; with `cfg`, the paper comparison (paper.comparison); with `judges`, each judge's official metrics."""
    out = {**metrics, "judge_calibration": cal.summary(calibration), "official_export_files": len(export_files)}
    if cfg is not None:
        out["paper_comparison"] = comparison(metrics, cfg.eval.paper_rows)
    if judges:
        out["judge_comparison"] = cal.comparison_records(judges)
    return out



# Problems per built-in benchmark (RECIPE, stage 5); other benchmarks are loaded to be counted.
BENCHMARK_SIZES = {"imo-proofbench": 60, "proofbench": 145, "imo-answerbench": 400}


def _benchmark_name(spec) -> str:
    """A benchmark spec's name (a mapping's `name`, else its path's stem; a string is its own name)."""
    if isinstance(spec, dict):
        return str(spec.get("name") or Path(str(spec["path"])).stem)
    return str(spec)


def cost_estimate(cfg) -> list[dict]:
    """Before anything runs: per model, benchmark and scaffold, the attempts, generated tokens, GPU-hours and
    judge tokens and dollars, from eval.estimate's assumptions and the endpoints' prices (per million tokens)."""
    ev, est = cfg.eval, cfg.eval.estimate
    models = [(ev.endpoint.model, ev.endpoint)] if ev.endpoint is not None else \
        [(ck, cfg.generation) for ck in ev.checkpoints]
    judges = [ev.judge.endpoint] + [dataclasses.replace(ev.judge.endpoint, **p) for p in ev.judge.panel]
    out = []
    for spec in ev.benchmarks:
        name = _benchmark_name(spec)
        n = BENCHMARK_SIZES.get(name) or len(load_benchmark(spec).problems)
        n = min(n, ev.benchmark_limit) if ev.benchmark_limit else n
        for sc in ev.scaffolds:
            tokens = est.tokens_per_problem.get(f"{name}/{sc}", est.tokens_per_problem.get(name, ev.sampling.max_new_tokens))
            attempts = n * ev.samples
            for model, ep in models:
                gen = attempts * tokens
                grades = attempts * ev.judge.samples
                j_in, j_out = grades * est.judge_input_tokens, grades * est.judge_output_tokens
                judge_usd = sum(j_in * j.price_in_per_mtok + j_out * j.price_out_per_mtok for j in judges) / 1e6
                out.append({"model": model, "benchmark": name, "scaffold": sc, "attempts": attempts,
                            "generated tokens": gen,
                            "GPU-hours": None if ep.backend == "openai" else gen / est.generation_tokens_per_s / 3600,
                            "generation $": gen * ep.price_out_per_mtok / 1e6,
                            "judge tokens": (j_in + j_out) * len(judges), "judge $": judge_usd})
    return out


def cost_estimate_text(cfg) -> str:
    """The eval estimate as text for `python -m qedlib plan`: one line per group, then the totals."""
    rows = cost_estimate(cfg)
    est = cfg.eval.estimate
    if not rows:
        return "== eval cost ==\n  nothing to evaluate (no checkpoint or benchmark)"
    lines = ["== eval cost (before anything runs) ==",
             f"  assumes {est.generation_tokens_per_s:g} generated tokens/s per GPU, {est.judge_input_tokens} judge prompt "
             f"+ {est.judge_output_tokens} judge output tokens per grade (eval.estimate); AnswerBench answers decided "
             "by exact match need no judge call, so its judge figures are an upper bound"]
    for r in rows:
        gpu = "served" if r["GPU-hours"] is None else f"{r['GPU-hours']:.1f} GPU-h"
        lines.append(f"  {r['model']} / {r['benchmark']} / {r['scaffold']}: {r['attempts']} attempts, "
                     f"{r['generated tokens'] / 1e6:.1f}M tokens, {gpu}; judge {r['judge tokens'] / 1e6:.1f}M tokens, "
                     f"${r['judge $']:.2f}")
    gpu_h = sum(r["GPU-hours"] or 0.0 for r in rows)
    judge_tok = sum(r["judge tokens"] for r in rows)
    usd = sum(r["judge $"] + r["generation $"] for r in rows)
    lines.append(f"  total: {gpu_h:.1f} GPU-hours, {judge_tok / 1e6:.1f}M judge tokens, ${usd:.2f} at the params' prices")
    return "\n".join(lines)
