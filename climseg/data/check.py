"""Scan sample files for every problem the loader would hit: a full read, not just the header.

Per file: HDF5 header (keys, shapes, dtypes), a shape equal to the other files', NaN/inf in the
data, label values outside {0, 1, 2}. Files are checked in parallel worker processes (h5py
serializes threads, so processes are what makes this parallel).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from climseg.data.format import CHANNELS, DATA_KEY, FILE_GLOB, DataError, Progress, read_sample
from climseg.data.stats import STATS_NAME, read_stats


def check_file(path: str | os.PathLike) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, None) for a good file, (shape or None, problem line) for a bad one."""
    path = Path(path)
    try:
        data, _ = read_sample(path)   # header, labels in {0, 1, 2}
    except DataError as err:
        return None, str(err)
    finite = np.isfinite(data).all(axis=(0, 1))
    if not finite.all():
        bad = [CHANNELS[i] for i in np.flatnonzero(~finite)]
        return data.shape, f"{path}: '{DATA_KEY}' contains NaN or inf in channel(s) " \
                           f"{', '.join(bad)}"
    return data.shape, None


def find_files(root: str | os.PathLike) -> list[Path]:
    """Sample files under ``root`` (a split folder, a data-set root, or a single file)."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder")
    files = sorted(root.rglob(FILE_GLOB))
    if not files:
        raise DataError(f"{root}: no {FILE_GLOB} files found")
    return files


def check_stats(path: Path) -> str | None:
    """The problem of a stats.h5 file (unreadable, or channels with zero range), or None."""
    try:
        stats = read_stats(path)
    except DataError as err:
        return str(err)
    flat = [name for i, name in enumerate(CHANNELS) if not stats.maxval[i] > stats.minval[i]]
    if flat:
        return f"{path}: zero range (maxval == minval) in channel(s) {', '.join(flat)}"
    return None


def check_tree(root: str | os.PathLike, workers: int | None = None,
               progress: bool = True) -> tuple[int, list[str]]:
    """(number of files checked, problem lines) for every sample under ``root`` and its stats.h5."""
    files = find_files(root)
    workers = workers or min(len(files), os.cpu_count() or 1)
    results = []
    bar = Progress(len(files), "checking", enabled=progress)
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        for result in pool.map(check_file, files,
                               chunksize=max(1, len(files) // (8 * workers))):
            results.append(result)
            bar.update()
    # The shape most files have is the data set's; a file with another is bad.
    shapes = Counter(shape for shape, problem in results if problem is None)
    common = shapes.most_common(1)[0][0] if shapes else None
    problems: list[str] = []
    for path, (shape, problem) in zip(files, results):
        if problem:
            problems.append(problem)
        elif shape != common:
            problems.append(f"{path}: shape {shape} differs from {common} of the other files")
    stats = Path(root) / STATS_NAME
    if Path(root).is_dir() and stats.exists():
        problem = check_stats(stats)
        if problem:
            problems.append(problem)
    return len(files), problems
