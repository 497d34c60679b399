"""Run notebooks top to bottom and save them with their outputs, as they are committed.

    python notebooks/execute.py                      # all four, in place
    python notebooks/execute.py notebooks/quickstart.ipynb

Each notebook runs in a fresh `python3` kernel with its own folder as the working directory.
So that the files read well on GitHub and stay small, progress bars are saved as their final line
(`coalesce_streams`), tqdm's note that ipywidgets is missing is silenced (the bars fall back to
text), and an image saved as PNG is not saved a second time as JPEG. `HF_HUB_OFFLINE=1` is not set
here: with a network, quickstart's last cell downloads SD 1.5.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = ("quickstart.ipynb", "image_to_image.ipynb", "inside_the_loop.ipynb", "train_your_own.ipynb")


def run(notebook, folder: Path, timeout: int = 1800, env: dict | None = None) -> None:
    """Execute a notebook object in a fresh kernel, working in `folder`; outputs are stored in it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore:IProgress not found", **(env or {})}
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", coalesce_streams=True,
                   resources={"metadata": {"path": str(folder)}}).execute(env=env)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output["data"].pop("image/jpeg", None)


def execute(path: Path, timeout: int = 1800) -> float:
    """Execute the notebook at `path` and save it in place with its outputs; returns the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    run(notebook, path.parent, timeout)
    nbformat.write(notebook, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name in sys.argv[1:] or NOTEBOOKS:
        path = Path(name) if Path(name).is_file() else here / name
        print(f"{path.name}: {execute(path.resolve()):.0f} s, {path.stat().st_size / 1e6:.2f} MB", flush=True)
