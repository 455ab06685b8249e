"""Synthetic CAM5-like samples: the project's stand-in for the 8.8 TB DeepCAM data set.

A sample is built the way the atmosphere is organized, then labelled by rules applied to the
finished fields, in the spirit of TECA (the detector that labelled DeepCAM):

- a zonal-mean climate: surface temperature falling poleward, trade winds and mid-latitude
  westerlies, and the sea-level pressure those winds balance (geostrophy);
- multi-scale weather: a random streamfunction with a power-law spectrum gives winds (its
  derivatives) and the pressure that balances them (``rho f psi``); vapour, temperature and
  precipitation get their own power-law noise. Along latitude circles the zonal spectra of
  TMQ, the winds and PRECT fall off with slopes near -2.3 over wavenumbers 4-100, as in
  reanalyses, instead of the smooth blobs of a hand-drawn field, and TMQ keeps a reanalysis'
  share of small-scale power (P(k 50-100) / P(k 4-10) about 0.05 at 20-60 degrees);
- consistency: TMQ and QREFHT follow temperature (Clausius-Clapeyron) and share one humidity
  field, poleward flow is moist, temperatures fall with height, Z1000/Z200 are hydrostatic
  (thickness from the layer temperature), PS is PSL reduced over random orography;
- features: tropical cyclones (deep, warm-core, cyclonic vortices), atmospheric rivers (long
  narrow moist filaments carrying a low-level jet), and look-alikes that must *not* be
  labelled: moist filaments with weak wind, cold-core lows in the subtropics, and the moist
  tropical band itself.

Labels follow from the fields only (:func:`detect_labels`): AR where the vapour transport
TMQ x |wind at 850 hPa| is high over a region at least 2000 km long and at most 1000 km wide,
poleward of the deep tropics; TC where sea-level pressure has a deep local minimum at 5-30
degrees latitude with a cyclonic wind maximum and a warm core. Feature sizes are fractions of
the grid and the spectra are defined in wavenumbers, so small grids (192x288) keep the class
fractions of the full 768x1152 one: about 98.6 % background, 0.05 % TC and 1.3 % AR, like the
real data (MLPerf HPC DeepCAM README).

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
import scipy.fft
import scipy.ndimage as ndi

from climseg.data.format import (CHANNELS, HEIGHT, WIDTH, DataError, Progress,
                                 prepare_output_folder, write_sample)

# Class fractions of the real data set (DeepCAM README): targets of the calibration below.
TARGET_FRACTIONS = (0.986, 0.0005, 0.013)

# Physical constants (SI).
_R_EARTH = 6.371e6
_OMEGA = 7.292e-5
_RHO = 1.2                      # near-surface air density, for geostrophy
_RD_OVER_G = 287.04 / 9.80665   # hydrostatic height per kelvin per e-folding of pressure
_KM_PER_DEG = 111.19

# Spectral noise: wavenumbers up to _KMAX zonally (per 360 degrees) and _LMAX meridionally
# (per 180 degrees, i.e. 2 * _LMAX per 360). The coefficients are drawn at this fixed size
# whatever the grid, so a seed gives the same large-scale weather at every resolution.
_KMAX = 160
_LMAX = 80

# The vapour noise's spectrum: K**-4.2, flat below wavenumber 18 (~2000 km). Moisture
# anomalies are stirred by synoptic eddies (storm-track scales, 1000-3000 km) and not fed from
# planetary scales, where the climate and temperature set TMQ; a plain power law from k0 = 3
# put too much of the variance there (zonal power ratio P(k 50-100) / P(k 4-10) of TMQ at
# 20-60 degrees 0.021 against 0.051 in a reanalysis). With the roll-off: about 0.05, slope -2.3.
_MOIST_SPECTRUM = (4.2, 18.0)

# Feature sizes in units of the grid height (768 rows = 180 degrees at full size).
_TC_RADIUS = 0.0140          # e-folding radius of the PSL low
_TC_PER_SAMPLE = (1, 4)      # integers in [low, high)
_COLD_LOWS = (0, 3)          # subtropical cold-core lows: deep, cyclonic, not TCs
_AR_LENGTH = (0.28, 0.42)    # centre-line length
_AR_HALF_WIDTH = 0.0199      # e-folding half width of the moisture filament
_AR_PER_SAMPLE = (2, 6)
_DRY_FILAMENTS = (1, 3)      # moist filaments with weak wind: not ARs

# Detection rules (TECA-like); calibrated to the DeepCAM class fractions.
IVT_THRESHOLD = 590.0        # TMQ (kg m-2) x |V850| (m s-1)
AR_MIN_LENGTH_KM = 2000.0
AR_MAX_WIDTH_KM = 1000.0
_IVT_SMOOTHING = 0.012       # box (fraction of the grid height) averaging IVT
AR_MIN_ABS_LAT = 15.0        # no AR pixel in the deep tropics...
AR_MIN_CENTROID_LAT = 20.0   # ... and an AR lies mostly outside the tropics
TC_LAT_RANGE = (5.0, 30.0)
TC_MIN_DEPRESSION = 1200.0   # Pa below the surrounding mean sea-level pressure
TC_MIN_WIND = 17.0           # m/s at 850 hPa: tropical-storm strength
TC_MIN_WARM_CORE = 0.5       # K: T500 above its surroundings
_TC_LABEL_FRACTION = 0.5     # label where the depression is at least half its peak

_CH = {name: i for i, name in enumerate(CHANNELS)}


# --- spectral noise ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _spectral_layout(height: int, width: int):
    """Index arrays placing the fixed-size coefficients into an (H, W//2+1) rfft2 array.

    Returns (rows_src, rows_dst, kmax, l_of_src, k) for the meridional wavenumbers that fit
    below the grid's Nyquist limits (strictly, so no coefficient needs Hermitian care).
    """
    lm = min(_LMAX, height // 2 - 1)
    km = min(_KMAX, width // 2 - 1)
    l_src = np.concatenate([np.arange(0, lm + 1), np.arange(-lm, 0)])
    rows_src = np.where(l_src >= 0, l_src, 2 * _LMAX + 1 + l_src)
    rows_dst = np.where(l_src >= 0, l_src, height + l_src)
    return rows_src, rows_dst, km, l_src.astype(np.float64), np.arange(km + 1, dtype=np.float64)


def _draw_coefficients(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` sets of unit complex normal coefficients of fixed size (2L+1, K+1)."""
    z = rng.standard_normal((count, 2, 2 * _LMAX + 1, _KMAX + 1), dtype=np.float32)
    return z[:, 0] + 1j * z[:, 1]


def _amplitude(l: np.ndarray, k: np.ndarray, beta: float, k0: float = 3.0) -> np.ndarray:
    """Isotropic amplitude for a 2-D spectrum ~ K**-beta (zonal 1-D slope 1 - beta) above
    wavenumber ``k0``, flattening below it."""
    kk = k[None, :] ** 2 + (2.0 * l[:, None]) ** 2       # (2l): per 360 degrees, like k
    amp = (kk + k0 * k0) ** (-beta / 4.0)
    amp[:, 0] = 0.0    # no zonally symmetric part: zonal means come from the climate profiles
    return amp


def _to_grid(coef: np.ndarray, height: int, width: int) -> np.ndarray:
    """Real fields (n, H, W) float32 from truncated half-plane coefficients (n, 2l+1, k+1)."""
    rows_src, rows_dst, km, _, _ = _spectral_layout(height, width)
    # Only the first km+1 columns are non-zero: transform those along latitude, then let the
    # zonal inverse transform pad the rest (3-4x less work than a full irfft2).
    part = np.zeros((coef.shape[0], height, km + 1), np.complex64)
    part[:, rows_dst] = coef
    part = scipy.fft.ifft(part, axis=-2, norm="forward", workers=1)
    return scipy.fft.irfft(part, n=width, axis=-1, norm="forward", workers=1)


def _noise_fields(rng: np.random.Generator, height: int, width: int,
                  spectra: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Unit-variance (in expectation) noise fields, one per (beta, k0) of ``spectra``: the
    2-D spectral exponent and the wavenumber below which it flattens (see _amplitude)."""
    rows_src, _, km, _, _ = _spectral_layout(height, width)
    z = _draw_coefficients(rng, len(spectra))[:, rows_src, :km + 1]
    coef = np.empty_like(z)
    for i, (beta, k0) in enumerate(spectra):
        coef[i] = z[i] * _unit_amplitude(beta, k0)[rows_src, :km + 1]
    return _to_grid(coef, height, width)


_L_ALL = np.concatenate([np.arange(0, _LMAX + 1), np.arange(-_LMAX, 0)]).astype(np.float64)
_K_ALL = np.arange(_KMAX + 1, dtype=np.float64)


@functools.lru_cache(maxsize=16)
def _unit_amplitude(beta: float, k0: float = 3.0) -> np.ndarray:
    """Amplitudes (2L+1, K+1) of a field of unit variance when all wavenumbers are kept.

    Normalized over the full fixed spectrum, not the part a small grid keeps, so a coarse
    grid shows the same large scales with the same amplitude, only without the finest ones.
    """
    amp = _amplitude(_L_ALL, _K_ALL, beta, k0)
    # Parseval for irfft2 (norm="forward"), k >= 1 only: var = sum 2 |c|^2, E|c|^2 = 2 A^2.
    return amp / np.sqrt(4.0 * (amp ** 2).sum())


def _streamfunction_winds(rng: np.random.Generator, height: int, width: int, beta: float,
                          wind_std: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(psi m2/s, u, v m/s) of a random non-divergent flow; u, v have std ``wind_std``.

    u = -d(psi)/dy, v = d(psi)/dx, taken in spectral space (exact for the truncated field).
    """
    rows_src, _, km, l, k = _spectral_layout(height, width)
    z = _draw_coefficients(rng, 1)[0][rows_src, :km + 1]
    amp = _amplitude(_L_ALL, _K_ALL, beta)
    dy_all = (2.0 * _L_ALL / _R_EARTH)[:, None]    # meridional wavenumber, rad per metre
    dx_all = (_K_ALL / _R_EARTH)[None, :]
    # Normalized over the full fixed spectrum (see _unit_amplitude).
    wind_var = 4.0 * (((dy_all ** 2 + dx_all ** 2) / 2.0) * amp ** 2).sum()
    amp = amp[rows_src, :km + 1] * (wind_std / np.sqrt(wind_var))
    dy = (2.0 * l / _R_EARTH)[:, None]
    dx = (k / _R_EARTH)[None, :]
    psi = z * amp
    coef = np.stack([psi, -1j * dy * psi, 1j * dx * psi]).astype(np.complex64)
    out = _to_grid(coef, height, width)
    return out[0], out[1], out[2]


# --- features ---------------------------------------------------------------------------------

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
    """Anomaly fields of the features, on the full grid."""

    def __init__(self, height: int, width: int):
        shape = (height, width)
        self.psl = np.zeros(shape, np.float32)     # Pa (negative in lows)
        self.warm = np.zeros(shape, np.float32)    # core temperature anomaly profile (K)
        self.wide = np.zeros(shape, np.float32)    # cyclone moisture/rain shield (0..1)
        self.moist = np.zeros(shape, np.float32)   # filament vapour (0..1)
        self.u = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)


def _add_vortex(feat: _Features, rng: np.random.Generator, lat: np.ndarray, height: int,
                width: int, lat_range: tuple[float, float], radius_scale: float,
                depth: tuple[float, float], vmax: tuple[float, float],
                warm: tuple[float, float]) -> None:
    """A cyclonic low: Gaussian PSL depression, tangential wind peaking near 1.3 radii."""
    hemisphere = rng.choice((-1.0, 1.0))
    lat_deg = hemisphere * rng.uniform(*lat_range)
    row = float(np.interp(lat_deg, lat, np.arange(height)))
    col = rng.uniform(0, width)
    radius = _TC_RADIUS * height * radius_scale * rng.uniform(0.85, 1.15)
    dp, vm, dt_core = rng.uniform(*depth), rng.uniform(*vmax), rng.uniform(*warm)
    rows, cols, dy, dx = _wrapped_box(row, col, 4.0 * radius + 2, height, width)
    dy, dx = dy[:, None].astype(np.float32), dx[None, :].astype(np.float32)
    r2 = (dx * dx + dy * dy) / (radius * radius)
    core = np.exp(-r2)
    rm = 1.3
    rr = np.sqrt(r2) + 1e-6
    vt = vm * (rr / rm) * np.exp(0.5 * (1.0 - (rr / rm) ** 2))
    sense = 1.0 if lat_deg > 0 else -1.0     # anticlockwise in the north, clockwise in the south
    ix = np.ix_(rows, cols)
    feat.psl[ix] -= dp * core
    feat.warm[ix] += dt_core * core
    feat.wide[ix] = np.maximum(feat.wide[ix], np.exp(-r2 / 4.0) * (dt_core > 0))
    feat.u[ix] += -sense * vt * (dy / radius) / rr
    feat.v[ix] += sense * vt * (dx / radius) / rr


def _add_filament(feat: _Features, rng: np.random.Generator, lat: np.ndarray, height: int,
                  width: int, transport: tuple[float, float], segments: int = 16) -> None:
    """A long, narrow, curved moist filament from the subtropics poleward, carrying a jet of
    ``transport`` m/s along it (an AR) or almost none (a moist filament that is no AR)."""
    hemisphere = rng.choice((-1.0, 1.0))
    lat0 = hemisphere * rng.uniform(18.0, 32.0)
    row0 = float(np.interp(lat0, lat, np.arange(height)))
    col0 = rng.uniform(0, width)
    length = rng.uniform(*_AR_LENGTH) * height
    heading = np.deg2rad(rng.uniform(15.0, 45.0))      # from east, poleward
    bend = rng.uniform(-0.12, 0.12) * length
    half_width = _AR_HALF_WIDTH * height * rng.uniform(0.85, 1.15)
    jet = rng.uniform(*transport)

    t = np.linspace(0.0, 1.0, segments + 1)
    along = np.array([np.cos(heading), hemisphere * np.sin(heading)])   # (col, row) direction
    normal = np.array([-along[1], along[0]])
    pts = (np.array([col0, row0])[None, :] + (t * length)[:, None] * along[None, :]
           + (bend * np.sin(np.pi * t))[:, None] * normal[None, :])    # (segments+1, 2)

    pts = pts.astype(np.float32)
    pad = 3.0 * half_width + 2
    c_lo, c_hi = pts[:, 0].min() - pad, pts[:, 0].max() + pad
    r_lo, r_hi = max(pts[:, 1].min() - pad, 0), min(pts[:, 1].max() + pad, height - 1)
    if r_hi <= r_lo:
        return
    rows = np.arange(int(r_lo), int(np.ceil(r_hi)) + 1)
    cols_unwrapped = np.arange(int(np.floor(c_lo)), int(np.ceil(c_hi)) + 1)[:width]
    r_base, c_base = rows[0], cols_unwrapped[0]
    shape = (rows.size, cols_unwrapped.size)
    # Nearest centre-line point of every pixel, segment by segment, each over only the pixels
    # within `pad` of it (the filament's bounding box is mostly empty): distance^2, position
    # along the line (0..1) and the segment's direction.
    d2min = np.full(shape, np.inf, np.float32)
    tpos = np.zeros(shape, np.float32)
    dir_x = np.zeros(shape, np.float32)
    dir_y = np.zeros(shape, np.float32)
    for j in range(segments):
        (ax, ay), (bx, by) = pts[j], pts[j + 1]
        r0 = max(int(np.floor(min(ay, by) - pad)), int(rows[0])) - r_base
        r1 = min(int(np.ceil(max(ay, by) + pad)), int(rows[-1])) - r_base + 1
        c0 = max(int(np.floor(min(ax, bx) - pad)) - c_base, 0)
        c1 = min(int(np.ceil(max(ax, bx) + pad)) - c_base + 1, shape[1])
        if r1 <= r0 or c1 <= c0:
            continue
        py = (np.arange(r0, r1, dtype=np.float32) + r_base)[:, None]
        px = (np.arange(c0, c1, dtype=np.float32) + c_base)[None, :]
        sx, sy = np.float32(bx - ax), np.float32(by - ay)
        seg_len2 = sx * sx + sy * sy
        s_ = np.clip(((px - ax) * sx + (py - ay) * sy) / seg_len2, 0.0, 1.0)
        qx = ax + s_ * sx - px
        qy = ay + s_ * sy - py
        d2 = qx * qx + qy * qy
        win = (slice(r0, r1), slice(c0, c1))
        closer = d2 < d2min[win]
        d2min[win] = np.where(closer, d2, d2min[win])
        tpos[win] = np.where(closer, (j + s_) / segments, tpos[win])
        norm = np.sqrt(seg_len2)
        dir_x[win] = np.where(closer, sx / norm, dir_x[win])
        dir_y[win] = np.where(closer, sy / norm, dir_y[win])
    taper = np.sqrt(np.clip(np.sin(np.pi * tpos) * 1.6, 0.0, 1.0))      # fades at both ends
    profile = np.exp(-d2min / half_width ** 2) * taper
    speed = jet * np.exp(-d2min / (1.5 * half_width) ** 2) * taper

    ix = np.ix_(rows, cols_unwrapped % width)
    feat.moist[ix] = np.maximum(feat.moist[ix], profile)
    feat.u[ix] += speed * dir_x
    feat.v[ix] += speed * dir_y


# --- the sample -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _climate(height: int):
    """Zonal-mean profiles (1-D over rows, float64): lat, TS, U850 and the balancing PSL."""
    lat = np.linspace(-90.0, 90.0, height)
    phi = np.deg2rad(lat)
    ts = 250.0 + 50.0 * np.cos(phi) ** 2
    alat = np.abs(lat)

    def u850(a):   # trade easterlies and mid-latitude westerlies (m/s)
        return 9.0 * np.exp(-((a - 45.0) / 13.0) ** 2) - 6.0 * np.exp(-(a / 14.0) ** 2)

    # Geostrophy, dP/dy = -rho f U, integrated from the equator poleward.
    fine = np.linspace(0.0, 90.0, 901)
    dpdy = -_RHO * 2.0 * _OMEGA * np.sin(np.deg2rad(fine)) * u850(fine)
    dp = np.concatenate([[0.0], np.cumsum(0.5 * (dpdy[1:] + dpdy[:-1]))]) \
        * np.deg2rad(fine[1] - fine[0]) * _R_EARTH
    psl = 100900.0 + np.interp(alat, fine, dp)
    return lat, ts, u850(alat), psl


def _qsat(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Saturation specific humidity (kg/kg) at temperature t (K) and pressure p (Pa)."""
    es = 611.2 * np.exp(17.67 * (t - 273.15) / (t - 29.65))
    return 0.622 * es / (p - 0.378 * es)


def generate_fields(rng: np.random.Generator, height: int = HEIGHT,
                    width: int = WIDTH) -> np.ndarray:
    """The 16 channels of one synthetic sample, float32 (H, W, 16), before labelling."""
    if height < 8 or width < 8:
        raise DataError(f"synthetic grid {height}x{width} is too small (at least 8x8)")
    lat1, ts1, u1, psl1 = _climate(height)
    lat = lat1.astype(np.float32)
    col = lambda a: np.asarray(a, np.float32)[:, None]   # noqa: E731  (a 1-D profile as a column)
    sinlat = col(np.sin(np.deg2rad(lat1)))
    # Hemisphere sign, smoothed over +-10 degrees so nothing jumps at the equator.
    sign = col(np.tanh(lat1 / 10.0))
    midlat = col(np.exp(-((np.abs(lat1) - 45.0) / 25.0) ** 2))
    tropics = col(np.exp(-(lat1 / 25.0) ** 2))

    feat = _Features(height, width)
    for _ in range(rng.integers(*_AR_PER_SAMPLE)):
        _add_filament(feat, rng, lat, height, width, transport=(17.0, 26.0))
    for _ in range(rng.integers(*_DRY_FILAMENTS)):
        _add_filament(feat, rng, lat, height, width, transport=(0.0, 3.0))
    for _ in range(rng.integers(*_TC_PER_SAMPLE)):
        _add_vortex(feat, rng, lat, height, width, lat_range=(8.0, 27.0), radius_scale=1.0,
                    depth=(2500.0, 6000.0), vmax=(25.0, 45.0), warm=(3.0, 7.0))
    for _ in range(rng.integers(*_COLD_LOWS)):
        _add_vortex(feat, rng, lat, height, width, lat_range=(12.0, 28.0), radius_scale=1.6,
                    depth=(1800.0, 3500.0), vmax=(15.0, 25.0), warm=(-4.0, -1.5))

    # Weather: winds from a streamfunction (2-D spectrum K^-5.4: wind zonal slope ~ -2.4);
    # vapour, temperature, precipitation and orography noise with their own slopes.
    psi, u_w, v_w = _streamfunction_winds(rng, height, width, beta=5.4, wind_std=6.5)
    moist_n, temp_n, rain_n, orog_n = _noise_fields(
        rng, height, width, spectra=(_MOIST_SPECTRUM, (4.4, 3.0), (2.9, 3.0), (4.0, 3.0)))
    eddy = 0.55 + 0.7 * midlat               # storm tracks: stronger eddies at mid-latitudes
    f = col(2.0 * _OMEGA * np.sin(np.deg2rad(lat1)))

    ch: dict[str, np.ndarray] = {}
    ch["U850"] = u850 = col(u1) + eddy * u_w + feat.u
    ch["V850"] = v850 = eddy * v_w + feat.v
    # Surface winds: weaker and turned towards low pressure by friction (left in the north).
    turn_c, turn_s = np.float32(np.cos(0.35)), np.float32(np.sin(0.35))
    ch["UBOT"] = 0.72 * (u850 * turn_c - sign * v850 * turn_s)
    ch["VBOT"] = 0.72 * (v850 * turn_c + sign * u850 * turn_s)
    # Geostrophic pressure of the eddies: p' = rho f psi.
    psl = col(psl1) + (_RHO * f) * (eddy * psi) + feat.psl
    ch["PSL"] = psl

    zs = np.clip(1600.0 * (orog_n - 1.0), 0.0, 1300.0)     # orography (m), ~15 % of the area
    t_anom = (1.5 + 3.5 * np.abs(sinlat)) * temp_n
    ts = col(ts1) + t_anom - 0.0065 * zs
    ch["TS"] = ts
    trefht = ts - 0.8
    ch["TREFHT"] = trefht
    ch["PS"] = psl * np.exp(-zs / (_RD_OVER_G * (trefht + 0.00325 * zs)))
    t500 = col(0.62 * ts1 + 80.0) + 0.8 * t_anom + feat.warm
    ch["T500"] = t500
    t200 = 221.0 - 5.0 * tropics + 0.3 * t_anom + 0.6 * feat.warm
    ch["T200"] = t200

    # Humidity: one relative-humidity-like field, moist where the flow is poleward.
    wetness = 0.8 * moist_n + 0.5 * sign * v_w / 6.5
    humid = np.exp(0.32 * wetness)
    tmq = (48.0 * np.exp(0.05 * (ts + 0.0065 * zs - 300.0)) * humid
           + 20.0 * feat.moist + 22.0 * feat.wide)
    np.clip(tmq, 0.3, 75.0, out=tmq)
    ch["TMQ"] = tmq
    rh = np.clip(0.72 * np.sqrt(humid) + 0.15 * feat.moist + 0.2 * feat.wide, 0.1, 0.98)
    ch["QREFHT"] = rh * _qsat(trefht, ch["PS"])
    prect = (2.5e-8 * (tmq / 40.0) ** 2 * np.exp(1.1 * rain_n)
             * (1.0 + 3.0 * feat.moist + 12.0 * feat.wide))
    ch["PRECT"] = np.clip(prect - 4e-9, 0.0, 1e-5)

    # Hydrostatic heights: Z1000 from PSL and the surface air temperature at sea level, Z200
    # adds the 1000-200 hPa thickness of the layer's mean temperature.
    t_sl = trefht + 0.0065 * zs
    z1000 = _RD_OVER_G * t_sl * np.log(psl / 100000.0)
    ch["Z1000"] = z1000
    t_layer = 0.3 * t_sl + 0.45 * t500 + 0.25 * t200
    ch["Z200"] = z1000 + (_RD_OVER_G * np.log(5.0)) * t_layer
    ch["ZBOT"] = (_RD_OVER_G * 0.00753) * trefht    # lowest level, ~0.75 % above PS
    return _interleave([ch[name] for name in CHANNELS])


def _interleave(planes: list[np.ndarray], rows_per_block: int = 16) -> np.ndarray:
    """(H, W, C) float32 from C (H, W) planes, in row blocks that stay in the cache (writing
    whole planes into the strided channel axis would stream the 57 MB output 16 times)."""
    height, width = planes[0].shape
    out = np.empty((height, width, len(planes)), np.float32)
    for r in range(0, height, rows_per_block):
        block = out[r:r + rows_per_block]
        for c, plane in enumerate(planes):
            block[:, :, c] = plane[r:r + rows_per_block]
    return out


# --- labels -----------------------------------------------------------------------------------

def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of ``mask``, joined across the date line (periodic longitude)."""
    if not mask.any():
        return np.zeros(mask.shape, np.int32), 0
    # Cut at the longitude with the fewest mask pixels: a component crosses the cut only if
    # that column holds some of it, which the roll back then reunites.
    shift = int(np.argmin(mask.sum(axis=0)))
    rolled = np.roll(mask, -shift, axis=1)
    labels, n = ndi.label(rolled, structure=np.ones((3, 3), bool))
    if rolled[:, 0].any():   # the cut column is not empty: merge components across it
        first, last = labels[:, 0], labels[:, -1]
        parent = np.arange(n + 1)

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        h = mask.shape[0]
        for r in range(h):
            if first[r]:
                for rr in (r - 1, r, r + 1):
                    if 0 <= rr < h and last[rr]:
                        a, b = root(first[r]), root(last[rr])
                        parent[max(a, b)] = min(a, b)
        roots = np.array([root(i) for i in range(n + 1)])
        labels = roots[labels]
    return np.roll(labels, shift, axis=1), n


def transport(data: np.ndarray) -> np.ndarray:
    """The AR rule's vapour transport: TMQ x |(U850, V850)| averaged over a ~2-degree box.

    Transport is a vertical integral, smoother than the 850 hPa product: averaging it before
    thresholding keeps AR outlines from being frayed by grid-scale gusts.
    """
    height, width = data.shape[:2]
    u, v = data[..., _CH["U850"]], data[..., _CH["V850"]]
    ivt = data[..., _CH["TMQ"]] * np.sqrt(u * u + v * v)
    box_r = max(1, int(round(_IVT_SMOOTHING * height)))
    box_c = max(1, int(round(box_r * width / (2.0 * height))))
    if box_r > 1 or box_c > 1:
        ivt = ndi.uniform_filter(ivt, size=(box_r, box_c), mode=("nearest", "wrap"))
    return ivt


def detect_labels(data: np.ndarray) -> np.ndarray:
    """Class ids (uint8 (H, W)) of a sample by TECA-like rules on its fields.

    AR (2): TMQ x |(U850, V850)|, box-averaged over ~2 degrees, >= IVT_THRESHOLD at |lat| >= 15
    degrees outside the wind ring of deep (sub)tropical lows, in connected regions
    at least 2000 km long and at most 1000 km wide (area / length) whose centroid lies poleward
    of 20 degrees. TC (1): a local sea-level-pressure depression of at least
    TC_MIN_DEPRESSION at 5-30 degrees latitude whose region has 850 hPa winds of at least
    17 m/s, cyclonic mean vorticity for its hemisphere and a warm core at 500 hPa; labelled
    where the depression exceeds half its peak.
    """
    height, width = data.shape[:2]
    lat = np.linspace(-90.0, 90.0, height)
    labels = np.zeros((height, width), np.uint8)

    # Local sea-level-pressure depression: below the mean of a ~12-degree box around.
    psl = data[..., _CH["PSL"]]
    size_r = max(3, int(round(0.07 * height)))
    size_c = max(3, int(round(size_r * width / (2.0 * height))))
    depression = ndi.uniform_filter(psl, size=(size_r, size_c), mode=("nearest", "wrap")) - psl
    _label_rivers(data, lat, depression, labels)
    _label_cyclones(data, lat, depression, labels)
    return labels


def _label_rivers(data: np.ndarray, lat: np.ndarray, depression: np.ndarray,
                  labels: np.ndarray) -> None:
    """Mark detect_labels' atmospheric rivers (2) in ``labels``."""
    height, width = data.shape[:2]
    alat = np.abs(lat)
    coslat = np.cos(np.deg2rad(lat))
    dlat_km = 180.0 / (height - 1) * _KM_PER_DEG
    dlon_km = 360.0 / width * _KM_PER_DEG
    # Atmospheric rivers.
    ivt = transport(data)
    # The ring of strong wind around a deep (sub)tropical low is a cyclone's, not a river's.
    # The low's region, widened by ~3 TC radii each way to cover its wind ring.
    cyclonic = ((depression >= 0.5 * TC_MIN_DEPRESSION)
                & (alat <= TC_LAT_RANGE[1] + 5.0)[:, None])
    if cyclonic.any():
        reach = max(3, int(round(6 * _TC_RADIUS * height)) | 1)
        cyclonic = ndi.maximum_filter(cyclonic, size=(reach, max(3, int(round(
            reach * width / (2.0 * height))) | 1)), mode=("nearest", "wrap"))
    cand = (ivt >= IVT_THRESHOLD) & (alat >= AR_MIN_ABS_LAT)[:, None] & ~cyclonic
    comp, n = _components(cand)
    if n:
        rows, cols = np.nonzero(comp)
        ids = comp[rows, cols]
        # Unwrap longitudes around each component's first pixel so that spans are local.
        ref = np.zeros(n + 1, np.int64)
        ref[ids[::-1]] = cols[::-1]
        x = (cols - ref[ids] + width // 2) % width - width // 2
        y = rows.astype(np.float64)
        w = coslat[rows]
        count = np.bincount(ids, minlength=n + 1).astype(np.float64)
        area = np.bincount(ids, w, n + 1) * dlat_km * dlon_km
        mean = lambda q: np.bincount(ids, q, n + 1) / np.maximum(count, 1)   # noqa: E731
        my, mx = mean(y), mean(x)
        cy = lat[np.clip(np.round(my).astype(int), 0, height - 1)]
        sx = dlon_km * np.cos(np.deg2rad(cy))
        vyy = (mean(y * y) - my * my) * dlat_km ** 2
        vxx = (mean(x * x) - mx * mx) * sx ** 2
        vxy = (mean(x * y) - mx * my) * dlat_km * sx
        lam = 0.5 * (vxx + vyy) + np.sqrt(0.25 * (vxx - vyy) ** 2 + vxy ** 2)
        length = np.sqrt(12.0 * np.maximum(lam, 0.0))    # a uniform segment has var L^2 / 12
        width_km = area / np.maximum(length, 1e-9)
        keep = ((length >= AR_MIN_LENGTH_KM) & (width_km <= AR_MAX_WIDTH_KM)
                & (np.abs(cy) >= AR_MIN_CENTROID_LAT))
        keep[0] = False
        labels[keep[comp]] = 2


def _label_cyclones(data: np.ndarray, lat: np.ndarray, depression: np.ndarray,
                    labels: np.ndarray) -> None:
    """Mark detect_labels' tropical cyclones (1) in ``labels``, over any river there."""
    height, width = data.shape[:2]
    alat = np.abs(lat)
    u, v = data[..., _CH["U850"]], data[..., _CH["V850"]]
    # Tropical cyclones.
    band = (alat >= TC_LAT_RANGE[0]) & (alat <= TC_LAT_RANGE[1])
    comp, n = _components((depression >= TC_MIN_DEPRESSION) & band[:, None])
    if n:
        t500 = data[..., _CH["T500"]]
        for i, sl in enumerate(ndi.find_objects(comp), start=1):
            if sl is None:
                continue
            region = comp[sl] == i
            dep = depression[sl]
            peak = dep[region].max()
            r0 = sl[0].start + int(np.argmax(np.where(region, dep, -np.inf)) // region.shape[1])
            hemi = 1.0 if lat[r0] > 0 else -1.0
            uu, vv = u[sl], v[sl]
            if np.sqrt(uu * uu + vv * vv)[region].max() < TC_MIN_WIND:
                continue
            # Circulation sign: d(v)/dx - d(u)/dy summed over the region (grid units suffice).
            if region.shape[0] < 2 or region.shape[1] < 2:
                continue
            vort = np.gradient(vv, axis=1) - np.gradient(uu, axis=0)
            if hemi * vort[region].sum() <= 0:
                continue
            # Warm core: T500 over the region against a ring around it.
            r_a, r_b = max(sl[0].start - region.shape[0], 0), min(sl[0].stop + region.shape[0],
                                                                    height)
            c_idx = np.arange(sl[1].start - region.shape[1],
                              sl[1].stop + region.shape[1]) % width
            ring = t500[r_a:r_b][:, c_idx]
            ring_mask = (comp[r_a:r_b][:, c_idx] != i)
            if t500[sl][region].mean() - ring[ring_mask].mean() < TC_MIN_WARM_CORE:
                continue
            inner = region & (dep >= max(TC_MIN_DEPRESSION, _TC_LABEL_FRACTION * peak))
            labels[sl][inner] = 1


def generate_sample(rng: np.random.Generator, height: int = HEIGHT,
                    width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic sample: (data float32 (H, W, 16), labels uint8 (H, W))."""
    data = generate_fields(rng, height, width)
    return data, detect_labels(data)


def sample_name(index: int) -> str:
    """File name of sample ``index`` in the real data set's pattern, 3-hourly from 2100-01-01.

    As in DeepCAM, the fourth field is the 3-hourly step of the day (0-7; hour = 3 x step), and
    the last is the ensemble member.
    """
    day = dt.date(2100, 1, 1) + dt.timedelta(days=index // 8)
    return f"data-{day:%Y-%m-%d}-{index % 8:02d}-1.h5"


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
    if height < 8 or width < 8:
        raise DataError(f"synthetic grid {height}x{width} is too small (at least 8x8)")
    out_dir = Path(out_dir)
    prepare_output_folder(out_dir, force)
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
