"""``python -m climseg.predict``: segment sample files or CF-netCDF fields with a trained
checkpoint.

Inputs are climseg sample files (``<name>.h5``, on the grid their shape implies) or netCDF
files on any regular global lat/lon grid (:mod:`climseg.inputs`). An input on another grid
than the one the checkpoint records (:func:`climseg.inference.model_grid`) is regridded
bilinearly to it, predicted there and brought back (:mod:`climseg.regrid`): the mask by
nearest neighbour, probabilities bilinearly. A netCDF input's mask is ``<name>-mask.nc`` on
its own coordinates (time axis included), with a map per time step. For each sample file
``<name>.h5`` writes, into ``--out``:

- ``<name>-mask.h5`` with ``climate/prediction``: uint8 (lat, lon) class ids (0 background,
  1 tropical cyclone, 2 atmospheric river); with ``--probabilities`` also
  ``climate/probabilities``: float16 (lat, lon, class), channels last like ``climate/data``;
  or, with ``--format netcdf``, ``<name>-mask.nc``: CF-1.8 netCDF with ``lat``/``lon`` (and
  ``time``) coordinates that xarray opens (:mod:`climseg.netcdf`);
- ``<name>.png``: the TMQ map with the predicted TCs and ARs, and the file's own labels side by
  side when it has them.

Every mask file records the input file, the checkpoint, the sha256 of its config, climseg's
version and the region predicted (always the whole field; in tiles for a crop-trained run).
Files are processed one at a time (a full-size sample needs a few GB on a CPU). Under
``horovodrun``/``srun`` rank ``r`` of ``n`` takes ``FILES[r::n]``. Outputs are written atomically.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from climseg import __version__, dist
from climseg.atomic import write_failure
from climseg.checkpoint import CheckpointError
from climseg.cli import ArgumentParser, fail
from climseg.config import ConfigError
from climseg.data.format import (CHANNELS, CLASS_NAMES, DATA_KEY, LABEL_KEY, NUM_CHANNELS,
                                 DataError, hdf5_writer, read_sample, sample_time)
from climseg.engine import Precision
from climseg.grid import RegularGrid, describe, regular_grid
from climseg.inference import (InputSpec, add_model_arguments, chosen_tile, class_names,
                               config_hash, input_spec, model_from_checkpoint, model_grid,
                               predict_probabilities, prepare, read_checkpoint, scored_region,
                               select_device)
from climseg.inputs import add_variables_option, is_netcdf, open_gridded, variable_map
from climseg.logs import setup_logging
from climseg.netcdf import write_mask_netcdf, write_mask_on_coordinates
from climseg.plot import map_title, plot_sample, save_map
from climseg.regrid import ToModelGrid

log = logging.getLogger("climseg.predict")

PREDICTION_KEY = "climate/prediction"
PROBABILITIES_KEY = "climate/probabilities"
TMQ = CHANNELS.index("TMQ")


def read_input(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(data (H, W, NUM_CHANNELS) float32, labels uint8 or None) of a file to predict on.

    Labelled files go through ``read_sample`` (all its checks). Files without
    ``climate/labels_0`` (new CAM5 output nobody has labelled) are allowed too: then only
    ``climate/data`` is read.
    """
    try:
        with h5py.File(path, "r") as f:
            has_labels = LABEL_KEY in f
    except (OSError, FileNotFoundError):
        has_labels = True  # let read_sample name the problem
    if has_labels:
        return read_sample(path)
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get(DATA_KEY), h5py.Dataset):
                raise DataError(f"{path}: missing dataset '{DATA_KEY}'")
            data = f[DATA_KEY][...]
    except OSError as err:
        raise DataError(f"{path}: cannot read '{DATA_KEY}': {str(err).splitlines()[0]}") from None
    if data.ndim != 3 or data.shape[2] != NUM_CHANNELS:
        raise DataError(f"{path}: '{DATA_KEY}' has shape {data.shape}, expected "
                        f"(height, width, {NUM_CHANNELS})")
    return data.astype(np.float32, copy=False), None


def write_mask(path: Path, prediction: np.ndarray, probabilities: np.ndarray | None,
               attrs: dict[str, str], names: tuple[str, ...] = CLASS_NAMES) -> None:
    """Write the predicted mask file atomically (temp file, fsync, rename); ``names``: the
    class names, recorded in the file."""
    with hdf5_writer(path) as f:
        f.create_dataset(PREDICTION_KEY, data=prediction.astype(np.uint8))
        if probabilities is not None:
            f.create_dataset(PROBABILITIES_KEY, data=probabilities.astype(np.float16),
                             compression="gzip", compression_opts=1)
            f[PROBABILITIES_KEY].attrs["layout"] = "lat, lon, class"
        f["climate"].attrs["class_names"] = ",".join(names)
        for key, value in attrs.items():
            f["climate"].attrs[key] = value


MASK_SUFFIX = {"hdf5": "-mask.h5", "netcdf": "-mask.nc"}  # --format -> file name ending


@dataclass
class Job:
    """What every input of one predict run shares: the model and how it is run, what it
    learned on (``grid``; None where unknown), what to write and where."""

    model: torch.nn.Module
    spec: InputSpec
    prec: Precision
    tile: tuple[int, int] | None      # chosen_tile: --tile, else the run's; None: whole
    names: tuple[str, ...]            # class names, recorded in every mask
    provenance: dict[str, str]        # checkpoint, config hash, version, history
    made_with: str                    # the maps' titles: checkpoint and step
    out_dir: Path
    probabilities: bool = False
    fmt: str | None = None            # hdf5 | netcdf; None: the input's own kind
    grid: RegularGrid | None = None
    variables: dict[str, str] = field(default_factory=lambda: variable_map(None))


def segment(job: Job, data: np.ndarray, source: RegularGrid) -> tuple[np.ndarray, np.ndarray,
                                                                       str]:
    """(probabilities (K, H, W) float32, class mask (H, W) uint8, how) of one field ``data``
    (H, W, NUM_CHANNELS) on its grid ``source``. On the model's grid as it is; on another, its
    channels are regridded bilinearly to the model's grid, predicted there, and brought back:
    probabilities bilinearly, the mask by nearest neighbour (class ids are not averaged).
    ``how`` says which, for the mask file."""
    grids = ToModelGrid(source, job.grid)
    probs = predict_probabilities(job.model, prepare(grids.fields(data, job.spec.channels),
                                                     job.spec), job.prec, job.tile)[0]
    mask = probs.argmax(0).to(torch.uint8).numpy()
    if grids.back is None:
        return probs.numpy(), mask, grids.how
    return grids.back.bilinear(probs.numpy()), grids.back.nearest(mask), grids.how


def _region(job: Job, shape: tuple[int, int]) -> str:
    """What was run, in words: the field on the model's grid, in tiles or in one piece."""
    return scored_region(job.grid.shape if job.grid is not None else shape, None,
                         job.tile)["region"]


def _save(maps: list[tuple[Path, object]], write_mask, mask: Path) -> None:
    """The maps first, then the mask; the maps go again when the mask cannot be written: a
    mask is never there without its maps, and a failure leaves neither."""
    target = mask
    try:
        for png, fig in maps:
            target = png
            save_map(fig, png)
        target = mask
        write_mask()
    except OSError as err:
        _remove(png for png, _ in maps)
        raise DataError(write_failure(target, err)) from None
    except DataError:  # the mask (hdf5_writer says why)
        _remove(png for png, _ in maps)
        raise


def _remove(paths) -> None:
    """Remove what was written of a failed prediction; on a read-only file system, where even
    an absent file cannot be unlinked (EROFS before ENOENT), nothing was written to remove."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def predict_sample(job: Job, path: Path) -> dict[str, int]:
    """Write ``<name>-mask.h5`` (``-mask.nc`` with ``job.fmt`` netcdf) and ``<name>.png`` for
    one climseg sample file, on the grid its shape implies; return predicted pixel counts per
    class name."""
    data, labels = read_input(path)
    probs, prediction, how = segment(job, data, regular_grid(*data.shape[:2]))
    name, fmt = path.stem, job.fmt or "hdf5"
    mask = job.out_dir / f"{name}{MASK_SUFFIX[fmt]}"
    fig = plot_sample(data[..., TMQ], prediction, labels, title=map_title(path, job.made_with))
    attrs = {**job.provenance, "region": _region(job, prediction.shape), "grid": how}
    chosen = np.moveaxis(probs, 0, -1) if job.probabilities else None

    def write():
        if fmt == "netcdf":
            write_mask_netcdf(mask, prediction, chosen, {"input_file": str(path), **attrs},
                              job.names, time=sample_time(path))
        else:
            write_mask(mask, prediction, chosen, {"source": str(path), **attrs}, job.names)

    _save([(job.out_dir / f"{name}.png", fig)], write, mask)
    return {job.names[c]: int((prediction == c).sum()) for c in range(len(job.names))}


def predict_gridded(job: Job, path: Path) -> dict[str, int]:
    """Write ``<name>-mask.nc`` on a netCDF input's own coordinates (its time axis, rows and
    columns as the file has them) and one map per time step (``<name>.png``, or
    ``<name>-tN.png`` for several); return predicted pixel counts per class name, all steps."""
    target = describe(job.grid) if job.grid is not None else "unknown"
    with open_gridded(path, job.variables, job.spec.channels, target,
                      optional=[TMQ]) as src:
        masks, probs, maps, how = [], [], [], ""
        for t in range(src.steps):
            data = src.read_step(t)
            p, m, how = segment(job, data, src.grid)
            masks.append(src.to_file_layout(m))
            if job.probabilities:
                probs.append(src.to_file_layout(p))
            note = job.made_with if src.steps == 1 else f"step {t + 1} of {src.steps}, " \
                                                        f"{job.made_with}"
            png = job.out_dir / (f"{path.stem}.png" if src.steps == 1
                                 else f"{path.stem}-t{t}.png")
            maps.append((png, plot_sample(data[..., TMQ], m, src.read_labels(t),
                                          title=map_title(path, note))))
        lat, lon, time = src.lat, src.lon, src.time
    mask = job.out_dir / f"{path.stem}{MASK_SUFFIX['netcdf']}"
    attrs = {"input_file": str(path), **job.provenance,
             "region": _region(job, masks[0].shape), "grid": how}
    _save(maps, lambda: write_mask_on_coordinates(
        mask, np.stack(masks), np.stack(probs) if probs else None, attrs, job.names,
        lat, lon, time), mask)
    every = np.stack(masks)
    return {job.names[c]: int((every == c).sum()) for c in range(len(job.names))}


def provenance(checkpoint: str | Path, cfg) -> dict[str, str]:
    """What made a mask: the checkpoint, the sha256 of its config, climseg's version, when."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"checkpoint": str(checkpoint), "config_sha256": config_hash(cfg),
            "climseg_version": __version__, "history": f"{now} climseg predict"}


def checkpoint_note(path: str | Path, ckpt: dict) -> str:
    """``checkpoint best.pt, step 120``: what made a prediction, for its map's title."""
    step = ckpt.get("step")
    return f"checkpoint {Path(path).name}" + (f", step {step}" if isinstance(step, int) else "")


def parse_args(argv: list[str] | None):
    p = ArgumentParser("predict", description=(
        "Segment climseg sample files or CF-netCDF fields with a trained checkpoint: a mask "
        "file and a map per input file.\n\n"
        "Inputs: climseg samples (NAME.h5, climate/data on the grid their shape implies) and "
        "netCDF files\n(ClimateNet, CAM5 history, ERA5/MERRA-2 style) with 1-D lat/latitude "
        "and lon/longitude\ncoordinates and an optional time axis (one prediction per step). "
        "An input on another regular\nglobal grid than the model's (recorded in its "
        "checkpoint) is regridded bilinearly to it, and\nthe mask brought back to the input's "
        "grid (nearest neighbour; probabilities bilinearly).\nSee docs/inference.md.\n\n"
        "Example: climseg predict --checkpoint runs/demo/best.pt --output "
        "runs/demo/predictions data/demo/cam/test/*.h5\n"
        "         climseg predict --checkpoint best.pt --output pred "
        "--variables TMQ=tcwv,PSL=msl era5.nc"))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by climseg train")
    p.add_option("--output", "--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--probabilities", action="store_true",
                   help="also store per-class probabilities (HDF5: float16 (lat, lon, class); "
                        "netCDF: float32 (time, class, lat, lon))")
    p.add_argument("--format", choices=tuple(MASK_SUFFIX), default=None,
                   help="mask files: hdf5 (NAME-mask.h5, climseg's layout) or netcdf "
                        "(NAME-mask.nc, CF-1.8 with lat/lon/time); default: hdf5 for sample "
                        "files, netcdf (on the input's own coordinates) for netCDF inputs, "
                        "which can have no other")
    add_variables_option(p)
    add_model_arguments(p)
    p.add_quiet()
    p.add_argument("files", nargs="+", type=Path,
                   help=f"sample files (climate/data (H, W, {NUM_CHANNELS})) or netCDF files")
    return p.parse_args(argv)


def check_inputs(files: list[Path], fmt: str | None) -> dict[Path, bool]:
    """Every input exists and no two share a name (their outputs would collide); which are
    netCDF. A netCDF input with ``--format hdf5`` is refused: its mask lies on its own
    coordinates, which climseg's HDF5 layout cannot hold."""
    names = [f.stem for f in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{files[names.index(dupes[0])]}: several inputs are named "
                        f"{dupes[0]}.*; their outputs would overwrite each other")
    kinds = {}
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: file not found")
        kinds[f] = is_netcdf(f)
        if kinds[f] and fmt == "hdf5":
            raise DataError(f"{f}: a netCDF input's mask is written as netCDF on the file's "
                            "own coordinates; --format hdf5 cannot hold them (leave --format "
                            "out, or use --format netcdf)")
    return kinds


def build_job(args, device: torch.device) -> Job:
    """The model of ``--checkpoint`` on ``device`` and everything the inputs share."""
    variables = variable_map(args.variables)
    ckpt, cfg = read_checkpoint(args.checkpoint, device)
    model = model_from_checkpoint(ckpt, cfg, str(args.checkpoint), device)
    grid = model_grid(ckpt, cfg, str(args.checkpoint))
    made_with = checkpoint_note(args.checkpoint, ckpt)
    del ckpt
    prec = Precision.build(device, args.precision, None)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Job(model, input_spec(cfg, args.stats), prec,
               chosen_tile(cfg, args.full_field, tuple(args.tile) if args.tile else None),
               class_names(cfg),
               provenance(args.checkpoint, cfg), made_with, args.output, args.probabilities,
               args.format, grid, variables)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dist.init()
    except RuntimeError as err:
        return fail("predict", str(err))
    setup_logging(dist.rank(), dist.size(), args.quiet)
    try:
        netcdf_input = check_inputs(args.files, args.format)
        job = build_job(args, select_device(args.device, dist.local_rank()))
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"{args.output}: cannot create the output folder: "
                            f"{err.strerror}") from None
        mine = args.files[dist.rank()::dist.size()]
        for i, path in enumerate(mine, 1):
            start = time.perf_counter()
            gridded = netcdf_input[path]
            counts = (predict_gridded if gridded else predict_sample)(job, path)
            suffix = MASK_SUFFIX["netcdf" if gridded else job.fmt or "hdf5"]
            log.info("[%d/%d] %s: %.1fs, predicted pixels %s -> %s", i, len(mine), path.name,
                     time.perf_counter() - start, counts, args.output / f"{path.stem}{suffix}")
    except (DataError, CheckpointError, ConfigError) as err:
        return fail("predict", f"rank {dist.rank()}: {err}" if dist.size() > 1 else str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
