"""The notebooks in notebooks/ run top to bottom, offline on the CPU, and are committed with their outputs.

Each runs in a fresh kernel on a copy in a temporary folder (the working directory), so the committed
outputs are never overwritten. `LDM_NOTEBOOK_QUICK=1` shortens train_your_own's training to a few
steps; `HF_HUB_OFFLINE=1` makes quickstart's Stable Diffusion cell skip itself even with a network
(rather than download 4 GB).
"""

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["quickstart", "image_to_image", "inside_the_loop", "train_your_own"]
MAX_BYTES = 1_500_000


def _outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


# quickstart runs in the default test run; the other three (about 2.5 minutes together on 2 cores) with -m slow
RUN = [name if name == "quickstart" else pytest.param(name, marks=pytest.mark.slow) for name in NOTEBOOKS]


@pytest.mark.parametrize("name", RUN)
def test_notebook_runs(name, tmp_path):
    shutil.copy(FOLDER / f"{name}.ipynb", tmp_path)
    notebook = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    env = {**os.environ, "LDM_NOTEBOOK_QUICK": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path),
           "PYTHONWARNINGS": "ignore:IProgress not found"}  # TMPDIR: the notebooks' temporary folders go here
    # a failing cell raises CellExecutionError with its traceback
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
    assert any("image/png" in output.get("data", {}) for output in _outputs(notebook))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_its_outputs(name):
    path = FOLDER / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run `python notebooks/execute.py` to save outputs"
    assert not [output for output in _outputs(notebook) if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in _outputs(notebook))
    assert not any("application/vnd.jupyter.widget-view+json" in output.get("data", {})
                   for output in _outputs(notebook)), "widget outputs do not render on GitHub"
    assert path.stat().st_size < MAX_BYTES
