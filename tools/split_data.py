#!/usr/bin/env python
"""Split a folder of data-*.h5 samples into OUTPUT/train, OUTPUT/validation, OUTPUT/test.

The reference's algorithm: sort the names, shuffle with --seed, cut 80/10/10 (--fractions).
Split folders hold symlinks to the input files (or copies with --copy).

Example: python tools/split_data.py --input data/raw --output data/cam
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from climseg.data.format import DataError  # noqa: E402
from climseg.data.split import DEFAULT_FRACTIONS, DEFAULT_SEED, split_dataset  # noqa: E402

log = logging.getLogger("split_data")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="folder of data-*.h5 files")
    parser.add_argument("--output", required=True, type=Path, help="data-set root to create")
    parser.add_argument("--fractions", type=float, nargs=3, default=DEFAULT_FRACTIONS,
                        metavar=("TRAIN", "VAL", "TEST"), help="default 0.8 0.1 0.1")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"shuffle seed (default {DEFAULT_SEED})")
    parser.add_argument("--copy", action="store_true", help="copy files instead of symlinks")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--force", action="store_true",
                        help="replace split folders that are not empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = split_dataset(args.input, args.output, args.fractions, args.seed,
                               copy=args.copy, force=args.force,
                               progress=args.copy and not args.quiet)
    except (DataError, OSError) as err:
        print(f"split_data: error: {err}", file=sys.stderr)
        return 2
    how = "copies" if args.copy else "symlinks"
    log.info("split %d files into %s (%s): %s", sum(counts.values()), args.output, how,
             ", ".join(f"{split} {n}" for split, n in counts.items()))
    if (args.output / "stats.h5").exists():
        log.info("note: %s is from before this split; rerun tools/summarize_data.py",
                 args.output / "stats.h5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
