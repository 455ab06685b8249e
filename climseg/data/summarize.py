"""Per-channel statistics of a split, in one process or spread over ranks.

Each rank accumulates float64 sums over its rank-strided partition of the files; the sums are
then added over ranks (:func:`climseg.dist.array_reducer`: mpi4py, or Horovod under
``horovodrun --gloo``) so the result is the same, up to float64 rounding, for any number of
ranks. Rank 0 writes ``stats.h5`` atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np

from climseg import dist
from climseg.data.format import DATA_KEY, DataError, Progress, read_sample
from climseg.data.partition import list_files, rank_partition
from climseg.data.stats import STATS_NAME, Stats, StatsAccumulator, write_stats

Reducer = dist.ArrayReducer


def _single(values: np.ndarray, op: str) -> np.ndarray:
    return values


def accumulate_files(files: list[Path], progress: bool = False) -> StatsAccumulator:
    """Float64 statistics over ``files`` (all of them; partition first if distributed)."""
    acc = StatsAccumulator()
    bar = Progress(len(files), "summarizing", enabled=progress)
    for path in files:
        data, _ = read_sample(path)
        one = StatsAccumulator(data.shape[-1])
        one.add(data)
        if not (np.isfinite(one.sum).all() and np.isfinite(one.sqsum).all()):
            raise DataError(f"{path}: '{DATA_KEY}' contains NaN or inf values "
                            "(tools/check_data.py lists every bad file)")
        acc.merge(one)
        bar.update()
    return acc


def reduce_accumulator(acc: StatsAccumulator, reduce: Reducer) -> StatsAccumulator:
    """``acc`` summed over ranks with ``reduce``; every rank must call it."""
    sums = reduce(np.concatenate([[acc.samples, acc.pixels], acc.sum, acc.sqsum])
                  .astype(np.float64), "sum")
    minval = reduce(acc.minval.copy(), "min")
    maxval = reduce(acc.maxval.copy(), "max")
    c = acc.sum.size
    out = StatsAccumulator(c)
    out.samples, out.pixels = int(round(sums[0])), int(round(sums[1]))
    out.sum, out.sqsum = sums[2:2 + c], sums[2 + c:]
    out.minval, out.maxval = minval, maxval
    return out


def summarize_split(root: str | os.PathLike, split: str = "train", rank: int = 0,
                    size: int = 1, reduce: Reducer = _single,
                    progress: bool = True) -> Stats:
    """Statistics of ``ROOT/<split>``; rank 0 writes ``ROOT/stats.h5``; every rank returns them."""
    root = Path(root)
    files = list_files(root / split)
    mine = rank_partition(files, rank, size)
    error = None
    try:
        acc = accumulate_files(mine, progress=progress and rank == 0)
    except DataError as err:
        error, acc = err, StatsAccumulator()
    # Every rank reaches every collective, also when one of them hit a bad file.
    failed = reduce(np.array([1.0 if error else 0.0]), "sum")[0]
    if error is not None:
        raise error
    if failed:
        raise DataError(f"{root / split}: another rank found a bad file (see its message)")
    stats = reduce_accumulator(acc, reduce).result()
    if rank == 0:
        write_stats(root / STATS_NAME, stats)
        stats.path = str(root / STATS_NAME)
    return stats


def launcher_reducer(size: int, environ: dict[str, str] | None = None):
    """(rank, size, reducer) for a launch of ``size`` ranks: see :func:`climseg.dist.array_reducer`."""
    try:
        return dist.array_reducer(size, environ)
    except RuntimeError as err:
        raise DataError(str(err)) from None
