"""CF-netCDF fields as ``climseg predict`` and ``climseg evaluate`` inputs: ClimateNet files,
CAM5 history files, ERA5- and MERRA-2-style downloads.

A file holds one 1-D latitude coordinate (``lat`` or ``latitude``, ascending or descending)
and one 1-D longitude coordinate (``lon`` or ``longitude``, -180..180 or 0..360), an optional
time axis (``time``, ``valid_time``, or any dimension whose coordinate is CF time), and one
variable per channel, dimensioned (lat, lon) or (time, lat, lon). Variables are found by a
name map (:func:`variable_map`): climseg's channel names by default (ClimateNet's and CAM5's
own), others with ``--variables TMQ=tcwv,PSL=msl``. Values are unpacked (CF ``scale_factor``,
``add_offset``); no unit is converted, so a mapped variable must be in the channel's units.
Labels (class ids) are ClimateNet's ``LABELS``, drawn by ``predict`` where a file has them;
``evaluate`` requires them (or another name, ``--labels``), one mask per time step.

Both netCDF kinds are read with what climseg already pins: netCDF-4 through h5netcdf (it is
HDF5), netCDF-3 (classic and 64-bit offset, as CAM5 writes) through ``scipy.io.netcdf_file``.

:class:`GriddedFile` gives each time step in climseg's layout (rows south to north, columns
eastward from the first longitude at or past 0°E) on the file's grid as a
:class:`~climseg.grid.RegularGrid`, and puts anything in that layout back into the file's own
order (:meth:`GriddedFile.to_file_layout`), so a mask is written on the file's coordinates.
Every problem is one :class:`~climseg.data.format.DataError` line naming the file.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5netcdf
import numpy as np
from scipy.io import netcdf_file

from climseg.config import ConfigError
from climseg.data.format import CHANNELS, NUM_CHANNELS, DataError, labels_to_uint8
from climseg.grid import LAT_SPAN, LON_SPAN, SAME_GRID_TOLERANCE, RegularGrid, axis_grid

LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "longitude")
TIME_NAMES = ("time", "valid_time")
LABEL_VARIABLE = "LABELS"  # ClimateNet's expert labels, class ids as climseg's
LABEL_NAMES = (LABEL_VARIABLE, "labels")  # what evaluate looks for without --labels
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CLASSIC_MAGIC = (b"CDF\x01", b"CDF\x02")  # scipy reads these; CDF-5 (b"CDF\x05") it cannot
_PACKING = ("scale_factor", "add_offset", "_FillValue", "missing_value", "valid_range",
            "valid_min", "valid_max", "bounds", "_Netcdf4Dimid")


def variable_map(text: str | None) -> dict[str, str]:
    """Channel -> variable name in the file: each channel's own name (ClimateNet, CAM5), with
    ``text`` (``TMQ=tcwv,PSL=msl``, the ``--variables`` flag) overriding some. ConfigError
    naming the flag for a pair that is not CHANNEL=NAME or a channel climseg does not have."""
    names = {c: c for c in CHANNELS}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        channel, sep, name = (s.strip() for s in pair.partition("="))
        if not sep or not channel or not name:
            raise ConfigError(f"--variables: {pair.strip()!r} is not CHANNEL=NAME "
                              "(e.g. TMQ=tcwv,PSL=msl)")
        if channel not in CHANNELS:
            raise ConfigError(f"--variables: {channel!r} is not a climseg channel; the "
                              f"channels are {', '.join(CHANNELS)}")
        names[channel] = name
    return names


def add_variables_option(parser) -> None:
    """``--variables``, the map of :func:`variable_map`, as predict and evaluate take it."""
    parser.add_argument("--variables", default=None, metavar="CHANNEL=NAME,...",
                        help="netCDF variable names of climseg channels where they differ from "
                             "the channel names (ClimateNet's and CAM5's), e.g. "
                             "TMQ=tcwv,PSL=msl; the values are used as they are (no unit "
                             "conversion)")


def is_netcdf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a netCDF input rather than a climseg sample file: a classic netCDF
    file, or an HDF5 file without a ``climate`` group (netCDF-4)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False  # the sample reader names the problem
    if head[:4] in _CLASSIC_MAGIC or head[:4] == b"CDF\x05":
        return True
    if head != _HDF5_MAGIC:
        return Path(path).suffix in (".nc", ".nc4", ".netcdf")
    import h5py  # only here: h5netcdf imports it anyway
    try:
        with h5py.File(path, "r") as f:
            return "climate" not in f
    except OSError:
        return False


@dataclass
class _Variable:
    """The little of a netCDF variable the reader needs, from either library."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    attrs: dict[str, Any]
    data: Any  # sliceable: an h5netcdf Variable or a memory-mapped scipy array

    def read(self, index: Any = ()) -> np.ndarray:
        """Values at ``index``, unpacked (scale_factor, add_offset), fill values as NaN."""
        raw = np.array(self.data[index])
        fill = [self.attrs.get(k) for k in ("_FillValue", "missing_value")]
        scale, offset = self.attrs.get("scale_factor"), self.attrs.get("add_offset")
        if scale is None and offset is None and all(v is None for v in fill):
            return raw
        out = raw.astype(np.float64 if raw.dtype.itemsize > 4 else np.float32)
        for value in fill:
            if value is not None:
                out[raw == np.asarray(value).reshape(-1)[0]] = np.nan
        if scale is not None:
            out *= np.asarray(scale).reshape(-1)[0]
        if offset is not None:
            out += np.asarray(offset).reshape(-1)[0]
        return out


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@contextlib.contextmanager
def _open_variables(path: Path) -> Iterator[dict[str, _Variable]]:
    """The variables of a netCDF-4 or netCDF-3 file, open while the block runs."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"CDF\x05":
        raise DataError(f"{path}: a netCDF-3 CDF-5 (64-bit data) file, which climseg cannot "
                        "read; convert it with `nccopy -k nc4 IN OUT`")
    try:
        if head[:4] in _CLASSIC_MAGIC:
            # Not memory-mapped: a map outliving its arrays makes scipy refuse to close.
            handle = netcdf_file(path, "r", mmap=False)
            variables = {name: _Variable(tuple(v.dimensions), tuple(v.shape),
                                         {k: _text(a) for k, a in v._attributes.items()}, v.data)
                         for name, v in handle.variables.items()}
        else:
            handle = h5netcdf.File(path, "r")
            variables = {name: _Variable(tuple(v.dimensions), tuple(v.shape),
                                         {k: _text(a) for k, a in v.attrs.items()}, v)
                         for name, v in handle.variables.items()}
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"{path}: not a readable netCDF file: "
                        f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None
    try:
        yield variables
    finally:
        handle.close()


@dataclass(frozen=True)
class Coordinate:
    """A coordinate as the file has it, to be written back on the mask: its variable and
    dimension names, values (unpacked) and attributes (less packing and bounds)."""

    name: str
    dim: str
    values: np.ndarray
    attrs: dict[str, Any]


def _coordinate(path: Path, variables: dict[str, _Variable], names: tuple[str, ...],
                what: str, target: str) -> Coordinate:
    found = [n for n in names if n in variables]
    if not found:
        raise DataError(f"{path}: no {what} coordinate (looked for {' or '.join(names)})")
    var = variables[found[0]]
    if len(var.dims) != 1:
        raise DataError(f"{path}: its {what} '{found[0]}' is {len(var.dims)}-D {var.shape} "
                        f"(a curvilinear grid); climseg regrids only 1-D regular lat/lon grids "
                        f"to the model's grid {target}")
    attrs = {k: v for k, v in var.attrs.items() if k not in _PACKING}
    return Coordinate(found[0], var.dims[0], np.asarray(var.read(), np.float64), attrs)


def _regular(path: Path, c: Coordinate, what: str, target: str) -> float:
    """The spacing of ``c``, whose values must run strictly one way at a regular step."""
    v = c.values
    if len(v) < 2 or not np.isfinite(v).all():
        raise DataError(f"{path}: its {what} '{c.name}' has {len(v)} values "
                        f"{'' if np.isfinite(v).all() else 'with NaN '}; the model's grid "
                        f"is {target}")
    steps = np.diff(v)
    if not ((steps > 0).all() or (steps < 0).all()):
        raise DataError(f"{path}: its {what} '{c.name}' is not monotonic; climseg regrids "
                        f"only regular lat/lon grids to the model's grid {target}")
    step = (v[-1] - v[0]) / (len(v) - 1)
    off = np.abs(v - (v[0] + step * np.arange(len(v)))).max()
    if off > SAME_GRID_TOLERANCE * abs(step):
        raise DataError(f"{path}: its {what} '{c.name}' is not regularly spaced (steps "
                        f"{abs(steps).min():.6g} to {abs(steps).max():.6g} degrees); climseg "
                        f"regrids only regular lat/lon grids to the model's grid {target}")
    return abs(step)


def _grid(path: Path, lat: Coordinate, lon: Coordinate,
          target: str) -> tuple[RegularGrid, np.ndarray, np.ndarray]:
    """The file's grid in climseg's layout, and the file's row and column of each of its
    rows and columns."""
    dlat, dlon = _regular(path, lat, "latitude", target), _regular(path, lon, "longitude", target)
    tol = SAME_GRID_TOLERANCE
    shown = (f"{len(lat.values)}x{len(lon.values)} (lat {lat.values[0]:.6g}..{lat.values[-1]:.6g}"
             f", lon {lon.values[0]:.6g}..{lon.values[-1]:.6g})")
    south, north = lat.values.min(), lat.values.max()
    if south < -LAT_SPAN / 2 - tol * dlat or north > LAT_SPAN / 2 + tol * dlat:
        raise DataError(f"{path}: its grid {shown} has latitudes beyond the poles")
    if south - dlat > -LAT_SPAN / 2 + tol * dlat or north + dlat < LAT_SPAN / 2 - tol * dlat \
            or abs(len(lon.values) * dlon - LON_SPAN) > tol * dlon:
        raise DataError(f"{path}: its grid {shown} does not cover the globe; the model's grid "
                        f"is {target}, and climseg regrids only global grids to it")
    rows = np.argsort(lat.values)
    east = np.mod(lon.values, LON_SPAN)
    east = np.where(east > LON_SPAN - tol * dlon, east - LON_SPAN, east)  # 359.9999 is 0
    cols = np.argsort(east, kind="stable")
    return axis_grid(lat.values[rows], east[cols]), rows, cols


def _time(variables: dict[str, _Variable], dim: str) -> bool:
    var = variables.get(dim)
    return dim in TIME_NAMES or (var is not None and (
        var.attrs.get("axis") == "T" or var.attrs.get("standard_name") == "time"
        or " since " in str(var.attrs.get("units", ""))))


@dataclass
class GriddedFile:
    """An open netCDF input (:func:`open_gridded`): its coordinates as the file has them, its
    grid in climseg's layout, and its fields, one time step at a time."""

    path: Path
    lat: Coordinate
    lon: Coordinate
    time: Coordinate | None   # None: no time axis (one step)
    steps: int
    grid: RegularGrid          # climseg's layout: rows south to north, columns from 0°E
    rows: np.ndarray           # file row of each grid row
    cols: np.ndarray           # file column of each grid column
    fields: dict[int, _Variable] = field(default_factory=dict)  # channel index -> variable
    labels: _Variable | None = None
    label_name: str = LABEL_VARIABLE

    def _step(self, var: _Variable, t: int) -> np.ndarray:
        values = var.read((t,) if len(var.dims) == 3 else ())
        return values[np.ix_(self.rows, self.cols)]

    def read_step(self, t: int) -> np.ndarray:
        """(H, W, NUM_CHANNELS) float32 of time step ``t`` in climseg's layout; channels not
        in ``fields`` (those the model does not use) are zero."""
        data = np.zeros((*self.grid.shape, NUM_CHANNELS), np.float32)
        for channel, var in self.fields.items():
            values = self._step(var, t)
            if not np.isfinite(values).all():
                raise DataError(f"{self.path}: variable for {CHANNELS[channel]} has missing or "
                                f"non-finite values at time step {t}")
            data[..., channel] = values
        return data

    def read_labels(self, t: int) -> np.ndarray | None:
        """The file's labels at step ``t`` in climseg's layout, or None."""
        if self.labels is None:
            return None
        return labels_to_uint8(self._step(self.labels, t), self.path, self.label_name)

    def to_file_layout(self, values: np.ndarray) -> np.ndarray:
        """``values`` (..., lat, lon) in climseg's layout back in the file's row and column
        order."""
        out = np.empty_like(values)
        out[..., self.rows[:, None], self.cols[None, :]] = values
        return out


def _field_variable(path: Path, variables: dict[str, _Variable], name: str, channel: str,
                    lat: Coordinate, lon: Coordinate) -> _Variable:
    var = variables[name]
    if var.dims[-2:] != (lat.dim, lon.dim) or len(var.dims) not in (2, 3) \
            or (len(var.dims) == 3 and not _time(variables, var.dims[0])):
        raise DataError(f"{path}: variable '{name}' ({channel}) has dimensions "
                        f"{var.dims}; expected ({lat.dim}, {lon.dim}) or (time, {lat.dim}, "
                        f"{lon.dim})")
    return var


def _label_variable(path: Path, variables: dict[str, _Variable], names: tuple[str, ...],
                    lat: Coordinate, lon: Coordinate, time: Coordinate | None
                    ) -> tuple[str, _Variable]:
    """The labels a scored file must have, and their name: the first of ``names`` it holds,
    on the fields' grid, one mask per time step; (lat, lon) labels serve a file of one step
    (ClimateNet's fields are (1, lat, lon), its ``LABELS`` (lat, lon))."""
    found = [n for n in names if n in variables]
    if not found:
        raise DataError(f"{path}: no label variable (looked for {' or '.join(names)}); name "
                        "it with --labels NAME")
    name, var = found[0], variables[found[0]]
    plane = (lat.dim, lon.dim)
    if var.dims[-2:] != plane or len(var.dims) not in (2, 3):
        raise DataError(f"{path}: labels '{name}' have dimensions {var.dims} of shape "
                        f"{var.shape}; the fields' are {plane} of shape "
                        f"({len(lat.values)}, {len(lon.values)})")
    steps = 1 if time is None else len(time.values)
    if len(var.dims) == 2 and steps > 1:
        raise DataError(f"{path}: labels '{name}' {var.dims} have no time axis, but the "
                        f"fields have {steps} time steps along '{time.dim}'; one mask per "
                        "step is needed")
    if len(var.dims) == 3 and (var.shape[0] != steps
                               or time is not None and var.dims[0] != time.dim):
        raise DataError(f"{path}: labels '{name}' have dimensions {var.dims} of shape "
                        f"{var.shape}; the fields have {steps} time step(s)"
                        + (f" along '{time.dim}'" if time is not None else ""))
    return name, var


@contextlib.contextmanager
def open_gridded(path: str | os.PathLike, names: dict[str, str], channels: list[int],
                 target: str, optional: list[int] = (),
                 labels: tuple[str, ...] | None = None) -> Iterator[GriddedFile]:
    """``path`` opened as a :class:`GriddedFile` with the variables of ``channels`` (indices
    into CHANNELS) found by ``names`` (:func:`variable_map`), and those of ``optional`` that
    the file has (TMQ for the map). ``target`` describes the model's grid for the error
    lines. DataError naming the file and every missing variable. ``labels``: the names the
    file's labels may have where it must have them (to be scored); DataError where it has
    none or they do not fit its fields. Without it, ``LABELS`` are taken where they lie on
    the fields' grid (to be drawn)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _open_variables(path) as variables:
        missing = [f"{CHANNELS[c]} (as '{names[CHANNELS[c]]}')" for c in channels
                   if names[CHANNELS[c]] not in variables]
        if missing:
            raise DataError(f"{path}: missing variables the model needs: {', '.join(missing)}"
                            "; map other names with --variables CHANNEL=NAME,...")
        lat = _coordinate(path, variables, LAT_NAMES, "latitude", target)
        lon = _coordinate(path, variables, LON_NAMES, "longitude", target)
        grid, rows, cols = _grid(path, lat, lon, target)
        extra = [c for c in optional if c not in channels and names[CHANNELS[c]] in variables]
        fields = {c: _field_variable(path, variables, names[CHANNELS[c]], CHANNELS[c], lat, lon)
                  for c in [*channels, *extra]}
        timed = [v for v in fields.values() if len(v.dims) == 3]
        lengths = {v.shape[0] for v in timed}
        if len(lengths) > 1 or len({v.dims[0] for v in timed}) > 1:
            raise DataError(f"{path}: the variables have different time axes "
                            f"({sorted({(v.dims[0], v.shape[0]) for v in timed})})")
        time = None
        if timed:
            dim = timed[0].dims[0]
            time = (Coordinate(dim, dim, np.array(variables[dim].data[...]),
                               {k: v for k, v in variables[dim].attrs.items()
                                if k not in _PACKING})
                    if dim in variables else Coordinate(dim, dim, np.arange(lengths.pop()), {}))
        if labels is not None:
            name, mask = _label_variable(path, variables, labels, lat, lon, time)
        else:
            name, mask = LABEL_VARIABLE, variables.get(LABEL_VARIABLE)
            if mask is not None and mask.dims[-2:] != (lat.dim, lon.dim):
                mask = None  # not a mask on this grid: not drawn
        yield GriddedFile(path, lat, lon, time, len(time.values) if time else 1, grid, rows,
                          cols, fields, mask, name)
