"""The training step and the evaluation loop, shared by ``train``, ``evaluate`` and ``bench``;
the torch settings of a run (:func:`configure_torch`) and the cost of a sample
(:func:`tflop_per_sample`).

Nothing here imports Horovod: the synchronise/skip-synchronise recipe of a
``DistributedOptimizer`` and every collective go through :mod:`climseg.dist`, and do nothing
to a plain optimizer in a single process.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from climseg import dist
from climseg.config import PRECISIONS, Config
from climseg.data.format import HEIGHT, WIDTH
from climseg.metrics import confusion_matrix, iou_from_confusion, mlperf_iou

# Forward + backward cost of one training sample of a full 768x1152 field with DeepLabv3+, as
# the project counted it when the trainer first reported TFLOP/s; train and bench both use it.
FULL_SAMPLE_TFLOP = 1.97


def tflop_per_sample(height: int, width: int, model_width: float = 1.0) -> float:
    """Forward + backward TFLOP of one training sample; a crop costs its share of pixels, a
    narrower model (``model.width``) the square of its width (the convolutions' cost: at 0.25
    a FLOP count of both widths gives 0.0634, the square 0.0625)."""
    return FULL_SAMPLE_TFLOP * height * width / (HEIGHT * WIDTH) * model_width ** 2


_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(_AMP_DTYPES) == set(PRECISIONS) - {"auto"}


@dataclass
class Precision:
    """How the step runs: autocast dtype (None for fp32), GradScaler (fp16 only), and the
    memory layout of the model's input.

    ``channels_last`` lays out the *input* only. The weights stay contiguous: Horovod refuses
    non-contiguous tensors in its broadcasts and allreduces, and a channels_last input keeps
    the convolutions' activations channels_last anyway (cuDNN picks the layout from the input).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    @classmethod
    def build(cls, device: torch.device, precision: str, channels_last: bool | None) -> "Precision":
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        amp_dtype = _AMP_DTYPES[precision]
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        if channels_last is None:
            channels_last = device.type == "cuda"
        return cls(device, amp_dtype, scaler, channels_last)

    @property
    def name(self) -> str:
        return next(k for k, v in _AMP_DTYPES.items() if v == self.amp_dtype)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The model input in the chosen layout (a no-op when it is already in it)."""
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


@dataclass
class StepResult:
    """What one optimizer step leaves behind, on the device, not synchronised to the host
    (read it only at log steps)."""

    loss_sum: torch.Tensor            # summed over the step's micro-batches
    confusion: torch.Tensor           # (num_classes, num_classes) int64
    grad_norm: torch.Tensor | None    # before clipping, when this step clipped; else None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
               micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], prec: Precision,
               clip_norm: float = 0.0, num_classes: int = 3) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation).

    ``clip_norm`` > 0 clips the global gradient norm here (LAMB clips inside its own step).
    """
    micro_batches = list(micro_batches)
    optimizer.zero_grad()  # set_to_none by default; Horovod 0.28 takes no argument
    loss_sum = torch.zeros((), device=prec.device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=prec.device)
    for i, (x, y) in enumerate(micro_batches):
        # Only the last micro-batch's backward communicates (torch's DDP; Horovod counts).
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else dist.no_sync(model):
            with prec.autocast():
                logits = model(prec.prepare(x))
                loss = loss_fn(logits, y)
            scaled = loss / len(micro_batches)
            (prec.scaler.scale(scaled) if prec.scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        with torch.no_grad():
            cm += confusion_matrix(logits.argmax(1), y, num_classes)

    if prec.scaler is None and clip_norm <= 0:
        optimizer.step()
        return StepResult(loss_sum, cm, None)
    # Gradients must be reduced before they are unscaled or clipped: the Horovod recipe is
    # synchronize(), unscale/clip, then step without a second allreduce.
    dist.synchronize(optimizer)
    if prec.scaler is not None:
        prec.scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip_norm) if clip_norm > 0 else None
    with dist.skip_synchronize(optimizer):
        if prec.scaler is not None:
            prec.scaler.step(optimizer)
            prec.scaler.update()
        else:
            optimizer.step()
    return StepResult(loss_sum, cm, norm)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of the current gradients (device tensor)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def average_batchnorm_stats(model: nn.Module) -> None:
    """Average batch-norm running statistics over ranks (one allreduce), so that every rank
    evaluates, and every checkpoint holds, the same model."""
    buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var) if b is not None]
    dist.allreduce_mean_(buffers, name="bn_stats")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             loss_fn: nn.Module, prec: Precision, num_classes: int = 3,
             keep_first: bool = False,
             on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Score ``batches`` (this rank's partition) and reduce over ranks with one allreduce.

    Returns per-class and mean IoU from the summed confusion matrix, the MLPerf
    ``eval_accuracy`` (mean over all ranks' batches of the per-batch IoU), the mean loss,
    the sample count and samples/s. With ``keep_first`` the dict also holds ``first``:
    (x, y, prediction) of this rank's first sample, for a picture. ``on_batch(prediction,
    labels)`` sees every batch's class ids, for scores the confusion matrix cannot give.
    """
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=prec.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    iou_sum = torch.zeros((), dtype=torch.float64, device=prec.device)
    n_batches = n_samples = 0
    first = None
    for x, y in batches:
        with prec.autocast():
            logits = model(prec.prepare(x))
            loss = loss_fn(logits, y)
        pred = logits.argmax(1)
        cm += confusion_matrix(pred, y, num_classes)
        loss_sum += loss.double() * x.shape[0]
        iou_sum += mlperf_iou(pred, y, num_classes).double()
        n_batches += 1
        n_samples += x.shape[0]
        if on_batch is not None:
            on_batch(pred, y)
        if keep_first and first is None:
            first = (x[0].cpu(), y[0].cpu(), pred[0].cpu())
    model.train(was_training)

    packed = torch.cat([cm.flatten().double(), torch.stack([loss_sum, iou_sum]),
                        torch.tensor([n_batches, n_samples], dtype=torch.float64,
                                     device=prec.device)]).cpu()
    packed = dist.allreduce_sum(packed, name="eval_counts")
    k = num_classes * num_classes
    total_cm = packed[:k].round().to(torch.int64).view(num_classes, num_classes)
    loss_total, iou_total, batches_total, samples_total = packed[k:].tolist()
    per_class, mean_iou = iou_from_confusion(total_cm)
    elapsed = time.perf_counter() - start
    result = {
        "loss": loss_total / max(samples_total, 1),
        "mean_iou": float(mean_iou),
        "per_class_iou": [float(v) for v in per_class],
        "eval_accuracy": iou_total / max(batches_total, 1),
        "confusion": total_cm.tolist(),
        "samples": int(samples_total),
        "batches": int(batches_total),
        "seconds": elapsed,
        "samples_per_second": samples_total / elapsed if elapsed > 0 else 0.0,
    }
    if keep_first:
        result["first"] = first
    return result


def configure_torch(cfg: Config, device: torch.device) -> None:
    """Threads, kernel choice and seeds: process-wide settings, made once per run."""
    if device.type == "cpu":  # ranks sharing a node share its cores
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, cores // dist.local_size()))
    else:
        # Input shapes are fixed for a run, so cuDNN's autotuning pays for itself after the
        # first steps; it picks kernels by timing, so it is off for deterministic runs.
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
