#!/usr/bin/env python
"""Generate a synthetic CAM5-like data set: data-YYYY-MM-DD-HH-N.h5 files in --out.

Example:
  python tools/make_synthetic.py --out data/raw --samples 64 --seed 1 --height 192 --width 288
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from climseg.data.format import HEIGHT, WIDTH, DataError  # noqa: E402
from climseg.data.synthetic import generate_dataset  # noqa: E402

log = logging.getLogger("make_synthetic")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--samples", required=True, type=int, help="number of sample files")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--height", type=int, default=HEIGHT, help=f"rows (default {HEIGHT})")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"columns (default {WIDTH})")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="generator processes (default: CPU count, at most 8)")
    parser.add_argument("--force", action="store_true",
                        help="delete data-*.h5 files already in --out first")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        start = time.perf_counter()
        paths = generate_dataset(args.out, args.samples, args.seed, height=args.height,
                                 width=args.width, progress=not args.quiet,
                                 force=args.force, workers=args.workers)
        seconds = time.perf_counter() - start
    except (DataError, OSError) as err:
        print(f"make_synthetic: error: {err}", file=sys.stderr)
        return 2
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    log.info("wrote %d samples (%.1f MB) to %s in %.1f s: %.1f MB/s", len(paths), megabytes,
             args.out, seconds, megabytes / seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
