#!/usr/bin/env python
"""Check every data-*.h5 file under ROOT (and ROOT/stats.h5): header, shapes, NaN/inf, labels.

Prints one line per bad file and a summary. Exit status: 0 all good, 1 some file is bad,
2 nothing to check (no such folder, no files).

Example: python tools/check_data.py data/cam
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from climseg.data.check import check_tree  # noqa: E402
from climseg.data.format import DataError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a data-set root, split folder or file")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel worker processes (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        checked, problems = check_tree(args.root, args.workers, progress=not args.quiet)
    except DataError as err:
        print(f"check_data: error: {err}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    print(f"checked {checked} files under {args.root}: "
          f"{'all good' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
