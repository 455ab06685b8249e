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
- field statistics, where the data are at hand (a sample file, or the sample file a mask's
  ``source``/``input_file`` names); empty otherwise:
  ``max_tmq`` the largest total precipitable water (kg m⁻²); ``mean_ivt``/``max_ivt`` the
  vapour transport TMQ x |(U850, V850)| (kg m⁻¹ s⁻¹), the single-level stand-in for IVT that
  the synthetic labels also use (a CAM5 sample has no specific humidity aloft to integrate);
  for cyclones only, ``min_psl`` (Pa, as the file stores it) and ``max_wind``, the largest
  |(UBOT, VBOT)| (m s⁻¹), the two numbers a cyclone track records.

``--min-area KM2`` leaves out events smaller than that: a model that breaks a river into
specks, or a cyclone's edge into crumbs, buries the storms in the table otherwise (the demo
model's 11 test masks hold 5119 events for 45 true ones). A mask's crumbs count in nothing
then, not in the summary, the plot or the log's counts; how many were left out is logged.

:func:`summarize` counts the events per class by latitude band and by month (printed after the
table is written), :func:`plot_events` draws them on a map, and :func:`event_scores` matches
predicted events with true ones (object-based precision, recall and F1). Under ``horovodrun``
or ``srun`` rank ``r`` of ``n`` reads ``MASKS[r::n]`` and rank 0 writes the one table.
"""

from __future__ import annotations

import argparse
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
FIELDS = ("TMQ", "U850", "V850", "PSL", "UBOT", "VBOT")  # the channels the statistics use
COLUMNS = ("file", "time", "class", "event", "cells", "area_km2", "centroid_lat",
           "centroid_lon", "lat_south", "lat_north", "lon_west", "lon_east", "max_tmq",
           "mean_ivt", "max_ivt", "min_psl", "max_wind")
CYCLONE = "tropical_cyclone"
# Latitude bands of the summary, south to north (degrees): the tropics, subtropics, mid and
# high latitudes of each hemisphere, where cyclones and rivers are told apart.
LAT_BANDS = (-90.0, -60.0, -30.0, -15.0, 0.0, 15.0, 30.0, 60.0, 90.0)
# The IoU at which a predicted event counts as finding a true one. A low bar on purpose: it asks
# whether the storm was found, not how well its edge was traced, since the edges of labels are
# the least certain part of them (ClimateNet's experts drew the same storms differently).
EVENT_OVERLAP = 0.1
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_events(region: np.ndarray, periodic: bool = True) -> tuple[np.ndarray, int]:
    """(labels, count) of the 8-connected components of the boolean (lat, lon) ``region``,
    with components that touch across the last and first column joined (``periodic``: the
    region spans all longitudes; a crop does not); labels 1..count."""
    labels, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
    if count == 0 or not periodic:
        return labels, int(count)
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


def _statistics(fields: dict[str, np.ndarray], r: np.ndarray, c: np.ndarray, w: np.ndarray,
                cyclone: bool) -> dict[str, float | None]:
    """The field statistics of the event at cells (``r``, ``c``) with cell areas ``w``; None
    for each one whose channels are not in ``fields``."""
    stats = dict.fromkeys(("max_tmq", "mean_ivt", "max_ivt", "min_psl", "max_wind"))
    if "TMQ" in fields:
        stats["max_tmq"] = float(fields["TMQ"][r, c].max())
        if "U850" in fields and "V850" in fields:
            ivt = fields["TMQ"][r, c] * np.hypot(fields["U850"][r, c], fields["V850"][r, c])
            stats["mean_ivt"] = float((w * ivt).sum() / w.sum())  # area-weighted, as the area
            stats["max_ivt"] = float(ivt.max())
    if cyclone and "PSL" in fields:
        stats["min_psl"] = float(fields["PSL"][r, c].min())
    if cyclone and "UBOT" in fields and "VBOT" in fields:
        stats["max_wind"] = float(np.hypot(fields["UBOT"][r, c], fields["VBOT"][r, c]).max())
    return stats


def event_rows(mask: np.ndarray, grid: RegularGrid, fields: dict[str, np.ndarray] | None,
               names: tuple[str, ...]) -> list[dict]:
    """One row (COLUMNS less file and time) per event of each non-background class.

    ``fields`` maps channel names (:data:`FIELDS`) to (lat, lon) arrays on the mask's grid;
    the statistics of channels not in it are left empty."""
    fields = fields or {}
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
                         **_statistics(fields, r, c, w, names[class_id] == CYCLONE)})
    return rows


def _fields_of(source: str | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The :data:`FIELDS` channels of the sample file ``source``; empty when it is not at hand
    (moved, not a sample file, another shape): the statistics are then left out, not an error,
    since the mask alone still gives the table."""
    if not source or not Path(source).is_file():
        return {}
    try:
        with h5py.File(source, "r") as f:
            data = f.get(DATA_KEY)
            if not isinstance(data, h5py.Dataset) or data.shape[:2] != shape[-2:] \
                    or data.ndim != 3 or data.shape[2] != len(CHANNELS):
                return {}
            return {name: data[:, :, CHANNELS.index(name)] for name in FIELDS}
    except OSError:
        return {}


def read_mask(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[str, ...],
                                   str | None]:
    """(mask (lat, lon) class ids, the source's :data:`FIELDS` (maybe none), class names,
    source file) of a mask file."""
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
    return mask, _fields_of(source, mask.shape), names, source


def file_events(path: Path) -> list[dict]:
    """The table rows of one mask file: its events, with the file and the time (when the
    sample's name gives it) first."""
    mask, fields, names, source = read_mask(path)
    time = sample_time(source) if source else None
    if time is None:
        time = sample_time(path.name.replace("-mask.", "."))
    head = {"file": str(path), "time": "" if time is None else time.isoformat()}
    return [{**head, **row} for row in event_rows(mask, regular_grid(*mask.shape), fields, names)]


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


def _band_names() -> list[str]:
    def deg(v: float) -> str:
        return "0" if v == 0 else f"{abs(v):g}{'S' if v < 0 else 'N'}"
    return [f"{deg(lo)}-{deg(hi)}" for lo, hi in zip(LAT_BANDS[:-1], LAT_BANDS[1:])]


def summarize(rows: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Event counts per class: ``{"latitude": {class: {band: n}}, "month": {class: {MM: n}}}``.

    An event is counted in the band of its centroid latitude (a band holds its southern edge;
    the last one also the pole) and in the month of its time; events without a time are
    counted under ``"unknown"``."""
    names = list(dict.fromkeys(r["class"] for r in rows))
    bands = _band_names()
    by_band = {n: dict.fromkeys(bands, 0) for n in names}
    by_month: dict[str, dict[str, int]] = {n: {} for n in names}
    for r in rows:
        k = int(np.searchsorted(LAT_BANDS, r["centroid_lat"], side="right")) - 1
        by_band[r["class"]][bands[min(max(k, 0), len(bands) - 1)]] += 1
        month = r["time"][5:7] if r["time"] else "unknown"
        by_month[r["class"]][month] = by_month[r["class"]].get(month, 0) + 1
    return {"latitude": by_band, "month": {n: dict(sorted(m.items())) for n, m in by_month.items()}}


def summary_text(summary: dict[str, dict[str, dict[str, int]]]) -> str:
    """The counts of :func:`summarize` as two small tables (classes as columns)."""
    lines = []
    for title, table in (("latitude band", summary["latitude"]), ("month", summary["month"])):
        names = list(table)
        keys = list(dict.fromkeys(k for counts in table.values() for k in counts))
        lines.append(f"{'events by ' + title:<24}" + "".join(f"{n:>20}" for n in names))
        for key in keys:
            lines.append(f"{key:<24}" + "".join(f"{table[n].get(key, 0):>20}" for n in names))
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_events(rows: list[dict], path: Path, title: str | None = None) -> None:
    """One figure, written atomically: every event at its centroid on a latitude/longitude map
    (marker area by the event's area, cyclones red, rivers orange as on climseg's maps) and
    beside it the counts per latitude band."""
    from matplotlib.figure import Figure  # matplotlib is slow to import; only --plot needs it

    from climseg.plot import save_map

    colours = {CYCLONE: "#d62728", "atmospheric_river": "#ff7f0e"}
    fig = Figure(figsize=(12.8, 4.8), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.12, top=0.9)
    grid_spec = fig.add_gridspec(1, 2, width_ratios=(4, 1), wspace=0.12)
    world, bands = fig.add_subplot(grid_spec[0]), fig.add_subplot(grid_spec[1])
    names = list(dict.fromkeys(r["class"] for r in rows))
    largest = max((r["area_km2"] for r in rows), default=1.0)
    for name in names:
        mine = [r for r in rows if r["class"] == name]
        size = [8 + 400 * r["area_km2"] / largest for r in mine]
        world.scatter([r["centroid_lon"] for r in mine], [r["centroid_lat"] for r in mine],
                      s=size, c=colours.get(name, "#1f77b4"), alpha=0.55, edgecolors="k",
                      linewidths=0.4, label=f"{name.replace('_', ' ')} ({len(mine)})")
    world.set(xlim=(0, 360), ylim=(-90, 90), xlabel="longitude (°E)", ylabel="latitude (°N)",
              xticks=range(0, 361, 60), yticks=range(-90, 91, 30),
              title=title or f"{len(rows)} events at their centroids (marker area ~ event area)")
    world.grid(alpha=0.3)
    if names:
        world.legend(loc="lower left", fontsize=8)
    counts = summarize(rows)["latitude"]
    centres = (np.array(LAT_BANDS[:-1]) + np.array(LAT_BANDS[1:])) / 2
    heights = np.diff(LAT_BANDS)
    left = np.zeros(len(centres))
    for name in names:
        n = np.array(list(counts[name].values()), dtype=float)
        bands.barh(centres, n, height=heights * 0.9, left=left,
                   color=colours.get(name, "#1f77b4"), alpha=0.8)
        left += n
    bands.set(ylim=(-90, 90), yticks=LAT_BANDS, xlabel="events per latitude band")
    bands.yaxis.tick_right()
    bands.xaxis.get_major_locator().set_params(integer=True)
    bands.grid(alpha=0.3, axis="x")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_map(fig, path)
    except OSError as err:
        raise DataError(write_failure(path, err)) from None


def event_scores(prediction: np.ndarray, truth: np.ndarray, names: tuple[str, ...],
                 overlap: float = EVENT_OVERLAP, periodic: bool = True
                 ) -> dict[str, dict[str, int]]:
    """Object-based counts per class: ``{name: {"true": T, "predicted": P, "matched": M}}``.

    Events are those of :func:`label_events` in each mask. A predicted and a true event of the
    same class match when the IoU of their cells is at least ``overlap``; each event matches at
    most once, the best-overlapping pairs first (a greedy one-to-one assignment, as object
    detection scores do). Precision is M/P, recall M/T; the counts are kept, not the ratios,
    so that files and ranks add them up. ``periodic``: as :func:`label_events`."""
    scores = {}
    for class_id in range(1, len(names)):
        pred, n_pred = label_events(prediction == class_id, periodic)
        true, n_true = label_events(truth == class_id, periodic)
        both = (pred > 0) & (true > 0)
        pairs = np.unique(np.stack([pred[both], true[both]]), axis=1)
        size_p = np.bincount(pred.ravel(), minlength=n_pred + 1)
        size_t = np.bincount(true.ravel(), minlength=n_true + 1)
        joint = {(int(a), int(b)): 0 for a, b in pairs.T}
        for a, b in zip(pred[both], true[both]):
            joint[int(a), int(b)] += 1
        ious = sorted(((n / (size_p[a] + size_t[b] - n), a, b) for (a, b), n in joint.items()),
                      reverse=True)
        used_p, used_t = set(), set()
        for iou, a, b in ious:
            if iou >= overlap and a not in used_p and b not in used_t:
                used_p.add(a)
                used_t.add(b)
        scores[names[class_id]] = {"true": n_true, "predicted": n_pred, "matched": len(used_p)}
    return scores


def detection_skill(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, float | None]]:
    """Precision, recall and F1 per class from summed :func:`event_scores` counts (None where a
    ratio has nothing to count: no predicted or no true events)."""
    skill = {}
    for name, c in counts.items():
        precision = c["matched"] / c["predicted"] if c["predicted"] else None
        recall = c["matched"] / c["true"] if c["true"] else None
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        skill[name] = {"precision": precision, "recall": recall, "f1": f1}
    return skill


def large_events(rows: list[dict], min_area_km2: float) -> list[dict]:
    """The rows whose event covers at least ``min_area_km2`` (all of them for 0)."""
    return [row for row in rows if row["area_km2"] >= min_area_km2]


def _area(text: str) -> float:
    """An argparse ``type``: an area in km², 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be an area in km², 0 or more, got {text}")
    return value


def parse_args(argv: list[str] | None):
    p = ArgumentParser("events", description=(
        "One row per connected tropical cyclone or atmospheric river in each mask: area (km²), "
        "centroid, bounding box, TMQ, vapour transport, and for cyclones the lowest sea-level "
        "pressure and strongest wind; then the counts by latitude band and month.\n\n"
        "Under horovodrun or srun each rank reads a share of the masks and rank 0 writes the "
        "one table.\n\nExample: climseg events --output runs/demo/events.csv --plot "
        "runs/demo/events.png runs/demo/predictions/*-mask.h5"))
    p.add_option("--output", "--out", required=True, type=Path, help="the CSV table")
    p.add_option("--plot", type=Path, metavar="PNG",
                 help="also draw the events on a map, with their counts by latitude band")
    p.add_argument("--min-area", type=_area, default=0.0, metavar="KM2",
                   help="leave out events smaller than this (km²; default 0: every event). "
                        "A grid cell of the 768x1152 CAM5 grid is at most about 900 km²")
    p.add_quiet()
    p.add_argument("masks", nargs="+", type=Path, metavar="MASKS",
                   help="NAME-mask.h5 / NAME-mask.nc from climseg predict, or sample files")
    return p.parse_args(argv)


def _gather(masks: list[Path]) -> tuple[list[dict], str | None, int, int]:
    """(every rank's rows in the order of ``masks``, the first error of any rank or None,
    rank, size). One process reads all; under a launcher rank r reads ``masks[r::n]`` and the
    rows travel to every rank (a few hundred bytes per event)."""
    from climseg import dist

    rank, size, _ = dist.launcher_rank_size()
    if size > 1:
        dist.init()
    mine, error = [], None
    for path in masks[rank::size]:
        try:
            mine.append(file_events(path))
        except DataError as err:
            error = str(err) if size == 1 else f"rank {rank}: {err}"
            break
    if size == 1:
        return [row for rows in mine for row in rows], error, 0, 1
    shares = dist.allgather_object((mine, error), name="events")
    errors = [e for _, e in shares if e is not None]
    if errors:
        return [], errors[0], rank, size
    # masks[r::n] back in input order: file i is rank i % n's (i // n)-th
    rows = [row for i in range(len(masks)) for row in shares[i % size][0][i // size]]
    return rows, None, rank, size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows, error, rank, size = _gather(args.masks)
    except RuntimeError as err:  # a launch the engine cannot start
        return fail("events", str(err))
    setup_logging(rank, size, args.quiet)
    if error is not None:
        return fail("events", error) if rank == 0 else 2
    if rank != 0:
        return 0
    if args.min_area > 0:
        kept = large_events(rows, args.min_area)
        log.info("left out %d of %d events under %g km²", len(rows) - len(kept), len(rows),
                 args.min_area)
        rows = kept
    try:
        write_table(rows, args.output)
        if args.plot is not None:
            plot_events(rows, args.plot)
    except DataError as err:
        return fail("events", str(err))
    counts = {name: sum(r["class"] == name for r in rows) for name in dict.fromkeys(
        r["class"] for r in rows)}
    log.info("%d events in %d files %s -> %s%s", len(rows), len(args.masks), counts,
             args.output, f", {args.plot}" if args.plot is not None else "")
    if rows:
        print(summary_text(summarize(rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
