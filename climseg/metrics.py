"""Segmentation metrics from integer counts.

Counts are computed on the device without host synchronization, so that they can be summed
over steps and ranks (one allreduce) before any ratio is taken.
"""

from __future__ import annotations

import torch


def _pair_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 groups: int = 1, use_bincount: bool | None = None) -> torch.Tensor:
    """int64 (groups, C, C) counts of (target, prediction) pairs; the leading dimension of
    `pred`/`target` is split into `groups` equal parts. `use_bincount` defaults to CPU only."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape "
                         f"{tuple(target.shape)}")
    bins = num_classes * num_classes
    index = (target.reshape(groups, -1).long() * num_classes + pred.reshape(groups, -1).long())
    if use_bincount is None:
        use_bincount = index.device.type == "cpu"
    if use_bincount:
        # bincount synchronizes anyway, so a range check costs little here.
        for name, t in (("labels", target), ("predictions", pred)):
            if t.numel() and (t.min() < 0 or t.max() >= num_classes):
                raise ValueError(f"{name} outside [0, {num_classes}): "
                                 f"min {t.min().item()}, max {t.max().item()}")
        offsets = torch.arange(groups, device=index.device).unsqueeze(1) * bins
        counts = torch.bincount((index + offsets).flatten(), minlength=groups * bins)
    else:
        # torch.bincount reads the maximum back to the host on accelerators; comparing with
        # every bin is a plain reduction and keeps the step free of synchronization.
        # Values must lie in [0, num_classes) (the data loader validates labels).
        bin_ids = torch.arange(bins, device=index.device)
        counts = (index.unsqueeze(-1) == bin_ids).sum(dim=1)
    return counts.view(groups, num_classes, num_classes)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (C, C) matrix: row = true class, column = predicted class, over all pixels.

    `pred` and `target` are integer tensors of the same shape with values in [0, num_classes).
    """
    return _pair_counts(pred, target, num_classes)[0]


def iou_from_confusion(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU (float64, shape (C,)) and their mean (float64 scalar tensor).

    IoU_c = TP / (TP + FP + FN). A class absent from both truth and prediction has no IoU:
    its entry is NaN and the mean is taken over the remaining classes (NaN if none remain).
    """
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    per_class = tp / union  # 0/0 -> NaN for an absent class
    return per_class, per_class.nanmean()


def mlperf_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MLPerf HPC DeepCAM accuracy of one batch (float64 scalar tensor).

    As the reference's `utils/metric.py:compute_score`: for each sample, IoU per class with a
    class absent from both its prediction and its truth counting as 1, mean over classes; then
    mean over the samples of the batch. `eval_accuracy` is the mean of this over all
    validation batches. `pred` and `target` have shape (N, ...).
    """
    counts = _pair_counts(pred, target, num_classes, groups=target.shape[0]).double()
    tp = counts.diagonal(dim1=1, dim2=2)
    union = counts.sum(1) + counts.sum(2) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(tp))
    return iou.mean(dim=1).mean()
