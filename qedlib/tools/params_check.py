"""Inert keys: params keys that no code reads. A key that is accepted but never read is a silent
change to the method (the recipe says one thing, the run does another).

Used by `python -m qedlib plan` and by the tests on every shipped params file. The check is
static: a key `section.sub.name` counts as read when an attribute `.name` is loaded (or
`getattr(x, "name")` is called) in a module that consumes that section or that key's config
class, or in the section's notebook. It cannot see a read in the wrong place of such a module;
what it catches is the key no consumer looks at.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import typing
from pathlib import Path

import yaml

from .. import config as C
from ..layout import DISTILL, EVAL, RC_RL, RUBRIC_RL, SFT

PKG = Path(__file__).resolve().parent.parent  # qedlib/
NOTEBOOKS = PKG.parent / "notebooks"

# Who consumes each params section (files under qedlib/, and the stage's notebook).
SECTION_READERS = {
    "distill": (["stages/distill.py", "views/distill.py", "decontam.py", "problem_sets.py"], f"{DISTILL}.ipynb"),
    "sft": (["stages/sft.py", "views/sft.py", "sft_data.py", "training.py", "attention.py", "launch.py"], f"{SFT}.ipynb"),
    "rubric_rl": (["stages/rubric_rl.py", "views/rubric_rl.py", "side_run.py", "grpo.py", "rl_settings.py", "training.py", "launch.py"],
                  f"{RUBRIC_RL}.ipynb"),
    "rc_rl": (["stages/rc_rl.py", "views/rc_rl.py", "side_run.py", "grpo.py", "rl_settings.py", "training.py", "launch.py"],
              f"{RC_RL}.ipynb"),
    "eval": (["stages/evaluation.py", "views/evaluation.py", "scaffolds.py", "stats.py", "tools/report.py",
              "calibration.py"], f"{EVAL}.ipynb"),
}
# Config classes read wherever they are used (a Sampling is read by the generator it is handed to).
CLASS_READERS = {
    C.Endpoint: ["generation.py", "grading.py", "judge_server.py", "models.py"],
    C.Sampling: ["generation.py", "reasoning_cache.py"],
    C.Judge: ["grading.py", "verdicts.py"],
    C.ProblemSource: ["problem_sets.py"],
    C.Lora: ["training.py"],
    C.Launch: ["launch.py"],
    C.RCSettings: ["reasoning_cache.py"],
}


@functools.lru_cache(maxsize=None)
def _reads_in(path: str) -> frozenset:
    """Attribute names loaded in a Python file or a notebook's code cells."""
    p = Path(path)
    if not p.exists():  # a reader that moved would make every key it reads look inert: say so instead
        raise FileNotFoundError(f"params check: reader {p} does not exist; update SECTION_READERS / CLASS_READERS")
    if p.suffix == ".ipynb":
        cells = json.loads(p.read_text())["cells"]
        src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
    else:
        src = p.read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            names.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return frozenset(names)


def _reads(files: list[str]) -> set:
    out: set = set()
    for f in files:
        out |= _reads_in(str(NOTEBOOKS / f if f.endswith(".ipynb") else PKG / f))
    return out


def _walk(tree: dict, cls, path: tuple, section: str | None, found: list) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in tree.items():
        if key not in hints:
            continue  # unknown keys are load_config's error, not this check's
        sub = C._dataclass_of(hints[key])
        sec = section if section is not None else key if key in SECTION_READERS else None
        files = list(SECTION_READERS[sec][0]) + [SECTION_READERS[sec][1]] if sec else \
            [p.name for p in PKG.glob("*.py")]
        files += CLASS_READERS.get(cls, [])
        dotted = ".".join(path + (key,))
        if path and key not in _reads(files):
            found.append(dotted)
        if sub is not None and isinstance(value, dict):
            _walk(value, sub, path + (key,), sec, found)
        elif sub is not None and isinstance(value, list) and key == "panel":
            for item in value:
                _walk(item, C.Endpoint, path + (key,), sec, found)


def inert_keys(params: str | Path | dict) -> list[str]:
    """Dotted keys a params file sets that no consumer of their section reads (empty list: none)."""
    tree = params if isinstance(params, dict) else yaml.safe_load(Path(params).read_text()) or {}
    found: list[str] = []
    _walk(tree, C.Config, (), None, found)
    return found


def all_inert_keys(cls=C.Config) -> list[str]:
    """Every config field that no consumer reads, as if a params file set them all (for the tests)."""
    def full(c):
        return {f.name: (full(C._dataclass_of(typing.get_type_hints(c)[f.name]))
                         if C._dataclass_of(typing.get_type_hints(c)[f.name]) else None)
                for f in dataclasses.fields(c)}
    return inert_keys(full(cls))


# Keys that code reads but that change nothing in the mode their section sets: (section kind, key, when, why).
# A rule is data: another mode switch adds a row here. `when` gets the section's settings with defaults filled in.
NO_EFFECT = [
    ("rl", "rollout_batch_size", lambda s: s["use_vllm"],
     "use_vllm: true generates with vLLM; rollout_batch_size sizes transformers' generate() calls only"),
    ("rl", "vllm_max_model_length", lambda s: s["use_vllm"] and s["vllm_mode"] == "server",
     "vllm_mode: server: the server's own --max-model-len sets the context, not the trainer"),
]
RL_SECTIONS = {"rubric_rl": C.RLConfig, "rc_rl": C.RCRLConfig}


def no_effect_keys(params: str | Path | dict) -> list[tuple[str, str]]:
    """(dotted key, why) for keys a params file sets that have no effect in the mode it sets (NO_EFFECT)."""
    tree = params if isinstance(params, dict) else yaml.safe_load(Path(params).read_text()) or {}
    found = []
    for section, cls in RL_SECTIONS.items():
        given = tree.get(section) or {}
        settings = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        settings.update(given)
        for kind, key, when, why in NO_EFFECT:
            if kind == "rl" and key in given and when(settings):
                found.append((f"{section}.{key}", why))
    return found

