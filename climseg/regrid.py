"""Fields from one regular global latitude/longitude grid to another: bilinear for fields and
probabilities, nearest neighbour for class masks.

Both grids are in climseg's layout (:mod:`climseg.grid`): latitudes ascending, longitudes
ascending within 0..360, regular spacing, the globe covered in longitude. Interpolation is
separable: along latitude, then along longitude, each a linear blend of the two source
centres around the target.

- **The 0/360 seam** is periodic: a target east of the last source column blends it with the
  first one, 360 degrees on.
- **The poles.** A source grid of centred cells has no row on the pole, so a target row
  between its outermost row and the pole (the model's first half-cell, say) has only one
  neighbour. The pole is one point: it is given the mean of the outermost ring (the value a
  smooth field tends to there, to second order in the ring's distance), and such targets are
  interpolated linearly between the ring and the pole. Masks take the nearest row instead.

Bilinear, not conservative: conservative remapping needs each cell's bounds, which many files
(ERA5, CAM5 history files) do not carry; the model's inputs are smooth at its scale (a 25 to
60 km grid for fields whose features span hundreds of kilometres), where bilinear and
conservative differ by far less than the model can tell; and bilinear keeps a field's extremes
within the source's, where higher orders overshoot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from climseg.grid import LAT_SPAN, LON_SPAN, RegularGrid, same_grid

_POLE = LAT_SPAN / 2


@dataclass(frozen=True)
class _Axis:
    """Target j = (1 - w[j]) * source[lo[j]] + w[j] * source[hi[j]], along one axis."""

    lo: np.ndarray
    hi: np.ndarray
    w: np.ndarray

    def apply(self, field: np.ndarray, axis: int) -> np.ndarray:
        lo, hi = np.take(field, self.lo, axis=axis), np.take(field, self.hi, axis=axis)
        shape = [1] * field.ndim
        shape[axis] = len(self.w)
        w = self.w.reshape(shape).astype(field.dtype, copy=False)
        return lo + w * (hi - lo)


def _linear(source: np.ndarray, target: np.ndarray) -> _Axis:
    """Blend weights of ascending ``source`` coordinates at ``target`` (inside their range)."""
    hi = np.clip(np.searchsorted(source, target, side="right"), 1, len(source) - 1)
    lo = hi - 1
    w = np.clip((target - source[lo]) / (source[hi] - source[lo]), 0.0, 1.0)
    return _Axis(lo, hi, w)


def _lat_rows(source: np.ndarray) -> tuple[np.ndarray, bool, bool]:
    """Source latitudes with a pole row added on each side that has none (see the module
    doc), and whether the south and north ones were added."""
    south, north = bool(source[0] > -_POLE), bool(source[-1] < _POLE)
    rows = np.concatenate([[-_POLE]] * south + [source] + [[_POLE]] * north)
    return rows, south, north


def _periodic(source: np.ndarray, target: np.ndarray) -> _Axis:
    """Blend weights along a global longitude axis: the first column again 360 degrees on
    closes the seam."""
    n = len(source)
    extended = np.append(source, source[0] + LON_SPAN)
    t = np.asarray(target, np.float64) % LON_SPAN
    t = np.where(t < source[0], t + LON_SPAN, t)
    axis = _linear(extended, t)
    return _Axis(axis.lo % n, axis.hi % n, axis.w)


class Regridder:
    """From ``source`` to ``target`` (both :class:`~climseg.grid.RegularGrid`, climseg's
    layout). ``bilinear`` for fields (..., lat, lon); ``nearest`` for class masks (lat, lon).
    On the same grid both return their input unchanged."""

    def __init__(self, source: RegularGrid, target: RegularGrid):
        self.source, self.target = source, target
        self.identity = same_grid(source, target)
        if self.identity:
            return
        rows, self._south, self._north = _lat_rows(source.lat)
        self._lat = _linear(rows, np.clip(target.lat, -_POLE, _POLE))
        self._lon = _periodic(source.lon, target.lon)
        # Nearest: the closer of the two blended centres; a target half-way takes the first.
        near_lat = _linear(source.lat, np.clip(target.lat, source.lat[0], source.lat[-1]))
        self._near_lat = np.where(near_lat.w > 0.5, near_lat.hi, near_lat.lo)
        self._near_lon = np.where(self._lon.w > 0.5, self._lon.hi, self._lon.lo)

    def bilinear(self, field: np.ndarray) -> np.ndarray:
        """``field`` (..., lat, lon) on the target grid, interpolated bilinearly."""
        if self.identity:
            return field
        field = np.asarray(field)
        parts = [field]
        if self._south:
            parts.insert(0, field[..., :1, :].mean(axis=-1, keepdims=True)
                         .repeat(field.shape[-1], axis=-1))
        if self._north:
            parts.append(field[..., -1:, :].mean(axis=-1, keepdims=True)
                         .repeat(field.shape[-1], axis=-1))
        rows = np.concatenate(parts, axis=-2) if len(parts) > 1 else field
        return self._lon.apply(self._lat.apply(rows, -2), -1)

    def nearest(self, mask: np.ndarray) -> np.ndarray:
        """A (lat, lon) class mask on the target grid: each target cell takes the class of the
        nearest source centre (periodic in longitude)."""
        if self.identity:
            return mask
        return np.asarray(mask)[np.ix_(self._near_lat, self._near_lon)]

