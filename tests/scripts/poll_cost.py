"""What the stop vote costs per training step: a blocking allreduce of the flags at every
step against climseg's AnyRankPoll (started at one step, read at the next).

Usage: horovodrun -np 2 -H localhost:2 --gloo python tests/scripts/poll_cost.py [STEPS] [WORK_MS] [busy|sleep]
Each "step" is WORK_MS of work, a stand-in for the forward/backward pass: ``busy`` spins the
CPU (a CPU run), ``sleep`` leaves it idle (a GPU run, whose host thread mostly waits). The
figures are the extra time per step over the work alone, on rank 0.
"""

import sys
import time

import torch

from climseg import dist


def busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    work = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    mode = sys.argv[3] if len(sys.argv) > 3 else "busy"
    do_work = busy if mode == "busy" else (lambda ms: time.sleep(ms / 1000))
    dist.init()

    def timed(step_fn) -> float:
        dist.allreduce_sum(torch.zeros(1), name="sync_before")
        start = time.perf_counter()
        for _ in range(steps):
            do_work(work)
            step_fn()
        return (time.perf_counter() - start) / steps * 1000 - work

    none = timed(lambda: None)
    flags = torch.zeros(2, dtype=torch.int32)
    blocking = timed(lambda: dist.allreduce_sum(flags, name="blocking_vote"))
    poll = dist.AnyRankPoll("lagged_vote")
    lagged = timed(lambda: poll.exchange([0, 0]))
    poll.drain()
    if dist.is_primary():
        print(f"{dist.size()} ranks, {steps} steps of {work:.0f} ms {mode} work; extra ms per step: "
              f"no vote {none:.3f}, blocking allreduce {blocking:.3f}, "
              f"AnyRankPoll {lagged:.3f}")


if __name__ == "__main__":
    main()
