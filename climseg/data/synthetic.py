"""Synthetic CAM5-like samples: the project's stand-in for the 8.8 TB DeepCAM data set.

Each sample is a smooth, latitude-dependent background climate plus a few
- tropical cyclones: compact vortices with a deep PSL low, strong rotating winds (cyclonic in
  each hemisphere), a warm core and high TMQ/PRECT; and
- atmospheric rivers: long, narrow, curved filaments of high TMQ, QREFHT and PRECT with winds
  along the filament (moisture transport), reaching from the subtropics poleward.

Labels are derived from the same feature intensity fields that shape the values (TC where the
PSL depression exceeds half its peak, AR where the TMQ filament exceeds half its peak), so a
model can learn them from the fields. Every feature size is a fraction of the grid, so small
grids (64x96, 192x288) hold the same class fractions as the full 768x1152 one: about 98.6 %
background, 0.05 % TC and 1.3 % AR, like the real data (MLPerf HPC DeepCAM README).

Sample ``i`` of a data set is drawn from ``np.random.default_rng([seed, i])``: deterministic and
independent of how many samples are generated or in which order.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from climseg.data.format import (CHANNELS, FILE_GLOB, HEIGHT, NUM_CHANNELS, WIDTH, DataError,
                                 Progress, write_sample)

# Class fractions of the real data set (DeepCAM README): targets of the calibration below.
TARGET_FRACTIONS = (0.986, 0.0005, 0.013)

# Feature sizes in units of the grid height (768 rows = 180 degrees at full size).
_TC_RADIUS = 0.0120        # e-folding radius of the PSL low (label radius is 0.83 of it)
_TC_PER_SAMPLE = (1, 4)    # integers in [low, high)
_AR_LENGTH = (0.28, 0.42)  # centre-line length
_AR_HALF_WIDTH = 0.0199    # e-folding half width of the TMQ filament
_AR_PER_SAMPLE = (1, 4)
_HALF = 0.5                # a feature is labelled where its intensity exceeds half its peak

_CH = {name: i for i, name in enumerate(CHANNELS)}


def _smooth_noise(rng: np.random.Generator, lat_cells: int, lon_cells: int,
                  height: int, width: int) -> np.ndarray:
    """Unit-variance noise varying on a (lat_cells x lon_cells) scale, periodic in longitude."""
    coarse = rng.standard_normal((lat_cells + 1, lon_cells + 1)).astype(np.float32)
    coarse[:, -1] = coarse[:, 0]
    y = np.linspace(0.0, lat_cells, height, dtype=np.float32)
    x = np.linspace(0.0, lon_cells, width, endpoint=False, dtype=np.float32)
    y0 = np.minimum(y.astype(np.int64), lat_cells - 1)
    x0 = np.minimum(x.astype(np.int64), lon_cells - 1)
    fy = (y - y0)[:, None]
    fx = x - x0
    rows = coarse[y0] * (1 - fy) + coarse[y0 + 1] * fy          # (height, lon_cells + 1)
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


def _wrapped_box(center_row: float, center_col: float, radius: float, height: int,
                 width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows/cols (cols wrapped in longitude) of a box around a point, and their offsets."""
    r0 = max(int(np.floor(center_row - radius)), 0)
    r1 = min(int(np.ceil(center_row + radius)) + 1, height)
    half = min(int(np.ceil(radius)), (width - 1) // 2)
    c = int(np.round(center_col))
    cols_unwrapped = np.arange(c - half, c + half + 1)
    rows = np.arange(r0, r1)
    return rows, cols_unwrapped % width, rows - center_row, cols_unwrapped - center_col


class _Features:
    """Intensity fields (0..1) of the features and their wind anomalies, on the full grid."""

    def __init__(self, height: int, width: int):
        shape = (height, width)
        self.tc = np.zeros(shape, np.float32)       # PSL-low profile, labels TC above 0.5
        self.tc_wide = np.zeros(shape, np.float32)  # wider moisture/rain shield
        self.ar = np.zeros(shape, np.float32)       # TMQ filament profile, labels AR above 0.5
        self.u = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)


def _add_cyclone(feat: _Features, rng: np.random.Generator, lat: np.ndarray, height: int,
                 width: int) -> None:
    hemisphere = rng.choice((-1.0, 1.0))
    lat_deg = hemisphere * rng.uniform(8.0, 28.0)
    row = float(np.interp(lat_deg, lat, np.arange(height)))
    col = rng.uniform(0, width)
    radius = _TC_RADIUS * height * rng.uniform(0.85, 1.15)
    vmax = rng.uniform(22.0, 38.0)
    rows, cols, dy, dx = _wrapped_box(row, col, 4.0 * radius + 2, height, width)
    dy, dx = dy[:, None].astype(np.float32), dx[None, :].astype(np.float32)
    r2 = (dx * dx + dy * dy) / (radius * radius)
    core = np.exp(-r2)
    wide = np.exp(-r2 / 4.0)
    # Tangential wind peaking at 1.3 radii, counter-clockwise (cyclonic) in the north.
    rm = 1.3
    rr = np.sqrt(r2) + 1e-6
    vt = vmax * (rr / rm) * np.exp(0.5 * (1.0 - (rr / rm) ** 2))
    sense = 1.0 if lat_deg > 0 else -1.0
    u = -sense * vt * (dy / radius) / rr
    v = sense * vt * (dx / radius) / rr
    ix = np.ix_(rows, cols)
    feat.tc[ix] = np.maximum(feat.tc[ix], core)
    feat.tc_wide[ix] = np.maximum(feat.tc_wide[ix], wide)
    feat.u[ix] += u
    feat.v[ix] += v


def _add_river(feat: _Features, rng: np.random.Generator, lat: np.ndarray, height: int,
               width: int, segments: int = 24) -> None:
    hemisphere = rng.choice((-1.0, 1.0))
    lat0 = hemisphere * rng.uniform(15.0, 32.0)
    row0 = float(np.interp(lat0, lat, np.arange(height)))
    col0 = rng.uniform(0, width)
    length = rng.uniform(*_AR_LENGTH) * height
    heading = np.deg2rad(rng.uniform(15.0, 45.0))      # from east, poleward
    bend = rng.uniform(-0.12, 0.12) * length
    half_width = _AR_HALF_WIDTH * height * rng.uniform(0.85, 1.15)

    t = np.linspace(0.0, 1.0, segments + 1)
    along = np.array([np.cos(heading), hemisphere * np.sin(heading)])   # (col, row) direction
    normal = np.array([-along[1], along[0]])
    pts = (np.array([col0, row0])[None, :] + (t * length)[:, None] * along[None, :]
           + (bend * np.sin(np.pi * t))[:, None] * normal[None, :])    # (segments+1, 2)

    pad = 3.0 * half_width + 2
    c_lo, c_hi = pts[:, 0].min() - pad, pts[:, 0].max() + pad
    r_lo, r_hi = max(pts[:, 1].min() - pad, 0), min(pts[:, 1].max() + pad, height - 1)
    if r_hi <= r_lo:
        return
    rows = np.arange(int(r_lo), int(np.ceil(r_hi)) + 1)
    cols_unwrapped = np.arange(int(np.floor(c_lo)), int(np.ceil(c_hi)) + 1)[:width]
    py = rows[:, None, None].astype(np.float32)
    px = cols_unwrapped[None, :, None].astype(np.float32)

    a, b = pts[:-1].astype(np.float32), pts[1:].astype(np.float32)      # segment ends
    seg = b - a
    seg_len2 = (seg ** 2).sum(axis=1)
    s = ((px - a[:, 0]) * seg[:, 0] + (py - a[:, 1]) * seg[:, 1]) / seg_len2
    s = np.clip(s, 0.0, 1.0)                                            # (rows, cols, segs)
    qx = a[:, 0] + s * seg[:, 0] - px
    qy = a[:, 1] + s * seg[:, 1] - py
    d2 = qx * qx + qy * qy
    nearest = d2.argmin(axis=2)
    d2min = np.take_along_axis(d2, nearest[..., None], axis=2)[..., 0]
    tpos = (nearest + np.take_along_axis(s, nearest[..., None], axis=2)[..., 0]) / segments
    taper = np.sqrt(np.clip(np.sin(np.pi * tpos) * 1.6, 0.0, 1.0))      # fades at both ends
    profile = np.exp(-d2min / half_width ** 2) * taper
    direction = seg[nearest] / np.sqrt(seg_len2[nearest])[..., None]   # (rows, cols, 2)
    transport = rng.uniform(10.0, 18.0) * np.exp(-d2min / (2.0 * half_width) ** 2) * taper

    ix = np.ix_(rows, cols_unwrapped % width)
    feat.ar[ix] = np.maximum(feat.ar[ix], profile)
    feat.u[ix] += transport * direction[..., 0]
    feat.v[ix] += transport * direction[..., 1]


def generate_sample(rng: np.random.Generator, height: int = HEIGHT,
                    width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic sample: (data float32 (H, W, 16), labels uint8 (H, W))."""
    if height < 8 or width < 8:
        raise DataError(f"synthetic grid {height}x{width} is too small (at least 8x8)")
    lat = np.linspace(-90.0, 90.0, height, dtype=np.float32)   # row 0 is the south pole
    coslat2 = (np.cos(np.deg2rad(lat)) ** 2)[:, None]
    tropics = np.exp(-(lat / 30.0) ** 2)[:, None]
    deep_tropics = np.exp(-(lat / 12.0) ** 2)[:, None]
    jets = np.exp(-((np.abs(lat) - 45.0) / 12.0) ** 2)[:, None]

    feat = _Features(height, width)
    for _ in range(rng.integers(*_AR_PER_SAMPLE)):
        _add_river(feat, rng, lat, height, width)
    for _ in range(rng.integers(*_TC_PER_SAMPLE)):
        _add_cyclone(feat, rng, lat, height, width)

    def noise(lat_cells=6, lon_cells=9):
        return _smooth_noise(rng, lat_cells, lon_cells, height, width)

    weather = noise(6, 9)        # large-scale anomaly shared by the thermodynamic fields
    moist = noise(10, 15)
    flow_u, flow_v = noise(8, 12), noise(8, 12)
    surface = noise(12, 18)

    tc, wide, ar = feat.tc, feat.tc_wide, feat.ar
    out = np.empty((height, width, NUM_CHANNELS), np.float32)

    tmq = 4.0 + 44.0 * tropics + 4.0 * moist + 26.0 * ar + 22.0 * wide
    out[..., _CH["TMQ"]] = np.clip(tmq, 0.3, 70.0)
    u850 = 12.0 * jets - 6.0 * deep_tropics + 5.0 * flow_u + feat.u
    v850 = 4.0 * flow_v + feat.v
    out[..., _CH["U850"]] = u850
    out[..., _CH["V850"]] = v850
    out[..., _CH["UBOT"]] = 0.7 * u850 + 0.8 * flow_v
    out[..., _CH["VBOT"]] = 0.7 * v850 + 0.8 * flow_u
    out[..., _CH["QREFHT"]] = np.clip(
        0.001 + 0.017 * tropics + 0.0015 * moist + 0.004 * ar + 0.004 * wide, 1e-5, 0.03)
    psl = 101325.0 + 900.0 * weather - 5000.0 * tc - 800.0 * wide
    out[..., _CH["PSL"]] = psl
    out[..., _CH["PS"]] = psl - 1500.0 - 1200.0 * np.abs(surface)
    out[..., _CH["T200"]] = 220.0 - 8.0 * tropics + 2.0 * weather
    out[..., _CH["T500"]] = 236.0 + 30.0 * coslat2 + 2.5 * weather + 4.0 * tc
    log_prect = -8.6 + 1.4 * deep_tropics + 0.4 * moist + 1.6 * ar + 2.2 * wide
    out[..., _CH["PRECT"]] = 10.0 ** np.clip(log_prect, -10.0, -5.5)
    ts = 238.0 + 62.0 * coslat2 + 3.0 * weather + 1.5 * surface
    out[..., _CH["TS"]] = ts
    out[..., _CH["TREFHT"]] = ts - 1.5 + 0.5 * surface
    out[..., _CH["Z1000"]] = (psl - 100000.0) * 0.0083
    out[..., _CH["Z200"]] = 11000.0 + 1400.0 * coslat2 + 80.0 * weather - 60.0 * tc
    out[..., _CH["ZBOT"]] = 61.0 + 2.0 * surface

    labels = np.zeros((height, width), np.uint8)
    labels[ar > _HALF] = 2
    labels[tc > _HALF] = 1
    return out, labels


def sample_name(index: int) -> str:
    """File name of sample ``index`` in the real data set's pattern, 3-hourly from 2100-01-01."""
    when = dt.datetime(2100, 1, 1) + dt.timedelta(hours=3 * index)
    return f"data-{when:%Y-%m-%d-%H}-1.h5"


def write_synthetic_sample(out_dir: Path, index: int, seed: int, height: int,
                           width: int) -> Path:
    """Generate sample ``index`` of the data set with ``seed`` and write it; return its path."""
    data, labels = generate_sample(np.random.default_rng([int(seed), index]), height, width)
    path = Path(out_dir) / sample_name(index)
    write_sample(path, data, labels)
    return path


def generate_dataset(out_dir: str | os.PathLike, samples: int, seed: int,
                     height: int = HEIGHT, width: int = WIDTH, progress: bool = True,
                     force: bool = False, workers: int = 1) -> list[Path]:
    """Write ``samples`` synthetic sample files into ``out_dir``; return their paths.

    ``workers`` > 1 generates in that many processes (the files are the same: sample ``i``
    depends only on ``seed`` and ``i``). Refuses a folder that already holds sample files
    (they would mix with the new ones) unless ``force``, which deletes them first.
    """
    if samples < 1:
        raise DataError(f"number of samples must be positive, got {samples}")
    if workers < 1:
        raise DataError(f"number of workers must be positive, got {workers}")
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
    bar = Progress(samples, f"generating {height}x{width} samples", enabled=progress)
    job = functools.partial(write_synthetic_sample, out_dir, seed=seed, height=height,
                            width=width)
    paths = []
    if workers == 1:
        for i in range(samples):
            paths.append(job(i))
            bar.update()
        return paths
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for path in pool.map(job, range(samples)):
            paths.append(path)
            bar.update()
    return paths
