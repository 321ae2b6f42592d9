"""Decontamination: drop training problems whose text overlaps an evaluation benchmark.

Used by notebooks/01_distill.ipynb (and any stage that builds training data). Texts are
normalised (lower case, LaTeX markup and punctuation removed, whitespace collapsed) and cut into
word n-grams; a training problem is contaminated when the fraction of its n-grams found in ONE
benchmark problem reaches the threshold. Comparing against single benchmark items (not the
union of all of them) keeps stock phrases such as "prove that for every positive integer n"
from adding up across many unrelated problems.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from .problem_sets import DataError, load_problems, load_source, problem_source

_LATEX_CMD = re.compile(r"\\[a-zA-Z]+")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalise(text: str) -> list[str]:
    """Lower-cased word tokens with LaTeX commands, math delimiters and punctuation removed."""
    text = _LATEX_CMD.sub(" ", text.lower())
    return [w for w in _NON_WORD.split(text) if w]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of the normalised text (the whole text when it is shorter than n)."""
    words = normalise(text)
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class BenchmarkIndex:
    """An n-gram index over benchmark problems: gram -> ids of the problems that contain it."""
    n: int
    grams: dict  # tuple -> set of benchmark item ids
    texts: dict  # benchmark item id -> problem text
    names: list  # benchmark names indexed (for the report)

    def best_match(self, text: str) -> tuple[float, str | None]:
        """(overlap, benchmark id): the largest fraction of `text`'s n-grams found in one item."""
        mine = ngrams(text, self.n)
        if not mine:
            return 0.0, None
        hits: Counter = Counter()
        for g in mine:
            for item in self.grams.get(g, ()):
                hits[item] += 1
        if not hits:
            return 0.0, None
        item, count = hits.most_common(1)[0]
        return count / len(mine), item


def build_index(benchmarks: dict[str, list], n: int = 8) -> BenchmarkIndex:
    """Index benchmark problems; `benchmarks` maps a name to Problems or plain strings."""
    grams: dict = defaultdict(set)
    texts = {}
    for name, items in benchmarks.items():
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else item.problem
            item_id = f"{name}/{i if isinstance(item, str) else item.id}"
            texts[item_id] = text
            for g in ngrams(text, n):
                grams[g].add(item_id)
    return BenchmarkIndex(n, dict(grams), texts, list(benchmarks))


def overlap_rows(problems: list, index: BenchmarkIndex) -> list[dict]:
    """One row per problem: its best benchmark match and the overlap, largest overlap first."""
    rows = []
    for p in problems:
        text = p if isinstance(p, str) else p.problem
        overlap, item = index.best_match(text)
        rows.append({"id": text[:40] if isinstance(p, str) else p.id, "overlap": round(overlap, 3),
                     "benchmark_item": item, "problem": text[:160],
                     "benchmark_problem": index.texts[item][:160] if item else "",
                     "reason": f"{overlap:.0%} of its {index.n}-grams found in {item}" if item else ""})
    return sorted(rows, key=lambda r: -r["overlap"])


def find_contaminated(problems: list, index: BenchmarkIndex, threshold: float = 0.5) -> list[dict]:
    """The rows of `overlap_rows` whose overlap reaches `threshold` (what is removed and why)."""
    return [r for r in overlap_rows(problems, index) if r["benchmark_item"] and r["overlap"] >= threshold]


def load_benchmarks(specs: list, missing: str = "skip") -> tuple[dict[str, list], list[str]]:
    """Load the benchmark problem lists named in params; return ({name: problems}, notes).

    A spec is "imo-proofbench", "imo-answerbench", "proofbench", "shipped:eval" (a split of the
    shipped set), a file path, "hub:org/name", or a mapping like an eval.benchmarks entry (name,
    path and ProblemSource keys such as columns and duplicates; prompt/task are ignored here).
    A benchmark that cannot be loaded is an error with `missing: error` (a publishable run must
    not train on what it evaluates), or skipped with a note with `missing: skip`.
    """
    out, notes = {}, []
    for spec in specs:
        if isinstance(spec, dict):
            name = spec.get("name") or f"{spec.get('path')}:{spec.get('split')}"
            load = lambda: load_source(problem_source(spec, "distill.decontaminate", ("name", "prompt", "task")))
        elif isinstance(spec, str):
            name = spec
            path, _, split = spec.partition(":") if spec.startswith("shipped:") else (spec, "", "")
            load = lambda: load_problems(path, split or None)
        else:
            raise ValueError(f"distill.decontaminate: entry {spec!r} must be a string or a mapping "
                             "(e.g. imo-proofbench, shipped:eval, path/to/file.jsonl)")
        try:
            out[name] = load()
        except (DataError, FileNotFoundError, OSError) as e:
            if missing == "error":
                raise DataError(f"distill.decontaminate: benchmark {name!r} could not be loaded, so training "
                                f"data cannot be checked against it: {e}") from None
            notes.append(f"skipped benchmark {name!r}: {e}")
    return out, notes
