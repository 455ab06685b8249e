"""Patch Horovod 0.28.1's launcher so that stopping ``horovodrun`` lets a run save.

    python tools/patch_horovod.py SRC/horovod     # the package folder of the unpacked source

tools/install_horovod.sh runs it on the source before building the wheel. The changes are all
in pure-Python launcher code (the compiled core is untouched):

1. The grace period. On Ctrl-C or SIGTERM, horovodrun sends each rank SIGTERM and kills it
   5 s later (``GRACEFUL_TERMINATION_TIME_S``). A climseg rank needs longer: it finishes its
   step, the ranks vote, rank 0 writes a checkpoint (hundreds of MB). The period now comes
   from ``HOROVOD_GRACEFUL_TERMINATION_TIME_S`` (seconds), default ``DEFAULT_GRACE_S``.
2. A second signal kills at once. Horovod ignored every signal after the first, so an
   impatient user had no way out but ``kill -9``; now the second Ctrl-C or SIGTERM kills every
   rank's process group immediately.

3. A rank's own exit status. Once every command has ended within the grace period, the
   launcher no longer terminates their shell before it can exit with the command's status (a
   race that reported a rank that stopped cleanly with status 3 as killed, 143).

4. A failed rank ends horovodrun with one line and that rank's status. Horovod raised a
   RuntimeError (a 25-line traceback after the rank's own one-line error) and exited 1;
   ``horovodrun`` now prints ``horovodrun: process N exited first, with status S; ...`` and
   exits S, so that a job script sees the status climseg gave (2: bad input, 3: stopped).
   ``horovod.run()`` callers still get a RuntimeError (a subclass, ``ProcessFailed``).

5. A rank on another host keeps its status. horovodrun starts such a rank as ``ssh HOST
   COMMAND`` (gloo_run tells it by the host's address: not one of this machine's), and a stop
   signal terminated each command's process group at once: for a remote rank that is the ssh
   client, which died with 143 while the rank, which ssh passes no signal to, went on to stop
   cleanly through climseg's stop vote with status 3; horovodrun then exited 143, blaming
   that rank. Now, on the first signal, a remote command is left to end by itself within the
   grace period (its client exits with the remote status) and is terminated only after it;
   a rank's failure during that period does not cut it short. Local ranks get SIGTERM as
   before, and a second signal still kills everything at once. When after a stop signal every
   rank exited with the same status, horovodrun says ``horovodrun: stopped: all N processes
   exited with status 3`` (not that one of them exited first) and exits with it.

Each edit checks the text it replaces, so a Horovod other than 0.28.1 fails loudly instead of
building unpatched. Exit 1 with one line on such a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_GRACE_S = 120

GRACE_OLD = "GRACEFUL_TERMINATION_TIME_S = 5\n"
GRACE_NEW = f'''

def _grace_seconds():
    # climseg: the ranks' grace period after a stop signal, long enough for a checkpoint.
    value = os.environ.get("HOROVOD_GRACEFUL_TERMINATION_TIME_S", "")
    try:
        return float(value) if value.strip() else {DEFAULT_GRACE_S}.0
    except ValueError:
        sys.stderr.write("horovodrun: HOROVOD_GRACEFUL_TERMINATION_TIME_S=%r is not a number "
                         "of seconds; using {DEFAULT_GRACE_S}\\n" % value)
        return {DEFAULT_GRACE_S}.0


GRACEFUL_TERMINATION_TIME_S = _grace_seconds()

# climseg: the middlemen alive now; each leads the process group of one rank's command.
_MIDDLEMEN = set()


def kill_all_now():
    """Kill every running command's process group at once (a second stop signal)."""
    for pid in list(_MIDDLEMEN):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
'''

WAIT_OLD = ("    gone, alive = psutil.wait_procs(p.children(), "
            "timeout=GRACEFUL_TERMINATION_TIME_S)\n")
WAIT_NEW = WAIT_OLD + """
    # climseg: every command ended within the grace period: let the shell end with their
    # status instead of terminating it (a rank that stopped cleanly read as killed, 143).
    # Polled, not waited for: the middleman's own wait must reap the shell and its status.
    if not alive:
        deadline = time.time() + GRACEFUL_TERMINATION_TIME_S
        try:
            while p.status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
                time.sleep(0.05)
            if p.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
"""

START_OLD = "    middleman.start()\n"
START_NEW = "    middleman.start()\n    _MIDDLEMEN.add(middleman.pid)\n"

FINALLY_OLD = "    finally:\n        stop.set()\n"
FINALLY_NEW = "    finally:\n        stop.set()\n        _MIDDLEMEN.discard(middleman.pid)\n"

HANDLER_OLD = """    def set_event_on_signal(signum, frame):
        event.set()
"""
HANDLER_NEW = """    def set_event_on_signal(signum, frame):
        # climseg: the first signal asks the ranks to stop within the grace period; a second
        # one kills them now.
        if event.is_set():
            sys.stderr.write("horovodrun: second stop signal: killing every rank now\\n")
            safe_shell_exec.kill_all_now()
            return
        sys.stderr.write("horovodrun: stop signal: the ranks have %g s to stop (a second "
                         "signal kills them now)\\n" % safe_shell_exec.GRACEFUL_TERMINATION_TIME_S)
        event.set()
"""

EXECUTE_OLD = ("def execute(command, env=None, stdout=None, stderr=None, index=None, events=None,\n"
               "            prefix_output_with_timestamp=False):\n")
EXECUTE_NEW = ("def execute(command, env=None, stdout=None, stderr=None, index=None, events=None,\n"
               "            prefix_output_with_timestamp=False, stop_events=None):\n")

EVENTS_OLD = """    stop = threading.Event()
    events = events or []
    for event in events:
        on_event(event, exit_event.set, stop=stop, silent=True)
"""
EVENTS_NEW = """    stop = threading.Event()
    events = events or []
    # climseg: those of the events in stop_events (the stop signal, for a command that runs on
    # another host through ssh) give the command the grace period to end by itself, and only
    # then terminate it. ssh passes no signal on: the remote ranks learn of the stop from the
    # local ones (a vote) and exit with their own status, which the ssh client exits with;
    # terminating the client at once read as 143. Meanwhile the other events do not cut the
    # grace period short (a local rank that stopped with status 3 sets "a rank failed").
    stop_events = stop_events or []
    stopping = threading.Event()

    def end_unless_stopping():
        if not stopping.is_set():
            exit_event.set()

    def end_if_not_ended_in_grace_period():
        # Waiting on the sentinel (readable once the middleman exits) does not reap the
        # middleman: middleman.join() below must, to read its status.
        from multiprocessing.connection import wait
        stopping.set()
        if not wait([middleman.sentinel], GRACEFUL_TERMINATION_TIME_S):
            sys.stderr.write("horovodrun: process %s (on another host) did not stop within "
                             "%g s; ending it\\n" % (index, GRACEFUL_TERMINATION_TIME_S))
            exit_event.set()

    for event in events:
        if event in stop_events:
            on_event(event, end_if_not_ended_in_grace_period, stop=stop, silent=True)
        else:
            on_event(event, end_unless_stopping, stop=stop, silent=True)
"""

STOP_EVENTS_OLD = "def register_shutdown_event():\n"
STOP_EVENTS_NEW = """# climseg: the events register_shutdown_event() made, set by a stop signal; a command on
# another host is given the grace period on them (safe_shell_exec.execute's stop_events).
_STOP_EVENTS = []


""" + STOP_EVENTS_OLD

REGISTER_OLD = "    signal.signal(signal.SIGTERM, set_event_on_signal)\n    return event\n"
REGISTER_NEW = ("    signal.signal(signal.SIGTERM, set_event_on_signal)\n"
                "    _STOP_EVENTS.append(event)\n    return event\n")

REMOTE_OLD = """        try:
            exit_code = safe_shell_exec.execute(command,
                                                index=index,
"""
REMOTE_NEW = """        # climseg: a command on another host (``ssh HOST COMMAND``) is not terminated at the
        # stop signal: its ssh client would die with 143 while its ranks stop cleanly; it is
        # given the grace period to end with their status (safe_shell_exec.execute).
        remote = host_address not in local_addresses
        stop_events = [ev for ev in all_events if remote and ev in _STOP_EVENTS]
        try:
            exit_code = safe_shell_exec.execute(command,
                                                stop_events=stop_events,
                                                index=index,
"""

STOPPED_OLD = "\n    for name, value in sorted(res.items(), key=lambda item: item[1][1]):\n"
STOPPED_NEW = """
    # climseg: after a stop signal, ranks that all stopped by themselves end with one status
    # (3): say so, rather than name the first of them as if it had failed the run. Ranks
    # killed (a second signal) are still reported as before.
    statuses = set(exit_code for exit_code, _ in res.values())
    if event.is_set() and len(statuses) == 1 and 0 < min(statuses) < 128:
        status = statuses.pop()
        raise ProcessFailed('stopped: all {n} processes exited with status {code}'
                            .format(n=len(res), code=status), status)

""" + STOPPED_OLD[1:]

FAILED_CLASS_OLD = "def _get_min_start_hosts(settings):\n"
FAILED_CLASS_NEW = """class ProcessFailed(RuntimeError):
    # climseg: a rank exited non-zero; horovodrun's command line reports it in one line and
    # exits with ``exit_code``, the first failed rank's status.
    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


""" + FAILED_CLASS_OLD


def _failed_raise(indent: str) -> tuple[str, str]:
    """The launcher's raise for a failed rank (static runs at ``indent``, elastic ones deeper),
    and the same raise of :class:`ProcessFailed` carrying the rank's status."""
    pad = indent + " " * len("raise RuntimeError(")
    old = (f"{indent}raise RuntimeError('Horovod detected that one or more processes exited "
           "with non-zero '\n"
           f"{pad}'status, thus causing the job to be terminated. The first process '\n"
           f"{pad}'to do so was:\\nProcess name: {{name}}\\nExit code: {{code}}\\n'\n"
           f"{pad}.format(name=name, code=exit_code))\n")
    new = (f"{indent}raise ProcessFailed('process {{name}} exited first, with status {{code}}; "
           "the other ranks were ended (a rank\\'s own error, if it gave one, is above)'\n"
           f"{indent}                    .format(name=name, code=exit_code), exit_code)\n")
    return old, new


RUN_OLD = "    _run(args)\n\n\nif __name__ == '__main__':\n"
RUN_NEW = """    # climseg: a failed rank has said why in its own output; say which rank ended the job in
    # one line and exit with its status (not a traceback and 1).
    from horovod.runner.gloo_run import ProcessFailed
    try:
        _run(args)
    except ProcessFailed as failed:
        sys.stderr.write("horovodrun: %s\\n" % failed)
        sys.exit(failed.exit_code if 0 < failed.exit_code < 256 else 1)


if __name__ == '__main__':
"""

EDITS = {
    "runner/common/util/safe_shell_exec.py": [(GRACE_OLD, GRACE_NEW), (WAIT_OLD, WAIT_NEW),
                                              (START_OLD, START_NEW),
                                              (FINALLY_OLD, FINALLY_NEW),
                                              (EXECUTE_OLD, EXECUTE_NEW),
                                              (EVENTS_OLD, EVENTS_NEW)],
    "runner/gloo_run.py": [(HANDLER_OLD, HANDLER_NEW), (FAILED_CLASS_OLD, FAILED_CLASS_NEW),
                           _failed_raise(" " * 12), _failed_raise(" " * 16),
                           (STOPPED_OLD, STOPPED_NEW), (STOP_EVENTS_OLD, STOP_EVENTS_NEW),
                           (REGISTER_OLD, REGISTER_NEW), (REMOTE_OLD, REMOTE_NEW)],
    "runner/launch.py": [(RUN_OLD, RUN_NEW)],
}


def patch(package: Path) -> None:
    """Apply :data:`EDITS` to the horovod package folder ``package``; ValueError naming the
    file when a text to replace is not there exactly once, and then no file is changed."""
    patched = {}
    for name, edits in EDITS.items():
        path = package / name
        text = path.read_text()
        for old, new in edits:
            if text.count(old) != 1:
                raise ValueError(f"{path}: expected the text {old.strip()[:60]!r} once, found it "
                                 f"{text.count(old)} times; is this horovod 0.28.1?")
            text = text.replace(old, new)
        patched[path] = text
    for path, text in patched.items():
        path.write_text(text)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/patch_horovod.py HOROVOD_PACKAGE_DIR", file=sys.stderr)
        return 2
    try:
        patch(Path(argv[0]))
    except (OSError, ValueError) as err:
        print(f"patch_horovod: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
