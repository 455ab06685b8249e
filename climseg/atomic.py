"""Atomic file output: nothing climseg writes is ever seen half-written under its real name."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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
        # On a read-only or vanished folder the unlink fails too; its error must not replace
        # the one that says what went wrong.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)


def write_failure(path: str | os.PathLike, err: OSError) -> str:
    """One line for a failed write of ``path``: its folder and the reason, with the folder's
    free space where the disk may be full (HDF5 reports a full disk as a failed write of a
    hidden temporary, in a message several lines long and sometimes without an errno)."""
    path = Path(path)
    folder = path.parent
    reason = os.strerror(err.errno) if err.errno else (str(err).splitlines() or [""])[0]
    line = f"{folder}: cannot write {path.name} ({reason or type(err).__name__})"
    if err.errno not in (None, 0, errno.ENOSPC, errno.EDQUOT):
        return line
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return line
    size = f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free // 1024} KiB"
    return f"{line}; {size} free there"
