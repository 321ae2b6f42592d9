"""Problem records and loaders: the shipped set, local files, hub datasets, the IMO benchmarks.

Used by every stage notebook. A `Problem` is the one record all stages share; loaders map a
source's columns onto it and name the file, row and column of anything wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

FIELDS = ["id", "problem", "reference_solution", "rubric", "answer", "source", "category"]


@dataclass
class Problem:
    """One problem as every stage sees it."""
    id: str
    problem: str
    reference_solution: Optional[str] = None
    rubric: Optional[str] = None  # 0-7 scheme: checkpoints / zero-credit / deductions, or guidelines
    answer: Optional[str] = None  # short final answer, when there is one
    source: str = ""
    category: str = ""
    extra: dict = field(default_factory=dict)  # other columns (split, difficulty, reward_mean, ...)

    def to_dict(self) -> dict:
        return asdict(self)


class DataError(ValueError):
    """A data file or row is wrong; the message names file, row and column."""


def shipped_path(name: str = "problems.jsonl") -> Path:
    """Path of a data file that ships inside the package."""
    return Path(str(resources.files("qedlib") / "data" / name))


def imobench_dir() -> Path:
    """Folder of the IMO-Bench CSVs (QED_IMOBENCH, default ../shared/data/imobench)."""
    env = os.environ.get("QED_IMOBENCH")
    if env:
        return Path(env)
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent):
        cand = base / ".." / "shared" / "data" / "imobench"
        if cand.exists():
            return cand.resolve()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imobench"


# Column mappings of known sources: our field -> their column.
IMO_PROOFBENCH = {"id": "Problem ID", "problem": "Problem", "reference_solution": "Solution",
                  "rubric": "Grading guidelines", "answer": "Short Answer", "category": "Category",
                  "source": "Source"}
IMO_ANSWERBENCH = {"id": "Problem ID", "problem": "Problem", "answer": "Short Answer",
                   "category": "Category", "source": "Source"}
FINEPROOFS_RL = {"problem": "problem", "rubric": "rubrics", "source": "source", "category": "category"}


def _clean(v):
    if v is None:
        return None
    try:
        import math
        if isinstance(v, float) and math.isnan(v):
            return None
    except TypeError:
        pass
    return v


def records_to_problems(rows: list[dict], columns: dict | None, where: str) -> list[Problem]:
    """Map raw rows onto Problems; every row needs a non-empty problem text."""
    columns = columns or {}
    out, seen = [], set()
    for i, row in enumerate(rows):
        get = {f: _clean(row.get(columns.get(f, f))) for f in FIELDS}
        text = get["problem"]
        if not isinstance(text, str) or not text.strip():
            col = columns.get("problem", "problem")
            raise DataError(f"{where}: row {i}: column {col!r} is missing or empty (columns present: "
                            f"{sorted(row)}); map it with `columns: {{problem: <column>}}`")
        pid = str(get["id"]) if get["id"] is not None else f"row-{i:05d}"
        if pid in seen:
            raise DataError(f"{where}: row {i}: duplicate id {pid!r}")
        seen.add(pid)
        used = set(columns.get(f, f) for f in FIELDS)
        extra = {k: _clean(v) for k, v in row.items() if k not in used}
        out.append(Problem(
            id=pid, problem=text.strip(),
            reference_solution=get["reference_solution"], rubric=get["rubric"],
            answer=None if get["answer"] is None else str(get["answer"]),
            source=str(get["source"] or ""), category=str(get["category"] or ""), extra=extra))
    return out


def read_rows(path: str | Path) -> list[dict]:
    """Read rows from a .jsonl, .json, .csv or .parquet file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{i}: not valid JSON ({e})") from None
        return rows
    if suffix == ".json":
        return json.loads(p.read_text())
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(p).to_pylist()  # nested columns (messages, rubric lists) stay Python lists
    if suffix == ".csv":
        import pandas as pd
        return pd.read_csv(p).to_dict(orient="records")
    raise DataError(f"{p}: unsupported format {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def read_records(source: str | Path, hub_config: str | None = None, hub_split: str = "train") -> tuple[list[dict], str]:
    """Rows of a table wherever it lives: `hub:org/name` (Hugging Face hub), a `save_to_disk` folder,
    or a .jsonl/.json/.csv/.parquet file. Returns (rows, a description of where they came from)."""
    source = str(source)
    if source.startswith("hub:"):
        from datasets import load_dataset
        name = source[4:]
        ds = load_dataset(name, hub_config, split=hub_split)
        return ds.to_list(), f"hub dataset {name} ({hub_config or 'default'}/{hub_split})"
    p = Path(source).expanduser()
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk
        try:
            ds = load_from_disk(str(p))
        except FileNotFoundError as e:
            raise DataError(f"{p}: a folder, but not one written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, DatasetDict):
            ds = ds[hub_split if hub_split in ds else next(iter(ds))]
        return ds.to_list(), str(p)
    if not p.exists():
        raise DataError(f"{p} does not exist (expected hub:org/name, a save_to_disk folder, or a "
                        ".jsonl/.json/.csv/.parquet file)")
    return read_rows(p), str(p)


def load_problems(path: str = "shipped", split: str | None = None, columns: dict | None = None,
                  limit: int | None = None, hub_split: str = "train",
                  hub_config: str | None = None) -> list[Problem]:
    """Load problems from "shipped", "imo-proofbench", "imo-answerbench", a file, or hub:org/name."""
    if path == "shipped":
        where, rows = "shipped problems.jsonl", read_rows(shipped_path())
    elif path in ("imo-proofbench", "imo-answerbench"):
        name = "proofbench_v2.csv" if path == "imo-proofbench" else "answerbench_v2.csv"
        f = imobench_dir() / name
        if not f.exists():
            raise DataError(f"{path}: {f} not found; set QED_IMOBENCH to the folder holding {name}")
        where, rows = str(f), read_rows(f)
        columns = columns or (IMO_PROOFBENCH if path == "imo-proofbench" else IMO_ANSWERBENCH)
    else:
        rows, where = read_records(path, hub_config, hub_split)
    probs = records_to_problems(rows, columns, where)
    if path == "imo-proofbench":
        for p in probs:
            p.extra["split"] = "basic" if "Basic" in p.id else "advanced"
    if split is not None:
        probs = [p for p in probs if p.extra.get("split") == split]
        if not probs:
            raise DataError(f"{where}: no problems with split == {split!r}")
    return probs[:limit] if limit else probs


def load_source(src) -> list[Problem]:
    """Load problems for a `config.ProblemSource`."""
    return load_problems(src.path, src.split, src.columns, src.limit, src.hub_split, src.hub_config)
