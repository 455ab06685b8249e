"""``python -m climseg.train --config yaml/X.yaml [key=value ...]``

The same code path runs as a single process, under ``horovodrun`` and under ``srun``. The
function :func:`train` reads like the table of contents of a run: build everything, resume,
wrap for Horovod, then alternate training steps with validation until the step budget, the
epoch budget or the target IoU is reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from climseg import dist
from climseg.checkpoint import (CheckpointError, CheckpointSaver, latest_checkpoint,
                                load_checkpoint, rng_state, set_rng_state)
from climseg.config import Config, ConfigError, load_config, save_config
from climseg.data.format import CHANNELS, DataError, validate_file
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files, rank_partition
from climseg.data.stats import normalization, read_stats
from climseg.engine import Precision, average_batchnorm_stats, evaluate, grad_norm, train_step
from climseg.inference import select_device
from climseg.losses import build_loss
from climseg.metrics import iou_from_confusion
from climseg.model import build_model
from climseg.optim import build_optimizer, build_scheduler
from climseg.reporting import MetricsFile, MLPerfLog, TensorBoard

log = logging.getLogger("climseg.train")

# One training sample at 768x1152 costs about 1.97 TFLOP forward+backward (issue 6's count).
FULL_SAMPLE_TFLOP = 1.97


@dataclass
class Data:
    train: BatchLoader
    validation: BatchLoader
    train_samples: int        # whole split, all ranks
    validation_samples: int   # what one validation scores, all ranks
    shift: np.ndarray
    scale: np.ndarray


@dataclass
class Progress:
    """Where the run is; saved in checkpoints so a resumed run continues exactly."""

    step: int = 0             # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0   # micro-batches of this epoch already consumed
    best_iou: float = float("-inf")
    validations: int = 0


def setup_logging() -> None:
    """Rank 0 logs at INFO; the other ranks log warnings and errors only, tagged with rank."""
    level = logging.INFO if dist.is_primary() else logging.WARNING
    tag = "" if dist.size() == 1 else f"[{dist.rank()}] "
    logging.basicConfig(level=level, format=f"%(asctime)s {tag}%(message)s",
                        datefmt="%H:%M:%S", force=True)


def build_data(cfg: Config, rank: int, size: int, device: torch.device) -> Data:
    """Each rank's loaders over its strided partition of the train and validation splits."""
    d, t = cfg.data, cfg.train
    shift, scale = normalization(read_stats(d.stats_path), d.normalization, d.channels)
    root = Path(d.root)
    train_files = list_files(root / d.train_split)
    val_files = list_files(root / d.validation_split)
    if len(train_files) < size * t.local_batch_size * t.gradient_accumulation:
        raise DataError(f"{root / d.train_split}: {len(train_files)} training files are fewer "
                        f"than one global batch ({cfg.global_batch(size)})")
    if d.max_validation_samples is not None:
        val_files = val_files[:d.max_validation_samples]
    if len(val_files) < size:
        raise DataError(f"{root / d.validation_split}: {len(val_files)} validation files "
                        f"for {size} ranks; every rank needs at least one")
    my_train = rank_partition(train_files, rank, size)
    my_val = rank_partition(val_files, rank, size)
    for path in my_train + my_val:   # fail now on a bad file, not at step 10,000
        validate_file(path)
    common = dict(shift=shift, scale=scale, channels=d.channels, num_threads=d.loader_threads,
                  prefetch=d.prefetch, device=device, seed=cfg.seed)
    train = BatchLoader(my_train, t.local_batch_size, crop=d.crop, random_crop=d.crop is not None,
                        shuffle=d.shuffle, drop_last=True,
                        samples_per_epoch=len(train_files) // size, **common)
    # A model trained on crops is scored at that size by default: its image-pooling branch
    # averages over the whole input, so a larger field shifts what it sees.
    val_crop = d.validation_crop if d.validation_crop is not None else d.crop
    validation = BatchLoader(my_val, t.local_batch_size, crop=val_crop,
                             random_crop=False, shuffle=False, drop_last=False, **common)
    return Data(train, validation, len(train_files), len(val_files), shift, scale)


def _section(cfg_section) -> dict[str, Any]:
    return dataclasses.asdict(cfg_section)


def build_training(cfg: Config, device: torch.device):
    """Model, loss, optimizer: each from its config section. Batch norm becomes Horovod's
    SyncBatchNorm here when asked, before the optimizer takes the parameters."""
    model = build_model(**_section(cfg.model))
    if cfg.train.sync_batchnorm and dist.size() > 1:
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    loss_fn = build_loss(**_section(cfg.loss)).to(device)
    optimizer = build_optimizer(model.parameters(), **_section(cfg.optimizer))
    return model, loss_fn, optimizer


def wrap_distributed(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer):
    """The one place the model and optimizer meet Horovod. Returns the optimizer to step."""
    hvd = dist.horovod()
    if hvd is None:
        return optimizer
    compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
    return hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=compression[cfg.train.gradient_compression],
        backward_passes_per_step=cfg.train.gradient_accumulation)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d with Horovod's SyncBatchNorm, keeping its parameters."""
    hvd = dist.horovod()
    if isinstance(module, nn.BatchNorm2d):
        sync = hvd.SyncBatchNorm(module.num_features, module.eps, module.momentum,
                                 module.affine, module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        return sync
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module


def checkpoint_state(cfg: Config, model, optimizer, scheduler, prec: Precision,
                     progress: Progress, rng: list[dict]) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": prec.scaler.state_dict() if prec.scaler is not None else None,
        "step": progress.step,
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "best_iou": progress.best_iou,
        "validations": progress.validations,
        "rng": rng,
        "config": cfg.to_dict(),
    }


def resolve_resume(cfg: Config) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(cfg.output_dir)
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume: checkpoint {path} not found")
    return path


def resume(cfg: Config, model, optimizer, scheduler, prec: Precision) -> Progress:
    """Rank 0 reads the checkpoint (if any); every rank then receives its contents by
    broadcast, so that only rank 0 needs to see ``output_dir``."""
    path = resolve_resume(cfg) if dist.is_primary() else None
    path = dist.broadcast_object(path, name="resume_path")
    hvd = dist.horovod()
    if path is None:
        if hvd is not None:
            # A fresh optimizer has no state to share; parameters do (init differs by rank
            # only if seeding does, but this makes it certain).
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return Progress()

    state = load_checkpoint(path, map_location=prec.device) if dist.is_primary() else None
    meta = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if prec.scaler is not None and state["scaler"] is not None:
            prec.scaler.load_state_dict(state["scaler"])
        meta = {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "best_iou",
                                       "validations", "rng")}
        meta["scheduler"] = scheduler.state_dict()
        meta["scaler"] = state["scaler"]
    meta = dist.broadcast_object(meta, name="resume_meta")
    if hvd is not None:
        # Order matters: broadcast_optimizer_state may take a zero-gradient step on ranks
        # whose optimizer is still empty, so parameters are broadcast after it.
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if not dist.is_primary():
            scheduler.load_state_dict(meta["scheduler"])
            if prec.scaler is not None and meta["scaler"] is not None:
                prec.scaler.load_state_dict(meta["scaler"])
    rngs = meta["rng"]
    set_rng_state(rngs[dist.rank()] if len(rngs) == dist.size() else rngs[0])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, meta["step"],
             meta["epoch"], meta["batch_in_epoch"])
    return Progress(meta["step"], meta["epoch"], meta["batch_in_epoch"], meta["best_iou"],
                    meta["validations"])


def validation_image(tb: TensorBoard, first, data: Data, cfg: Config, step: int) -> None:
    """The TMQ field (or the first channel used) with true and predicted masks."""
    from climseg.plot import figure_to_array, plot_sample

    x, y, pred = first
    channels = cfg.data.channels if cfg.data.channels is not None else list(range(len(CHANNELS)))
    column = channels.index(0) if 0 in channels else 0
    field = x[column].float().numpy() / data.scale[column] + data.shift[column]
    title = f"{CHANNELS[channels[column]]}, validation, step {step}"
    fig = plot_sample(field, prediction=pred.numpy(), truth=y.numpy(), title=title)
    tb.image("validation/map", figure_to_array(fig), step)


def train(cfg: Config, on_data: Callable[[Data], Data] | None = None) -> dict[str, Any]:
    """Run the training ``cfg`` describes; returns the final summary (same on every rank).

    ``on_data`` may wrap the built loaders (``climseg.bench`` times the waits for batches).
    """
    rank, size = dist.rank(), dist.size()
    device = select_device(None, dist.local_rank())  # this rank's GPU, else the CPU
    if device.type == "cpu":  # ranks sharing a node share its cores
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, cores // dist.local_size()))
    global_batch = cfg.global_batch(size)
    if cfg.train.sync_batchnorm and size > 1 and device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: Horovod's SyncBatchNorm runs on GPUs only; "
                          "set it to false for a CPU run")
    # The resolved config names the stats file absolutely: evaluate/predict read it from the
    # checkpoint, perhaps from another working directory.
    cfg.data.stats_file = str(cfg.data.stats_path.resolve())
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    output_dir = Path(cfg.output_dir)

    primary = dist.is_primary()
    mlperf = tb = metrics = saver = None
    if primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        mlperf = MLPerfLog(output_dir / "mlperf.log")
        mlperf.start("init_start")
    log.info("climseg training on %d rank(s), %s, global batch %d; config:\n%s", size, device,
             global_batch, yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())

    data = build_data(cfg, rank, size, device)
    if on_data is not None:
        data = on_data(data)
    model, loss_fn, optimizer = build_training(cfg, device)
    prec = Precision.build(device, cfg.train.precision, cfg.train.channels_last)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = wrap_distributed(cfg, model, optimizer)
    scheduler = build_scheduler(optimizer, **_section(cfg.scheduler))
    progress = resume(cfg, model, optimizer, scheduler, prec)
    step_model = torch.compile(model) if cfg.train.compile else model
    clip_norm = cfg.optimizer.max_grad_norm if cfg.optimizer.name != "lamb" else 0.0

    accum = cfg.train.gradient_accumulation
    steps_per_epoch = len(data.train) // accum
    max_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %d parameters; %d steps per epoch; training to step %d; precision %s",
             cfg.model.name, n_params, steps_per_epoch, max_steps, prec.name)

    if primary:
        tb = TensorBoard(output_dir / "tensorboard")
        metrics = MetricsFile(output_dir / "metrics.jsonl")
        saver = CheckpointSaver(output_dir, cfg.train.keep_checkpoints, progress.best_iou)
        mlperf.hyperparameters(cfg, world_size=size, global_batch=global_batch,
                               train_samples=data.train_samples,
                               eval_samples=data.validation_samples)
        mlperf.end("init_stop")
        mlperf.start("run_start")

    height, width = cfg.data.crop or data.train.full_shape[:2]
    crop_pixels = height * width
    tflop_per_sample = FULL_SAMPLE_TFLOP * crop_pixels / (768 * 1152)
    last_eval: dict[str, Any] = {}
    stop_reason = "max_steps"

    def validate() -> dict[str, Any]:
        nonlocal last_eval
        epoch_num = progress.epoch + 1
        if mlperf:
            mlperf.start("eval_start", epoch_num=epoch_num)
        average_batchnorm_stats(model)
        want_image = (cfg.train.image_frequency > 0
                      and progress.validations % cfg.train.image_frequency == 0)
        result = evaluate(step_model, data.validation.epoch(0), loss_fn, prec,
                          cfg.model.num_classes, keep_first=primary and want_image)
        progress.validations += 1
        result["step"] = progress.step
        first = result.pop("first", None)
        if primary:
            mlperf.event("eval_accuracy", result["eval_accuracy"], epoch_num=epoch_num)
            mlperf.end("eval_stop", epoch_num=epoch_num)
            per_class = dict(zip(("background", "cyclone", "river"), result["per_class_iou"]))
            tb.scalars("eval", {"loss": result["loss"], "mean_iou": result["mean_iou"],
                                "eval_accuracy": result["eval_accuracy"],
                                **{f"iou_{k}": v for k, v in per_class.items()}}, progress.step)
            if first is not None:
                validation_image(tb, first, data, cfg, progress.step)
            metrics.write("eval", progress.step, {k: result[k] for k in (
                "loss", "mean_iou", "eval_accuracy", "per_class_iou", "samples")})
            log.info("eval step %d: loss %.4f  mean IoU %.4f  eval_accuracy %.4f  "
                     "IoU bg/TC/AR %.3f/%.3f/%.3f", progress.step, result["loss"],
                     result["mean_iou"], result["eval_accuracy"], *result["per_class_iou"])
        last_eval = result
        return result

    def save(eval_iou: float | None = None) -> None:
        rng = dist.allgather_object(rng_state(), name="rng_state")
        if saver is not None:
            state = checkpoint_state(cfg, model, optimizer, scheduler, prec, progress, rng)
            path = saver.save(state, progress.step, eval_iou)
            progress.best_iou = saver.best_iou
            log.info("saved %s", path)

    # -- the loop ------------------------------------------------------------------------
    model.train()
    start_time = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    window_loss = torch.zeros((), device=device)
    window_cm = torch.zeros(cfg.model.num_classes, cfg.model.num_classes, dtype=torch.int64,
                            device=device)
    done = progress.step >= max_steps
    while not done and progress.epoch < cfg.train.max_epochs:
        if progress.batch_in_epoch >= accum * steps_per_epoch:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            continue
        if mlperf:
            mlperf.start("epoch_start", epoch_num=progress.epoch + 1)
        batches = data.train.epoch(progress.epoch, start_batch=progress.batch_in_epoch)
        while progress.batch_in_epoch + accum <= accum * steps_per_epoch:
            micro = [next(batches) for _ in range(accum)]
            loss_sum, cm = train_step(step_model, optimizer, loss_fn, micro, prec, clip_norm,
                                      cfg.model.num_classes)
            scheduler.step()
            progress.step += 1
            progress.batch_in_epoch += accum
            window_loss += loss_sum / accum
            window_cm += cm
            window_steps += 1

            if progress.step % cfg.train.log_frequency == 0 or progress.step == max_steps:
                # The only host synchronisation in the step loop: one allreduce at log steps.
                packed = torch.cat([window_loss.reshape(1).double().cpu(),
                                    window_cm.flatten().double().cpu()])
                packed = dist.allreduce_sum(packed, name="train_log")
                loss_avg = packed[0].item() / (size * window_steps)
                cm_total = packed[1:].round().to(torch.int64).view_as(window_cm)
                _, train_iou = iou_from_confusion(cm_total)
                gnorm = grad_norm(model).item()
                elapsed = time.perf_counter() - window_start
                sps = window_steps * global_batch / elapsed if elapsed > 0 else float("nan")
                lr = optimizer.param_groups[0]["lr"]
                remaining = (max_steps - progress.step) * elapsed / window_steps
                if primary:
                    values = {"loss": loss_avg, "iou": float(train_iou), "lr": lr,
                              "samples_per_second": sps, "grad_norm": gnorm,
                              "tflops": sps * tflop_per_sample}
                    tb.scalars("train", values, progress.step)
                    metrics.write("train", progress.step, values)
                    log.info("step %d/%d epoch %d  loss %.4f  IoU %.3f  lr %.3g  %.2f samples/s"
                             "  ETA %s", progress.step, max_steps, progress.epoch + 1, loss_avg,
                             float(train_iou), lr, sps, _duration(remaining))
                if not math.isfinite(loss_avg):
                    raise FloatingPointError(f"training loss is {loss_avg} at step {progress.step}")
                window_start, window_steps = time.perf_counter(), 0
                window_loss.zero_()
                window_cm.zero_()

            stop = progress.step >= max_steps
            vf = cfg.train.validation_frequency
            if vf and progress.step % vf == 0:
                result = validate()
                if cfg.train.target_iou and result["eval_accuracy"] >= cfg.train.target_iou:
                    stop, stop_reason = True, "target_reached"
            sf = cfg.train.save_frequency
            if sf and progress.step % sf == 0 and not stop:
                save(last_eval["mean_iou"] if last_eval.get("step") == progress.step else None)
            if stop:
                done = True
                break
        batches.close()  # stops the loader's read-ahead if the epoch ended early
        if mlperf:
            mlperf.end("epoch_stop", epoch_num=progress.epoch + 1)
        if not done:
            if last_eval.get("step") != progress.step:
                result = validate()
                if cfg.train.target_iou and result["eval_accuracy"] >= cfg.train.target_iou:
                    done, stop_reason = True, "target_reached"
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    if stop_reason != "target_reached" and progress.step < max_steps:
        stop_reason = "max_epochs"

    # Every run ends with an evaluation of the final model, unless one just happened.
    final = last_eval if last_eval.get("step") == progress.step else validate()
    save(final["mean_iou"])
    wall = time.perf_counter() - start_time
    summary = {
        "steps": progress.step, "epochs_started": progress.epoch + 1, "stop_reason": stop_reason,
        "eval_mean_iou": final["mean_iou"], "eval_accuracy": final["eval_accuracy"],
        "eval_per_class_iou": final["per_class_iou"], "wall_seconds": wall,
        "checkpoint": str(output_dir / f"ckpt-step{progress.step:08d}.pt"),
        "tensorboard": str(output_dir / "tensorboard"),
    }
    if primary:
        status = "success" if stop_reason == "target_reached" else "aborted"
        mlperf.end("run_stop", status=status, epoch_num=progress.epoch + 1)
        mlperf.close()
        tb.hparams(cfg.to_dict(), {"eval_mean_iou": final["mean_iou"],
                                   "eval_accuracy": final["eval_accuracy"]})
        tb.close()
        metrics.write("summary", progress.step, summary)
        metrics.close()
        log.info("done: %d steps in %s (%s); eval mean IoU %.4f, eval_accuracy %.4f\n"
                 "checkpoint: %s\nTensorBoard: tensorboard --logdir %s", progress.step,
                 _duration(wall), stop_reason, final["mean_iou"], final["eval_accuracy"],
                 summary["checkpoint"], summary["tensorboard"])
    return summary


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m climseg.train",
        description="Train DeepLabv3+ on CAM5 climate data (single process, horovodrun or srun).",
        epilog="Overrides are dotted keys, e.g. optimizer.lr=0.002 data.root=/dev/shm/cam "
               "train.max_steps=100. See README.md for every key.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. yaml/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dist.init()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        logging.getLogger("climseg.train").error("error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
