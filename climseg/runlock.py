"""One run per output folder: a lock that rank 0 holds for the run's lifetime.

Two jobs pointed at the same ``output_dir`` would interleave their checkpoints, ``best.pt``,
``metrics.jsonl`` and ``mlperf.log``. The lock is an advisory ``flock`` on
``OUTPUT/.climseg.lock``: the kernel drops it when the holding process ends, however it ends
(kill -9, a lost node's job torn down), so a lock left by a killed run never blocks its resume.
The file's text names the holder (host, pid, start time) for the error the second run prints.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".climseg.lock"


class RunLockError(RuntimeError):
    """``output_dir`` is held by another run, or cannot be created; one line, naming it."""


class RunLock:
    """``with RunLock(directory):`` or ``acquire()`` / ``release()``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self.made_directory = False  # acquire created it (a failed start may remove it)
        self._previous: bytes | None = None  # the holder note acquire found

    def acquire(self) -> "RunLock":
        try:
            self.made_directory = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunLockError(f"output_dir: cannot create {self.directory} "
                               f"({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(f"output_dir: {self.directory} is in use by another run "
                                   f"({holder}); give this run another output_dir, or wait "
                                   "for that one to end") from None
            # A file system without flock (Lustre mounted without -o flock): say so once and
            # run unprotected rather than refuse every run there.
            log.warning("output_dir: cannot lock %s (%s); two runs in this folder would not "
                        "be stopped", self.path, err.strerror or err)
            return self
        self._previous = os.pread(fd, 4096, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def abandon(self) -> None:
        """A start that failed, the lock still held: the folder as it was found, i.e. the
        holder note acquire replaced written back, or a folder acquire created removed."""
        if self.made_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        elif self._fd is not None and self._previous:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._previous, 0)

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: removing it would race with a run that opened it meanwhile.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
