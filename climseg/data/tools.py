"""The data tools' command lines: ``climseg make-synthetic | split | summarize | check | stage``.

The work itself is in the library modules (synthetic, split, summarize, check, stage); this
module only parses arguments, sets up logging and turns a bad input into one line and exit
status 2. ``tools/*.py`` are aliases of these functions, so older command lines keep working:
their flag spellings (``--out``, ``--input``, ``--source``, ``--dest``, check's positional
root) are accepted, while the help shows the common names ``--data`` and ``--output``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from climseg.cli import ArgumentParser, fail
from climseg.logs import setup_logging

log = logging.getLogger("climseg.data.tools")


def make_synthetic_main(argv: list[str] | None = None) -> int:
    from climseg.data.format import HEIGHT, WIDTH, DataError
    from climseg.data.synthetic import generate_dataset

    p = ArgumentParser("make-synthetic", description=(
        "Generate a synthetic CAM5-like data set: data-YYYY-MM-DD-HH-N.h5 files in --output.\n\n"
        "Example:\n  climseg make-synthetic --output data/raw --samples 64 --seed 1 "
        "--height 192 --width 288"))
    p.add_option("--output", "--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--samples", required=True, type=int, help="number of sample files")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, default=HEIGHT, help=f"rows (default {HEIGHT})")
    p.add_argument("--width", type=int, default=WIDTH, help=f"columns (default {WIDTH})")
    p.add_workers("generator processes, each writing one sample at a time",
                  min(8, os.cpu_count() or 1), shown="CPU count, at most 8")
    p.add_argument("--force", action="store_true",
                   help="delete data-*.h5 files already in --output first")
    p.add_quiet()
    args = p.parse_args(argv)
    setup_logging(quiet=args.quiet)
    try:
        start = time.perf_counter()
        paths = generate_dataset(args.output, args.samples, args.seed, height=args.height,
                                 width=args.width, progress=not args.quiet,
                                 force=args.force, workers=args.workers)
        seconds = time.perf_counter() - start
    except (DataError, OSError) as err:
        return fail("make-synthetic", str(err))
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    log.info("wrote %d samples (%.1f MB) to %s in %.1f s: %.1f MB/s", len(paths), megabytes,
             args.output, seconds, megabytes / max(seconds, 1e-9))
    return 0


def split_main(argv: list[str] | None = None) -> int:
    from climseg.data.format import DataError
    from climseg.data.split import DEFAULT_FRACTIONS, DEFAULT_SEED, split_dataset

    p = ArgumentParser("split", description=(
        "Split a folder of data-*.h5 samples into OUTPUT/train, OUTPUT/validation, OUTPUT/test.\n"
        "\nThe reference's algorithm: sort the names, shuffle with --seed, cut 80/10/10 "
        "(--fractions).\nSplit folders hold symlinks to the input files (or copies with --copy)."
        "\n\nExample: climseg split --data data/raw --output data/cam"))
    p.add_option("--data", "--input", type=Path, required=True,
                 help="folder of data-*.h5 files")
    p.add_option("--output", type=Path, required=True, help="data-set root to create")
    p.add_argument("--fractions", type=float, nargs=3, default=DEFAULT_FRACTIONS,
                   metavar=("TRAIN", "VAL", "TEST"), help="default 0.8 0.1 0.1")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"shuffle seed (default {DEFAULT_SEED})")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinks")
    p.add_argument("--force", action="store_true",
                   help="replace split folders that are not empty")
    p.add_quiet()
    args = p.parse_args(argv)
    setup_logging(quiet=args.quiet)
    try:
        counts = split_dataset(args.data, args.output, args.fractions, args.seed,
                               copy=args.copy, force=args.force,
                               progress=args.copy and not args.quiet)
    except (DataError, OSError) as err:
        return fail("split", str(err))
    how = "copies" if args.copy else "symlinks"
    log.info("split %d files into %s (%s): %s", sum(counts.values()), args.output, how,
             ", ".join(f"{split} {n}" for split, n in counts.items()))
    if (args.output / "stats.h5").exists():
        log.warning("note: %s is from before this split; rerun climseg summarize --data %s",
                    args.output / "stats.h5", args.output)
    return 0


def summarize_main(argv: list[str] | None = None) -> int:
    from climseg.data.format import CHANNELS, DataError
    from climseg.data.summarize import launcher_reducer, summarize_split
    from climseg.dist import launcher_rank_size

    p = ArgumentParser("summarize", description=(
        "Per-channel statistics of DATA/<split> into DATA/stats.h5 (float64, written "
        "atomically).\nThe table goes to stdout, progress to stderr.\n\nRuns alone or in parallel, with the same "
        "result whatever the number of ranks:\n  mpirun -n 4 / srun / horovodrun -np 4 --gloo "
        "climseg summarize --data ROOT"))
    p.add_option("--data", required=True, type=Path, help="data-set root")
    p.add_argument("--split", default="train", help="split to summarize (default train)")
    p.add_quiet()
    args = p.parse_args(argv)
    try:
        _, size, _ = launcher_rank_size()
        rank, size, reduce = launcher_reducer(size)
    except (DataError, RuntimeError) as err:
        return fail("summarize", str(err))
    setup_logging(rank, size, quiet=args.quiet)
    try:
        stats = summarize_split(args.data, args.split, rank, size, reduce,
                                progress=not args.quiet)
    except DataError as err:
        return fail("summarize", f"rank {rank}: {err}" if size > 1 else str(err))
    if rank == 0:
        print(f"{'channel':<7} {'min':>14} {'max':>14} {'mean':>14} {'std':>14}")
        for i, name in enumerate(CHANNELS):
            print(f"{name:<7} {stats.minval[i]:14.6g} {stats.maxval[i]:14.6g} "
                  f"{stats.mean[i]:14.6g} {stats.std[i]:14.6g}")
        print(f"statistics of {stats.count} samples of {args.data / args.split} "
              f"({size} rank(s)) written to {stats.path}")
    return 0


def check_main(argv: list[str] | None = None) -> int:
    from climseg.data.check import check_tree
    from climseg.data.format import DataError

    p = ArgumentParser("check", description=(
        "Check every data-*.h5 file under --data (and its stats.h5): header, shapes, NaN/inf, "
        "labels.\n\nPrints one line per bad file and a summary on stdout. Exit status: 0 all "
        "good, 1 some\nfile is bad, 2 nothing to check (no such folder, no files).\n\n"
        "Example: climseg check --data data/cam"))
    p.show_required(p.add_option("--data", type=Path,
                                 help="a data-set root, split folder or file (required)"))
    # The older spelling: the root as a positional argument.
    p.add_argument("root", nargs="?", type=Path, help=argparse.SUPPRESS)
    p.add_workers("checking processes", None)
    p.add_quiet()
    args = p.parse_args(argv)
    if args.data is not None and args.root is not None and args.data != args.root:
        p.error(f"two data roots given: --data {args.data} and {args.root}")
    root = args.data if args.data is not None else args.root
    if root is None:
        p.error("the following arguments are required: --data")
    setup_logging(quiet=args.quiet)
    try:
        checked, problems = check_tree(root, args.workers, progress=not args.quiet)
    except DataError as err:
        return fail("check", str(err))
    for line in problems:
        print(line)
    print(f"checked {checked} files under {root}: "
          f"{'all good' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _stage_reducer(rank: int, size: int):
    """A communicator for the aggregate rate only (staging itself takes its rank from the
    launcher's variables and needs none), or None with a warning naming why there is none."""
    from climseg.data.format import DataError
    from climseg.data.summarize import launcher_reducer

    env = os.environ
    if "SLURM_PROCID" in env and not any(k in env for k in (
            "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "RANK")):
        # srun without an MPI plugin: every task would see an MPI (or Horovod) world of one.
        if rank == 0:
            log.warning("no aggregate rate: srun started the ranks without an MPI plugin "
                        "(srun --mpi=pmi2 gives one); each rank staged its files all the same")
        return None
    try:
        return launcher_reducer(size)[2]
    except DataError as err:
        log.warning("rank %d: no aggregate rate (%s)", rank, err)
        return None


def stage_main(argv: list[str] | None = None) -> int:
    import numpy as np

    from climseg.data.format import DataError
    from climseg.data.stage import StageResult, stage_dataset
    from climseg.dist import launcher_rank_size

    p = ArgumentParser("stage", description=(
        "Copy each rank's files onto node-local storage: run one process per rank.\n\n"
        "Rank r of n copies files[r::n] of every --splits folder (the files it will train on), "
        "plus\nstats.h5, into --output, and writes OUTPUT/<split>/index.txt (the full file "
        "list) so that\nthe trainer's partition of OUTPUT/<split> is exactly the staged files. "
        "Rank and size come\nfrom horovodrun, Open MPI, MPICH/PMI or Slurm variables.\n\n"
        "Example (the Gloo controller works with every `make install`):\n"
        "  horovodrun -np 4 --gloo climseg stage --data /lustre/cam --output /dev/shm/cam\n\n"
        "--per-node copies the whole of each split once per node instead (the node's local "
        "rank 0\ncopies, the others wait for the launch to end): for elastic runs, or to "
        "train with any rank\nlayout. Example: srun --ntasks-per-node=1 climseg stage "
        "--per-node ..."))
    p.add_option("--data", "--source", required=True, type=Path, help="data-set root to read")
    p.add_option("--output", "--dest", required=True, type=Path,
                 help="node-local folder to fill")
    p.add_argument("--splits", nargs="+", default=["train", "validation"],
                   help="splits to stage (default: train validation)")
    p.add_workers("copy threads", 4)
    p.add_argument("--force", action="store_true",
                   help="empty --output first when it was staged from another source (or "
                        "holds files no stage recorded); without it such a folder is refused")
    p.add_argument("--per-node", action="store_true",
                   help="copy every file of the splits once per node (local rank 0 copies), "
                        "not each rank's share")
    p.add_quiet()
    args = p.parse_args(argv)
    try:
        rank, size, local = launcher_rank_size()
    except RuntimeError as err:
        return fail("stage", str(err))
    setup_logging(rank, size, quiet=args.quiet)
    reduce = _stage_reducer(rank, size) if size > 1 else None
    error, result = None, StageResult()
    try:
        if not args.per_node or local == 0:
            result = stage_dataset(args.data, args.output, args.splits, rank, size,
                                   args.workers, progress=not args.quiet and rank == 0,
                                   force=args.force, whole=args.per_node)
    except DataError as err:
        error = err
        fail("stage", f"rank {rank}: {err}")
    if error is None:
        # Each rank copied its own files: its line is a result (stdout), on every rank.
        rate = result.bytes_copied / result.seconds / 1e9 if result.seconds > 0 else 0.0
        print(f"rank {rank}/{size}: copied {result.copied} files "
              f"({result.bytes_copied / 1e9:.3f} GB), skipped {result.skipped} already staged, "
              f"in {result.seconds:.2f} s: {rate:.3f} GB/s", flush=True)
    failed = error is not None
    if reduce is not None:   # every rank reaches these collectives, failed or not
        sums = reduce(np.array([float(failed), float(result.bytes_copied)]), "sum")
        slowest = float(reduce(np.array([result.seconds]), "max")[0])
        failed = sums[0] > 0
        if rank == 0 and not failed:
            rate = sums[1] / slowest / 1e9 if slowest > 0 else 0.0
            print(f"all {size} ranks: copied {sums[1] / 1e9:.3f} GB in {slowest:.2f} s: "
                  f"{rate:.3f} GB/s aggregate", flush=True)
    return 2 if failed else 0
