"""Atomic file output: nothing climseg writes is ever seen half-written under its real name."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside ``path`` (same folder, so a rename is atomic), unique
    per process and thread."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; when the block ends normally it
    is renamed over ``path``, and on any error it is removed and ``path`` left as it was.

    With ``fsync`` the data and the rename are flushed to disk first, so a crash cannot leave
    an empty file under the real name (worth it for checkpoints and results; bulk copies to
    node-local scratch pass ``fsync=False``).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)
