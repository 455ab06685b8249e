"""The CAM5 HDF5 sample format: one sample per file, read and written here only.

A sample file holds ``climate/data`` (float32, (lat, lon, channel) = (768, 1152, 16)) and
``climate/labels_0`` ((lat, lon), any numeric dtype, class ids 0 background, 1 tropical
cyclone, 2 atmospheric river). Real DeepCAM files carry extra datasets (``labels_1``,
``data_stats``); they are ignored. The (H, W, C) layout is kept as it is on disk: it is
PyTorch's channels_last memory order, so no transpose is needed on the way to the GPU.

Every problem with an input raises :class:`DataError` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from climseg.atomic import atomic_path, write_failure

# Channel order of `climate/data` in the DeepCAM data set (MLPerf HPC DeepCAM README).
CHANNELS = ("TMQ", "U850", "V850", "UBOT", "VBOT", "QREFHT", "PS", "PSL",
            "T200", "T500", "PRECT", "TS", "TREFHT", "Z1000", "Z200", "ZBOT")
NUM_CHANNELS = len(CHANNELS)
HEIGHT = 768
WIDTH = 1152
NUM_CLASSES = 3  # 0 background, 1 tropical cyclone, 2 atmospheric river
CLASS_NAMES = ("background", "tropical_cyclone", "atmospheric_river")
# Pixel frequencies of the three classes in the CAM5 training data, with the weight power, as
# hard-coded in the MLPerf HPC DeepCAM reference (mlcommons/hpc, deepcam/src/deepCam/train.py:
# class_weights = freq ** loss_pow).
DEEPCAM_CLASS_FREQUENCIES = (0.986267818390377, 0.0004578708870701058, 0.01327431072255291)
DEEPCAM_WEIGHT_POW = -0.125
DATA_KEY = "climate/data"
LABEL_KEY = "climate/labels_0"
FILE_GLOB = "data-*.h5"
# data-YYYY-MM-DD-HH-N: as in DeepCAM, HH is the 3-hourly step of the day (0-7) and N the
# ensemble member; converted ClimateNet files add _K (data-2011-06-01-01-1_0).
_SAMPLE_NAME = re.compile(r"data-(\d{4})-(\d{2})-(\d{2})-(\d{2})-\d+(?:_\d+)?")
HOURS_PER_STEP = 3


class DataError(ValueError):
    """A bad input file or folder; the message is one line naming it and the problem."""


def sample_time(path: str | os.PathLike) -> dt.datetime | None:
    """The time a sample's name ``data-YYYY-MM-DD-HH-N.h5`` gives (hour 3 x HH), or None when
    the name gives none: another name, a step past 7, a day that does not exist."""
    match = _SAMPLE_NAME.fullmatch(Path(path).stem)
    if match is None:
        return None
    year, month, day, step = (int(g) for g in match.groups())
    if step * HOURS_PER_STEP >= 24:
        return None
    try:
        return dt.datetime(year, month, day, step * HOURS_PER_STEP)
    except ValueError:  # 2100-02-30: not a day
        return None


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): "
                        f"{str(err).splitlines()[0]}") from None


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    try:
        obj = f[key]
    except KeyError:
        raise DataError(f"{path}: missing dataset '{key}'") from None
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: '{key}' is a group, not a dataset")
    return obj


def _check_header(f: h5py.File, path: Path, expect_shape) -> tuple[int, int, int]:
    data = _dataset(f, DATA_KEY, path)
    labels = _dataset(f, LABEL_KEY, path)
    if data.dtype != np.dtype("<f4"):
        raise DataError(f"{path}: '{DATA_KEY}' has dtype {data.dtype}, expected float32 "
                        "(little-endian)")
    if data.ndim != 3 or data.shape[2] != NUM_CHANNELS:
        raise DataError(f"{path}: '{DATA_KEY}' has shape {data.shape}, expected "
                        f"(height, width, {NUM_CHANNELS})")
    shape = tuple(int(s) for s in data.shape)
    if expect_shape is not None and shape != tuple(expect_shape):
        raise DataError(f"{path}: '{DATA_KEY}' has shape {shape}, expected "
                        f"{tuple(expect_shape)}")
    if labels.shape != shape[:2]:
        raise DataError(f"{path}: '{LABEL_KEY}' has shape {labels.shape}, expected "
                        f"{shape[:2]} to match '{DATA_KEY}'")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise DataError(f"{path}: '{LABEL_KEY}' has non-numeric dtype {labels.dtype}")
    # A contiguous dataset lies at a known offset: a file cut short is caught here, cheaply.
    if data.chunks is None:
        offset = data.id.get_offset()
        if offset is None:
            raise DataError(f"{path}: '{DATA_KEY}' was never written (no storage)")
        needed = offset + data.id.get_storage_size()
        have = os.path.getsize(path)
        if needed > have:
            raise DataError(f"{path}: truncated: '{DATA_KEY}' ends at byte {needed} "
                            f"but the file has {have} bytes")
    return shape


def validate_file(path: str | os.PathLike,
                  expect_shape: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Check a sample's header (keys, shapes, dtypes) without reading the data; return (H, W, C).

    ``expect_shape`` (H, W, C), when given, must match exactly.
    """
    path = Path(path)
    with _open(path) as f:
        return _check_header(f, path, expect_shape)


def labels_to_uint8(raw: np.ndarray, path: str | os.PathLike,
                    name: str = LABEL_KEY) -> np.ndarray:
    """Class ids as uint8 from labels of any numeric dtype; DataError unless all in {0,1,2},
    naming the file and the labels' variable ``name``."""
    if raw.dtype == np.uint8:
        labels = raw
    else:
        if np.issubdtype(raw.dtype, np.floating):
            if not np.isfinite(raw).all():
                raise DataError(f"{path}: '{name}' contains NaN or inf")
            if not (np.round(raw) == raw).all():
                raise DataError(f"{path}: '{name}' contains non-integer class ids")
        if raw.size and (raw.min() < 0 or raw.max() >= NUM_CLASSES):
            raise DataError(f"{path}: '{name}' has values outside "
                            f"{{0..{NUM_CLASSES - 1}}} (min {raw.min()}, max {raw.max()})")
        labels = raw.astype(np.uint8)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: '{name}' has values outside {{0..{NUM_CLASSES - 1}}} "
                        f"(max {labels.max()})")
    return labels


def read_sample(path: str | os.PathLike, window: tuple[int, int, int, int] | None = None,
                expect_shape: tuple[int, int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(data float32 (H, W, C), labels uint8 (H, W)) of one sample file.

    ``window`` (top, left, height, width) reads only that region; ``expect_shape`` is checked
    as in :func:`validate_file`. The header and the label values are checked; data values are
    not scanned for NaN/inf (that is ``tools/check_data.py``'s job, once, not every epoch).
    """
    path = Path(path)
    with _open(path) as f:
        shape = _check_header(f, path, expect_shape)
        if window is None:
            rows, cols = slice(None), slice(None)
        else:
            top, left, height, width = window
            if not (0 <= top and 0 <= left and 0 < height and 0 < width
                    and top + height <= shape[0] and left + width <= shape[1]):
                raise DataError(f"{path}: window {window} outside the {shape[0]}x{shape[1]} "
                                "sample")
            rows, cols = slice(top, top + height), slice(left, left + width)
        try:
            data = f[DATA_KEY][rows, cols]
            raw = f[LABEL_KEY][rows, cols]
        except OSError as err:
            raise DataError(f"{path}: cannot read data (truncated or corrupt?): "
                            f"{str(err).splitlines()[0]}") from None
    return data, labels_to_uint8(raw, path)


def dataset_byte_offset(path: str | os.PathLike, key: str) -> int | None:
    """File offset of dataset ``key`` when stored contiguous and uncompressed, else None."""
    path = Path(path)
    with _open(path) as f:
        dset = _dataset(f, key, path)
        if dset.chunks is not None or dset.compression is not None:
            return None
        return dset.id.get_offset()


def data_byte_offset(path: str | os.PathLike) -> int | None:
    """File offset of ``climate/data``'s raw bytes ((H, W, C) float32, C order) if contiguous.

    None when the dataset is chunked or compressed; then it must be read through h5py.
    """
    return dataset_byte_offset(path, DATA_KEY)


def prepare_output_folder(out_dir: str | os.PathLike, force: bool) -> Path:
    """``out_dir`` created and holding no sample files: the ones there are removed with
    ``force``, else DataError (a tool never mixes a new set with an old one silently)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    old = sorted(out_dir.glob(FILE_GLOB)) if out_dir.is_dir() else []
    if old and not force:
        raise DataError(f"{out_dir}: already holds {len(old)} {FILE_GLOB} files; use --force "
                        "to replace them")
    for path in old:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_sample(path: str | os.PathLike, data: np.ndarray, labels: np.ndarray) -> None:
    """Write one sample atomically (temp file + rename): contiguous, uncompressed datasets.

    ``data`` must be (H, W, 16) and is stored as float32; ``labels`` (H, W) class ids are
    stored as uint8.
    """
    path = Path(path)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 3 or data.shape[2] != NUM_CHANNELS:
        raise DataError(f"{path}: data has shape {data.shape}, expected (H, W, {NUM_CHANNELS})")
    if labels.shape != data.shape[:2]:
        raise DataError(f"{path}: labels have shape {labels.shape}, expected {data.shape[:2]}")
    labels = labels_to_uint8(np.asarray(labels), path)
    with hdf5_writer(path, fsync=False) as f:
        f.create_dataset(DATA_KEY, data=data)
        f.create_dataset(LABEL_KEY, data=labels)


@contextlib.contextmanager
def hdf5_writer(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[h5py.File]:
    """An HDF5 file built in memory, then written to ``path`` atomically (``atomic_path``).

    Not written by HDF5 itself: on a full disk HDF5 reports only a failed write of the hidden
    temporary, and closing such a file can crash the process (seen with h5py 3 on a full
    tmpfs). Plain writes fail cleanly; the failure is a DataError naming the folder, the
    reason and the free space."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    try:
        with atomic_path(path, fsync=fsync) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as err:
        raise DataError(write_failure(path, err)) from None


class Progress:
    """A dependency-free progress line on stderr: ``desc: done/total  rate  eta``.

    Redraws in place on a terminal; otherwise prints at most every 10 % and every few seconds
    (and at the end), so logs stay short. ``update`` is safe to call from several threads.
    """

    def __init__(self, total: int, desc: str, unit: str = "files", enabled: bool = True,
                 min_interval: float = 2.0):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = 0
        self.start = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._min_interval = 0.1 if self._tty else min_interval
        self._last_draw = self.start
        self._next_count = max(1, total // 10)
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if not self.enabled:
                return
            now = time.perf_counter()
            if self.done >= self.total:
                self._draw(now, end="\n")
            elif (now - self._last_draw >= self._min_interval
                  and (self._tty or self.done >= self._next_count)):
                self._draw(now, end="")
                self._next_count = self.done + max(1, self.total // 10)

    def _draw(self, now: float, end: str) -> None:
        self._last_draw = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.desc}: {self.done}/{self.total} {self.unit}  "
                f"{rate:.2f}/s  eta {eta:.0f}s")
        if self._tty:
            sys.stderr.write("\r" + line + end)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
