"""Writing files so that a stop mid-write never leaves a broken one: beside the target, then a rename.

Every file the package writes for later reading (images with their recipes, caches, checkpoints,
manifests) goes through `atomic_path`: whatever is at the target stays whole until the new file is
complete, and a failed write leaves nothing behind but, after a kill, a hidden `.NAME.PID.partial.EXT`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_name(path: Path) -> Path:
    """The temporary file `atomic_path` writes for `path`: hidden, in the same folder, same suffix (some writers,
    such as numpy's savez and AOTInductor's packager, go by it), with this process's id so writers never share it."""
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def leftovers(folder: Path, name_glob: str) -> list[Path]:
    """The temporary files that killed writers left for targets matching `name_glob` (e.g. "step-*.pt")."""
    pattern = Path(name_glob)
    return sorted(folder.glob(f".{pattern.stem}.*.partial{pattern.suffix}"))


def fsync(path: Path) -> None:
    """Flush a file's, or a folder's (the names in it), contents to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | os.PathLike, sync: bool = False) -> Iterator[Path]:
    """A temporary path to write to; when the block ends without an error it replaces `path`, else it is removed.

    Args:
        sync: flush the file and the rename to the disk, so that the guarantee holds after a power cut too
            (a renamed but unwritten file could otherwise be left); costs a disk flush, meant for checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        yield temporary
        if sync:
            fsync(temporary)
        os.replace(temporary, path)
        if sync:
            fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
