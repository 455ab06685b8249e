"""``python -m climseg.evaluate``: score a checkpoint on a data split.

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
field in one piece anyway; ``--crop H W`` scores only a centred crop, and says so: the printed
result and the JSON's ``region`` name what was scored and its share of the field.

Logs and progress go to stderr; the result table to stdout, so that it can be redirected.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from climseg import dist
from climseg.atomic import atomic_path
from climseg.checkpoint import CheckpointError
from climseg.cli import ArgumentParser, fail, positive_int
from climseg.config import ConfigError
from climseg.data.format import DataError, Progress, validate_file
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files, rank_partition
from climseg.engine import Precision, evaluate
from climseg.events import EVENT_OVERLAP, detection_skill, event_scores
from climseg.inference import (OUTPUT_STRIDE, TiledModel, add_model_arguments, class_names,
                               input_spec, model_from_checkpoint, read_checkpoint, run_field,
                               scored_region, select_device)
from climseg.logs import setup_logging
from climseg.losses import build_loss

log = logging.getLogger("climseg.evaluate")


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


def score(checkpoint: str | os.PathLike, data_root: str | os.PathLike, split: str = "test",
          batch_size: int | None = None, crop: tuple[int, int] | None = None,
          stats_file: str | os.PathLike | None = None, device: str | None = None,
          precision: str = "auto", threads: int = 2,
          full_field: bool = False, progress: bool = False,
          event_overlap: float = EVENT_OVERLAP) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data_root/split``; the same result dict on every rank.

    The whole field is scored unless ``crop`` names a centred crop; in tiles of the run's
    validation size where that is smaller, or in one piece with ``full_field``.
    ``progress``: a progress line on stderr (this rank's batches). Beside the pixel scores,
    events are matched per sample (:func:`climseg.events.event_scores` at IoU
    ``event_overlap``): the detection skill the ClimateNet paper reports.
    """
    device = select_device(device, dist.local_rank())
    ckpt, cfg = read_checkpoint(checkpoint, device)
    model = model_from_checkpoint(ckpt, cfg, str(checkpoint), device)
    step = ckpt.get("step")
    del ckpt  # the optimizer state is as large as the model twice over
    spec = input_spec(cfg, stats_file)
    num_classes = cfg.model.num_classes
    batch_size = batch_size or cfg.train.local_batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    if crop is not None and any(c <= 0 or c % OUTPUT_STRIDE for c in crop):
        raise ConfigError(f"--crop: sides must be positive multiples of {OUTPUT_STRIDE}, "
                          f"got {crop[0]} {crop[1]}")

    split_dir = Path(data_root) / split
    files = list_files(split_dir)
    if len(files) < dist.size():
        raise DataError(f"{split_dir}: {len(files)} files for {dist.size()} ranks; "
                        "every rank needs at least one")
    mine = rank_partition(files, dist.rank(), dist.size())
    shape = validate_file(mine[0])
    for path in mine[1:]:  # fail now on a bad file, not after an hour of scoring
        validate_file(path, expect_shape=shape)
    try:
        loader = BatchLoader(mine, batch_size, shift=spec.shift, scale=spec.scale,
                             channels=spec.channels, crop=crop, random_crop=False,
                             shuffle=False, drop_last=False, num_threads=threads, prefetch=2,
                             device=device)
    except ValueError as err:
        raise ConfigError(f"--crop/--workers: {err}") from None
    region = scored_region(loader.full_shape[:2], crop, None if full_field else run_field(cfg))
    model = _scoring_model(model, region, split_dir)
    prec = Precision.build(device, precision, None)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(class_frequencies=cfg.loss.class_frequencies,
                         weight_pow=cfg.loss.weight_pow).to(device)

    bar = Progress(len(loader), "scoring", unit="batches", enabled=progress)
    names = class_names(cfg)
    tally = EventTally(names, event_overlap, periodic=region["fraction"] == 1.0)
    result = evaluate(model, _counted(loader.epoch(0), bar), loss_fn, prec, num_classes,
                      on_batch=tally.add)
    result["per_class_iou"] = _finite_or_none(result["per_class_iou"])
    if not math.isfinite(result["mean_iou"]):
        result["mean_iou"] = None
    return {
        "checkpoint": str(checkpoint),
        "step": step,
        "data": str(split_dir),
        "classes": list(names),
        **result,
        "event_overlap": event_overlap,
        "events": tally.reduced(),
        "pixel_frequency": pixel_frequencies(result["confusion"]),
        "ranks": dist.size(),
        "batch_size": batch_size,
        **region,
        "device": device.type,
        "precision": prec.name,
    }


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
        "Example: climseg evaluate --checkpoint runs/demo/best.pt --data data/demo/cam "
        "--output runs/demo/test.json"))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by climseg train")
    p.add_option("--data", required=True, help="data root holding <split>/data-*.h5")
    p.add_argument("--split", default="test", help="split folder under --data (default: test)")
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
                       progress=dist.is_primary() and not args.quiet,
                       event_overlap=args.event_overlap)
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
