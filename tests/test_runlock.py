"""One run per output folder: the lock, its holder named, and a killed holder not blocking."""

import os
import signal
import subprocess
import sys

import pytest

from climseg.runlock import LOCK_NAME, RunLock, RunLockError

HOLD = ("import sys, time; from climseg.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunLockError) as err:
            RunLock(tmp_path / "run").acquire()
        assert f"pid {proc.pid}" in str(err.value) and "in use by another run" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # kill -9 leaves the lock file behind, but the kernel dropped the lock with the process.
    assert (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(tmp_path / "run") as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()


def test_released_lock_can_be_taken_again(tmp_path):
    # flock locks belong to the open file: two RunLocks conflict even in one process.
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path) as second:
        assert f"pid {os.getpid()}" in second.path.read_text()
        with pytest.raises(RunLockError, match="in use by another run"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()   # released again on leaving the with block


def test_uncreatable_output_dir_names_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLockError, match="output_dir: cannot create"):
        RunLock(tmp_path / "file" / "run").acquire()
