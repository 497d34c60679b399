"""Writing files so that a stop mid-write never leaves a broken one: beside the target, then a rename.

Every file the package writes for later reading (images with their recipes, caches, checkpoints,
manifests) goes through `atomic_path`: whatever is at the target stays whole until the new file is
complete, and a failed write leaves nothing behind but, after a kill, a hidden `.NAME.PID.partial.EXT`.
Whole folders (models, LoRAs, image folders) go through `atomic_folder`, its twin.
"""

from __future__ import annotations

import os
import shutil
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


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder to fill; when the block ends without an error it replaces the folder `path`, else it
    is removed.

    The old folder, if any, is renamed aside first and deleted once the new one is in place (put back if that
    rename fails), so a folder with that name is always a whole old one or a whole new one. A kill can
    leave a hidden `.NAME.PID.partial` or `.NAME.PID.old` beside it, never a half-written folder under the name.
    Callers check what may be replaced (a user's folder must not be) before the block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    for leftover in (temporary, old):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        replacing = path.exists()
        if replacing:
            os.replace(path, old)
        try:
            os.replace(temporary, path)
        except BaseException:
            if replacing:
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)  # the new folder is in place; the old one is only clutter
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
