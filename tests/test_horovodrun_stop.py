"""Stopping ``horovodrun`` itself (Ctrl-C, SIGTERM) against climseg's launcher patch
(tools/patch_horovod.py, applied by tools/install_horovod.sh).

Unpatched, Horovod 0.28.1 gives its ranks 5 s after a stop signal and then kills them, and
ignores every later signal. The ranks here are a small script that takes longer than 5 s to
stop, so each test fails on an unpatched Horovod; the trainer itself is stopped this way in
tests/test_faults.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HUNG_S, require_horovod, wait_for

REPO = Path(__file__).resolve().parent.parent
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# A rank that says when it is up, and on SIGTERM takes SLOW_STOP_S to "save", writes a
# marker, and exits 3 (climseg's "stopped, resumable" status).
SLOW_STOP_S = 8
RANK = f"""
import os, signal, sys, time
out = sys.argv[1]
def stop(signum, frame):
    time.sleep({SLOW_STOP_S})
    open(os.path.join(out, "saved-" + os.environ["HOROVOD_RANK"]), "w").close()
    os._exit(3)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(out, "up-" + os.environ["HOROVOD_RANK"]), "w").close()
time.sleep({HUNG_S})
"""


def _start(tmp_path: Path, grace: str | None = None) -> tuple[subprocess.Popen, Path]:
    """horovodrun with two RANKs, once both are up; ``grace`` its grace period setting
    (None: unset, the patched default)."""
    require_horovod()
    env = dict(os.environ)
    env.pop("HOROVOD_GRACEFUL_TERMINATION_TIME_S", None)
    if grace is not None:
        env["HOROVOD_GRACEFUL_TERMINATION_TIME_S"] = grace
    script, log = tmp_path / "rank.py", tmp_path / "run.log"
    script.write_text(RANK)
    proc = subprocess.Popen([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo",
                             sys.executable, str(script), str(tmp_path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env=env)
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in (0, 1)), proc, log)
    return proc, log


def _statuses(log: Path) -> list[str]:
    return sorted(re.findall(r"Process \d exit with status code (-?\d+)\.", log.read_text()))


def _stop(proc: subprocess.Popen, *signals: int) -> None:
    """Send ``signals`` to horovodrun a second apart and wait for it to end. The ranks' marker
    files and statuses say what happened; no test times it (two workers load the machine)."""
    try:
        for i, sig in enumerate(signals):
            if i:
                time.sleep(1)
            proc.send_signal(sig)
        proc.wait(timeout=HUNG_S)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_gives_the_ranks_the_default_grace_period(tmp_path, sig):
    proc, log = _start(tmp_path)
    _stop(proc, sig)
    assert (tmp_path / "saved-0").exists() and (tmp_path / "saved-1").exists(), log.read_text()
    assert _statuses(log) == ["3", "3"], log.read_text()
    assert "the ranks have 120 s to stop" in log.read_text()
    # All stopped by themselves: horovodrun says so and exits with their status.
    assert proc.returncode == 3, log.read_text()
    assert "horovodrun: stopped: all 2 processes exited with status 3" \
        in log.read_text().splitlines(), log.read_text()


def test_the_grace_period_comes_from_the_environment(tmp_path):
    proc, log = _start(tmp_path, grace="2")
    _stop(proc, signal.SIGINT)
    assert not list(tmp_path.glob("saved-*")), log.read_text()   # killed before their 8 s
    assert "the ranks have 2 s to stop" in log.read_text()


def test_a_second_signal_kills_the_ranks_at_once(tmp_path):
    proc, log = _start(tmp_path)
    _stop(proc, signal.SIGINT, signal.SIGINT)
    text = log.read_text()
    assert "second stop signal: killing every rank now" in text
    assert not list(tmp_path.glob("saved-*")), text
    assert _statuses(log) == ["-9", "-9"], text


# Rank 0 fails the way climseg does on bad input (one line, status 2); rank 1 would run on.
FAILING_RANK = f"""
import os, sys, time
if os.environ["HOROVOD_RANK"] == "0":
    sys.stderr.write("error: data.root: /nowhere is not a folder\\n")
    sys.exit(2)
time.sleep({HUNG_S})
"""


def test_a_failed_rank_ends_horovodrun_with_one_line_and_its_status(tmp_path):
    require_horovod()
    script = tmp_path / "rank.py"
    script.write_text(FAILING_RANK)
    proc = subprocess.run([str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo",
                           sys.executable, str(script)], capture_output=True, text=True,
                          cwd=REPO, timeout=HUNG_S)
    # Unpatched: a RuntimeError's traceback after the rank's line, and status 1.
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error: data.root: /nowhere is not a folder" in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "horovodrun: process 0 exited first, with status 2; the other ranks were ended (a "
        "rank's own error, if it gave one, is above)"), proc.stderr


# A rank on another host, as horovodrun starts it (``ssh HOST COMMAND``): the stop signal does
# not reach it (ssh passes none on); it stops when the other ranks' vote says so (here: a file)
# and exits 3. A SIGTERM, had the launcher sent one, would leave a marker and status 143.
REMOTE_RANK = """
import os, signal, sys, time
out = sys.argv[1]
def killed(signum, frame):
    open(os.path.join(out, "signalled"), "w").close()
    os._exit(143)
signal.signal(signal.SIGTERM, killed)
open(os.path.join(out, "up"), "w").close()
while not os.path.exists(os.path.join(out, "vote")):
    time.sleep(0.1)
sys.exit(3)
"""

# The launcher's side, as gloo_run calls it for rank 2 on another host: the stop signal's event
# is one of its stop_events. Once the rank is up: the stop signal, a second later a local rank's
# exit 3 (which sets "a rank failed"), and a second after that the vote (unless told not to).
LAUNCHER = """
import os, sys, threading, time
from horovod.runner.common.util import safe_shell_exec

def stop_then_vote(out, vote, stop, failed):
    while not os.path.exists(os.path.join(out, "up")):
        time.sleep(0.1)
    stop.set()
    time.sleep(1)
    failed.set()
    time.sleep(1)
    if vote:
        open(os.path.join(out, "vote"), "w").close()

if __name__ == "__main__":
    rank, out, vote = sys.argv[1], sys.argv[2], sys.argv[3] == "vote"
    stop, failed = threading.Event(), threading.Event()
    threading.Thread(target=stop_then_vote, args=(out, vote, stop, failed), daemon=True).start()
    status = safe_shell_exec.execute("%s %s %s" % (sys.executable, rank, out),
                                     index=2, events=[stop, failed], stop_events=[stop])
    print("status %s" % status)
"""


def _remote_stop(tmp_path: Path, vote: bool, grace: str | None = None) -> str:
    require_horovod()
    env = dict(os.environ)
    env.pop("HOROVOD_GRACEFUL_TERMINATION_TIME_S", None)
    if grace is not None:
        env["HOROVOD_GRACEFUL_TERMINATION_TIME_S"] = grace
    (tmp_path / "rank.py").write_text(REMOTE_RANK)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    proc = subprocess.run([sys.executable, str(tmp_path / "launcher.py"),
                           str(tmp_path / "rank.py"), str(tmp_path), "vote" if vote else "no"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=HUNG_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_a_remote_rank_is_left_to_stop_by_the_vote_and_keeps_its_status(tmp_path):
    # Before patch_horovod's edit 5 its command (the ssh client) was terminated at the
    # signal: 143, whatever the rank's own status.
    text = _remote_stop(tmp_path, vote=True)
    assert not (tmp_path / "signalled").exists(), text
    assert "status 3" in text.splitlines(), text


def test_a_remote_rank_that_does_not_stop_is_ended_after_the_grace_period(tmp_path):
    text = _remote_stop(tmp_path, vote=False, grace="3")
    assert (tmp_path / "signalled").exists(), text
    assert "status 143" in text.splitlines(), text
    assert "horovodrun: process 2 (on another host) did not stop within 3 s; ending it" \
        in text, text
