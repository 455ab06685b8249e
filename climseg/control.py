"""How the ranks of a run agree: on stopping (SIGTERM/SIGUSR1, voted one step late) and on
errors (one rank's one-line error raised on every rank)."""

from __future__ import annotations

import contextlib
import signal

from climseg import dist
from climseg.errors import RUN_ERRORS, RunError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's time limit and its ``--signal=USR1@N`` warning) only set a
    flag here; the training loop acts on it at a step boundary, once every rank agrees."""

    def __init__(self):
        self.received: dict[int, int] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Nothing else is safe here: the main thread may be inside a collective.
        self.received[signum] = self.received.get(signum, 0) + 1

    def flags(self) -> list[int]:
        return [int(sig in self.received) for sig in STOP_SIGNALS]


SIGNALS = StopSignals()


class StopVote:
    """Whether any rank was asked to stop, agreed by every rank.

    The vote is an asynchronous allreduce started at one step boundary and read at the next:
    by then it has long finished, so the loop never waits for it, and since every rank reads
    the same vote at the same step, all stop at the same step."""

    def __init__(self, signals: StopSignals = SIGNALS):
        self.signals = signals
        self.reset()

    def reset(self) -> None:
        """A new vote (after an elastic reset: a vote in flight died with it)."""
        self._poll = dist.AnyRankPoll("stop_poll")
        self.save_voted = False

    def poll(self, size: int, save_due: bool = False) -> str | None:
        """Why the run must stop (e.g. ``stopped by SIGTERM (1 of 2 ranks)``), or None.

        The same vote carries ``save_due`` (rank 0's clock says a checkpoint is due): after the
        call, ``save_voted`` tells whether any rank said so at the previous call, the same on
        every rank, so the ranks agree on a time-based save without a collective of its own."""
        votes = self._poll.exchange(self.signals.flags() + [int(save_due)])
        self.save_voted = bool(votes and votes[-1])
        stops = (votes or [])[:len(STOP_SIGNALS)]
        if not any(stops):
            return None
        # The vote just started holds the flags of this boundary, a step after the ones read:
        # a signal that reached another rank during that step (srun and horovodrun signal the
        # ranks one by one) is counted too. Every rank decides to stop here alike, so every
        # rank waits on it; nothing is left in flight.
        now = self._poll.take() or stops
        stops = [max(then, later) for then, later in zip(stops, now)]
        names = [f"{signal.Signals(sig).name} ({n} of {size} ranks)"
                 for sig, n in zip(STOP_SIGNALS, stops) if n]
        return "stopped by " + ", ".join(names)

    def drain(self) -> None:
        self._poll.drain()


@contextlib.contextmanager
def every_rank_agrees(name: str):
    """Run the block on every rank, then agree (one allgather) on whether any rank failed with
    a run error: if one did, every rank raises the same one-line error, so no rank is left
    waiting in a collective and none prints a traceback. Only for blocks without collectives."""
    err = None
    try:
        yield
    except RUN_ERRORS as caught:
        err = caught
    found = dist.allgather_object(None if err is None else str(err), name=f"agree_{name}")
    first = next((m for m in found if m is not None), None)
    if first is None:
        return
    if err is not None and str(err) == first:
        raise err
    raise RunError(first)
