"""The progress watchdog (climseg/watchdog.py) on a hand-driven clock: when it ends a rank,
what it says, and what does not count as a hang. The end-to-end case (a stopped rank, the
other ends within the limit) is in tests/test_faults.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import HUNG_S

from climseg.watchdog import EXIT_STATUS, STEP_MARGIN, Watchdog

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dog(timeout: float = 60.0):
    clock, exits, stream = Clock(), [], io.StringIO()
    dog = Watchdog(timeout, rank=3, clock=clock, exit=exits.append, stream=stream)
    return dog, clock, exits, stream


def test_a_rank_silent_past_the_limit_ends_with_one_line_naming_where_it_waits():
    dog, clock, exits, stream = _dog(60)
    dog.beat(0, "step 1")
    clock.now += 5
    dog.beat(1, "step 2 (its batch, gradient allreduce)")
    clock.now += 59.9
    assert not dog.check() and exits == []
    clock.now += 0.2
    assert dog.check()
    assert exits == [EXIT_STATUS]
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("climseg: error: rank 3: no progress for 60 s after step 1, "
                           "waiting in step 2 (its batch, gradient allreduce)")
    assert "train.stall_timeout 60 s" in line


def test_the_warm_up_step_and_a_pause_are_not_held_to_the_limit():
    dog, clock, exits, _ = _dog(60)
    dog.beat(0, "step 1")
    clock.now += 1000  # the first step: compilation, allocation
    assert not dog.check()
    dog.beat(1, "step 2")
    assert dog.limit() == 60  # the warm-up gap does not stretch the limit
    dog.pause()  # an elastic re-formation waits for hosts
    clock.now += 1000
    assert not dog.check()
    dog.beat(1, "step 2")
    clock.now += 1000
    assert not dog.check() and exits == []  # one beat after a pause: not armed yet


def test_the_limit_grows_with_the_runs_own_pace():
    dog, clock, exits, _ = _dog(60)
    for step, gap in enumerate([1, 2, 9, 3]):
        dog.beat(step, "step")
        clock.now += gap
    dog.beat(4, "validation")
    assert dog.limit() == STEP_MARGIN * 9  # gaps after the warm-up: 2, 9, 3
    clock.now += 89
    assert not dog.check()
    clock.now += 2
    assert dog.check() and exits == [EXIT_STATUS]


def test_zero_is_off():
    dog, clock, exits, _ = _dog(0)
    assert dog.start()._thread is None  # no watch thread
    for step in range(4):
        dog.beat(step, "step")
        clock.now += 1
    clock.now += 10**6
    assert not dog.check() and exits == []


# A rank with the real watch thread and backstop process, two beats, then stuck: in C code
# that holds the GIL (``ctypes.PyDLL`` does not release it, like Horovod's enqueue seen in a
# backward hook), or in a wait that releases it.
STUCK_RANK = """
import ctypes, sys, time
from climseg.watchdog import Watchdog
dog = Watchdog(float(sys.argv[1]), rank=0).start()
dog.beat(0, "step 1")
time.sleep(0.1)
dog.beat(1, "step 2 (its batch, gradient allreduce)")
if sys.argv[2] == "holding":
    ctypes.PyDLL(None).sleep(600)
else:
    time.sleep(600)
"""


def _stuck(tmp_path, how: str) -> subprocess.CompletedProcess:
    script = tmp_path / "rank.py"
    script.write_text(STUCK_RANK)
    return subprocess.run([sys.executable, str(script), "1", how], capture_output=True,
                          text=True, timeout=HUNG_S, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_a_rank_stuck_holding_the_gil_is_killed_by_the_backstop_with_one_line(tmp_path):
    proc = _stuck(tmp_path, "holding")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (line,) = proc.stderr.splitlines()  # the thread never ran: only the backstop's line
    assert line.startswith("climseg: error: rank 0: no progress for 6 s after step 1, waiting "
                           "in step 2 (its batch, gradient allreduce) (train.stall_timeout 1 s),"
                           " and the rank does not answer"), line


def test_a_rank_waiting_without_the_gil_is_ended_by_the_thread_first(tmp_path):
    proc = _stuck(tmp_path, "waiting")
    assert proc.returncode == EXIT_STATUS, proc.stderr
    (line,) = proc.stderr.splitlines()  # the backstop saw the end of file and said nothing
    assert line.startswith("climseg: error: rank 0: no progress for 1 s after step 1"), line
    assert "does not answer" not in line
