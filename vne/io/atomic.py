"""Writing files and folders so that a reader never sees half of one: the one definition.

- :func:`atomic_path`: a fresh temporary name beside the target, renamed onto it when the
  block succeeds and removed when it fails (for writers that want a file name: HDF5, torch);
- :func:`atomic_write`: the same for a writer of a binary file object;
- :func:`move_into`: a finished temporary folder into its destination (renamed whole when the
  destination does not exist, else entry by entry, each replacing its namesake).

Temporary names start with ``.<target name>.`` and end with ``.tmp``, in the target's folder
(the rename must not cross file systems).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path (not yet created) beside ``path``; becomes ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path, write: Callable[[BinaryIO], object], fsync: bool = False) -> Path:
    """Write ``path`` through ``write(fileobj)`` into a temporary file, then rename it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def move_into(src_dir, dest_dir) -> None:
    """Move the finished folder ``src_dir`` to ``dest_dir``: a rename when ``dest_dir`` does not
    exist, else each entry renamed into it (replacing an entry of the same name); ``src_dir`` is
    gone afterwards."""
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    if not dest_dir.exists():
        os.replace(src_dir, dest_dir)
        return
    for child in sorted(src_dir.iterdir()):
        dest = dest_dir / child.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif child.is_dir() and (dest.exists() or dest.is_symlink()):
            dest.unlink()
        os.replace(child, dest)  # a file replaces a file in one step
    shutil.rmtree(src_dir, ignore_errors=True)
