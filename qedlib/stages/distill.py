"""Stage 1, distillation: teacher proofs -> graded, filtered SFT data (notebooks/01_distill.ipynb).

`run_stage(cfg, run_dir)` runs the whole stage; the notebook calls its steps one cell at a time, in the same
order, and each step writes its own artifacts into the stage folder (what it shows is in qedlib.views.distill):

1. `prepare_problems`: load `distill.problems` (shipped set, a file, or a hub dataset with a column
   mapping), `decontaminate` against the evaluation benchmarks (qedlib.decontam; decontamination.json),
   optionally `screen_problems` (screening.jsonl) and `write_rubrics` (rubrics.jsonl), keep what the
   judge can grade;
2. `generate_samples`: n teacher samples per problem, appended to `samples.jsonl` one record at a
   time as they arrive (a rerun skips finished keys; a kill loses only what was in flight);
3. `stage_grader` + `grade_samples`: every sample graded by the judge, appended to `grades.jsonl` likewise;
4. `select`: the selection rules from params, every sample labelled kept or why not; funnel.json;
5. `build_dataset` + `save_dataset`: a `datasets.Dataset` with the FineProofs-SFT columns in
   `dataset/` (`sft_data.sft_features`; stage 02 reads it, or the public FineProofs-SFT, with one reader);
6. `stage_metrics`: the numbers the notebook writes to metrics.json.

With `distill.thinking: false` (the CPU default: SmolLM2-135M writes no <think> blocks) the
teacher's whole answer is the proof and the reasoning is empty; the SFT target is then
"<think>\\n\\n</think>\\n\\n{proof}", so the student still learns to close its thinking.
"""
from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .. import prompts
from ..decontam import build_index, find_contaminated, load_benchmarks
from ..files import JsonlLog, read_json, replace_folder, settings_hash, write_json, write_metrics
from ..generation import Completion, make_generator, run_sync
from ..grading import Grader, InvalidRateError, check_invalid_rate, describe_endpoint, grade_completions
from ..layout import DISTILL, stage_dir
from ..models import resolve_model, stable_seed
from ..problem_sets import load_source
from ..proof_chat import SFT_COLUMNS, sft_messages
from ..run_state import note_open_work
from ..sft_data import sft_features
from ..verdicts import judge_hash, no_proof_reason

SAMPLES_FILE, GRADES_FILE = "samples.jsonl", "grades.jsonl"
FUNNEL_FILE = "funnel.json"  # the funnel rows of the last `select`
SAMPLES_SETTINGS = "samples_settings.json"  # the teacher settings hash of the last generate_samples call


def sample_key(problem_id: str, index: int, settings: str = "") -> str:
    """The resume key of one teacher sample: problem#index@hash of the teacher settings that wrote it."""
    return f"{problem_id}#{index}" + (f"@{settings}" if settings else "")


def teacher_hash(dc, seed: int = 0) -> str:
    """Hash of what a teacher sample depends on: teacher model, sampling (not n), thinking, system prompt, seed."""
    return settings_hash({"teacher": dc.teacher, "sampling": dataclasses.replace(dc.sampling, n=1),
                          "thinking": dc.thinking, "system_prompt": dc.system_prompt, "seed": seed})


def sample_seed(problem_ids, index: int, settings: str) -> int:
    """The seed of one teacher batch (or request): from its problems, the sample index and the settings hash
    alone, so a resumed run samples exactly what an uninterrupted one does. Below 2**32 for transformers' set_seed."""
    return stable_seed(settings, index, *problem_ids, limit=2 ** 32)


def grade_key(sample: str, judge) -> str:
    """The resume key of one grade: the sample's key~hash of the judge settings."""
    return f"{sample}~{judge_hash(judge)}"


def set_aside(log: JsonlLog, current: set, what: str) -> int:
    """Count (and say) the logged records whose key is not one the current settings produce."""
    n = sum(1 for k in log.records if k not in current)
    if n:
        print(f"[distill] {log.path.name}: {n} {what} written with other settings are set aside (kept in the file, not used)")
    return n


# ---------------------------------------------------------------- problems
def load_stage_problems(dc) -> list:
    """The problems named by `distill.problems` (shipped, file, or hub with a column mapping)."""
    return load_source(dc.problems)


def decontaminate(problems: list, dc) -> tuple[list, list[dict], list[str]]:
    """Drop problems overlapping the benchmarks in `distill.decontaminate`; (kept, removed rows, notes)."""
    if not dc.decontaminate:
        return problems, [], ["decontamination off (distill.decontaminate is empty)"]
    benchmarks, notes = load_benchmarks(dc.decontaminate, dc.decontaminate_missing)
    if not benchmarks:
        return problems, [], notes + ["no benchmark available: nothing decontaminated"]
    index = build_index(benchmarks, dc.ngram)
    removed = find_contaminated(problems, index, dc.overlap_threshold)
    gone = {r["id"] for r in removed}
    sizes = ", ".join(f"{k} ({len(v)})" for k, v in benchmarks.items())
    notes.append(f"checked {len(problems)} problems against {sizes}: {len(gone)} removed "
                 f"({dc.ngram}-gram overlap >= {dc.overlap_threshold})")
    return [p for p in problems if p.id not in gone], removed, notes


def gradable(problems: list, judge) -> tuple[list, int]:
    """Problems the judge's prompt can grade (rubric: a rubric; proofbench: + reference solution; answer: an answer)."""
    need = {"rubric": ("rubric",), "proofbench": ("rubric", "reference_solution"), "answer": ("answer",)}[judge.prompt]
    ok = [p for p in problems if all(getattr(p, f) for f in need)]
    return ok, len(problems) - len(ok)


def helper_generator(dc, teacher=None, judge_generator=None):
    """The generator that screens problems and writes rubrics (`distill.helper`), reusing loaded models."""
    endpoint = dc.judge.endpoint if dc.helper == "judge" else dc.teacher
    for gen in (teacher, judge_generator):
        if gen is not None and (getattr(gen, "endpoint", None) == endpoint
                                or (endpoint.backend == "vllm" and _same_engine(gen.endpoint, endpoint))):
            return gen
    if teacher is not None and _same_model(endpoint, dc.teacher):
        return make_generator(endpoint, teacher.model, teacher.tokenizer)
    return make_generator(endpoint)


def _same_model(a, b) -> bool:
    return (a.backend == b.backend == "transformers" and a.model == b.model
            and a.device == b.device and a.dtype == b.dtype)


def _same_engine(a, b) -> bool:
    return a.backend == b.backend and a.model == b.model and a.vllm == b.vllm


def chunk_size(endpoint) -> int:
    """Requests per durable chunk: everything in flight (openai) or one forward batch (in-process)."""
    return max(1, endpoint.max_concurrency if endpoint.backend == "openai" else endpoint.batch_size)


def _helper_answers(generator, todo: list, make_prompt, sampling):
    """Yield (problem, answer text) chunk by chunk, so each chunk can be logged before the next."""
    if not todo:
        return
    one = dataclasses.replace(sampling, n=1)
    size = chunk_size(generator.endpoint)
    for start in range(0, len(todo), size):
        part = todo[start:start + size]
        groups = generator.generate([[{"role": "user", "content": make_prompt(p)}] for p in part], one)
        yield from ((p, g[0].final or g[0].text) for p, g in zip(part, groups))


def screen_problems(problems: list, dc, generator, stage_folder: str | Path) -> tuple[list, list[dict]]:
    """Screen problems with the screening prompt; keep sound, proof-style problems in the difficulty band.

    Verdicts are logged to `screening.jsonl` (resumable). Returns (kept problems, one row per problem).
    """
    log = JsonlLog(Path(stage_folder) / "screening.jsonl", key="id")
    todo = [p for p in problems if p.id not in log]
    for p, text in _helper_answers(generator, todo, lambda p: prompts.fill("screen_problem", problem=p.problem), dc.judge.sampling):
        log.append({"id": p.id, **_screening_verdict(text, dc.screen_difficulty), "raw": text})
    rows = [log.records[p.id] for p in problems]
    return [p for p, r in zip(problems, rows) if r["keep"]], rows


def _screening_verdict(text: str, band: list) -> dict:
    """Turn a screening answer into keep/why; an unparseable answer drops the problem (with the reason)."""
    parsed, error = prompts.parse_screening(text)
    if parsed is None:
        return {"keep": False, "why": f"unparseable screening answer: {error}", "difficulty": None}
    flags = [k for k in prompts.SCREEN_FLAGS if parsed[k]]
    difficulty = parsed["difficulty"]
    if flags:
        return {"keep": False, "why": "flagged " + ", ".join(flags), "difficulty": difficulty}
    if not band[0] <= difficulty <= band[1]:
        return {"keep": False, "why": f"difficulty {difficulty} outside {list(band)}", "difficulty": difficulty}
    return {"keep": True, "why": "", "difficulty": difficulty}


def write_rubrics(problems: list, dc, generator, stage_folder: str | Path) -> tuple[list, int]:
    """Write a 0-7 rubric for each problem with a reference solution and no rubric (logged, resumable)."""
    log = JsonlLog(Path(stage_folder) / "rubrics.jsonl", key="id")
    need = [p for p in problems if not p.rubric and p.reference_solution]
    todo = [p for p in need if p.id not in log]
    fill = lambda p: prompts.fill("write_rubric", problem=p.problem, reference_solution=p.reference_solution)  # noqa: E731
    for p, text in _helper_answers(generator, todo, fill, dc.judge.sampling):
        parsed, error = prompts.parse_rubric(text)
        # An unusable rubric leaves the problem without one (the judge then grades without); counted.
        log.append({"id": p.id, "rubric": parsed["text"] if parsed else None, "error": error, "raw": text})
    need_ids = {p.id for p in need}
    out = [dataclasses.replace(p, rubric=log.records[p.id]["rubric"]) if p.id in need_ids else p for p in problems]
    return out, sum(1 for p in need if log.records[p.id]["rubric"])


# ---------------------------------------------------------------- teacher generation
def teacher_messages(problem_text: str, system_prompt: Optional[str]) -> list[dict]:
    """The teacher's chat: the bare problem as the user message, after an optional system prompt."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": problem_text}]


def make_teacher(dc, model=None, tokenizer=None):
    """The teacher generator for `distill.teacher` (pass model/tokenizer to reuse a loaded model).
    Notebook 01, "Problems"."""
    return make_generator(dc.teacher, model, tokenizer)


def sample_record(problem, index: int, completion, dc, seed: int = 0) -> dict:
    """One JSON record for one teacher sample.

    `truncated` is true when the budget ran out (finish_reason "length") or, with thinking on,
    when the thinking never closed: such a sample has no proof.
    """
    no_proof = no_proof_reason(completion.final, completion.think_closed or not dc.thinking) == "truncated"
    h = teacher_hash(dc, seed)
    return {"key": sample_key(problem.id, index, h), "settings": h, "problem_id": problem.id, "sample_index": index,
            "teacher": dc.teacher.model, "thinking": dc.thinking, "text": completion.text,
            "reasoning": completion.reasoning, "proof": "" if no_proof else completion.final,
            "think_closed": completion.think_closed, "finish_reason": completion.finish_reason,
            "truncated": completion.finish_reason == "length" or no_proof,
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "cost": completion.cost, "time": round(time.time(), 3)}


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), where stderr refreshes are saved one chunk each."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and hasattr(shell, "kernel")


class NotebookLine:
    """A file for tqdm in a Jupyter kernel: every refresh replaces one display (update_display_data), so the user
    watches the bar move and the saved notebook keeps only its final line, not one stderr chunk per refresh (which
    nbconvert's HTML shows as 5-8 pink lines)."""

    def __init__(self, display=None):
        if display is None:
            from IPython.display import display  # heavy: only inside a kernel
        self.handle = display({"text/plain": ""}, raw=True, display_id=True)
        self.last = ""

    def write(self, s: str) -> None:
        """Show the newest non-empty line of what tqdm wrote (it writes '\\r' + the whole bar)."""
        lines = [ln.strip() for ln in s.replace("\r", "\n").split("\n") if ln.strip()]
        if lines and lines[-1] != self.last:
            self.last = lines[-1]
            self.handle.update({"text/plain": self.last}, raw=True)

    def flush(self) -> None:
        """Nothing buffered."""


class _Progress:
    """tqdm bar with tokens/s and running cost in the postfix (in a notebook: one line that updates in place)."""

    def __init__(self, total: int, desc: str, cost0: float, enabled: bool):
        on = enabled and total > 0
        file = NotebookLine() if on and _in_kernel() else None
        self.bar = tqdm(total=total, desc=desc, unit="sample", disable=not on, file=file, ncols=100 if file else None,
                        ascii=False if file else None)
        self.t0, self.tokens, self.cost = time.perf_counter(), 0, cost0

    def update(self, records: list[dict]) -> None:
        """Advance by these records, adding their tokens and cost."""
        self.tokens += sum(r.get("completion_tokens", 0) for r in records)
        self.cost += sum(r.get("cost", 0.0) for r in records)
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"{rate:.0f} tok/s, ${self.cost:.4f}", refresh=False)
        self.bar.update(len(records))

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def generate_samples(problems: list, dc, stage_folder: str | Path, generator=None, progress: bool = True,
                     seed: int = 0) -> dict:
    """Generate `distill.sampling.n` teacher samples per problem into `samples.jsonl`, skipping done keys.

    Transformers/vLLM: one `generate` call per batch of `teacher.batch_size` pending prompts, each
    batch appended as soon as it returns. OpenAI: every request in flight under
    `teacher.max_concurrency`, each appended when it arrives. Failed requests are not logged (a
    rerun retries them) and are counted under "errors"; past `distill.max_invalid_rate` of them the
    stage stops (InvalidRateError naming the teacher endpoint). Batches are cut from the whole
    (sample index, problem) list and seeded by `sample_seed`, so a resumed run equals an uninterrupted one.
    Notebook 01, "Teacher generation".
    """
    log = JsonlLog(Path(stage_folder) / SAMPLES_FILE, key="key")
    h = teacher_hash(dc, seed)
    write_json(Path(stage_folder) / SAMPLES_SETTINGS, {"settings": h})  # what read_samples returns without dc
    wanted = {sample_key(p.id, i, h): (p, i) for p in problems for i in range(dc.sampling.n)}
    todo = [pi for k, pi in wanted.items() if k not in log]
    stats = {"skipped": len(wanted) - len(todo), "generated": 0, "errors": 0, "attempted": 0,
             "first_error": None, "seconds": 0.0, "set_aside": set_aside(log, set(wanted), "samples"), "settings": h, "seed": seed}
    if not todo:
        return stats
    generator = generator or make_teacher(dc)
    bar = _Progress(len(todo), f"teacher {dc.teacher.model}", sum(r.get("cost", 0.0) for r in log.values()), progress)
    t0 = time.perf_counter()
    try:
        if dc.teacher.backend == "openai":
            run_sync(_generate_openai(todo, dc, generator, log, bar, stats))
            _check_teacher(dc, stats)
        else:
            _generate_batches(problems, dc, generator, log, bar, stats)
    finally:
        bar.close()
        stats["seconds"] = round(time.perf_counter() - t0, 2)
    if stats["errors"]:
        print(f"[distill] {stats['errors']} teacher requests failed (first: {stats['first_error']}); "
              "they are not logged, so a rerun retries them")
    note_open_work(stage_folder, "teacher", f"{stats['errors']} teacher requests failed" if stats["errors"] else None)
    if not any(r.get("settings") == h for r in log.values()):
        raise InvalidRateError(f"01_distill: no teacher sample at all ({stats['errors']} requests to the "
                               f"{describe_endpoint(dc.teacher)} failed; first: {stats['first_error']}): fix the "
                               "teacher endpoint and rerun 01_distill")
    return stats


def _check_teacher(dc, stats) -> None:
    """Stop when the teacher's failed share passes distill.max_invalid_rate."""
    # the share among this stage's samples (logged before + tried now), so a rerun of a few failures is not 100%
    check_invalid_rate("01_distill (teacher)", dc.teacher, stats["errors"], stats["attempted"] + stats["skipped"], dc.max_invalid_rate,
                       "distill.max_invalid_rate", stats["first_error"])


def _keep(problem, index, completion, dc, log, stats) -> Optional[dict]:
    stats["attempted"] += 1
    if completion.finish_reason == "error":
        stats["errors"] += 1
        stats["first_error"] = stats["first_error"] or completion.error
        return None
    rec = sample_record(problem, index, completion, dc, stats["seed"])
    log.append(rec)
    stats["generated"] += 1
    return rec


def _generate_batches(problems, dc, generator, log, bar, stats) -> None:
    from transformers import set_seed  # heavy: loads torch, only when the teacher runs in-process
    one = dataclasses.replace(dc.sampling, n=1)
    size = max(1, dc.teacher.batch_size)
    for index in range(dc.sampling.n):
        for start in range(0, len(problems), size):
            batch = problems[start:start + size]  # cut from the whole list: the same batches on every resume
            missing = [p for p in batch if sample_key(p.id, index, stats["settings"]) not in log]
            if not missing:
                continue
            set_seed(sample_seed([p.id for p in batch], index, stats["settings"]))
            groups = generator.generate([teacher_messages(p.problem, dc.system_prompt) for p in batch], one,
                                        thinking=dc.thinking)
            todo = {p.id for p in missing}
            recs = [_keep(p, index, g[0], dc, log, stats) for p, g in zip(batch, groups) if p.id in todo]
            bar.update([r for r in recs if r])
            _check_teacher(dc, stats)


async def _generate_openai(todo, dc, generator, log, bar, stats) -> None:
    one = dataclasses.replace(dc.sampling, n=1)
    sem = asyncio.Semaphore(max(1, dc.teacher.max_concurrency))

    async def request(problem, index):
        # a per-request seed the server samples with (chat API; the Responses API has no seed field)
        extra = {"seed": sample_seed([problem.id], index, stats["settings"])} if dc.teacher.api == "chat" else None
        async with sem:
            groups = await generator.agenerate([teacher_messages(problem.problem, dc.system_prompt)], one,
                                               thinking=dc.thinking, extra=extra)
        return problem, index, groups[0][0]

    for next_done in asyncio.as_completed([request(p, i) for p, i in todo]):
        problem, index, completion = await next_done
        rec = _keep(problem, index, completion, dc, log, stats)
        bar.update([rec] if rec else [])


def read_samples(stage_folder: str | Path, problems: list | None = None, n: int | None = None, dc=None,
                 seed: int = 0) -> list[dict]:
    """Logged teacher samples of the current teacher settings (dc's with `seed`, else those of the last
    generate_samples in this folder), optionally only those of these problems and sample indices < n.
    Notebook 01, "Teacher generation"."""
    recs = JsonlLog(Path(stage_folder) / SAMPLES_FILE, key="key").values()
    marker = Path(stage_folder) / SAMPLES_SETTINGS
    h = teacher_hash(dc, seed) if dc is not None else (read_json(marker)["settings"] if marker.exists() else None)
    if h is not None:
        recs = [r for r in recs if r.get("settings") == h]
    if problems is None:
        return recs
    wanted = {p.id for p in problems}
    return [r for r in recs if r["problem_id"] in wanted and (n is None or r["sample_index"] < n)]


# ---------------------------------------------------------------- grading
def stage_grader(dc, stage_folder: str | Path, teacher=None):
    """The grader of this stage: the judge for `distill.judge`, reusing the teacher's loaded model when it is the same
    model. Notebook 01, "Grading"."""
    generator = None
    if teacher is not None and dc.judge.endpoint.backend == "vllm" and _same_engine(dc.judge.endpoint, dc.teacher):
        generator = teacher  # one vLLM engine per GPU: the judge samples from the teacher's engine
    elif teacher is not None and _same_model(dc.judge.endpoint, dc.teacher):
        generator = make_generator(dc.judge.endpoint, teacher.model, teacher.tokenizer)
    cache = Path(stage_folder) / "judge_cache" if dc.judge.cache else None
    return Grader(dc.judge, cache_dir=cache, generator=generator)


def completion_of(rec: dict):
    """Rebuild the generation.Completion of a logged sample (what the grader takes)."""
    return Completion(rec["text"], rec["reasoning"], rec["proof"], rec["think_closed"], rec["finish_reason"],
                      rec["prompt_tokens"], rec["completion_tokens"], rec["cost"])


def grade_samples(problems: list, samples: list[dict], grader, stage_folder: str | Path,
                  chunk: int | None = None, progress: bool = True, max_invalid_rate: float = 1.0) -> dict:
    """Grade every logged sample not yet graded into `grades.jsonl` (chunk by chunk, resumable). Failed judge calls
    are not logged (a rerun retries them); past `max_invalid_rate` failed or invalid grades (pass
    distill.max_invalid_rate) the stage stops, and with no grade at all it is an error naming the judge endpoint.
    Notebook 01, "Grading"."""
    log = JsonlLog(Path(stage_folder) / GRADES_FILE, key="key")
    by_id = {p.id: p for p in problems}
    todo = [s for s in samples if grade_key(s["key"], grader.judge) not in log]
    stats = {"skipped": len(samples) - len(todo), "graded": 0, "judge_errors": 0, "invalid": 0, "first_error": None, "seconds": 0.0,
             "set_aside": set_aside(log, {grade_key(s["key"], grader.judge) for s in samples}, "grades")}
    if not todo:
        return stats
    chunk = chunk or chunk_size(grader.judge.endpoint)
    bar = _Progress(len(todo), "judge", sum(r.get("cost", 0.0) for r in log.values()), progress)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            grades = grade_completions(grader, [by_id[s["problem_id"]] for s in part], [completion_of(s) for s in part])
            recs = [{"key": grade_key(s["key"], grader.judge), "sample_key": s["key"], "problem_id": s["problem_id"], "sample_index": s["sample_index"], **g.to_dict()}
                    for s, g in zip(part, grades)]
            for r in recs:
                if r["reason"] == "judge_error":  # the judge call failed: not logged, so a rerun retries it
                    stats["judge_errors"] += 1
                    stats["first_error"] = stats["first_error"] or r.get("detail")
                    continue
                log.append(r)
                stats["graded"] += 1
                stats["invalid"] += not r["valid"]
            bar.update(recs)
            check_invalid_rate("01_distill (judge)", grader.judge.endpoint, stats["judge_errors"] + stats["invalid"],
                               stats["graded"] + stats["judge_errors"] + stats["skipped"], max_invalid_rate, "distill.max_invalid_rate",
                               stats["first_error"])
    finally:
        bar.close()
        stats["seconds"] = round(time.perf_counter() - t0, 2)
    if stats["judge_errors"]:
        print(f"[distill] {stats['judge_errors']} judge calls failed (first: {stats['first_error']}); "
              "they are not logged, so a rerun retries them")
    note_open_work(stage_folder, "judge", f"{stats['judge_errors']} judge calls failed" if stats["judge_errors"] else None)
    if samples and not any(grade_key(s["key"], grader.judge) in log for s in samples):
        raise InvalidRateError(f"01_distill: 0 of {len(samples)} samples graded ({stats['judge_errors']} calls to the "
                               f"judge, {describe_endpoint(grader.judge.endpoint)}, failed; first: "
                               f"{stats['first_error']}): fix the judge endpoint and rerun 01_distill")
    return stats


def read_grades(stage_folder: str | Path) -> list[dict]:
    """Logged grades (one per sample and judge settings; select_samples picks the current judge's).
    Notebook 01, "Grading"."""
    return JsonlLog(Path(stage_folder) / GRADES_FILE, key="key").values()


# ---------------------------------------------------------------- selection
def sft_token_counts(samples: list[dict], problems: list, tokenizer) -> dict[str, int]:
    """Tokens of each sample's SFT example (chat template of `sft_messages`) under the student's tokenizer."""
    by_id = {p.id: p for p in problems}
    out = {}
    for s in samples:
        msgs = sft_messages(by_id[s["problem_id"]].problem, s["reasoning"], s["proof"])
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        out[s["key"]] = len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return out


def select_samples(samples: list[dict], grades: list[dict], dc, problems: list,
                   token_counts: dict[str, int] | None = None) -> list[dict]:
    """Apply the selection rules; return one row per sample with `status` "kept" or why it was dropped.

    Order: truncated (when `drop_truncated`), no proof ("no_proof": nothing after </think>, or
    unclosed thinking when truncated samples are not dropped; graded 0), invalid grade ("invalid:<reason>"; with
    `judge.invalid: zero` an invalid grade counts as 0 points instead), longer than
    `max_sft_tokens` ("too_long"; tokens from `token_counts`, else the teacher's prompt +
    completion tokens), below `min_grade`, and with `per_problem: best` every sample but the
    best of its problem ("not_best"; ties go to the lower sample index). Ungraded samples are
    "ungraded".
    """
    by_id = {p.id: p for p in problems}
    grade_of = {g["key"]: g for g in grades}
    rows = []
    for s in sorted(samples, key=lambda r: (r["problem_id"], r["sample_index"])):
        p = by_id[s["problem_id"]]
        g = grade_of.get(grade_key(s["key"], dc.judge))  # a grade by other judge settings is not this one
        tokens = (token_counts or {}).get(s["key"], s["prompt_tokens"] + s["completion_tokens"])
        points = None if g is None else (g["points"] if g["valid"] else (0.0 if dc.judge.invalid == "zero" else None))
        if g is None:
            status = "ungraded"
        elif dc.drop_truncated and s["truncated"]:
            status = "truncated"
        elif g.get("no_proof"):  # nothing to train on (graded 0 without a judge call): never kept
            status = "no_proof"
        elif points is None:
            status = f"invalid:{g.get('reason') or 'unknown'}"
        elif dc.max_sft_tokens is not None and tokens > dc.max_sft_tokens:
            status = "too_long"
        elif points < dc.min_grade:
            status = "below_min_grade"
        else:
            status = "kept"
        rows.append({"key": s["key"], "problem_id": s["problem_id"], "sample_index": s["sample_index"],
                     "status": status, "points": points, "valid": None if g is None else g["valid"],
                     "invalid_reason": None if g is None or g["valid"] else g.get("reason"),
                     "judge_text": "" if g is None else g.get("judge_text", ""), "truncated": s["truncated"],
                     "finish_reason": s["finish_reason"], "completion_tokens": s["completion_tokens"],
                     "sft_tokens": tokens, "cost": s["cost"], "judge_cost": 0.0 if g is None else g.get("cost", 0.0),
                     "problem": p.problem, "reasoning": s["reasoning"], "proof": s["proof"],
                     "source": p.source or "unknown", "category": p.category or "",
                     "competition": str(p.extra.get("competition") or p.source or "")})
    if dc.per_problem == "best":
        best: dict[str, dict] = {}
        for r in rows:
            if r["status"] == "kept" and (r["problem_id"] not in best or r["points"] > best[r["problem_id"]]["points"]):
                best[r["problem_id"]] = r
        for r in rows:
            if r["status"] == "kept" and best[r["problem_id"]] is not r:
                r["status"] = "not_best"
    return rows


def funnel(n_loaded: int, removed: dict[str, int], rows: list[dict], n_expected: int) -> list[dict]:
    """The stage's funnel: problems -> samples -> graded -> kept, with the count dropped at each step and why."""
    status = Counter(r["status"] for r in rows)
    out = [{"step": "problems loaded", "count": n_loaded, "dropped": 0, "why": ""}]
    left = n_loaded
    for why, k in removed.items():
        left -= k
        out.append({"step": f"problems after {why}", "count": left, "dropped": k, "why": why if k else ""})
    out.append({"step": "samples generated", "count": len(rows), "dropped": n_expected - len(rows),
                "why": "missing (failed requests; rerun to retry)" if n_expected > len(rows) else ""})
    graded = len(rows) - status["ungraded"]
    out.append({"step": "samples graded", "count": graded, "dropped": status["ungraded"],
                "why": "ungraded (judge call failed; rerun to retry)" if status["ungraded"] else ""})
    left = graded
    for label in ["truncated", "no_proof", *sorted(k for k in status if k.startswith("invalid:")), "too_long", "below_min_grade", "not_best"]:
        if status[label]:
            left -= status[label]
            out.append({"step": f"after dropping {label}", "count": left, "dropped": status[label], "why": label})
    out.append({"step": "kept", "count": status["kept"], "dropped": 0, "why": ""})
    return out


def select(cfg, stage_folder: str | Path, prep: dict, samples: list[dict], grades: list[dict]) -> tuple[list[dict], list[dict]]:
    """The selection step: every sample labelled (SFT tokens counted with the student's tokenizer when
    `max_sft_tokens` is set) and the funnel written to funnel.json; returns (rows, funnel rows).
    Notebook 01, "Selection and the funnel"."""
    dc, problems = cfg.distill, prep["problems"]
    tokenizer = student_tokenizer(cfg) if dc.max_sft_tokens else None
    counts = sft_token_counts(samples, problems, tokenizer) if tokenizer else None
    rows = select_samples(samples, grades, dc, problems, counts)
    steps = funnel(prep["loaded"], prep["removed"], rows, len(problems) * dc.sampling.n)
    write_json(Path(stage_folder) / FUNNEL_FILE, steps)
    return rows, steps


# ---------------------------------------------------------------- dataset
def build_dataset(rows: list[dict]):
    """A datasets.Dataset with the FineProofs-SFT columns from the kept selection rows.
    Notebook 01, "The SFT dataset"."""
    from datasets import Dataset  # heavy: loads pyarrow, only when the dataset is built
    kept = [r for r in rows if r["status"] == "kept"]
    data = {c: [] for c in SFT_COLUMNS}
    for r in kept:
        data["problem"].append(r["problem"])
        data["reasoning_content"].append(r["reasoning"])
        data["proof"].append(r["proof"])
        data["category"].append(r["category"])
        data["competition"].append(r["competition"])
        data["grade"].append(float(r["points"]))
        data["source"].append(r["source"])
        data["messages"].append(sft_messages(r["problem"], r["reasoning"], r["proof"]))
    return Dataset.from_dict(data, features=sft_features())


def save_dataset(ds, stage_folder: str | Path) -> Path:
    """Save the dataset at <stage>/dataset atomically (a half-written folder never looks ready).
    Notebook 01, "The SFT dataset"."""
    out = Path(stage_folder) / "dataset"
    tmp = out.with_name("dataset.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    replace_folder(tmp, out)
    return out


# ---------------------------------------------------------------- the numbers the notebook shows
def token_cost_table(samples: list[dict], grades: list[dict]) -> list[dict]:
    """Tokens and cost of the teacher and the judge. Notebook 01, "Grades, lengths, tokens and cost"."""
    return [{"role": "teacher", "calls": len(samples), "prompt_tokens": sum(s["prompt_tokens"] for s in samples),
             "completion_tokens": sum(s["completion_tokens"] for s in samples), "cost_usd": round(sum(s["cost"] for s in samples), 6)},
            {"role": "judge", "calls": sum(1 for g in grades if not g.get("cached")),
             "prompt_tokens": sum(g.get("prompt_tokens", 0) for g in grades),
             "completion_tokens": sum(g.get("completion_tokens", 0) for g in grades),
             "cost_usd": round(sum(g.get("cost", 0.0) for g in grades), 6)}]


# ---------------------------------------------------------------- the whole stage
def student_tokenizer(cfg):
    """The base model's tokenizer (to count SFT tokens), or None with a note when it cannot load."""
    from transformers import AutoTokenizer  # heavy: loads only when SFT tokens are counted
    try:
        return AutoTokenizer.from_pretrained(resolve_model(cfg.base_model))
    except (OSError, ValueError) as e:
        print(f"[distill] cannot load the tokenizer of {cfg.base_model!r} ({e}); counting teacher tokens instead")
        return None


def stage_metrics(rows: list[dict], samples: list[dict], grades: list[dict], n_problems: int,
                  removed: dict[str, int], seconds: float, dataset_dir: str | Path) -> dict:
    """The metrics.json of the stage. Notebook 01, "Metrics, and what they say"."""
    status = Counter(r["status"] for r in rows)
    kept = [r for r in rows if r["status"] == "kept"]
    valid = [r["points"] for r in rows if r["valid"]]
    costs = token_cost_table(samples, grades)
    return {"problems": n_problems, "problems_used": n_problems - sum(removed.values()),
            "decontaminated": removed.get("decontamination", 0), "screened_out": removed.get("screening", 0),
            "samples": len(rows), "graded": len(rows) - status["ungraded"],
            "invalid": sum(v for k, v in status.items() if k.startswith("invalid:")),
            "invalid_reasons": dict(Counter(r["invalid_reason"] for r in rows if r["valid"] is False)),
            "truncated": sum(r["truncated"] for r in rows), "no_proof": status["no_proof"], "too_long": status["too_long"],
            "below_min_grade": status["below_min_grade"], "not_best": status["not_best"],
            "kept": len(kept), "kept_problems": len({r["problem_id"] for r in kept}),
            "mean_grade": round(sum(valid) / len(valid), 4) if valid else None,
            "mean_grade_kept": round(sum(r["points"] for r in kept) / len(kept), 4) if kept else None,
            "tokens": sum(c["prompt_tokens"] + c["completion_tokens"] for c in costs),
            "teacher_completion_tokens": costs[0]["completion_tokens"],
            "cost": round(costs[0]["cost_usd"] + costs[1]["cost_usd"], 6),
            "seconds": round(seconds, 1), "dataset_dir": str(dataset_dir)}


def prepare_problems(cfg, stage_folder: str | Path, teacher=None) -> dict:
    """Load, decontaminate, optionally screen and write rubrics, keep what the judge can grade.

    Returns {"problems", "loaded", "removed" (why -> count), "contaminated" (rows), "notes",
    "screening" (rows or [])}; the decontamination report is written to decontamination.json.
    Notebook 01, "Problems".
    """
    dc = cfg.distill
    problems = load_stage_problems(dc)
    out = {"loaded": len(problems), "removed": {}, "screening": []}
    problems, out["contaminated"], out["notes"] = decontaminate(problems, dc)
    out["removed"]["decontamination"] = len(out["contaminated"])
    write_json(Path(stage_folder) / "decontamination.json", {"removed": out["contaminated"], "notes": out["notes"]})
    if dc.screen or dc.write_rubrics:
        helper = helper_generator(dc, teacher)
        if dc.screen:
            before = len(problems)
            problems, out["screening"] = screen_problems(problems, dc, helper, stage_folder)
            out["removed"]["screening"] = before - len(problems)
        if dc.write_rubrics:
            problems, written = write_rubrics(problems, dc, helper, stage_folder)
            out["notes"].append(f"wrote {written} rubrics")
    problems, ungradable = gradable(problems, dc.judge)
    if ungradable:
        out["removed"][f"no {dc.judge.prompt} fields"] = ungradable  # the judge prompt could not be filled
    out["problems"] = problems
    return out


def run_stage(cfg, run_dir: str | Path, params_file: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """The whole stage, its steps in notebook 01's order: prepare problems, generate, grade, select, build and save
    the dataset, metrics (written to metrics.json); returns the metrics.

    The same entry as every stage's (`run_stage(cfg, run_dir, params_file, overrides)`); distillation trains nothing,
    so `params_file` and `overrides` (what a launched training stage passes on) are not used.
    """
    t_start = time.perf_counter()
    dc, folder = cfg.distill, stage_dir(run_dir, DISTILL)
    teacher = make_teacher(dc)
    prep = prepare_problems(cfg, folder, teacher)
    problems = prep["problems"]
    print("\n".join(prep["notes"]))
    generate_samples(problems, dc, folder, teacher, seed=cfg.seed)
    samples = read_samples(folder, problems, dc.sampling.n, dc, seed=cfg.seed)
    grader = stage_grader(dc, folder, teacher)
    grade_samples(problems, samples, grader, folder, max_invalid_rate=dc.max_invalid_rate)
    grades = read_grades(folder)
    rows, _ = select(cfg, folder, prep, samples, grades)
    dataset = build_dataset(rows)
    dataset_dir = save_dataset(dataset, folder)
    metrics = stage_metrics(rows, samples, grades, prep["loaded"], prep["removed"],
                            time.perf_counter() - t_start, dataset_dir)
    write_metrics(folder, metrics)
    return metrics
