"""``climseg bench {step,loader,train,allreduce}``: how fast the step, the loader, the trainer run.

* ``step``: forward + backward + optimizer step on a synthetic batch resident on the device
  (bf16 autocast and channels_last on CUDA by default; ``--compile`` reports compile time).
* ``loader``: climseg's :class:`BatchLoader` and the reference-style read path (a torch
  DataLoader whose worker processes do h5py read, transpose to CHW and normalize per sample,
  collated by the default collate) on the same files, side by side and interleaved, several
  thread/worker counts each; the reference is scored by its best worker count.
* ``allreduce``: the gradient allreduce alone across the launched ranks, Horovod or torch,
  fusion and fp16 on or off: time per round and bus bandwidth (:mod:`climseg.bench.allreduce`).
* ``train``: the real trainer (:func:`climseg.train.train`) for N steps on staged files, with
  the time each step waits on the loader measured from outside.

Each prints one table (samples/s, ms per step, MB/s read, data-wait share, peak memory,
TFLOP/s) and, with ``--output PATH`` (formerly ``--json``), writes it as JSON. Tiny sizes
run in seconds on a CPU, so CI smoke-tests every mode.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from climseg import dist
from climseg.atomic import atomic_path
from climseg.cli import fail
from climseg.bench.allreduce import allreduce_mode, format_summary
from climseg.bench.common import environment, format_table, parse_args
from climseg.bench.loader import loader_mode
from climseg.bench.step import step_mode
from climseg.bench.train import train_mode
from climseg.errors import RUN_ERRORS, DivergenceError, RunError

MODES = {"step": step_mode, "loader": loader_mode, "train": train_mode,
         "allreduce": allreduce_mode}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        results, summary = MODES[args.mode](args)
    except RUN_ERRORS + (RunError, DivergenceError) as err:   # bench train: the trainer's
        return fail(f"bench {args.mode}", str(err))
    if args.mode == "allreduce":
        if not dist.is_primary():
            return 0
        print(format_summary(summary))
    else:
        print(format_table(results))
    if args.mode == "loader" and "speedup" in summary:
        print(f"climseg best ({summary['climseg_best']}) / reference best "
              f"({summary['reference_best']}): {summary['speedup']:.2f}x (medians); per repeat: "
              + ", ".join(f"{s:.2f}x" for s in summary["speedup_per_repeat"]))
    if args.output:
        record = {"mode": args.mode, "argv": sys.argv if argv is None else argv,
                  "environment": environment(), "summary": summary,
                  "results": [asdict(r) for r in results]}
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(args.output)) as tmp:
                tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        except OSError as err:
            return fail(f"bench {args.mode}", f"{args.output}: cannot write the results: "
                                              f"{err.strerror or err}")
    return 0
