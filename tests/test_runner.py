"""The runner (qedlib.runner): kernels talk over IPC sockets (no 'unencrypted TCP' warning in the run's output),
a failing notebook is named with its cell, an unknown stage is rejected."""
import nbformat
import papermill as pm
import pytest

from qedlib.files import write_json
from qedlib.runner import KERNEL, local_kernel_manager


def test_notebook_runs_over_ipc_without_the_tcp_warning(tmp_path, capfd):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(sorted(os.environ).__len__() > 0)")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name=KERNEL,
                        progress_bar=False, kernel_manager_class=local_kernel_manager())
    out = nbformat.read(tmp_path / "out.ipynb", 4)
    assert out.cells[0].outputs[0]["text"] == "True\n"
    assert "without encryption" not in capfd.readouterr().err
    assert local_kernel_manager()().transport == "ipc"


def test_runner_names_the_failing_notebook_and_cell(tmp_path, monkeypatch):
    """A stage that raises stops the run with the notebook, the cell and the error."""
    from qedlib import runner
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    cells = [{"id": "params", "cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [], "execution_count": None,
              "source": "params_file = ''\nrun_dir = ''\noverrides = {}"},
             {"id": "fails", "cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": "raise ValueError('bad row 7 in data.jsonl')"}]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "qed", "display_name": "qed", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    write_json(nbdir / "01_distill.ipynb", nb)
    monkeypatch.setattr(runner, "NOTEBOOKS", nbdir)
    with pytest.raises(RuntimeError, match=r"stage 01_distill failed in notebook 01_distill.ipynb, cell 1 .*bad row 7"):
        runner.run_pipeline("params/smoke.yaml", "t", ["distill"], outputs=tmp_path / "out")


def test_unknown_stage_is_rejected():
    from qedlib.config import ConfigError
    from qedlib.runner import _select_stages
    assert _select_stages(["sft", "05_eval"]) == ["02_sft", "05_eval"]
    with pytest.raises(ConfigError, match="--stages 'nope'"):
        _select_stages(["nope"])


def test_peak_memory_counts_the_process_tree(tmp_path):
    """PeakMemory follows a root process and the processes under it: a child that holds 300 MiB for a moment raises
    the peak above 300 MiB, though the root itself stays small."""
    import subprocess
    import sys
    import time

    from qedlib.runner import PeakMemory
    hold = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    root = subprocess.Popen([sys.executable, "-c",
                             f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hold!r}])"])
    try:
        with PeakMemory({root.pid}, interval=0.1) as memory:
            root.wait(timeout=30)
            time.sleep(0.2)
    finally:
        root.kill()
    assert memory.peak_gib is not None and memory.peak_gib > 300 / 1024, memory.peak_gib
    assert memory.peak_gib < 2  # two small interpreters and 300 MiB, not the whole machine


def test_peak_memory_of_no_process_is_none():
    from qedlib.runner import PeakMemory
    with PeakMemory(set(), interval=0.05) as memory:
        pass
    assert memory.peak_gib is None
