"""papermill as people call it: relative params_file / run_dir from the repo root and from notebooks/."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAPERMILL = Path(sys.executable).with_name("papermill")
pytestmark = pytest.mark.slow  # two notebooks on smoke params: ~90 s on 2 CPU cores


def papermill(notebook: str, out: Path, cwd: Path, params_file: str, run_dir: Path) -> None:
    """Run one notebook with the `qed` kernel from `cwd`, every path given relative to it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [str(PAPERMILL), notebook, str(out), "-k", "qed", "--no-progress-bar",
           "-p", "params_file", params_file, "-p", "run_dir", os.path.relpath(run_dir, cwd)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} (in {cwd}) failed:\n{done.stderr[-3000:]}"


@pytest.mark.skipif(not PAPERMILL.exists(), reason="papermill is not installed next to this python")
def test_relative_paths_from_repo_root_and_from_notebooks(tmp_path):
    run = tmp_path / "run"
    papermill("notebooks/01_distill.ipynb", tmp_path / "01.ipynb", REPO, "params/smoke.yaml", run)
    assert (run / "01_distill" / "dataset").is_dir()
    # the next stage from notebooks/, reading the first stage's artifacts through the relative run folder
    papermill("02_sft.ipynb", tmp_path / "02.ipynb", REPO / "notebooks", "../params/smoke.yaml", run)
    assert (run / "02_sft" / "model" / "config.json").exists() and (run / "02_sft" / "metrics.json").exists()
    assert not (REPO / "notebooks" / "run").exists() and not (REPO / "run").exists()  # nothing landed beside the notebooks
