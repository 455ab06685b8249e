#!/usr/bin/env python
"""Copy each rank's files onto node-local storage: run one process per rank.

Rank r of n copies files[r::n] of every --splits folder (the files it will train on), plus
stats.h5, into DEST, and writes DEST/<split>/index.txt (the full file list) so that the
trainer's partition of DEST/<split> is exactly the staged files. Rank and size come from
horovodrun, Open MPI, MPICH/PMI or Slurm variables.

Example: horovodrun -np 4 python tools/stage_data.py --source /lustre/cam --dest /dev/shm/cam
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from climseg.data.format import DataError  # noqa: E402
from climseg.data.stage import StageResult, stage_dataset  # noqa: E402
from climseg.data.summarize import launcher_reducer  # noqa: E402
from climseg.dist import launcher_rank_size  # noqa: E402

log = logging.getLogger("stage_data")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, type=Path, help="data-set root to read")
    parser.add_argument("--dest", required=True, type=Path, help="node-local folder to fill")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"],
                        help="splits to stage (default: train validation)")
    parser.add_argument("--workers", type=int, default=4, help="copy threads (default 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        rank, size, _ = launcher_rank_size()
    except RuntimeError as err:
        print(f"stage_data: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reduce = None
    if size > 1:
        try:   # a communicator only for the aggregate rate; staging itself needs none
            _, _, reduce = launcher_reducer(size)
        except DataError as err:
            log.info("rank %d: no aggregate rate (%s)", rank, err)
    error = None
    try:
        result = stage_dataset(args.source, args.dest, args.splits, rank, size, args.workers,
                               progress=not args.quiet and rank == 0)
    except DataError as err:
        error, result = err, StageResult()
        print(f"stage_data: rank {rank}: error: {err}", file=sys.stderr)
    if error is None:
        rate = result.bytes_copied / result.seconds / 1e9 if result.seconds > 0 else 0.0
        log.info("rank %d/%d: copied %d files (%.3f GB), skipped %d already staged, in %.2f s: "
                 "%.3f GB/s", rank, size, result.copied, result.bytes_copied / 1e9,
                 result.skipped, result.seconds, rate)
    failed = error is not None
    if reduce is not None:   # every rank reaches these collectives, failed or not
        sums = reduce(np.array([float(failed), float(result.bytes_copied)]), "sum")
        slowest = float(reduce(np.array([result.seconds]), "max")[0])
        failed = sums[0] > 0
        if rank == 0 and not failed:
            log.info("all %d ranks: copied %.3f GB in %.2f s: %.3f GB/s aggregate", size,
                     sums[1] / 1e9, slowest, sums[1] / slowest / 1e9 if slowest > 0 else 0.0)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
