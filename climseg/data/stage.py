"""Stage a rank's files onto node-local storage (/dev/shm, local NVMe) before training.

Rank ``r`` of ``n`` copies exactly ``rank_partition(list_files(SOURCE/<split>), r, n)`` - the
files it will read - plus ``stats.h5``, and writes ``DEST/<split>/index.txt`` with the full
sorted file list of the split, so that ``list_files(DEST/<split>)`` on the node returns the
global list and the trainer's partition picks exactly the staged files.

With ``whole=True`` (``climseg stage --per-node``) the call copies every file of the splits, as
rank 0 of 1 would: one process per node does it, and any rank count or layout (and an elastic
run, whose shares move) finds its files there.

``staged.json`` also records the layout the node was staged for (the ranks of how many, or the
whole split), so that a training launch with another layout is told which one differs.

Copies go to a temporary name and are renamed after their size is verified; a file already
staged with the same size and modification time is skipped.

A destination belongs to one source: ``DEST/staged.json`` records the source's path and a
fingerprint (the hash of stats.h5 and of each split's file names and sizes). Staging another
source into it is refused (``force=True`` empties it first); the check runs under a lock on
the destination, so two stages started at once cannot mix either. Temporaries left by a copy
that was killed are removed by the next stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from climseg.atomic import atomic_path
from climseg.data.format import DataError, Progress
from climseg.data.partition import INDEX_NAME, RECORD_NAME, list_files, rank_partition
from climseg.data.stats import STATS_NAME


LOCK_NAME = "stage.lock"
# atomic_path's temporaries: .NAME.tmpPID-THREAD
_TEMP_FILE = re.compile(r"^\..+\.tmp(\d+)-\d+$")


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


def fingerprint(source: Path, splits) -> dict[str, str]:
    """What identifies a source's data wherever it lies: sha256 of stats.h5's bytes and of
    each split's sorted (file name, size) list."""
    found = {STATS_NAME: hashlib.sha256((source / STATS_NAME).read_bytes()).hexdigest()}
    for split in splits:
        listing = "".join(f"{p.name} {p.stat().st_size}\n" for p in list_files(source / split))
        found[split] = hashlib.sha256(listing.encode()).hexdigest()
    return found


def read_record(dest: Path) -> dict | None:
    """``DEST/staged.json`` (source path and fingerprint), or None where there is none."""
    path = dest / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable staging record ({err}); stage again with "
                        "--force to replace the folder") from None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
        raise DataError(f"{path}: not a staging record; stage again with --force")
    return record


@contextlib.contextmanager
def _locked(dest: Path):
    """An exclusive lock on ``dest`` while the block runs (every rank of a node takes it in
    turn; a second stage into the same folder waits for it)."""
    with open(dest / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_layout(old: dict | None, rank: int, size: int, whole: bool) -> dict:
    """The layout a node holds after rank ``rank`` of ``size`` (or the whole split) stages
    there, given the recorded one: ranks of one size add up (their files stay); another size
    starts anew, since the old ranks' files no longer make up any rank's share."""
    if whole or (old or {}).get("whole"):
        return {"whole": True}
    if old is not None and old.get("size") == size:
        return {"size": size, "ranks": sorted(set(old.get("ranks", [])) | {rank})}
    return {"size": size, "ranks": [rank]}


def _claim(source: Path, dest: Path, splits, force: bool, layout: tuple[int, int, bool]) -> None:
    """Make ``dest`` this source's (under the lock): refuse another source's folder, or with
    ``force`` empty it first; record the source and the layout (``(rank, size, whole)``, see
    :func:`merge_layout`); remove dead copies' temporaries."""
    mine = fingerprint(source, splits)
    record = read_record(dest)
    old_layout = record.get("layout") if record is not None else None
    if record is not None:
        theirs = record["fingerprint"]
        differs = [k for k in mine if k in theirs and theirs[k] != mine[k]]
        if differs and not force:
            raise DataError(f"{dest}: staged from {record.get('source')}, whose "
                            f"{' and '.join(differs)} differ from {source}'s; stage into "
                            "another folder, or pass --force to empty this one first")
        if differs:
            _empty(dest)
            old_layout = None
        else:
            mine = {**theirs, **mine}  # splits staged earlier from the same source stay
    elif any(p.name not in (LOCK_NAME,) for p in dest.iterdir()) and not force:
        raise DataError(f"{dest}: holds files that no stage recorded; stage into an empty "
                        "folder, or pass --force to empty this one first")
    elif force:
        _empty(dest)
    _remove_dead_temporaries(dest)
    with atomic_path(dest / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps({"source": str(source.resolve()), "fingerprint": mine,
                                   "layout": merge_layout(old_layout, *layout)},
                                  indent=1) + "\n")


def _empty(dest: Path) -> None:
    for p in dest.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)   # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_dead_temporaries(dest: Path) -> None:
    """A copy killed with kill -9 leaves its full-size temporary: remove those whose writer
    is no longer alive (node-local storage: the PID is this node's)."""
    for folder in [dest, *[p for p in dest.iterdir() if p.is_dir()]]:
        for p in folder.iterdir():
            match = _TEMP_FILE.match(p.name)
            if match and not _pid_alive(int(match.group(1))):
                p.unlink(missing_ok=True)


def stage_dataset(source: str | os.PathLike, dest: str | os.PathLike, splits=("train",
                  "validation"), rank: int = 0, size: int = 1, workers: int = 4,
                  progress: bool = True, force: bool = False, whole: bool = False) -> StageResult:
    """Copy this rank's files of ``splits`` (and stats.h5) from ``source`` into ``dest``;
    with ``whole``, every file of them (the node's copy for any rank layout).

    ``force``: a ``dest`` staged from another source (or holding unrecorded files) is emptied
    first instead of refused."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    source, dest = Path(source), Path(dest)
    pairs = plan(source, splits, 0, 1) if whole else plan(source, splits, rank, size)
    sizes = [src.stat().st_size for src, _ in pairs]
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        _claim(source, dest, splits, force, (rank, size, whole))
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
