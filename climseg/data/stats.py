"""Per-channel statistics (``stats.h5``) and the normalization derived from them.

``stats.h5`` holds ``climate/count`` (a scalar: the number of samples), and per channel
``climate/mean``, ``climate/sqmean`` (mean of squares), ``climate/minval``, ``climate/maxval``:
the keys the DeepCAM reference ``summarize_data.py`` writes, so the files move between the two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from climseg.data.format import CHANNELS, NUM_CHANNELS, DataError, hdf5_writer

STATS_NAME = "stats.h5"
_KEYS = ("mean", "sqmean", "minval", "maxval")
NORMALIZATION_MODES = ("minmax", "zscore")
# A channel whose std is below this fraction of its RMS is constant up to float64 rounding.
_ZERO_STD_RELATIVE = 1e-7
# In a stats.h5 stored in float32 (the reference's summarize_data.py writes float32 sums),
# sqmean and mean^2 each carry a relative rounding error of 2^-24 or more (more after float32
# accumulation): a variance below this fraction of sqmean is lost to cancellation, not zero.
_FLOAT32_CANCELLATION = 64 * 2.0 ** -24


@dataclass(eq=False)   # numpy fields: compare them with np.testing, not ==
class Stats:
    """Per-channel statistics; ``path`` names the file they came from (for error messages).

    ``count`` is the number of samples summarized (as in the reference's stats.h5).
    """

    count: int
    mean: np.ndarray
    sqmean: np.ndarray
    minval: np.ndarray
    maxval: np.ndarray
    path: str | None = None
    float32: bool = False    # the file stored mean/sqmean in float32 (a reference-written file)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.sqmean - self.mean * self.mean, 0.0))


class StatsAccumulator:
    """Float64 sums over samples; ``merge`` combines accumulators from several ranks.

    The state is (samples, pixels, sum, sum of squares, min, max) so that merging is plain
    addition and min/max, whatever the number of ranks.
    """

    def __init__(self, num_channels: int = NUM_CHANNELS):
        self.samples = 0
        self.pixels = 0
        self.sum = np.zeros(num_channels, np.float64)
        self.sqsum = np.zeros(num_channels, np.float64)
        self.minval = np.full(num_channels, np.inf)
        self.maxval = np.full(num_channels, -np.inf)

    def add(self, data: np.ndarray, rows_per_block: int = 64) -> None:
        """Add one (H, W, C) sample, in row blocks to bound the float64 temporaries."""
        for r in range(0, data.shape[0], rows_per_block):
            block = data[r:r + rows_per_block].reshape(-1, data.shape[-1]).astype(np.float64)
            self.sum += block.sum(axis=0)
            self.sqsum += np.einsum("ij,ij->j", block, block)
            np.minimum(self.minval, block.min(axis=0), out=self.minval)
            np.maximum(self.maxval, block.max(axis=0), out=self.maxval)
        self.samples += 1
        self.pixels += data.shape[0] * data.shape[1]

    def merge(self, other: "StatsAccumulator") -> None:
        self.samples += other.samples
        self.pixels += other.pixels
        self.sum += other.sum
        self.sqsum += other.sqsum
        np.minimum(self.minval, other.minval, out=self.minval)
        np.maximum(self.maxval, other.maxval, out=self.maxval)

    def result(self) -> Stats:
        if self.samples == 0:
            raise DataError("no samples were summarized")
        return Stats(count=self.samples, mean=self.sum / self.pixels,
                     sqmean=self.sqsum / self.pixels, minval=self.minval.copy(),
                     maxval=self.maxval.copy())


def write_stats(path: str | os.PathLike, stats: Stats) -> None:
    """Write ``stats.h5`` atomically (temp file + rename)."""
    path = Path(path)
    with hdf5_writer(path) as f:
        f.create_dataset("climate/count", data=np.int64(stats.count))
        for key in _KEYS:
            f.create_dataset(f"climate/{key}", data=np.asarray(getattr(stats, key), np.float64))


def read_stats(path: str | os.PathLike) -> Stats:
    """Read ``stats.h5``; DataError naming the file for anything missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: stats file not found (create it with "
                        f"climseg summarize --data {path.parent})")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file: {str(err).splitlines()[0]}") from None
    with f:
        values = {}
        narrow = False
        for key in ("count",) + _KEYS:
            name = f"climate/{key}"
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise DataError(f"{path}: missing dataset '{name}'")
            if key in ("mean", "sqmean") and f[name].dtype.itemsize < 8:
                narrow = True
            values[key] = np.asarray(f[name][...], np.float64)
    count = values.pop("count")
    if count.size != 1 or not np.isfinite(count).all() or count.reshape(()) <= 0:
        raise DataError(f"{path}: 'climate/count' must be one positive number, got {count}")
    for key, value in values.items():
        if value.shape != (NUM_CHANNELS,):
            raise DataError(f"{path}: 'climate/{key}' has shape {value.shape}, expected "
                            f"({NUM_CHANNELS},)")
        if not np.isfinite(value).all():
            raise DataError(f"{path}: 'climate/{key}' contains NaN or inf")
    return Stats(count=int(count.reshape(())), path=str(path), float32=narrow, **values)


def channel_indices(channels) -> list[int]:
    """Channel indices from a list of indices and/or names (None: all channels)."""
    if channels is None:
        return list(range(NUM_CHANNELS))
    out = []
    for c in channels:
        if isinstance(c, str):
            if c not in CHANNELS:
                raise DataError(f"unknown channel '{c}'; known: {', '.join(CHANNELS)}")
            out.append(CHANNELS.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) \
                and 0 <= c < NUM_CHANNELS:
            out.append(int(c))
        else:
            raise DataError(f"bad channel {c!r}: expected an index 0..{NUM_CHANNELS - 1} "
                            "or a channel name")
    if not out:
        raise DataError("channel list is empty")
    return out


def normalization(stats: Stats, mode: str = "minmax",
                  channels=None) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) float32 per selected channel so that normalized = (x - shift) * scale.

    ``minmax`` (the reference's default): shift = minval, scale = 1 / (maxval - minval).
    ``zscore``: shift = mean, scale = 1 / std. A zero range or std is a DataError naming the
    stats file and the channel.
    """
    idx = channel_indices(channels)
    where = stats.path or "stats"
    if mode == "minmax":
        shift, spread = stats.minval[idx], (stats.maxval - stats.minval)[idx]
        bad = ~(spread > 0)
        what = "zero range (maxval == minval)"
    elif mode == "zscore":
        shift, spread = stats.mean[idx], stats.std[idx]
        sqmean = np.abs(stats.sqmean[idx])
        if stats.float32:
            # The file cannot resolve a variance this small: say so instead of calling the
            # channel constant (T200 in a reference-written file: var ~ 1e-4 of sqmean).
            variance = stats.sqmean[idx] - stats.mean[idx] ** 2
            lost = ~(variance > _FLOAT32_CANCELLATION * sqmean)
            if lost.any():
                i = int(np.argmax(lost))
                raise DataError(
                    f"{where}: channel {CHANNELS[idx[i]]}: sqmean - mean^2 = {variance[i]:.4g} "
                    f"is within the float32 rounding of sqmean = {stats.sqmean[idx[i]]:.7g}: "
                    "this stats file stores float32 sums (as the reference's summarize_data.py "
                    "writes), so the standard deviation cannot be recovered from it; rewrite "
                    "it with tools/summarize_data.py --data ROOT (float64) or use "
                    "data.normalization=minmax")
        bad = ~(spread > _ZERO_STD_RELATIVE * np.sqrt(sqmean))
        what = "zero standard deviation"
    else:
        raise DataError(f"unknown normalization mode '{mode}'; expected one of "
                        f"{', '.join(NORMALIZATION_MODES)}")
    if bad.any():
        name = CHANNELS[idx[int(np.argmax(bad))]]
        raise DataError(f"{where}: channel {name} has {what}; cannot normalize it "
                        f"with '{mode}' (drop it from the channel list)")
    return shift.astype(np.float32), (1.0 / spread).astype(np.float32)
