"""MkDocs hook: publish the notebooks of `notebooks/` (outside `docs/`) as pages.

The notebooks live once, at the top of the repository, where they are run and tested. This hook
adds them to the site's files as `notebooks/NAME.ipynb`, before mkdocs-jupyter turns them into
pages, so the site renders their committed outputs without a second copy under `docs/`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps .ipynb files as pages
def on_files(files, config):
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{path.name}", src_dir=str(NOTEBOOKS.parent),
                          dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


def on_serve(server, config, builder):
    server.watch(str(NOTEBOOKS))  # `mkdocs serve` rebuilds when a notebook changes
    return server
