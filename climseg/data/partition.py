"""Which files a rank reads, and in which order: one definition for trainer and stager alike.

A split folder holds ``data-*.h5`` files. A *staged* split (``tools/stage_data.py``) holds only
the files of the ranks on that node, plus ``index.txt`` listing the full sorted file list of the
source split; :func:`list_files` returns that full list so that rank ``r`` of ``n`` still gets
``files[r::n]`` of the global list, exactly the files staged for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from climseg.data.format import FILE_GLOB, DataError

INDEX_NAME = "index.txt"
# A staged data-set root's record of its source (climseg.data.stage): its presence marks every
# split folder under it as staged, complete only once its index.txt is written.
RECORD_NAME = "staged.json"


def read_index(split_dir: str | os.PathLike) -> list[str] | None:
    """File names listed in ``split_dir/index.txt`` (sorted), or None if there is no index."""
    index = Path(split_dir) / INDEX_NAME
    if not index.exists():
        return None
    names = [line.strip() for line in index.read_text().splitlines() if line.strip()]
    for name in names:
        if "/" in name or os.sep in name or not Path(name).match(FILE_GLOB):
            raise DataError(f"{index}: bad entry '{name}' (expected a file name like "
                            f"{FILE_GLOB})")
    if len(set(names)) != len(names):
        raise DataError(f"{index}: lists a file more than once")
    if not names:
        raise DataError(f"{index}: lists no files")
    return sorted(names)


def list_files(split_dir: str | os.PathLike) -> list[Path]:
    """The split's sample files, sorted by name; from ``index.txt`` when the split is staged."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found")
    names = read_index(split_dir)
    if names is not None:
        return [split_dir / name for name in names]
    if (split_dir.parent / RECORD_NAME).exists():
        raise DataError(f"{split_dir}: its staging did not finish (no {INDEX_NAME}); run "
                        "climseg stage again (it skips the files already copied)")
    files = sorted(split_dir.glob(FILE_GLOB), key=lambda p: p.name)
    if not files:
        raise DataError(f"{split_dir}: no {FILE_GLOB} files in folder")
    return files


def rank_partition(files: list, rank: int, size: int) -> list:
    """Rank ``rank`` of ``size``'s files: the rank-strided slice ``files[rank::size]``.

    In a staged split (one with ``index.txt``) every file of the slice must be present: a
    missing one means the node was staged for a different rank layout.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside 0..{size - 1}")
    mine = list(files[rank::size])
    if mine and (Path(mine[0]).parent / INDEX_NAME).exists():
        for path in mine:
            if not Path(path).exists():
                raise DataError(f"{path}: not staged here (needed by rank {rank} of {size}); "
                                + _layout_hint(Path(path).parent.parent, rank, size))
    return mine


def _layout_hint(root: Path, rank: int, size: int) -> str:
    """What differs between the layout this node was staged for (``staged.json``, see
    climseg.data.stage) and the training launch's: the number of ranks or their placement."""
    try:
        layout = json.loads((root / RECORD_NAME).read_text()).get("layout") or {}
    except (OSError, ValueError, AttributeError):
        layout = {}
    fix = ("stage with the training launch's layout, or once per node with climseg stage "
           "--per-node")
    staged_size, ranks = layout.get("size"), layout.get("ranks")
    if staged_size is not None and staged_size != size:
        return (f"this node was staged for {staged_size} ranks and the run has {size}; "
                f"{fix}")
    if ranks is not None:
        return (f"this node was staged for ranks {', '.join(map(str, ranks))} of {size}, not "
                f"rank {rank}: the same number of ranks, placed on the nodes differently (e.g. "
                f"srun --distribution=block to stage, cyclic to train); {fix}")
    return (f"this node was staged for another rank layout (a different number of ranks, or "
            f"ranks placed on the nodes differently); {fix}")


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(num_samples)`` that depends only on (num_samples, seed, epoch).

    Every rank computes the same order without communicating.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    return rng.permutation(num_samples)
