"""SFT data: rows in the FineProofs-SFT schema -> chat-template tokens -> loss masks (notebook 02_sft).

`load_sft_data` reads the distilled set, FineProofs-SFT from the hub or a local file into one
schema (`qedlib.proof_chat.SFT_COLUMNS`); `split_by_problem` holds out whole problems;
`training_chat_template` finds a template with `{% generation %}` markers that renders like the
tokenizer's own; `build_tokenized` turns rows into (input_ids, labels) with -100 outside the
assistant turn, dropping or truncating overlong rows and counting them. A building block of
qedlib.stages.sft (and its benchmark); it imports no stage.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import Config
from .generation import THINK_CLOSE
from .layout import DISTILL, from_repo_root
from .models import CHATML_TRAINING_TEMPLATE
from .problem_sets import DataError, read_records
from .proof_chat import SFT_COLUMNS, sft_messages

# Column names used by the public FineProofs-SFT release for our fields (its 0-7 grade column).
FINEPROOFS_ALIASES = {"gemini-3-pro-grade": "grade"}


def sft_features():
    """The datasets.Features of the SFT schema shared with FineProofs-SFT (grade as float 0-7)."""
    from datasets import Features, List, Value  # heavy: loads pyarrow, only when the schema is needed
    return Features({"problem": Value("string"), "reasoning_content": Value("string"), "proof": Value("string"),
                     "category": Value("string"), "competition": Value("string"), "grade": Value("float64"),
                     "source": Value("string"),
                     "messages": List({"content": Value("string"), "role": Value("string")})})

# A Qwen3 "thinking" chat template (the shape of Qwen3-4B-Thinking-2507's: the generation prompt
# already opens <think>, the last assistant turn is rendered as reasoning + </think> + answer),
# without tools. The {% generation %} markers start after the opening <think> because the model
# never generates it: the loss covers exactly what the model writes after the generation prompt.
QWEN3_THINKING_TRAINING_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is defined and m['reasoning_content'] else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<think>\n' -}}{% generation %}{{- reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}"
    "{% generation %}{{- content.lstrip('\n') + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}"
)
# The same template as a model would ship it (no markers): renders identically.
QWEN3_THINKING_TEMPLATE = QWEN3_THINKING_TRAINING_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", "")

PROBE_MESSAGES = [{"role": "user", "content": "Prove that 1 + 1 = 2."},
                  {"role": "assistant", "content": "<think>\nCount.\n</think>\n\nBy definition, 1 + 1 = 2."}]


class SFTDataError(ValueError):
    """An SFT dataset row is wrong; the message names the source, the row and the column."""


def _read_rows(source: str, cfg_sft, run_dir: str | Path) -> tuple[list[dict], str]:
    if source == "distill":
        path = Path(run_dir) / DISTILL / "dataset"
        if not path.exists():
            raise FileNotFoundError(f"sft.dataset = 'distill' but {path} does not exist: run 01_distill first "
                                    "(python -m qedlib run PARAMS --stages 01_distill), or point sft.dataset at "
                                    "hub:org/name or a .jsonl/.parquet file")
        source = str(path)
        if _saved_rows(path) == 0:  # datasets cannot even load a saved dataset with no rows (an IndexError)
            raise SFTDataError(f"sft.dataset = 'distill': {path}: the dataset is empty (01_distill kept no sample; "
                               "its funnel.json says why): rerun 01_distill (python -m qedlib run PARAMS --stages "
                               "01_distill) with a working judge or looser selection (distill.min_grade)")
    try:  # a relative path from the repository root also works from a notebook's kernel (notebooks/)
        return read_records(from_repo_root(source), cfg_sft.dataset_config, cfg_sft.dataset_split)
    except DataError as e:
        raise SFTDataError(f"sft.dataset: {e}") from None


def _saved_rows(folder: Path) -> int | None:
    """Rows of a `save_to_disk` dataset folder from its metadata (None when it does not say)."""
    state = folder / "state.json"
    if not state.exists():
        return None
    if not json.loads(state.read_text()).get("_data_files"):
        return 0
    info = folder / "dataset_info.json"
    splits = json.loads(info.read_text()).get("splits") if info.exists() else None
    return sum(s.get("num_examples", 0) for s in splits.values()) if splits else None


def normalise_row(row: dict, i: int, where: str) -> dict:
    """Check one row and bring it to the SFT schema (messages built from reasoning/proof when missing)."""
    row = {FINEPROOFS_ALIASES.get(k, k): v for k, v in row.items()}
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise SFTDataError(f"{where}: row {i}: column 'problem' is missing or empty; every row needs the problem text")
    msgs = row.get("messages")
    if not msgs:
        if not isinstance(row.get("proof"), str) or not row["proof"].strip():
            raise SFTDataError(f"{where}: row {i}: no 'messages' and no 'proof' column: give either the chat "
                               "messages or reasoning_content + proof")
        msgs = sft_messages(problem, row.get("reasoning_content") or "", row["proof"])
    if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs)
            or msgs[-1].get("role") != "assistant" or not any(m.get("role") == "user" for m in msgs)):
        raise SFTDataError(f"{where}: row {i}: 'messages' must be a list of {{role, content}} ending with an "
                           f"assistant turn after a user turn, got roles {[m.get('role') for m in msgs if isinstance(m, dict)]}")
    out = {c: row.get(c) for c in SFT_COLUMNS if c != "messages"}
    out["messages"] = [{"role": m["role"], "content": m.get("content") or ""} for m in msgs]
    return out


def load_sft_data(cfg: Config, run_dir: str | Path) -> tuple[Any, dict]:
    """Load cfg.sft.dataset as a `datasets.Dataset` in the SFT schema; return (dataset, counts)."""
    import datasets  # heavy: loads pyarrow, only when data is loaded
    raw, where = _read_rows(cfg.sft.dataset, cfg.sft, run_dir)
    if not raw:
        raise SFTDataError(f"{where}: the dataset is empty")
    rows = [normalise_row(r, i, where) for i, r in enumerate(raw)]
    counts = {"rows_loaded": len(rows), "unique_problems": len({r["problem"].strip() for r in rows})}
    if cfg.sft.one_per_problem:
        rows = one_per_problem(rows)
    counts["duplicates_dropped"] = counts["rows_loaded"] - len(rows)
    print(f"[qedlib] SFT data: {len(rows)} rows from {where} ({counts['duplicates_dropped']} duplicates of a problem dropped)")
    return datasets.Dataset.from_list(rows, features=sft_features()), counts


def one_per_problem(rows: list[dict]) -> list[dict]:
    """Keep one row per unique problem: the highest grade, the first on ties."""
    best: dict[str, dict] = {}
    score = lambda r: r["grade"] if isinstance(r.get("grade"), (int, float)) else -math.inf
    for r in rows:
        key = " ".join(r["problem"].split())
        if key not in best or score(r) > score(best[key]):
            best[key] = r
    return list(best.values())


def split_by_problem(ds, eval_fraction: float, seed: int = 0):
    """Split into (train, eval) by unique problem, so eval problems are never trained on."""
    problems = sorted({" ".join(p.split()) for p in ds["problem"]})
    random.Random(seed).shuffle(problems)
    n_eval = 0 if eval_fraction <= 0 or len(problems) < 2 else max(1, round(eval_fraction * len(problems)))
    held = set(problems[:n_eval])
    is_eval = [" ".join(p.split()) in held for p in ds["problem"]]
    train = ds.select([i for i, e in enumerate(is_eval) if not e])
    evals = ds.select([i for i, e in enumerate(is_eval) if e])
    return train, evals


# ---------------------------------------------------------------- templates and tokens
def _renders_like(tokenizer, template: str, original: Optional[str]) -> bool:
    try:
        a = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, chat_template=original)
        b = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, chat_template=template)
        mask = tokenizer.apply_chat_template(PROBE_MESSAGES, chat_template=template, tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    except Exception:  # a template that fails to render is simply not a match
        return False
    return a == b and 1 in mask


def training_chat_template(tokenizer, override_file: Optional[str] = None) -> str:
    """A chat template with {% generation %} markers that renders exactly like the tokenizer's own.

    Tried in order: sft.chat_template (a file), the tokenizer's template if it has markers, the
    SmolLM2/ChatML training template, the Qwen3 thinking template, TRL's patched templates.
    """
    if override_file:
        text = Path(override_file).read_text()
        if "{% generation %}" not in text:
            raise ValueError(f"sft.chat_template {override_file}: no {{% generation %}} markers, so the assistant "
                             "turn cannot be found; wrap the assistant content and its end token in them")
        return text
    own = tokenizer.chat_template
    if own and "{% generation %}" in own:
        return own
    candidates = [CHATML_TRAINING_TEMPLATE, QWEN3_THINKING_TRAINING_TEMPLATE]
    try:
        from trl.chat_template_utils import get_training_chat_template  # heavy: TRL loads only to find a template
        candidates.append(get_training_chat_template(tokenizer))
    except Exception:  # TRL does not know this template
        pass
    for tmpl in candidates:
        if tmpl and _renders_like(tokenizer, tmpl, own):
            return tmpl
    raise ValueError(
        f"no training chat template matches the tokenizer of {getattr(tokenizer, 'name_or_path', '?')}: write its "
        "template with {% generation %}…{% endgeneration %} around each assistant turn (end token included) and "
        "set sft.chat_template to that file")


def tokenize_example(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside the assistant turn."""
    enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def build_tokenized(ds, tokenizer, max_length: int, overlong: str = "drop", template: Optional[str] = None):
    """Tokenize the SFT rows; drop or truncate rows over max_length; return (dataset, stats)."""
    import datasets  # heavy: loads pyarrow, only when rows are tokenized
    template = template or training_chat_template(tokenizer)
    out, lengths, loss_tokens = [], [], []
    dropped = truncated = no_loss = 0
    for msgs in ds["messages"]:
        ids, labels = tokenize_example(tokenizer, msgs, template)
        lengths.append(len(ids))
        if len(ids) > max_length:
            if overlong == "drop":
                dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        n_loss = sum(1 for t in labels if t != -100)
        if n_loss == 0:
            no_loss += 1  # the prompt alone filled max_length: nothing to learn from
            continue
        loss_tokens.append(n_loss)
        out.append({"input_ids": ids, "labels": labels})
    arr = np.array(lengths or [0])
    stats = {"rows": len(lengths), "kept": len(out), "dropped_overlong": dropped + no_loss, "truncated": truncated,
             "tokens_mean": float(arr.mean()), "tokens_p50": float(np.median(arr)),
             "tokens_p95": float(np.percentile(arr, 95)), "tokens_max": int(arr.max()),
             "loss_tokens_mean": float(np.mean(loss_tokens)) if loss_tokens else 0.0,
             "think_closed_in_data": float(np.mean([THINK_CLOSE in m[-1]["content"] for m in ds["messages"]]))
             if len(ds) else 0.0}
    if not out:
        raise SFTDataError(f"all {len(lengths)} SFT rows are over sft.max_length={max_length} tokens (longest "
                           f"{stats['tokens_max']}): raise sft.max_length or set sft.overlong: truncate")
    return datasets.Dataset.from_list(out), stats


def loss_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode the tokens that carry loss (what the model is trained to write)."""
    return tokenizer.decode([t for t, l in zip(input_ids, labels) if l != -100])


def loss_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[dict]:
    """The example as runs of tokens that do / do not carry loss: [{loss, tokens, text}], in order."""
    runs: list[dict] = []
    for t, lab in zip(input_ids, labels):
        trained = lab != -100
        if not runs or runs[-1]["loss"] != trained:
            runs.append({"loss": trained, "ids": []})
        runs[-1]["ids"].append(t)
    return [{"loss": r["loss"], "tokens": len(r["ids"]), "text": tokenizer.decode(r["ids"])} for r in runs]
