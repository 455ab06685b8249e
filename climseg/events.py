"""``climseg events MASKS... --output table.csv``: one row per tropical cyclone or atmospheric
river in each mask.

An event is a connected region of one class (8-connected: cells touching at a corner belong
together, as a thin diagonal river does), joined across the 0°/360° longitude seam, so a river
crossing the date line of the grid counts once. Masks are read from climseg's prediction files
(``NAME-mask.h5``, ``NAME-mask.nc`` of ``predict --format netcdf``) or from labelled sample
files (their ``climate/labels_0``). Every field is taken to be on the regular global grid of
its shape (:mod:`climseg.grid`). Per event the table gives:

- ``area_km2``: the summed exact cell areas on a sphere of radius
  :data:`~climseg.grid.EARTH_RADIUS_KM` (cos-latitude weighted);
- ``centroid_lat``/``centroid_lon``: area-weighted mean latitude, and the area-weighted
  circular mean of longitude (an event across the seam has its centroid near 0°, not 180°);
- ``lat_south``/``lat_north``, ``lon_west``/``lon_east``: the bounding box of its cell centres,
  longitudes as the shortest arc that holds the event (``lon_west > lon_east`` when it
  crosses 0°E);
- ``max_tmq``: the largest total precipitable water (kg m⁻²) in it, where the data are at hand
  (a sample file, or the ``source``/``input_file`` a mask file names); empty otherwise.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from climseg.atomic import atomic_path, write_failure
from climseg.cli import ArgumentParser, fail
from climseg.data.format import (CHANNELS, CLASS_NAMES, DATA_KEY, LABEL_KEY, DataError,
                                  sample_time)
from climseg.data.format import _open as open_hdf5  # one-line errors: missing, corrupt
from climseg.grid import RegularGrid, cell_areas_km2, regular_grid
from climseg.logs import setup_logging
from climseg.netcdf import MASK_VARIABLE

log = logging.getLogger("climseg.events")

PREDICTION_KEY = "climate/prediction"  # as climseg.predict writes it (not imported: torch)
TMQ = CHANNELS.index("TMQ")
COLUMNS = ("file", "time", "class", "event", "cells", "area_km2", "centroid_lat",
           "centroid_lon", "lat_south", "lat_north", "lon_west", "lon_east", "max_tmq")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_events(region: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count) of the 8-connected components of the boolean (lat, lon) ``region``,
    with components that touch across the last and first column joined; labels 1..count."""
    labels, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
    if count == 0:
        return labels, 0
    parent = np.arange(count + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    east, west = labels[:, -1], labels[:, 0]
    for shift in (-1, 0, 1):  # the seam's neighbours: same row and the diagonals
        a = east[max(shift, 0):len(east) + min(shift, 0)]
        b = west[max(-shift, 0):len(west) + min(-shift, 0)]
        for i, j in zip(a[(a > 0) & (b > 0)], b[(a > 0) & (b > 0)]):
            parent[root(int(i))] = root(int(j))
    roots = np.array([root(i) for i in range(count + 1)])
    _, dense = np.unique(roots, return_inverse=True)  # root 0 (background) stays 0
    return dense.reshape(roots.shape)[labels], int(dense.max())


def _lon_arc(columns: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """(west, east) longitude of the shortest arc holding the occupied ``columns``: it starts
    after the largest empty gap between them, going round the globe."""
    cols = np.unique(columns)
    gaps = np.diff(np.append(cols, cols[0] + len(lon)))
    k = int(np.argmax(gaps))
    return float(lon[cols[(k + 1) % len(cols)]]), float(lon[cols[k]])


def event_rows(mask: np.ndarray, grid: RegularGrid, tmq: np.ndarray | None,
               names: tuple[str, ...]) -> list[dict]:
    """One row (COLUMNS less file and time) per event of each non-background class."""
    areas = np.broadcast_to(cell_areas_km2(grid), mask.shape)
    lon = np.radians(grid.lon)
    rows = []
    for class_id in range(1, len(names)):
        labels, count = label_events(mask == class_id)
        for event in range(1, count + 1):
            r, c = np.nonzero(labels == event)
            w = areas[r, c]
            mean_lon = np.degrees(np.arctan2((w * np.sin(lon[c])).sum(),
                                             (w * np.cos(lon[c])).sum())) % 360.0
            west, east = _lon_arc(c, grid.lon)
            rows.append({"class": names[class_id], "event": event, "cells": len(r),
                         "area_km2": float(w.sum()),
                         "centroid_lat": float((w * grid.lat[r]).sum() / w.sum()),
                         "centroid_lon": float(mean_lon),
                         "lat_south": float(grid.lat[r].min()),
                         "lat_north": float(grid.lat[r].max()),
                         "lon_west": west, "lon_east": east,
                         "max_tmq": None if tmq is None else float(tmq[r, c].max())})
    return rows


def _tmq_of(source: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The TMQ channel of the sample file ``source``, or None when it is not at hand."""
    if not source or not Path(source).is_file():
        return None
    try:
        with h5py.File(source, "r") as f:
            data = f.get(DATA_KEY)
            if not isinstance(data, h5py.Dataset) or data.shape[:2] != shape[-2:]:
                return None
            return data[:, :, TMQ]
    except OSError:
        return None


def read_mask(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...], str | None]:
    """(mask (lat, lon) class ids, TMQ or None, class names, source file) of a mask file."""
    with open_hdf5(path) as f:  # netCDF-4 files are HDF5 files
        names, source = CLASS_NAMES, None
        if PREDICTION_KEY in f:
            mask, attrs = f[PREDICTION_KEY][...], f["climate"].attrs
            names = tuple(str(attrs.get("class_names", ",".join(names))).split(","))
            source = attrs.get("source")
        elif MASK_VARIABLE in f:
            var = f[MASK_VARIABLE]
            mask, source = var[...], f.attrs.get("input_file")
            names = tuple(str(var.attrs.get("flag_meanings", " ".join(names))).split())
        elif LABEL_KEY in f and DATA_KEY in f:
            mask, source = f[LABEL_KEY][...], str(path)
        else:
            raise DataError(f"{path}: no mask in it: expected '{PREDICTION_KEY}' (climseg "
                            f"predict), '{MASK_VARIABLE}' (predict --format netcdf) or "
                            f"'{LABEL_KEY}' (a sample file)")
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:  # a netCDF mask's time axis
        mask = mask[0]
    if mask.ndim != 2:
        raise DataError(f"{path}: the mask has shape {mask.shape}, expected (lat, lon)")
    source = None if source is None else str(source)
    return mask, _tmq_of(source, mask.shape), names, source


def file_events(path: Path) -> list[dict]:
    """The table rows of one mask file: its events, with the file and the time (when the
    sample's name gives it) first."""
    mask, tmq, names, source = read_mask(path)
    time = sample_time(source) if source else None
    if time is None:
        time = sample_time(path.name.replace("-mask.", "."))
    head = {"file": str(path), "time": "" if time is None else time.isoformat()}
    return [{**head, **row} for row in event_rows(mask, regular_grid(*mask.shape), tmq, names)]


def write_table(rows: list[dict], path: Path) -> None:
    """The rows as CSV, written atomically; empty cells for missing values."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else round(v, 4) if isinstance(v, float) else v)
                         for k, v in row.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(text.getvalue())
    except OSError as err:
        raise DataError(write_failure(path, err)) from None


def parse_args(argv: list[str] | None):
    p = ArgumentParser("events", description=(
        "One row per connected tropical cyclone or atmospheric river in each mask: area (km²), "
        "centroid, bounding box, max TMQ.\n\nExample: climseg events --output "
        "runs/demo/events.csv runs/demo/predictions/*-mask.h5"))
    p.add_option("--output", "--out", required=True, type=Path, help="the CSV table")
    p.add_quiet()
    p.add_argument("masks", nargs="+", type=Path, metavar="MASKS",
                   help="NAME-mask.h5 / NAME-mask.nc from climseg predict, or sample files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0, 1, args.quiet)
    rows = []
    try:
        for path in args.masks:
            rows += file_events(path)
        write_table(rows, args.output)
    except DataError as err:
        return fail("events", str(err))
    counts = {name: sum(r["class"] == name for r in rows) for name in dict.fromkeys(
        r["class"] for r in rows)}
    log.info("%d events in %d files %s -> %s", len(rows), len(args.masks), counts, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
