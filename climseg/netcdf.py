"""CF-1.8 netCDF mask files, the output of ``climseg predict --format netcdf``.

One file per input: ``lat``/``lon`` coordinates with cell bounds (from the input's shape, see
:mod:`climseg.grid`), a ``time`` coordinate of length 1 when the input's name gives its time
(``data-YYYY-MM-DD-HH-N.h5``), the class mask as a byte variable ``class_mask`` with CF
``flag_values``/``flag_meanings``, optionally ``probability`` (class, lat, lon) float32, and
provenance attributes. ``xarray.open_dataset`` opens it as it is. The mask of a netCDF input
is written on that input's own coordinates instead (:func:`write_mask_on_coordinates`).

Written with h5netcdf, not netCDF4-python: a netCDF-4 file is an HDF5 file, and h5netcdf writes
it through h5py, which climseg already pins, in pure Python, so it adds no C library (netCDF4
brings its own libnetcdf and libhdf5, a second HDF5 next to h5py's) and lets the file be built
in memory by :func:`climseg.data.format.hdf5_writer` and written atomically like every other
output (temporary file, then rename).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import h5netcdf
import numpy as np

from climseg.data.format import hdf5_writer, sample_time  # noqa: F401 (also netcdf's name)
from climseg.grid import regular_grid

CONVENTIONS = "CF-1.8"
MASK_VARIABLE = "class_mask"
PROBABILITY_VARIABLE = "probability"


def _coordinates(f: h5netcdf.File, shape: tuple[int, int],
                 time: dt.datetime | None) -> tuple[str, ...]:
    """Write the grid (and time) coordinates; return the dimensions of a (lat, lon) field."""
    grid = regular_grid(*shape)
    f.dimensions.update({"lat": shape[0], "lon": shape[1], "bnds": 2})
    for name, values, bounds, units, axis in (
            ("lat", grid.lat, grid.lat_bounds, "degrees_north", "Y"),
            ("lon", grid.lon, grid.lon_bounds, "degrees_east", "X")):
        var = f.create_variable(name, (name,), data=values.astype(np.float64))
        var.attrs.update({"standard_name": {"lat": "latitude", "lon": "longitude"}[name],
                          "long_name": {"lat": "latitude", "lon": "longitude"}[name],
                          "units": units, "axis": axis, "bounds": f"{name}_bnds"})
        f.create_variable(f"{name}_bnds", (name, "bnds"), data=bounds.astype(np.float64))
    if time is None:
        return ("lat", "lon")
    f.dimensions["time"] = 1
    var = f.create_variable("time", ("time",), data=np.zeros(1, np.float64))
    # Offset 0 from the sample's own date: the same instant in CAM5's 365-day calendar and
    # in the standard one, which xarray decodes without cftime.
    var.attrs.update({"standard_name": "time", "axis": "T", "calendar": "standard",
                      "units": f"hours since {time:%Y-%m-%d %H:%M:%S}"})
    return ("time", "lat", "lon")


def _mask_variables(f: h5netcdf.File, dims: tuple[str, ...], prediction: np.ndarray,
                    probabilities: np.ndarray | None, names: tuple[str, ...]) -> None:
    """``class_mask`` of dims ``dims`` and, when given, ``probability`` (class before the two
    grid dimensions); the arrays already have the shapes the dims say."""
    codes = np.arange(len(names), dtype=np.int8)
    mask = f.create_variable(MASK_VARIABLE, dims, data=prediction.astype(np.int8),
                             compression="gzip", compression_opts=1)
    mask.attrs.update({"long_name": "predicted class", "flag_values": codes,
                       "flag_meanings": " ".join(names)})
    if probabilities is None:
        return
    f.dimensions["class"] = len(names)
    f.create_variable("class", ("class",), data=codes).attrs.update(
        {"long_name": "class id", "flag_values": codes, "flag_meanings": " ".join(names)})
    var = f.create_variable(PROBABILITY_VARIABLE, (*dims[:-2], "class", *dims[-2:]),
                            data=probabilities.astype(np.float32),
                            compression="gzip", compression_opts=1)
    var.attrs.update({"long_name": "predicted class probability", "units": "1"})


def _global_attrs(f: h5netcdf.File, names: tuple[str, ...], attrs: dict[str, str]) -> None:
    f.attrs.update({"Conventions": CONVENTIONS,
                    "title": "climseg segmentation: " + ", ".join(names[1:]), **attrs})


def write_mask_netcdf(path: str | Path, prediction: np.ndarray,
                      probabilities: np.ndarray | None, attrs: dict[str, str],
                      names: tuple[str, ...], time: dt.datetime | None = None) -> None:
    """Write a CF-1.8 mask file atomically: ``prediction`` (lat, lon) class ids,
    ``probabilities`` (lat, lon, class) or None, ``attrs`` as global attributes (provenance),
    ``names`` the class names, ``time`` the sample's time when known."""
    with hdf5_writer(path) as h5, h5netcdf.File(h5, "w") as f:
        dims = _coordinates(f, prediction.shape, time)
        lead = (np.newaxis,) if dims[0] == "time" else ()
        _mask_variables(f, dims, prediction[lead],
                        None if probabilities is None
                        else np.moveaxis(probabilities, -1, 0)[lead], names)
        _global_attrs(f, names, attrs)


def write_mask_on_coordinates(path: str | Path, prediction: np.ndarray,
                              probabilities: np.ndarray | None, attrs: dict[str, str],
                              names: tuple[str, ...], lat, lon, time=None) -> None:
    """Write a CF-1.8 mask file atomically on an input file's own coordinates: ``lat``,
    ``lon`` and ``time`` (:class:`climseg.inputs.Coordinate`: names, values, attributes as
    the input has them; ``time`` None for a file without a time axis). ``prediction`` is
    (time, lat, lon) class ids, ``probabilities`` (time, class, lat, lon) or None, both in the
    file's own row and column order."""
    with hdf5_writer(path) as h5, h5netcdf.File(h5, "w") as f:
        dims = ()
        for c in (time, lat, lon):
            if c is None:
                continue
            f.dimensions[c.dim] = len(c.values)
            var = f.create_variable(c.name, (c.dim,), data=c.values)
            var.attrs.update(c.attrs)
            dims += (c.dim,)
        if time is None:
            prediction = prediction[0]
            probabilities = None if probabilities is None else probabilities[0]
        _mask_variables(f, dims, prediction, probabilities, names)
        _global_attrs(f, names, attrs)
