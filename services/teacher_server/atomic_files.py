"""Writing folders and files so that a crash never leaves a half-written one behind.

A folder is written under a temporary name beside its destination, fsynced, and
renamed into place (a rename is atomic on POSIX file systems); an existing folder
is moved aside first and removed after. Used for teacher checkpoints, exported
students and training checkpoints alike; single files (data caches) the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomically(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(staging)`` fills a temporary folder that then replaces ``directory`` whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        fsync_tree(staging)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            directory.rename(old / directory.name)
            staging.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_file_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(f)`` fills a temporary file beside ``path`` that then replaces it (fsynced first).

    The temporary name is unique, so concurrent writers of the same file (two runs filling
    one cache) never interleave: the last rename wins and every reader sees a whole file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
