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

:class:`ToModelGrid` is the rule ``predict`` and ``evaluate`` share: an input on the model's
grid is taken as it is; on another, its channels go to the model's grid bilinearly and what
is predicted there comes back to the input's grid.

Bilinear, not conservative: conservative remapping needs each cell's bounds, which many files
(ERA5, CAM5 history files) do not carry; the model's inputs are smooth at its scale (a 25 to
60 km grid for fields whose features span hundreds of kilometres), where bilinear and
conservative differ by far less than the model can tell; and bilinear keeps a field's extremes
within the source's, where higher orders overshoot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from climseg.grid import LAT_SPAN, LON_SPAN, RegularGrid, describe, same_grid

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
        """A class mask (..., lat, lon) on the target grid: each target cell takes the value of
        the nearest source centre (periodic in longitude); also per-class scores whose argmax
        is then the nearest cell's class."""
        if self.identity:
            return mask
        return np.asarray(mask)[..., self._near_lat[:, None], self._near_lon[None, :]]


class ToModelGrid:
    """How an input on the grid ``source`` meets a model of the grid ``model`` (None:
    unknown), the rule ``predict`` and ``evaluate`` share: on the model's grid (or where the
    model's is unknown) as it is; on another, the channels the model uses are regridded
    bilinearly to the model's grid (:meth:`fields`), and what is predicted there goes back
    with :attr:`back` (None where nothing was regridded). :attr:`how` says which, in words."""

    def __init__(self, source: RegularGrid, model: RegularGrid | None):
        to_model = None if model is None else Regridder(source, model)
        self.regridded = to_model is not None and not to_model.identity
        self._to_model = to_model if self.regridded else None
        self.back = Regridder(model, source) if self.regridded else None
        if not self.regridded:
            how = "on the model's own grid" if model is not None \
                else "on the input's grid (model's unknown)"
            self.how = f"{how}, {describe(source)}"
        else:
            self.how = (f"on the model's grid {describe(model)}, regridded bilinearly from "
                        f"and back to the input's {describe(source)}; the class mask by "
                        "nearest neighbour")

    def fields(self, data: np.ndarray, channels: list[int]) -> np.ndarray:
        """``data`` (H, W, channel) on the model's grid: only ``channels`` are regridded (the
        others, which the model does not read, stay zero)."""
        if not self.regridded:
            return data
        on_model = np.zeros((*self._to_model.target.shape, data.shape[-1]), np.float32)
        on_model[..., channels] = np.moveaxis(
            self._to_model.bilinear(np.moveaxis(data[..., channels], -1, 0)), 0, -1)
        return on_model
