"""The import contracts in pyproject.toml ([tool.importlinter]): layers that hold, no cycles, every module placed.

`lint-imports` (import-linter) checks qedlib's imports, function-level ones included. The negative tests run it
on a copy of the package with one bad import or one unplaced module, so a contract that stopped checking fails here.
"""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """Run lint-imports with the repo's contracts on the qedlib package found under `package_parent`."""
    assert LINT_IMPORTS.exists(), (f"{LINT_IMPORTS} not found: install the test extra "
                                   f"(pip install -c constraints.txt -e '.[test]', or make setup)")
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(PYPROJECT), "--no-cache"], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=120)


def layer_contract() -> dict:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["type"] == "layers")


def placed_modules() -> set[str]:
    """Every module named in some layer of the layers contract."""
    return {name.strip() for layer in layer_contract()["layers"] for name in layer.replace("|", ":").split(":")}


def test_contracts_hold():
    out = lint_imports(REPO)
    assert out.returncode == 0, f"lint-imports found broken import contracts:\n{out.stdout}\n{out.stderr}"
    assert "0 broken" in out.stdout


def independence(contract_id: str) -> set[str]:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    return set(next(c for c in contracts if c["id"] == contract_id)["modules"])


def test_every_module_is_in_a_layer():
    """A new module must be placed (the contract is exhaustive), and a layer must not name a module that is gone;
    every stage and every view module is in its package's independence contract."""
    assert layer_contract()["exhaustive"] is True and layer_contract()["containers"] == ["qedlib"]
    packages = {p.parent.name for p in (REPO / "qedlib").glob("*/__init__.py")}
    modules = ({p.stem for p in (REPO / "qedlib").glob("*.py")} - {"__init__"}) | packages
    for pkg in ("stages", "views"):
        found = {f"qedlib.{pkg}.{p.stem}" for p in (REPO / "qedlib" / pkg).glob("*.py")} - {f"qedlib.{pkg}.__init__"}
        assert found == independence(pkg), f"qedlib/{pkg}/ modules vs the {pkg!r} independence contract: {sorted(found ^ independence(pkg))}"
    assert not modules - placed_modules(), (f"qedlib modules in no layer of pyproject.toml [tool.importlinter]: "
                                            f"{sorted(modules - placed_modules())}; add each to the layer it belongs to")
    assert not placed_modules() - modules, f"layers name modules that do not exist: {sorted(placed_modules() - modules)}"


def package_copy(tmp_path: Path) -> Path:
    """A copy of qedlib's Python files under tmp_path (what lint-imports reads), for breaking on purpose."""
    shutil.copytree(REPO / "qedlib", tmp_path / "qedlib", ignore=shutil.ignore_patterns("__pycache__", "data", "prompts",
                                                                                          "accelerate"))
    return tmp_path / "qedlib"


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_stage_importing_the_runner_inside_a_function_is_reported(tmp_path):
    pkg = package_copy(tmp_path)
    append(pkg / "stages" / "sft.py", "\n\ndef _reach_up():\n    from ..runner import start_stage\n    return start_stage\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "qedlib.stages is not allowed to import qedlib.runner" in out.stdout \
        and "qedlib.stages.sft -> qedlib.runner" in out.stdout, out.stdout


def test_a_stage_importing_another_stage_is_reported(tmp_path):
    pkg = package_copy(tmp_path)
    append(pkg / "stages" / "evaluation.py", "\n\ndef _sideways():\n    from . import distill\n    return distill\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "qedlib.stages.evaluation is not allowed to import qedlib.stages.distill" in out.stdout, out.stdout


def test_a_cycle_between_building_blocks_is_reported(tmp_path):
    pkg = package_copy(tmp_path)  # files -> tables -> files, both building blocks: only the acyclic contract sees it
    append(pkg / "files.py", "\n\ndef _around():\n    from .tables import markdown_table\n    return markdown_table\n")
    append(pkg / "tables.py", "\n\ndef _back():\n    from .files import read_json\n    return read_json\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "No cycles are allowed in qedlib" in out.stdout, out.stdout


def test_a_module_in_no_layer_is_reported(tmp_path):
    pkg = package_copy(tmp_path)
    (pkg / "unplaced_helper.py").write_text('"""A module nobody put in a layer."""\n')
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "not listed as layers" in out.stdout and "qedlib.unplaced_helper" in out.stdout, out.stdout


def test_a_view_importing_another_view_is_reported(tmp_path):
    pkg = package_copy(tmp_path)
    append(pkg / "views" / "rc_rl.py", "\n\ndef _sideways():\n    from . import rubric_rl\n    return rubric_rl\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "qedlib.views.rc_rl is not allowed to import qedlib.views.rubric_rl" in out.stdout, out.stdout


def test_a_stage_importing_its_view_is_reported(tmp_path):
    pkg = package_copy(tmp_path)
    append(pkg / "stages" / "sft.py", "\n\ndef _up():\n    from ..views import sft\n    return sft\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "qedlib.stages is not allowed to import qedlib.views" in out.stdout \
        and "qedlib.stages.sft -> qedlib.views.sft" in out.stdout, out.stdout


def test_a_view_importing_a_tool_is_reported(tmp_path):
    pkg = package_copy(tmp_path)
    append(pkg / "views" / "evaluation.py", "\n\ndef _up():\n    from ..tools import report\n    return report\n")
    out = lint_imports(tmp_path)
    assert out.returncode == 1 and "qedlib.views is not allowed to import qedlib.tools" in out.stdout \
        and "qedlib.views.evaluation -> qedlib.tools.report" in out.stdout, out.stdout


def test_stage_folder_names_are_written_only_in_layout():
    """Code names a stage folder through qedlib.layout; a literal "05_eval" elsewhere is a second definition (messages
    and docstrings may mention one)."""
    import ast
    from qedlib.layout import STAGES
    found = []
    for path in sorted((REPO / "qedlib").rglob("*.py")):
        if path.name == "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    any(node.value == s or node.value.startswith(s + "/") for s in STAGES):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, f"stage folder literals outside qedlib/layout.py (use its names): {found}"
