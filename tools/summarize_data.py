#!/usr/bin/env python
"""Per-channel statistics of ROOT/<split> into ROOT/stats.h5 (float64, written atomically).

Runs alone or in parallel: mpirun -n 4 / srun / horovodrun -np 4 python tools/summarize_data.py
--data ROOT. The result is the same whatever the number of ranks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from climseg.data.format import CHANNELS, DataError  # noqa: E402
from climseg.data.summarize import launcher_reducer, summarize_split  # noqa: E402
from climseg.dist import launcher_rank_size  # noqa: E402

log = logging.getLogger("summarize_data")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="data-set root")
    parser.add_argument("--split", default="train", help="split to summarize (default train)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        _, size, _ = launcher_rank_size()
        rank, size, reduce = launcher_reducer(size)
    except (DataError, RuntimeError) as err:
        print(f"summarize_data: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s")
    try:
        stats = summarize_split(args.data, args.split, rank, size, reduce,
                                progress=not args.quiet)
    except DataError as err:
        print(f"summarize_data: rank {rank}: error: {err}", file=sys.stderr)
        return 2
    log.info("%-7s %14s %14s %14s %14s", "channel", "min", "max", "mean", "std")
    for i, name in enumerate(CHANNELS):
        log.info("%-7s %14.6g %14.6g %14.6g %14.6g", name, stats.minval[i], stats.maxval[i],
                 stats.mean[i], stats.std[i])
    log.info("statistics of %d samples of %s (%d rank(s)) written to %s", stats.count,
             args.data / args.split, size, stats.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
