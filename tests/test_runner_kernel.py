"""The runner's kernels talk over IPC sockets: no 'unencrypted TCP' warning in the run's output."""
import nbformat
import papermill as pm

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
