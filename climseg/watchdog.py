"""The progress watchdog: a rank that has not finished a step for ``train.stall_timeout``
seconds ends itself with one line and exit status 2.

A rank whose peer hangs, or whose peer's node is cut off the network, waits inside a collective
with no error: Gloo and NCCL time out only after many minutes, Horovod's controller never,
and until then the job burns its allocation. The training loop reports each finished step and
each phase it enters (:meth:`Watchdog.beat`); a daemon thread checks the time since the last
report, and once it is too long writes the error naming the phase (so the collective) the rank
is stuck in and leaves at once with ``os._exit``: the main thread cannot be interrupted inside
a C++ collective, and a normal exit would wait for it. Checkpoints are written atomically and
the output folder's lock is the kernel's, so nothing is left half-written.

The thread needs the GIL. It runs while the stuck call releases it (Horovod's synchronize,
torch.distributed's waits), but Horovod's enqueue inside a backward hook was seen blocking with
the GIL held, and then no thread of the rank can run. So each beat also goes down a pipe to a
small backstop process (:class:`Backstop`, ``python -m climseg.watchdog``): when no beat has
come for the limit plus :func:`backstop_grace`, it writes the same kind of line, saying the rank
does not answer, and kills the rank with SIGKILL (status 137: the rank cannot exit itself). It
ends with the rank: the pipe's end of file.

The limit grows with the run's own pace: never less than ``STEP_MARGIN`` times the longest
beat-to-beat gap seen so far, so a slow first validation or checkpoint on a slow file system
is not mistaken for a hang.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

EXIT_STATUS = 2
STEP_MARGIN = 10


class Watchdog:
    """Ends the process when no :meth:`beat` comes for ``timeout_s`` seconds (0: never).

    Armed by the second beat, so the first step (warm-up, allocation, a first compilation) is
    not held to the limit; :meth:`pause` disarms it until two more beats."""

    def __init__(self, timeout_s: float, rank: int, clock=time.monotonic,
                 exit=os._exit, stream=None):
        self.timeout_s = timeout_s
        self.backstop: Backstop | None = None
        self.rank = rank
        self._clock, self._exit = clock, exit
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._last: float | None = None
        self._beats = 0  # since the start or the last pause
        self._longest = 0.0
        self._step = 0
        self._phase = "starting"
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="climseg-watchdog",
                                            daemon=True)
            self._thread.start()
            self.backstop = Backstop.start(self.rank, self.timeout_s)
        return self

    def beat(self, step: int, phase: str) -> None:
        """The loop is alive at ``step`` and now enters ``phase`` (what it waits in next)."""
        now = self._clock()
        with self._lock:
            if self._beats >= 2:  # the first gap is the warm-up step: not the run's pace
                self._longest = max(self._longest, now - self._last)
            self._last, self._step, self._phase = now, step, phase
            self._beats += 1
            limit = self.limit()
        if self.backstop is not None:
            self.backstop.send(f"{step}\t{limit}\t{phase}")

    def pause(self) -> None:
        """Not watched until the next beat (an elastic re-formation waits for hosts)."""
        with self._lock:
            self._last, self._beats = None, 0
        if self.backstop is not None:
            self.backstop.send("pause")

    def stop(self) -> None:
        self._done.set()
        if self.backstop is not None:
            self.backstop.close()
            self.backstop = None

    def limit(self) -> float:
        """The current limit: ``timeout_s``, or more for a run whose steps are long."""
        return max(self.timeout_s, STEP_MARGIN * self._longest)

    def check(self) -> bool:
        """Whether the rank has stalled; if so, says so and exits (the watch thread's work)."""
        with self._lock:
            if self._beats < 2 or self.timeout_s <= 0:
                return False
            waited = self._clock() - self._last
            limit = self.limit()
            if waited < limit:
                return False
            step, phase = self._step, self._phase
        self._stream.write(stall_line(self.rank, waited, step, phase, self.timeout_s,
                                      f": ending this rank (exit status {EXIT_STATUS})"))
        self._stream.flush()
        self._exit(EXIT_STATUS)
        return True

    def watched(self, items, step: int, phase: str):
        """``items`` passed through, with a beat for each (a long validation is progress)."""
        for item in items:
            self.beat(step, phase)
            yield item

    def _watch(self) -> None:
        period = max(0.2, min(5.0, self.timeout_s / 10))
        while not self._done.wait(period):
            self.check()


def stall_line(rank: int, waited: float, step: int, phase: str, timeout_s: float,
               action: str) -> str:
    """The one line of a stalled rank, from the watch thread or the backstop (``action``: what
    is done about it)."""
    return (f"climseg: error: rank {rank}: no progress for {waited:.0f} s after step {step}, "
            f"waiting in {phase} (train.stall_timeout {timeout_s:g} s){action}; another rank "
            f"or its node stopped responding; resume=auto goes on from the last checkpoint\n")


def backstop_grace(limit: float) -> float:
    """How long after the watchdog's own limit the backstop acts: the thread, which ends the
    rank cleanly with exit status 2, has its chance first."""
    return max(5.0, limit / 4)


class Backstop:
    """The rank's side of the backstop process: beats go down a non-blocking pipe (a beat is
    dropped, never waited for, if the pipe is full)."""

    def __init__(self, process: subprocess.Popen, fd: int):
        self.process, self.fd = process, fd

    @classmethod
    def start(cls, rank: int, timeout_s: float) -> "Backstop | None":
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "climseg.watchdog", str(os.getpid()), str(rank),
                 str(timeout_s)], stdin=read_fd, stdout=subprocess.DEVNULL, close_fds=True)
        except OSError as err:
            os.close(write_fd)
            sys.stderr.write(f"climseg: warning: rank {rank}: no watchdog backstop ({err}); "
                             "a rank stuck holding Python's lock would not be ended\n")
            return None
        finally:
            os.close(read_fd)
        os.set_blocking(write_fd, False)
        return cls(process, write_fd)

    def send(self, line: str) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, line.encode() + b"\n")
        except BlockingIOError:
            pass  # the backstop is behind; the next beat says the same
        except OSError:  # it is gone: nothing to tell
            self.close()

    def close(self) -> None:
        """End the backstop (end of file on its pipe) and reap it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _backstop(pid: int, rank: int, timeout_s: float, stream=sys.stderr) -> int:
    """The backstop process: read beats (``step<TAB>limit<TAB>phase``, or ``pause``) from
    stdin; when none comes for the limit plus the grace, say so and kill ``pid``."""
    fd, pending = sys.stdin.fileno(), b""
    beats, deadline, step, phase, limit = 0, None, 0, "starting", timeout_s
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return 0  # the rank ended
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line == b"pause":
                beats, deadline = 0, None
                continue
            fields = line.decode().split("\t", 2)
            step, limit, phase = int(fields[0]), float(fields[1]), fields[2]
            beats += 1
            # Armed by the second beat, like the watchdog.
            deadline = time.monotonic() + limit + backstop_grace(limit) if beats >= 2 else None
    stream.write(stall_line(rank, limit + backstop_grace(limit), step, phase, timeout_s,
                            ", and the rank does not answer (stuck holding Python's lock): "
                            "the watchdog's backstop kills it (SIGKILL)"))
    stream.flush()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_backstop(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
