"""ClimateNet's expert-labelled netCDF4 files to climseg samples (``convert-climatenet``).

ClimateNet (Prabhat, Kashinath et al., "ClimateNet: an expert-labeled open dataset and deep
learning architecture for enabling high-precision analyses of extreme weather", Geosci. Model
Dev. 14, 107-124, 2021) holds CAM5 time steps on DeepCAM's 768x1152 grid with the same 16
variables and class ids (0 background, 1 TC, 2 AR), labelled by human experts. Each file is
netCDF4 (HDF5 underneath, so h5py reads it without a netCDF library): one array per variable
with a leading time dimension of length 1, and the labels in ``LABELS`` (lat, lon) (a leading
time dimension of 1 is accepted too).

One climseg sample is written per input file, with the same base name and ``.h5`` (prefixed
with ``data-`` when the name lacks it, so the data tools, which read ``data-*.h5``, see it);
channels in climseg's order, rows from south to north as in DeepCAM (a file whose ``lat`` runs
north to south is flipped). Outputs are written atomically; every problem is one line naming
the file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import h5py
import numpy as np

from climseg.data.format import (CHANNELS, NUM_CLASSES, DataError, Progress,
                                 prepare_output_folder, write_sample)

LABEL_VARIABLE = "LABELS"
INPUT_GLOB = "*.nc"

log = logging.getLogger("climseg.data.climatenet")


def output_name(source: Path) -> str:
    """climseg file name of a ClimateNet file: same base name, ``.h5``, starting ``data-``."""
    stem = source.stem
    return (stem if stem.startswith("data-") else f"data-{stem}") + ".h5"


def _field(f: h5py.File, name: str, path: Path) -> h5py.Dataset:
    if name not in f:
        raise DataError(f"{path}: missing variable '{name}'")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is a group, not a variable")
    return obj


def _values(dset: h5py.Dataset) -> np.ndarray:
    """Unpacked values of a netCDF variable (CF ``scale_factor`` / ``add_offset``)."""
    raw = dset[...]
    scale = dset.attrs.get("scale_factor")
    offset = dset.attrs.get("add_offset")
    if scale is None and offset is None:
        return raw
    out = raw.astype(np.float64)
    if scale is not None:
        out *= float(np.asarray(scale).reshape(-1)[0])
    if offset is not None:
        out += float(np.asarray(offset).reshape(-1)[0])
    return out


def _as_2d(dset: h5py.Dataset, name: str, path: Path, grid: tuple[int, int] | None
           ) -> np.ndarray:
    """A (lat, lon) field from a (1, lat, lon) or (lat, lon) variable; shape errors name it."""
    shape = dset.shape
    expect = "(1, lat, lon) or (lat, lon)" if grid is None else \
        f"(1, {grid[0]}, {grid[1]}) or ({grid[0]}, {grid[1]})"
    if len(shape) == 3 and shape[0] == 1:
        plane = shape[1:]
    elif len(shape) == 2:
        plane = shape
    else:
        raise DataError(f"{path}: variable '{name}' has shape {shape}, expected {expect}")
    if grid is not None and plane != grid:
        raise DataError(f"{path}: variable '{name}' has shape {shape}, expected {expect} "
                        f"like {CHANNELS[0]}")
    if min(plane) < 1:
        raise DataError(f"{path}: variable '{name}' is empty (shape {shape})")
    try:
        values = _values(dset)
    except OSError as err:
        raise DataError(f"{path}: cannot read variable '{name}' (truncated or corrupt?): "
                        f"{str(err).splitlines()[0]}") from None
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{path}: variable '{name}' has non-numeric dtype {values.dtype}")
    return values.reshape(plane)


def read_climatenet(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data float32 (H, W, 16) in climseg's channel order, labels uint8 (H, W)) of one file."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a netCDF4/HDF5 file (a netCDF3 file can be converted "
                        f"with `nccopy -k nc4`): {str(err).splitlines()[0]}") from None
    with f:
        grid = None
        planes = []
        for name in CHANNELS:
            plane = _as_2d(_field(f, name, path), name, path, grid)
            grid = plane.shape
            planes.append(plane.astype(np.float32, copy=False))
        raw = _as_2d(_field(f, LABEL_VARIABLE, path), LABEL_VARIABLE, path, grid)
        flip = False
        if "lat" in f and isinstance(f["lat"], h5py.Dataset) and f["lat"].shape == (grid[0],) \
                and grid[0] > 1:
            lat = f["lat"][...]
            flip = bool(lat[0] > lat[-1])
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all():
            raise DataError(f"{path}: '{LABEL_VARIABLE}' contains NaN or inf")
        if not (np.round(raw) == raw).all():
            raise DataError(f"{path}: '{LABEL_VARIABLE}' contains non-integer class ids")
    if raw.min() < 0 or raw.max() >= NUM_CLASSES:
        raise DataError(f"{path}: '{LABEL_VARIABLE}' has values outside {{0..{NUM_CLASSES - 1}}}"
                        f" (min {raw.min()}, max {raw.max()})")
    data = np.stack(planes, axis=-1)
    labels = raw.astype(np.uint8)
    if flip:   # DeepCAM's rows run from south to north
        data, labels = data[::-1], labels[::-1]
    return data, labels


def convert_file(source: str | Path, out_dir: str | Path) -> Path:
    """Convert one ClimateNet file into ``out_dir``; return the written sample's path."""
    source = Path(source)
    data, labels = read_climatenet(source)
    target = Path(out_dir) / output_name(source)
    write_sample(target, data, labels)
    return target


def convert_folder(in_dir: str | Path, out_dir: str | Path, force: bool = False,
                   progress: bool = True) -> list[Path]:
    """Convert every ``*.nc`` file of ``in_dir``; return the written paths.

    Refuses an output folder that already holds ``data-*.h5`` files unless ``force``, which
    deletes them first (as ``make-synthetic --force`` does).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise DataError(f"{in_dir}: input folder not found")
    sources = sorted(p for p in in_dir.glob(INPUT_GLOB) if p.is_file())
    if not sources:
        raise DataError(f"{in_dir}: no {INPUT_GLOB} files (ClimateNet's netCDF4 files)")
    names = [output_name(p) for p in sources]
    seen = {}
    for src, name in zip(sources, names):
        if name in seen:
            raise DataError(f"{src}: converts to {name}, as {seen[name]} does")
        seen[name] = src
    if out_dir.resolve() == in_dir.resolve():
        raise DataError(f"{out_dir}: output folder is the input folder")
    prepare_output_folder(out_dir, force)
    bar = Progress(len(sources), "converting ClimateNet files", enabled=progress)
    written = []
    for src in sources:
        written.append(convert_file(src, out_dir))
        bar.update()
    return written


def main(argv: list[str] | None = None) -> int:
    from climseg.cli import ArgumentParser, fail

    parser = ArgumentParser(
        "convert-climatenet",
        description="Convert ClimateNet's expert-labelled netCDF4 files (one CAM5 time step "
                    "each) into climseg samples: one data-*.h5 per input file.",
        epilog="Example: climseg convert-climatenet --data climatenet/train "
               "--output data/climatenet/train-all")
    parser.add_option("--data", "--input", type=Path, required=True,
                      help="folder of ClimateNet *.nc files")
    parser.add_option("--output", "--out", type=Path, required=True,
                      help="folder for the climseg samples (created)")
    parser.add_argument("--force", action="store_true",
                        help="delete data-*.h5 files already in --output first")
    parser.add_quiet()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    try:
        paths = convert_folder(args.data, args.output, force=args.force,
                               progress=not args.quiet)
    except (DataError, OSError) as err:
        return fail("convert-climatenet", str(err).splitlines()[0])
    log.info("converted %d ClimateNet files into %s", len(paths), args.output)
    return 0

if __name__ == "__main__":
    sys.exit(main())
