"""``python -m climseg.predict``: segment sample files with a trained checkpoint.

For each input ``<name>.h5`` writes, into ``--out``:

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
from climseg.inference import (InputSpec, add_model_arguments, class_names, config_hash,
                               input_spec, model_from_checkpoint, predict_probabilities,
                               prepare, read_checkpoint, run_field, scored_region,
                               select_device)
from climseg.logs import setup_logging
from climseg.netcdf import write_mask_netcdf
from climseg.plot import map_title, plot_sample, save_map

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


def _write_mask_file(fmt: str, mask: Path, source: Path, prediction: np.ndarray,
                     probabilities: np.ndarray | None, attrs: dict[str, str],
                     names: tuple[str, ...]) -> None:
    """The mask of ``source`` in format ``fmt`` (a key of MASK_SUFFIX)."""
    if fmt == "netcdf":
        write_mask_netcdf(mask, prediction, probabilities, {"input_file": str(source), **attrs},
                          names, time=sample_time(source))
    else:
        write_mask(mask, prediction, probabilities, {"source": str(source), **attrs}, names)


def predict_file(model, spec: InputSpec, path: Path, out_dir: Path, prec: Precision,
                 probabilities: bool, provenance: dict[str, str],
                 tile: tuple[int, int] | None = None,
                 names: tuple[str, ...] = CLASS_NAMES, fmt: str = "hdf5",
                 made_with: str | None = None) -> dict[str, int]:
    """Write ``<name>-mask.h5`` (``-mask.nc`` with ``fmt`` netcdf) and ``<name>.png`` for one
    file; return predicted pixel counts per class name.

    ``provenance``: attributes every mask file records (checkpoint, config hash, version).
    ``tile``: score the field in tiles of this size (the run's validation size).
    ``made_with``: what the map's title says made the prediction (checkpoint, step)."""
    data, labels = read_input(path)
    probs = predict_probabilities(model, prepare(data, spec), prec, tile=tile)[0]  # (K, H, W)
    prediction = probs.argmax(0).to(torch.uint8).numpy()
    name = path.stem
    png, mask = out_dir / f"{name}.png", out_dir / f"{name}{MASK_SUFFIX[fmt]}"
    fig = plot_sample(data[..., TMQ], prediction, labels, title=map_title(path, made_with))
    # The map first, then the mask, and the map goes again when the mask cannot be written:
    # a mask is never there without its map, and a failure leaves neither.
    target = png
    try:
        save_map(fig, png)
        target = mask
        _write_mask_file(fmt, mask, path, prediction,
                         probs.permute(1, 2, 0).numpy() if probabilities else None,
                         {**provenance,
                          "region": scored_region(prediction.shape, None, tile)["region"]},
                         names)
    except OSError as err:
        raise DataError(write_failure(target, err)) from None
    except DataError:  # the mask (hdf5_writer says why)
        png.unlink(missing_ok=True)
        raise
    return {names[c]: int((prediction == c).sum()) for c in range(len(names))}


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
        "Segment sample files with a trained checkpoint: NAME-mask.h5 and NAME.png per input "
        "file.\n\nExample: climseg predict --checkpoint runs/demo/best.pt --output "
        "runs/demo/predictions data/demo/cam/test/*.h5"))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by climseg train")
    p.add_option("--output", "--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--probabilities", action="store_true",
                   help="also store per-class probabilities, float16 (lat, lon, class)")
    p.add_argument("--format", choices=tuple(MASK_SUFFIX), default="hdf5",
                   help="mask files: hdf5 (NAME-mask.h5, climseg's layout) or netcdf "
                        "(NAME-mask.nc, CF-1.8 with lat/lon/time; default hdf5)")
    add_model_arguments(p)
    p.add_quiet()
    p.add_argument("files", nargs="+", type=Path,
                   help=f"sample files (climate/data (H, W, {NUM_CHANNELS}))")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dist.init()
    except RuntimeError as err:
        return fail("predict", str(err))
    setup_logging(dist.rank(), dist.size(), args.quiet)
    try:
        names = [f.stem for f in args.files]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{args.files[names.index(dupes[0])]}: several inputs are named "
                            f"{dupes[0]}.h5; their outputs would overwrite each other")
        for f in args.files:
            if not f.is_file():
                raise DataError(f"{f}: file not found")
        device = select_device(args.device, dist.local_rank())
        ckpt, cfg = read_checkpoint(args.checkpoint, device)
        model = model_from_checkpoint(ckpt, cfg, str(args.checkpoint), device)
        made_with = checkpoint_note(args.checkpoint, ckpt)
        del ckpt
        spec = input_spec(cfg, args.stats)
        tile = None if args.full_field else run_field(cfg)
        names = class_names(cfg)
        made_by = provenance(args.checkpoint, cfg)
        prec = Precision.build(device, args.precision, None)
        if prec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"{args.output}: cannot create the output folder: "
                            f"{err.strerror}") from None
        mine = args.files[dist.rank()::dist.size()]
        for i, path in enumerate(mine, 1):
            start = time.perf_counter()
            counts = predict_file(model, spec, path, args.output, prec, args.probabilities,
                                  made_by, tile, names, args.format, made_with)
            log.info("[%d/%d] %s: %.1fs, predicted pixels %s -> %s", i, len(mine), path.name,
                     time.perf_counter() - start, counts,
                     args.output / f"{path.stem}{MASK_SUFFIX[args.format]}")
    except (DataError, CheckpointError, ConfigError) as err:
        return fail("predict", f"rank {dist.rank()}: {err}" if dist.size() > 1 else str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
