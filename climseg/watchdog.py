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

A limit of this design: the thread needs the GIL. It runs while the stuck call releases it
(Horovod's synchronize, torch.distributed's waits), but Horovod's enqueue inside a backward hook
was seen blocking with the GIL held, and then nothing here can run; a C-level backstop is still
to be built (docs/reliability.md).

The limit grows with the run's own pace: never less than ``STEP_MARGIN`` times the longest
beat-to-beat gap seen so far, so a slow first validation or checkpoint on a slow file system
is not mistaken for a hang.
"""

from __future__ import annotations

import os
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
        return self

    def beat(self, step: int, phase: str) -> None:
        """The loop is alive at ``step`` and now enters ``phase`` (what it waits in next)."""
        now = self._clock()
        with self._lock:
            if self._beats >= 2:  # the first gap is the warm-up step: not the run's pace
                self._longest = max(self._longest, now - self._last)
            self._last, self._step, self._phase = now, step, phase
            self._beats += 1

    def pause(self) -> None:
        """Not watched until the next beat (an elastic re-formation waits for hosts)."""
        with self._lock:
            self._last, self._beats = None, 0

    def stop(self) -> None:
        self._done.set()

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
        self._stream.write(
            f"climseg: error: rank {self.rank}: no progress for {waited:.0f} s after step "
            f"{step}, waiting in {phase} (train.stall_timeout {self.timeout_s:g} s): another "
            f"rank or its node stopped responding; ending this rank (exit status "
            f"{EXIT_STATUS}); resume=auto goes on from the last checkpoint\n")
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
