"""The import rule: the top of a qedlib file says what it depends on.

An AST scan of every qedlib/**/*.py checks three things about imports written inside a function or method:
(a) none imports a qedlib module (relative or `qedlib.`): the import graph is acyclic, so those go at the top;
(b) each carries a trailing comment starting with `# heavy` or `# optional` saying why it loads late;
(c) each names a package from LAZY_PACKAGES, the heavy or optional packages that must not load on import.
`rule_breaks(paths)` takes a list of files, so the rule can be checked on part of the package.
"""
import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qedlib"

# Packages that may be imported inside a function (heavy to load, or optional extras); nothing else may.
# httpx (~0.1 s to import) loads only to call a server; tokenizers and safetensors are not dependencies of their
# own (they come with transformers) and load only to build a tokenizer or read weights.
LAZY_PACKAGES = frozenset({
    "torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "deepspeed", "bitsandbytes",
    "flash_attn", "pandas", "pyarrow", "plotly", "ipywidgets", "IPython", "papermill", "nbformat", "nbconvert",
    "jupyter_client", "math_verify", "gguf", "openai", "tensorboard",
    "httpx", "tokenizers", "safetensors",
})
REASON_PREFIXES = ("# heavy", "# optional")
# qedlib modules that load TRL (and so torch) when imported, which the command line imports only in the subcommand
# that needs them, so `python -m qedlib --help`, `plan` and `run` start without TRL (tests/test_cli.py checks it).
LAZY_QEDLIB = frozenset({"tools.gpu_check"})


def line_comments(source: str) -> dict[int, str]:
    """{line number: the comment that ends that line} for every comment in `source`."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0]: tok.string for tok in tokens if tok.type == tokenize.COMMENT}


def imported_packages(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The top-level package names an import statement loads ("." for a relative import)."""
    if isinstance(node, ast.ImportFrom):
        return ["." if node.level else node.module.split(".")[0]]
    return [alias.name.split(".")[0] for alias in node.names]


def function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that sits inside a function or method body (at any depth)."""
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [node for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return list({id(node): node for node in found}.values())  # a nested function is walked twice


def rule_breaks(paths: list[Path], root: Path = REPO) -> list[str]:
    """One line per function-level import in `paths` (named relative to `root`) that breaks rule (a), (b) or (c)."""
    breaks = []
    for path in paths:
        source = path.read_text()
        comments = line_comments(source)
        for node in function_level_imports(ast.parse(source)):
            where = f"{path.relative_to(root)}:{node.lineno}"
            packages = imported_packages(node)
            end_line = getattr(node, "end_lineno", node.lineno)
            lazy_ok = (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in LAZY_QEDLIB
                       and comments.get(end_line, "").startswith(REASON_PREFIXES))
            if ("." in packages or "qedlib" in packages) and not lazy_ok:
                breaks.append(f"{where}: qedlib module imported inside a function (move it to the top)")
                continue
            if lazy_ok:
                continue
            comment = comments.get(end_line, "")
            if not comment.startswith(REASON_PREFIXES):
                breaks.append(f"{where}: function-level import without a '# heavy' / '# optional' reason comment")
            not_lazy = [name for name in packages if name not in LAZY_PACKAGES]
            if not_lazy:
                breaks.append(f"{where}: {not_lazy} imported inside a function but not heavy/optional (move it up)")
    return breaks


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_qedlib_file_keeps_the_import_rule():
    """Every file of the package: no qedlib import in a function, each lazy import heavy/optional with its reason."""
    breaks = rule_breaks(package_files())
    assert not breaks, "imports inside functions that break the rule:\n" + "\n".join(breaks)


def scan_text(tmp_path: Path, text: str) -> list[str]:
    """The rule breaks in a probe file holding `text`."""
    probe = tmp_path / "probe.py"
    probe.write_text(text)
    return rule_breaks([probe], root=tmp_path)


@pytest.mark.parametrize("body, expected", [
    ("def f():\n    from . import files\n", "qedlib module imported inside a function"),
    ("def f():\n    from qedlib import files  # heavy: no\n", "qedlib module imported inside a function"),
    ("def f():\n    import qedlib.files  # heavy\n", "qedlib module imported inside a function"),
    ("def f():\n    import torch\n", "without a '# heavy' / '# optional' reason comment"),
    ("def f():\n    import torch  # loads late\n", "without a '# heavy' / '# optional' reason comment"),
    ("def f():\n    import json  # heavy: not really\n", "not heavy/optional"),
    ("class C:\n    def m(self):\n        import yaml  # optional\n", "not heavy/optional"),
    ("def f():\n    def g():\n        from trl import (GRPOConfig,\n            GRPOTrainer)\n", "reason comment"),
])
def test_the_scan_catches_each_kind_of_break(tmp_path, body, expected):
    breaks = scan_text(tmp_path, body)
    assert len(breaks) == 1 and expected in breaks[0], breaks


@pytest.mark.parametrize("body", [
    "import json\nfrom . import files\n\ndef f():\n    return json\n",
    "def f():\n    import torch  # heavy: loads only when training\n",
    "def f():\n    from trl import (GRPOConfig,\n        GRPOTrainer)  # heavy: TRL loads torch\n",
    "def f():\n    import vllm  # optional: the [vllm] extra\n",
    "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n",
])
def test_the_scan_accepts_imports_that_keep_the_rule(tmp_path, body):
    assert scan_text(tmp_path, body) == []
