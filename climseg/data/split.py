"""Split a folder of samples into ``ROOT/train``, ``ROOT/validation``, ``ROOT/test``.

The reference's algorithm: sort the file names, shuffle them with a seeded generator, take the
first 80 % for training, the next 10 % for validation and the rest for test. Each split folder
is built under a temporary name and renamed into place, so a failure leaves no half-made split.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from climseg.data.format import DataError, Progress
from climseg.data.partition import INDEX_NAME, list_files

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 12345


def split_names(names: list[str], fractions=DEFAULT_FRACTIONS,
                seed: int = DEFAULT_SEED) -> dict[str, list[str]]:
    """Assign file names to the splits: sort, seeded shuffle, then cut by ``fractions``.

    Train and validation get ``floor(fraction * n)`` files; test gets the rest.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"fractions {fractions} must be {len(SPLITS)} non-negative numbers "
                        "summing to 1")
    ordered = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in perm]
    n_train = int(np.floor(fractions[0] * len(shuffled) + 1e-9))
    n_val = int(np.floor(fractions[1] * len(shuffled) + 1e-9))
    return {"train": sorted(shuffled[:n_train]),
            "validation": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def split_dataset(input_dir: str | os.PathLike, output_root: str | os.PathLike,
                  fractions=DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED, copy: bool = False,
                  force: bool = False, progress: bool = False) -> dict[str, int]:
    """Create the split folders as symlinks to (or copies of) the input files; return counts.

    Refuses to touch a non-empty split folder unless ``force``, which replaces it.
    """
    input_dir = Path(input_dir)
    output_root = Path(output_root)
    files = list_files(input_dir)
    if (input_dir / INDEX_NAME).exists():
        raise DataError(f"{input_dir}: is a staged split (has {INDEX_NAME}); split the "
                        "original folder instead")
    assignment = split_names([p.name for p in files], fractions, seed)

    for split in SPLITS:
        target = output_root / split
        if target.exists() and not target.is_dir():
            raise DataError(f"{target}: exists and is not a folder")
        if target.exists() and not _is_empty_dir(target) and not force:
            raise DataError(f"{target}: folder is not empty; use --force to replace it")
    output_root.mkdir(parents=True, exist_ok=True)

    source = input_dir.resolve()
    bar = Progress(len(files), "copying" if copy else "linking", enabled=progress)
    for split in SPLITS:
        target = output_root / split
        tmp = output_root / f".{split}.tmp{os.getpid()}"
        old = output_root / f".{split}.old{os.getpid()}"
        try:
            tmp.mkdir()
            for name in assignment[split]:
                if copy:
                    shutil.copyfile(source / name, tmp / name)
                else:
                    os.symlink(source / name, tmp / name)
                bar.update()
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not target.exists():
                os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    return {split: len(assignment[split]) for split in SPLITS}
