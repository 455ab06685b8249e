"""Stage a rank's files onto node-local storage (/dev/shm, local NVMe) before training.

Rank ``r`` of ``n`` copies exactly ``rank_partition(list_files(SOURCE/<split>), r, n)`` - the
files it will read - plus ``stats.h5``, and writes ``DEST/<split>/index.txt`` with the full
sorted file list of the split, so that ``list_files(DEST/<split>)`` on the node returns the
global list and the trainer's partition picks exactly the staged files.

Copies go to a temporary name and are renamed after their size is verified; a file already
staged with the same size and modification time is skipped.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from climseg.atomic import atomic_path
from climseg.data.format import DataError, Progress
from climseg.data.partition import INDEX_NAME, list_files, rank_partition
from climseg.data.stats import STATS_NAME


@dataclass
class StageResult:
    copied: int = 0          # files copied
    skipped: int = 0         # files already staged and identical
    bytes_copied: int = 0
    bytes_total: int = 0     # bytes of all the rank's files, copied or skipped
    seconds: float = 0.0


def _same_file(src_stat: os.stat_result, dest: Path) -> bool:
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    return st.st_size == src_stat.st_size and st.st_mtime_ns == src_stat.st_mtime_ns


def stage_file(src: Path, dest: Path) -> int:
    """Copy ``src`` to ``dest`` (temp + rename, size verified); return bytes copied (0: skipped)."""
    try:
        src_stat = src.stat()
    except FileNotFoundError:
        raise DataError(f"{src}: file not found") from None
    if _same_file(src_stat, dest):
        return 0
    try:
        with atomic_path(dest, fsync=False) as tmp:
            shutil.copyfile(src, tmp)
            size = tmp.stat().st_size
            if size != src_stat.st_size:
                raise DataError(f"{dest}: copied {size} bytes but {src} has {src_stat.st_size}")
            os.utime(tmp, ns=(src_stat.st_atime_ns, src_stat.st_mtime_ns))
    except OSError as err:
        raise DataError(f"{dest}: cannot stage {src}: {err.strerror or err}") from None
    return src_stat.st_size


def write_index(split_dir: Path, names: list[str]) -> None:
    """Write ``split_dir/index.txt`` (the full sorted file list) atomically."""
    path = split_dir / INDEX_NAME
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in sorted(names)))


def plan(source: str | os.PathLike, splits, rank: int, size: int) -> list[tuple[Path, Path]]:
    """(source file, staged path relative to DEST) pairs this rank copies, stats.h5 first."""
    source = Path(source)
    stats = source / STATS_NAME
    if not stats.exists():
        raise DataError(f"{stats}: stats file not found (create it with "
                        f"climseg summarize --data {source} before staging)")
    pairs = [(stats, Path(STATS_NAME))]
    for split in splits:
        if (source / split / INDEX_NAME).exists():
            raise DataError(f"{source / split}: is itself a staged split ({INDEX_NAME}); "
                            "stage from the full data set")
        for path in rank_partition(list_files(source / split), rank, size):
            pairs.append((path, Path(split) / path.name))
    return pairs


def stage_dataset(source: str | os.PathLike, dest: str | os.PathLike, splits=("train",
                  "validation"), rank: int = 0, size: int = 1, workers: int = 4,
                  progress: bool = True) -> StageResult:
    """Copy this rank's files of ``splits`` (and stats.h5) from ``source`` into ``dest``."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    source, dest = Path(source), Path(dest)
    pairs = plan(source, splits, rank, size)
    sizes = [src.stat().st_size for src, _ in pairs]
    dest.mkdir(parents=True, exist_ok=True)
    needed = sum(s for (src, rel), s in zip(pairs, sizes) if not _same_file(src.stat(), dest / rel))
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DataError(f"{dest}: needs {needed / 1e9:.2f} GB for rank {rank}'s files but only "
                        f"{free / 1e9:.2f} GB are free")
    for split in splits:
        (dest / split).mkdir(exist_ok=True)
        # Until the new index is written the split does not pass for staged.
        (dest / split / INDEX_NAME).unlink(missing_ok=True)

    result = StageResult(bytes_total=sum(sizes))
    bar = Progress(len(pairs), f"rank {rank}: staging", enabled=progress)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for copied in pool.map(lambda p: stage_file(p[0], dest / p[1]), pairs):
            if copied:
                result.copied += 1
                result.bytes_copied += copied
            else:
                result.skipped += 1
            bar.update()
    # The index goes last: a staged split is complete once index.txt is there.
    for split in splits:
        write_index(dest / split, [p.name for p in list_files(source / split)])
    result.seconds = time.perf_counter() - start
    return result
