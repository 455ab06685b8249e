"""``python -m climseg.evaluate``: score a checkpoint on a data split, or on labelled netCDF
files.

Alone or under ``horovodrun``/``srun``: rank ``r`` of ``n`` scores ``files[r::n]`` of the split
with the trainer's own evaluation loop (:func:`climseg.engine.evaluate`), whose confusion counts
and loss/batch sums are reduced in one allreduce. Rank 0 prints the result and writes it as
JSON: per-class and mean IoU, the MLPerf ``eval_accuracy``, the confusion matrix (rows truth,
columns prediction), per-class pixel frequencies of truth and prediction, and samples/s.

By default it scores the whole field, as ``predict`` segments it. A run that validated on
crops (``data.validation_crop``, else ``data.crop``) is run in half-overlapping tiles of that
size with the probabilities averaged, not on the whole field at once: DeepLabv3+'s
image-pooling branch averages over its whole input, so a crop-trained model fed a field 16
times larger sees statistics it never learned on and does worse (docs/inference.md), while
tiles give it inputs of its own size and still score every pixel. ``--full-field`` runs each
field in one piece anyway, ``--tile H W`` in tiles of another size (the training crop, to
measure what the whole field costs a crop-trained model); ``--crop H W`` scores only a centred
crop, and says so: the printed
result and the JSON's ``region`` name what was scored and its share of the field. A split
whose fields are on another grid than the model's (the grid their shape implies,
:mod:`climseg.grid`) is scored as ``predict`` masks such files: regridded to the model's grid,
run there, and scored on the split's own grid (below).

``--data`` may instead name netCDF files, or folders of them (:func:`netcdf_inputs`), with a
label variable (ClimateNet's ``LABELS``, else ``labels``, or ``--labels NAME``): each time
step is a sample, scored on the file's own grid against its labels (:func:`gridded_source`).
A file on another grid than the model's is taken as ``predict`` takes it (its channels
regridded bilinearly to the model's grid and predicted there, in the same tiles), and the
class prediction is brought back to the file's grid by nearest neighbour; the result's
``grid`` says which grid was scored and whether it was regridded.

Logs and progress go to stderr; the result table to stdout, so that it can be redirected.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from climseg import dist
from climseg.atomic import atomic_path
from climseg.checkpoint import CheckpointError
from climseg.cli import ArgumentParser, fail, positive_int
from climseg.config import Config, ConfigError
from climseg.data.format import DataError, Progress, read_sample, validate_file
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files, rank_partition
from climseg.engine import Precision, evaluate
from climseg.events import EVENT_OVERLAP, detection_skill, event_scores
from climseg.grid import RegularGrid, describe, regular_grid
from climseg.inference import (OUTPUT_STRIDE, InputSpec, TiledModel, add_model_arguments,
                               chosen_tile, class_names, input_spec, model_from_checkpoint,
                               model_grid, predict_log_probabilities, prepare, read_checkpoint,
                               scored_region, select_device)
from climseg.inputs import (LABEL_NAMES, add_variables_option, is_netcdf, open_gridded,
                            variable_map)
from climseg.logs import setup_logging
from climseg.losses import build_loss
from climseg.regrid import ToModelGrid

log = logging.getLogger("climseg.evaluate")

DataPaths = str | os.PathLike | Sequence[str | os.PathLike]  # --data: a root, or netCDF inputs


def _finite_or_none(values: list[float]) -> list[float | None]:
    # An IoU of a class absent from truth and prediction is NaN, which JSON cannot hold.
    return [v if math.isfinite(v) else None for v in values]


def pixel_frequencies(confusion: list[list[int]]) -> dict[str, list[float]]:
    """Share of pixels per class in the truth (row sums) and in the prediction (column sums)."""
    cm = torch.tensor(confusion, dtype=torch.float64)
    total = cm.sum().clamp(min=1)
    return {"truth": (cm.sum(1) / total).tolist(), "prediction": (cm.sum(0) / total).tolist()}


def _counted(batches: Iterable, bar: Progress) -> Iterator:
    for batch in batches:
        yield batch
        bar.update()


def score(checkpoint: str | os.PathLike, data_root: DataPaths, split: str = "test",
          batch_size: int | None = None, crop: tuple[int, int] | None = None,
          stats_file: str | os.PathLike | None = None, device: str | None = None,
          precision: str = "auto", threads: int = 2,
          full_field: bool = False, progress: bool = False,
          tile: tuple[int, int] | None = None,
          event_overlap: float = EVENT_OVERLAP, labels: tuple[str, ...] = LABEL_NAMES,
          variables: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data_root/split``, or on netCDF files (``data_root``: one
    or more files or folders of them, :func:`netcdf_inputs`); the same result dict on every
    rank.

    The whole field is scored unless ``crop`` names a centred crop; in tiles of the run's
    validation size where that is smaller, in one piece with ``full_field``, or in tiles of
    ``tile`` (:func:`climseg.inference.chosen_tile`).
    ``progress``: a progress line on stderr (this rank's batches). Beside the pixel scores,
    events are matched per sample (:func:`climseg.events.event_scores` at IoU
    ``event_overlap``): the detection skill the ClimateNet paper reports. netCDF files are
    scored on their own grids against their labels (the first of ``labels`` each has), their
    channels found by ``variables`` (:func:`climseg.inputs.variable_map`).
    """
    gridded = netcdf_inputs(data_root, split)
    names = variable_map(variables) if gridded is not None else None
    run = load_scoring(checkpoint, device, stats_file, precision, batch_size)
    tile = chosen_tile(run.cfg, full_field, tile)
    if crop is not None and any(c <= 0 or c % OUTPUT_STRIDE for c in crop):
        raise ConfigError(f"--crop: sides must be positive multiples of {OUTPUT_STRIDE}, "
                          f"got {crop[0]} {crop[1]}")
    if gridded is None:
        source = split_source(run, _paths(data_root)[0] / split, crop, threads, tile)
    elif crop is not None:
        raise ConfigError("--crop: netCDF inputs are scored whole, on their own grids; a "
                          "centred crop is for climseg's HDF5 splits")
    else:
        source = gridded_source(run, gridded, names, tuple(labels), tile)
    bar = Progress(source.batches, "scoring", unit="batches", enabled=progress)
    tally = EventTally(run.names, event_overlap, periodic=source.region["fraction"] == 1.0)
    result = evaluate(source.model, _counted(source.epoch, bar), run.loss_fn, run.prec,
                      run.cfg.model.num_classes, on_batch=tally.add)
    result["per_class_iou"] = _finite_or_none(result["per_class_iou"])
    if not math.isfinite(result["mean_iou"]):
        result["mean_iou"] = None
    return {
        "checkpoint": str(checkpoint),
        "step": run.step,
        "data": source.data,
        "classes": list(run.names),
        **result,
        "event_overlap": event_overlap,
        "events": tally.reduced(),
        "pixel_frequency": pixel_frequencies(result["confusion"]),
        "ranks": dist.size(),
        "batch_size": run.batch_size,
        **source.region,
        **source.extra,
        "device": run.prec.device.type,
        "precision": run.prec.name,
    }


@dataclass
class Scoring:
    """A checkpoint ready to score, whatever the data: its model, how it runs, and the grid it
    learned on (None where unknown)."""

    model: torch.nn.Module
    cfg: Config
    step: int | None
    spec: InputSpec
    prec: Precision
    loss_fn: torch.nn.Module
    names: tuple[str, ...]
    batch_size: int
    grid: RegularGrid | None = None


def load_scoring(checkpoint: str | os.PathLike, device: str | None,
                 stats_file: str | os.PathLike | None, precision: str,
                 batch_size: int | None) -> Scoring:
    """The checkpoint's model on this rank's device, with what scoring needs around it."""
    device = select_device(device, dist.local_rank())
    ckpt, cfg = read_checkpoint(checkpoint, device)
    model = model_from_checkpoint(ckpt, cfg, str(checkpoint), device)
    step = ckpt.get("step")
    grid = model_grid(ckpt, cfg, str(checkpoint))
    del ckpt  # the optimizer state is as large as the model twice over
    spec = input_spec(cfg, stats_file)
    batch_size = batch_size or cfg.train.local_batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    prec = Precision.build(device, precision, None)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(class_frequencies=cfg.loss.class_frequencies,
                         weight_pow=cfg.loss.weight_pow).to(device)
    return Scoring(model, cfg, step, spec, prec, loss_fn, class_names(cfg), batch_size, grid)


@dataclass
class Source:
    """This rank's batches and what they cover: the model to run them through, the batches
    (``epoch``) and their count, the ``region`` scored (:func:`scored_region`), the data in
    words, and keys the result adds (``extra``)."""

    model: torch.nn.Module
    epoch: Iterable[tuple[torch.Tensor, torch.Tensor]]
    batches: int
    region: dict[str, Any]
    data: str
    extra: dict[str, Any] = field(default_factory=dict)


def split_source(run: Scoring, split_dir: Path, crop: tuple[int, int] | None, threads: int,
                 tile: tuple[int, int] | None) -> Source:
    """A split of climseg's HDF5 samples: this rank's files through the trainer's loader."""
    files = list_files(split_dir)
    if len(files) < dist.size():
        raise DataError(f"{split_dir}: {len(files)} files for {dist.size()} ranks; "
                        "every rank needs at least one")
    mine = rank_partition(files, dist.rank(), dist.size())
    shape = validate_file(mine[0])
    for path in mine[1:]:  # fail now on a bad file, not after an hour of scoring
        validate_file(path, expect_shape=shape)
    grids = ToModelGrid(regular_grid(*shape[:2]), run.grid)
    if grids.regridded:
        if crop is not None:
            raise ConfigError(f"--crop: {split_dir} holds {shape[0]}x{shape[1]} fields, not on "
                              f"the model's grid ({describe(run.grid)}): they are scored "
                              "whole, regridded; a centred crop is for a split on the "
                              "model's grid")
        return _regridded_split(run, split_dir, mine, grids, tile)
    spec = run.spec
    try:
        loader = BatchLoader(mine, run.batch_size, shift=spec.shift, scale=spec.scale,
                             channels=spec.channels, crop=crop, random_crop=False,
                             shuffle=False, drop_last=False, num_threads=threads, prefetch=2,
                             device=run.prec.device)
    except ValueError as err:
        raise ConfigError(f"--crop/--workers: {err}") from None
    region = scored_region(loader.full_shape[:2], crop, tile)
    return Source(_scoring_model(run.model, region, split_dir), loader.epoch(0), len(loader),
                  region, str(split_dir))


def _regridded_split(run: Scoring, split_dir: Path, mine: list[Path], grids: ToModelGrid,
                     tile: tuple[int, int] | None) -> Source:
    """A split whose fields are on another grid than the model's, scored as ``predict``
    masks its files: each sample's channels regridded to the model's grid, run there (in the
    same tiles), the prediction brought back by nearest neighbour and scored on the split's
    own grid against its labels."""
    ran = scored_region(run.grid.shape, None, tile)
    region = {**ran, "region": f"the whole field, on the split's own grid; the model ran on "
                               f"{ran['region']}"}

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(mine), run.batch_size):
            samples = [read_sample(path) for path in mine[start:start + run.batch_size]]
            logp = _on_input_grid(run, grids, [data for data, _ in samples], tile)
            yield logp, torch.from_numpy(np.stack([y for _, y in samples])).to(
                run.prec.device, torch.int64)

    return Source(AlreadyPredicted(), batches(), -(-len(mine) // run.batch_size), region,
                  str(split_dir), {"grid": "scored on the split's grid against its labels; "
                                           "predicted " + grids.how, "regridded": True})


def _on_input_grid(run: Scoring, grids: ToModelGrid, fields: list[np.ndarray],
                   tile: tuple[int, int] | None) -> torch.Tensor:
    """Log class probabilities (n, K, H, W) of samples (H, W, channel) on their own grid:
    the channels on the model's grid as ``predict`` takes them, run as it runs them, and
    brought back by nearest neighbour, so that their argmax is ``predict``'s mask."""
    spec = run.spec
    x = torch.cat([prepare(grids.fields(data, spec.channels), spec) for data in fields])
    logp = predict_log_probabilities(run.model, x, run.prec, tile)
    if grids.back is None:
        return logp
    return torch.from_numpy(grids.back.nearest(logp.cpu().numpy())).to(run.prec.device)


NETCDF_GLOB = "*.nc"  # the netCDF files of a folder given as --data
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf")


def _paths(data: DataPaths) -> list[Path]:
    return [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]


def netcdf_inputs(data: DataPaths, split: str) -> list[Path] | None:
    """The netCDF files ``--data`` names: files, and the ``*.nc`` of folders; None for a
    climseg data root (one folder holding ``split/``, or naming no netCDF file, whose error
    is then the split's own, as before)."""
    paths = _paths(data)
    if len(paths) == 1 and ((paths[0] / split).is_dir() or not (
            paths[0].suffix in _NETCDF_SUFFIXES or paths[0].is_file()
            or paths[0].is_dir() and any(paths[0].glob(NETCDF_GLOB)))):
        return None
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob(NETCDF_GLOB))
            if not found:
                raise DataError(f"{path}: no {NETCDF_GLOB} files in folder")
            files += found
        elif not path.is_file():
            raise DataError(f"{path}: file not found")
        elif not is_netcdf(path):
            raise DataError(f"{path}: not a netCDF file; --data takes netCDF files and "
                            f"folders of them, or one data root holding {split}/")
        else:
            files.append(path)
    return files


class AlreadyPredicted(torch.nn.Module):
    """What the trainer's evaluation loop runs when its batches are already the model's log
    class probabilities on the grid scored: netCDF inputs are predicted on the model's grid
    and brought back to each file's own (:func:`gridded_source`), which no module of one
    fixed grid can do for files of several."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def gridded_source(run: Scoring, files: list[Path], names: dict[str, str],
                   labels: tuple[str, ...], tile: tuple[int, int] | None) -> Source:
    """netCDF inputs, each scored on its own grid against its labels, one sample per time
    step (batches do not span files). Every rank checks every file first (it reads their
    coordinates only), so a bad one stops all ranks alike, and the result names every grid;
    rank ``r`` of ``n`` then scores ``files[r::n]``."""
    if len(files) < dist.size():
        raise DataError(f"{files[0]}: {len(files)} netCDF files for {dist.size()} ranks; "
                        "every rank needs at least one (a file's time steps stay together)")
    target = describe(run.grid) if run.grid is not None else "unknown"
    steps, shapes, hows, regridded = [], [], [], False
    for path in files:
        with open_gridded(path, names, run.spec.channels, target, labels=labels) as src:
            grids = ToModelGrid(src.grid, run.grid)
            steps.append(src.steps)
            shapes.append(src.grid.shape)
        regridded = regridded or grids.regridded
        if grids.how not in hows:
            hows.append(grids.how)
    ran = scored_region(run.grid.shape if run.grid is not None else shapes[0], None, tile)
    region = {**ran, "region": f"each input's whole field, on its own grid; the model ran on "
                               f"{ran['region']}"}
    grid = ("scored on the input's grid against its labels; predicted " if len(hows) == 1
            else "scored on each input's own grid against its labels; predicted ")
    mine = rank_partition(files, dist.rank(), dist.size())
    batches = sum(-(-n // run.batch_size) for n in steps[dist.rank()::dist.size()])
    return Source(AlreadyPredicted(), _gridded_batches(run, mine, names, labels, tile, target),
                  batches, region, _described(files),
                  {"grid": grid + " | ".join(hows), "regridded": regridded, "files": len(files)})


def _described(files: list[Path]) -> str:
    """netCDF inputs in words, for the result's ``data``."""
    if len(files) == 1:
        return str(files[0])
    where = f"in {files[0].parent}" if len({f.parent for f in files}) == 1 \
        else f"({files[0]} ...)"
    return f"{len(files)} netCDF files {where}"


def _gridded_batches(run: Scoring, files: list[Path], names: dict[str, str],
                     labels: tuple[str, ...], tile: tuple[int, int] | None, target: str
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities (n, K, H, W), labels (n, H, W)) on each file's own grid, up to
    ``run.batch_size`` time steps at a time (:func:`_on_input_grid`)."""
    for path in files:
        with open_gridded(path, names, run.spec.channels, target, labels=labels) as src:
            grids = ToModelGrid(src.grid, run.grid)
            for start in range(0, src.steps, run.batch_size):
                steps = range(start, min(start + run.batch_size, src.steps))
                logp = _on_input_grid(run, grids, [src.read_step(t) for t in steps], tile)
                y = np.stack([src.read_labels(t) for t in steps])
                yield logp, torch.from_numpy(y).to(run.prec.device, torch.int64)


class EventTally:
    """Object-based counts (true, predicted and matched events per class) summed over this
    rank's samples by :meth:`add`, then over ranks by :meth:`reduced`."""

    def __init__(self, names: tuple[str, ...], overlap: float, periodic: bool):
        self.names, self.overlap, self.periodic = names, overlap, periodic
        self.counts = np.zeros((len(names) - 1, 3), dtype=np.int64)  # true, predicted, matched

    def add(self, prediction: torch.Tensor, labels: torch.Tensor) -> None:
        for p, y in zip(prediction.cpu().numpy(), labels.cpu().numpy()):
            scores = event_scores(p, y, self.names, self.overlap, self.periodic)
            self.counts += [[c["true"], c["predicted"], c["matched"]] for c in scores.values()]

    def reduced(self) -> dict[str, dict[str, int | float | None]]:
        total = dist.allreduce_sum(torch.from_numpy(self.counts), name="event_counts")
        counts = {name: dict(zip(("true", "predicted", "matched"), map(int, row)))
                  for name, row in zip(self.names[1:], total.tolist())}
        skill = detection_skill(counts)
        return {name: {**counts[name], **skill[name]} for name in counts}


def _scoring_model(model: torch.nn.Module, region: dict[str, Any],
                   split_dir: Path) -> torch.nn.Module:
    """``model`` as it scores ``region``: wrapped in tiles, or alone when it takes the field
    in one piece. What it is fed must be a multiple of the output stride on each side."""
    size = region["tile"] or region["field"]
    if any(s % OUTPUT_STRIDE for s in size):
        what = "tiles" if region["tile"] else "field"
        raise DataError(f"{split_dir}: the {size[0]}x{size[1]} {what} is not a multiple of "
                        f"{OUTPUT_STRIDE} on each side; score a crop with --crop H W")
    return TiledModel(model, region["tile"]) if region["tile"] else model


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


def summary(result: dict[str, Any]) -> str:
    def pct(v):
        return f"{100 * v:.3f}%"

    def iou(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"{result['samples']} samples of {result['data']} on {result['ranks']} rank(s), "
             f"{result['samples_per_second']:.2f} samples/s",
             f"scored: {result['region']}",
             *([f"grid: {result['grid']}"] if "grid" in result else []),
             f"mean IoU {iou(result['mean_iou'])}   eval_accuracy (MLPerf) "
             f"{result['eval_accuracy']:.4f}   loss {result['loss']:.4f}",
             f"{'class':<20}{'IoU':>8}{'truth px':>12}{'predicted px':>14}"]
    freq = result["pixel_frequency"]
    for c, name in enumerate(result["classes"]):
        lines.append(f"{name:<20}{iou(result['per_class_iou'][c]):>8}"
                     f"{pct(freq['truth'][c]):>12}{pct(freq['prediction'][c]):>14}")
    lines.append("confusion (rows truth, columns prediction): " + str(result["confusion"]))
    lines.append(f"{'events (IoU >= ' + format(result['event_overlap'], 'g') + ')':<20}"
                 f"{'true':>8}{'predicted':>12}{'matched':>10}{'precision':>11}{'recall':>8}"
                 f"{'F1':>8}")
    for name, e in result["events"].items():
        lines.append(f"{name:<20}{e['true']:>8}{e['predicted']:>12}{e['matched']:>10}"
                     f"{iou(e['precision']):>11}{iou(e['recall']):>8}{iou(e['f1']):>8}")
    return "\n".join(lines)


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None):
    p = ArgumentParser("evaluate", description=(
        "Score a checkpoint on a data split (IoU, MLPerf eval_accuracy); runs alone or under "
        "horovodrun/srun.\nThe table goes to stdout, logs and progress to stderr.\n\n"
        "--data is a climseg data root, or labelled netCDF files (ClimateNet's, or any "
        "CF-netCDF with a\nlabel variable; one sample per time step). A netCDF file on "
        "another regular global grid than\nthe model's (or a split of fields of another "
        "shape) is regridded bilinearly to it, predicted there,\nand scored on its own grid "
        "(the prediction brought back by nearest neighbour). See\ndocs/inference.md.\n\n"
        "Example: climseg evaluate --checkpoint runs/demo/best.pt --data data/demo/cam "
        "--output runs/demo/test.json\n"
        "         climseg evaluate --checkpoint best.pt --data climatenet/test"))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by climseg train")
    p.add_option("--data", required=True, nargs="+", metavar="PATH",
                 help="data root holding <split>/data-*.h5, or netCDF files and folders of "
                      "*.nc files")
    p.add_argument("--split", default="test", help="split folder under --data (default: test)")
    p.add_argument("--labels", default=None, metavar="NAME",
                   help="netCDF inputs: the label variable, class ids per pixel (default: "
                        f"{' or '.join(LABEL_NAMES)}, ClimateNet's)")
    add_variables_option(p)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="samples per batch and rank (default: the run's train.local_batch_size)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="score only the centred HxW crop (default: the whole field)")
    p.add_argument("--event-overlap", type=_overlap, default=EVENT_OVERLAP, metavar="IOU",
                   help="IoU at which a predicted event finds a true one, for the event "
                        f"precision/recall/F1 (default: {EVENT_OVERLAP})")
    add_model_arguments(p)
    p.add_workers("reader threads", 2, "--threads")
    p.add_option("--output", "--out", type=Path, default=None,
                 help="write the result as JSON here")
    p.add_quiet()
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dist.init()
    except RuntimeError as err:
        return fail("evaluate", str(err))
    setup_logging(dist.rank(), dist.size(), args.quiet)
    try:
        result = score(args.checkpoint, args.data, args.split, args.batch_size,
                       tuple(args.crop) if args.crop else None, args.stats, args.device,
                       args.precision, args.workers, args.full_field,
                       tile=tuple(args.tile) if args.tile else None,
                       progress=dist.is_primary() and not args.quiet,
                       event_overlap=args.event_overlap,
                       labels=(args.labels,) if args.labels else LABEL_NAMES,
                       variables=args.variables)
        if dist.is_primary() and args.output is not None:
            write_json(result, args.output)
    except (DataError, CheckpointError, ConfigError) as err:
        return fail("evaluate", f"rank {dist.rank()}: {err}" if dist.size() > 1 else str(err))
    except OSError as err:
        return fail("evaluate", f"{args.output}: cannot write the result: {err.strerror or err}")
    if dist.is_primary():
        print(summary(result), flush=True)
        if args.output is not None:
            log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
