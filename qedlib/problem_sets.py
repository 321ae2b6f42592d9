"""Problem records and loaders: the shipped set, local files, hub datasets, the IMO benchmarks.

Used by every stage notebook. A `Problem` is the one record all stages share; loaders map a
source's columns onto it and name the file, row and column of anything wrong. CSV cells are read
as text (an id or answer `6` stays "6", never "6.0"). A row without problem text, or whose
problem / rubric / reference solution is not text, is an error, or with `on_bad_row: skip` is
skipped and listed in the returned `Problems.skipped` (row, reason) for the stage's metrics.

Built-in benchmarks: `imo-proofbench` and `imo-answerbench` are the official IMO-Bench CSVs
(google-deepmind/superhuman, `imobench/`, pinned commit, sha256-checked). They are read from
`QED_IMOBENCH` (a folder) when set, else from a development copy at `../shared/data/imobench`,
else from the download cache (`QED_CACHE`/imobench/<commit>/), downloading them there once when
missing. `proofbench` is the hub dataset wenjiema02/ProofBench, one problem per problem_id.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from .models import cache_dir
from .config import ConfigError, ProblemSource, build

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


# The official IMO-Bench release: google-deepmind/superhuman, folder imobench/, at this commit.
# The sha256 values are of the files at that commit (checked against a clone of the repository:
# `git show a02069e:imobench/<file> | sha256sum`); any other bytes are refused.
IMOBENCH_REPO = "google-deepmind/superhuman"
IMOBENCH_REVISION = "a02069ef66dbae4c5b0713ba0dc144a35375558f"
IMOBENCH_FILES = {
    "proofbench_v2.csv": "aa8b813dbd4068137e3d165e5da228f6e0e1cc85a91c37883e1791b954e43af0",
    "answerbench_v2.csv": "275877a9d988d85278fad3a5f8a41d7f83393a60bf259531ec0a5161e6b21cf9",
}
IMOBENCH_FILE_OF = {"imo-proofbench": "proofbench_v2.csv", "imo-answerbench": "answerbench_v2.csv"}


def imobench_dir() -> Path:
    """Local folder of the IMO-Bench CSVs: QED_IMOBENCH, else a ../shared/data/imobench development copy."""
    env = os.environ.get("QED_IMOBENCH")
    if env:
        return Path(env)
    return local_imobench_dir() or Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imobench"


def local_imobench_dir() -> Path | None:
    """A ../shared/data/imobench folder above the working directory or the package (development setups), or None."""
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent):
        cand = base / ".." / "shared" / "data" / "imobench"
        if cand.exists():
            return cand.resolve()
    return None


def imobench_url(name: str) -> str:
    """Where the official file is downloaded from (QED_IMOBENCH_URL replaces the base, e.g. a mirror)."""
    base = os.environ.get("QED_IMOBENCH_URL") or \
        f"https://raw.githubusercontent.com/{IMOBENCH_REPO}/{IMOBENCH_REVISION}/imobench"
    return f"{base.rstrip('/')}/{name}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def imobench_file(name: str, timeout_s: float = 60.0) -> Path:
    """Path of one official IMO-Bench CSV: the local override or copy, else the cache (downloaded once, sha256-checked)."""
    if name not in IMOBENCH_FILES:
        raise DataError(f"unknown IMO-Bench file {name!r}; known: {sorted(IMOBENCH_FILES)}")
    if os.environ.get("QED_IMOBENCH"):  # an explicit folder wins, and is trusted as given
        f = Path(os.environ["QED_IMOBENCH"]) / name
        if not f.exists():
            raise DataError(f"QED_IMOBENCH={os.environ['QED_IMOBENCH']} has no {name}; put the file there or unset "
                            f"QED_IMOBENCH to download the official copy")
        return f
    local = local_imobench_dir()
    if local is not None and (local / name).exists():
        return local / name
    f = cache_dir() / "imobench" / IMOBENCH_REVISION / name
    if f.exists() and _sha256(f) == IMOBENCH_FILES[name]:
        return f
    url = imobench_url(name)
    tmp = f.with_suffix(".part")
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            tmp.write_bytes(r.read())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"IMO-Bench file {name} is not available here and could not be downloaded from {url} ({e}). "
            f"On a machine with network it is fetched once into {f.parent}; offline, copy it there yourself "
            f"(from https://github.com/{IMOBENCH_REPO}/tree/{IMOBENCH_REVISION}/imobench, sha256 "
            f"{IMOBENCH_FILES[name]}) or set QED_IMOBENCH to a folder holding {name}") from None
    got = _sha256(tmp)
    if got != IMOBENCH_FILES[name]:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: sha256 {got} is not the pinned {IMOBENCH_FILES[name]} of {name} at commit "
                        f"{IMOBENCH_REVISION}; refusing it (a changed or truncated file). Check the URL "
                        f"(QED_IMOBENCH_URL) or set QED_IMOBENCH to a folder with the official file")
    tmp.replace(f)
    print(f"[data] downloaded {name} ({f.stat().st_size} bytes, sha256 verified) to {f}")
    return f


# Column mappings of known sources: our field -> their column.
IMO_PROOFBENCH = {"id": "Problem ID", "problem": "Problem", "reference_solution": "Solution",
                  "rubric": "Grading guidelines", "answer": "Short Answer", "category": "Category",
                  "source": "Source"}
IMO_ANSWERBENCH = {"id": "Problem ID", "problem": "Problem", "answer": "Short Answer",
                   "category": "Category", "source": "Source"}
PROOFBENCH_HUB = "hub:wenjiema02/ProofBench"  # 435 rows: 145 problems x 3 graded model solutions
PROOFBENCH = {"id": "problem_id", "problem": "problem", "reference_solution": "reference_solution",
              "rubric": "marking_scheme", "source": "metadata.contest"}
TEXT_FIELDS = ("problem", "rubric", "reference_solution")  # must be text when present


class Problems(list):
    """A list of Problems that also says which rows were skipped (`skipped`: [{row, reason}])."""
    skipped: list

    def __init__(self, items=(), skipped=None):
        super().__init__(items)
        self.skipped = list(skipped or [])


def skipped_metrics(problems) -> dict:
    """{"skipped_rows": n, "skipped_reasons": {reason: n}} of a loaded problem list (for a stage's metrics.json)."""
    skipped = getattr(problems, "skipped", [])
    return {"skipped_rows": len(skipped), "skipped_reasons": dict(Counter(s["reason"] for s in skipped))}


def _column(row: dict, col: str):
    """A row's value for a column name; "a.b" reads key b of a nested mapping column a."""
    if col in row or "." not in col:
        return row.get(col)
    head, _, rest = col.partition(".")
    inner = row.get(head)
    return _column(inner, rest) if isinstance(inner, dict) else None


def _clean(v):
    if v is None:
        return None
    try:
        if isinstance(v, float) and math.isnan(v):
            return None
    except TypeError:
        pass
    return v


def _not_an_object(row) -> tuple[str, str]:
    """Why a row that is not a mapping (a JSON array, a number, a string) is unusable."""
    kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(row), "null")
    return ("not a JSON object", f"the row is a JSON {kind} ({json.dumps(row, default=str)[:60]}), not an object of "
                                 f"columns")


def _row_problem(row: dict, columns: dict) -> tuple[dict | None, tuple[str, str] | None]:
    """The row's fields, or (None, (short reason, full explanation)) when it is unusable."""
    get = {f: _clean(_column(row, columns.get(f, f))) for f in FIELDS}
    col = lambda f: columns.get(f, f)
    text = get["problem"]
    if text is None or (isinstance(text, str) and not text.strip()):
        return None, (f"no problem text in column {col('problem')!r}",
                      f"column {col('problem')!r} is missing or empty (columns present: {sorted(row)}); "
                      f"map it with `columns: {{problem: <column>}}`")
    for f in TEXT_FIELDS:
        if get[f] is not None and not isinstance(get[f], str):
            return None, (f"column {col(f)!r} is not text",
                          f"column {col(f)!r} ({f}) holds {type(get[f]).__name__} {str(get[f])[:60]!r}, not text; "
                          f"map a text column or convert it")
    ans = get["answer"]
    if ans is not None and (isinstance(ans, bool) or not isinstance(ans, (str, int, float))):
        return None, (f"column {col('answer')!r} is not a value",
                      f"column {col('answer')!r} (answer) holds {type(ans).__name__} {str(ans)[:60]!r}, not text or a number")
    return get, None


def records_to_problems(rows: list[dict], columns: dict | None, where: str, on_bad_row: str = "error",
                        duplicates: str = "error") -> Problems:
    """Map raw rows onto Problems; a bad row (no problem text, non-text problem/rubric) is an error or skipped."""
    columns = columns or {}
    out, seen, skipped = [], set(), []
    used = set(columns.get(f, f).partition(".")[0] for f in FIELDS)
    lines = getattr(rows, "lines", None)
    for i, row in enumerate(rows):
        get, why = _row_problem(row, columns) if isinstance(row, dict) else (None, _not_an_object(row))
        pid = None if get is None else (str(get["id"]) if get["id"] is not None else f"row-{i:05d}")
        if why is None and pid in seen:
            if duplicates == "first":
                continue
            why = ("duplicate id", f"duplicate id {pid!r}; set duplicates: first to keep the first row of each id")
        if why is not None:
            at = f"{where}:{lines[i]}" if lines else f"{where}: row {i}"  # a JSONL file: its line, as an editor shows it
            if on_bad_row != "skip":
                raise DataError(f"{at}: {why[1]} (or set on_bad_row: skip to skip such rows)")
            skipped.append({"row": i, "reason": why[0], **({"line": lines[i]} if lines else {})})
            continue
        seen.add(pid)
        extra = {k: _clean(v) for k, v in row.items() if k not in used}
        out.append(Problem(
            id=pid, problem=get["problem"].strip(),
            reference_solution=get["reference_solution"], rubric=get["rubric"],
            answer=None if get["answer"] is None else str(get["answer"]),
            source=str(get["source"] or ""), category=str(get["category"] or ""), extra=extra))
    if skipped:
        at = f"; lines {', '.join(str(s['line']) for s in skipped[:10])}" if lines else ""
        print(f"[data] {where}: skipped {len(skipped)} bad row(s): "
              + "; ".join(f"{r} x{n}" for r, n in Counter(s["reason"] for s in skipped).most_common(3)) + at)
    return Problems(out, skipped)


class Rows(list):
    """Rows read from a file, with the file line each came from where lines mean something (`lines`, JSONL)."""
    lines: Optional[list]

    def __init__(self, items=(), lines=None):
        super().__init__(items)
        self.lines = lines


def read_rows(path: str | Path) -> list[dict]:
    """Read rows from a .jsonl, .json, .csv or .parquet file; an empty file is an error naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(p)
    elif suffix == ".json":
        rows = _json_rows(p)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy: pyarrow loads only for parquet
        rows = pq.read_table(p).to_pylist()  # nested columns (messages, rubric lists) stay Python lists
    elif suffix == ".csv":
        rows = _csv_rows(p)
    else:
        raise DataError(f"{p}: unsupported format {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    if not rows:
        raise DataError(f"{p}: the file holds no rows (it is empty{', or a header only' if suffix == '.csv' else ''}); "
                        f"point the params at a file with data")
    return rows


def _jsonl_rows(p: Path) -> Rows:
    """A JSONL file's values with their line numbers; a line that is not JSON is an error naming file:line."""
    rows, lines = [], []
    for i, line in enumerate(p.read_text().split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e})") from None
            lines.append(i)
    return Rows(rows, lines)


def _json_rows(p: Path) -> list:
    """A .json file holding a list of rows."""
    try:
        rows = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e}); a .json data file holds one list of row objects") from None
    if not isinstance(rows, list):
        raise DataError(f"{p}: holds a JSON {type(rows).__name__}, not a list of row objects")
    return rows


def _csv_rows(p: Path) -> list:
    """A CSV file's rows, every cell as text."""
    import pandas as pd  # heavy: pandas loads only for tables
    try:
        # every cell as text: ids and answers keep their spelling ("6", "007"); an empty cell is None
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as e:
        raise DataError(f"{p}: not a readable CSV ({' '.join(str(e).split())})") from None
    return [{k: (v if v != "" else None) for k, v in r.items()} for r in df.to_dict(orient="records")]


def read_records(source: str | Path, hub_config: str | None = None, hub_split: str = "train",
                 hub_revision: str | None = None) -> tuple[list[dict], str]:
    """Rows of a table wherever it lives: `hub:org/name` (Hugging Face hub), a `save_to_disk` folder,
    or a .jsonl/.json/.csv/.parquet file. Returns (rows, a description of where they came from)."""
    source = str(source)
    if source.startswith("hub:"):
        from datasets import load_dataset  # heavy: datasets loads pyarrow
        name = source[4:]
        ds = load_dataset(name, hub_config, split=hub_split, revision=hub_revision)
        return ds.to_list(), f"hub dataset {name} ({hub_config or 'default'}/{hub_split}@{hub_revision or 'main'})"
    p = Path(source).expanduser()
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk  # heavy: datasets loads pyarrow
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
                  limit: int | None = None, hub_split: str = "train", hub_config: str | None = None,
                  on_bad_row: str = "error", duplicates: str = "error", hub_revision: str | None = None) -> Problems:
    """Load problems from "shipped", "imo-proofbench", "imo-answerbench", "proofbench", a file, or hub:org/name."""
    if path == "shipped":
        where, rows = "shipped problems.jsonl", read_rows(shipped_path())
    elif path in IMOBENCH_FILE_OF:
        f = imobench_file(IMOBENCH_FILE_OF[path])
        where, rows = str(f), read_rows(f)
        columns = columns or (IMO_PROOFBENCH if path == "imo-proofbench" else IMO_ANSWERBENCH)
    elif path == "proofbench":  # the hub dataset, one problem per problem_id
        rows, where = read_records(PROOFBENCH_HUB, hub_config, hub_split, hub_revision)
        columns, duplicates = columns or PROOFBENCH, "first"
    else:
        rows, where = read_records(path, hub_config, hub_split, hub_revision)
    probs = records_to_problems(rows, columns, where, on_bad_row, duplicates)
    if path == "imo-proofbench":
        for p in probs:
            p.extra["split"] = "basic" if "Basic" in p.id else "advanced"
    if split is not None:
        probs = Problems([p for p in probs if p.extra.get("split") == split], probs.skipped)
        if not probs:
            raise DataError(f"{where}: no problems with split == {split!r}")
    return Problems(probs[:limit], probs.skipped) if limit else probs


SOURCE_KEYS = ("path", "split", "columns", "limit", "hub_split", "hub_config", "on_bad_row", "duplicates",
               "hub_revision")


def problem_source(spec: dict, where: str, extra: tuple = ("name",)):
    """A config.ProblemSource from a mapping in params (a benchmark entry); keys in `extra` are allowed and ignored."""
    unknown = set(spec) - {*extra, *SOURCE_KEYS}
    if unknown or "path" not in spec:
        raise DataError(f"{where} entry {spec!r}: needs 'path' and may have {', '.join(extra)}, "
                        f"{', '.join(k for k in SOURCE_KEYS if k != 'path')} (unknown: {sorted(unknown)})")
    try:
        return build(ProblemSource, {k: v for k, v in spec.items() if k in SOURCE_KEYS}, where)
    except ConfigError as e:
        raise DataError(str(e)) from None


def load_source(src) -> Problems:
    """Load problems for a `config.ProblemSource`."""
    return load_problems(src.path, src.split, src.columns, src.limit, src.hub_split, src.hub_config,
                         src.on_bad_row, src.duplicates, src.hub_revision)
