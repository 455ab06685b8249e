"""Segmentation metrics from integer counts.

Counts are computed on the device without host synchronization, so that they can be summed
over steps and ranks (one allreduce) before any ratio is taken.
"""

from __future__ import annotations

import torch


def _pair_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 groups: int = 1, use_bincount: bool | None = None) -> torch.Tensor:
    """int64 (groups, C, C) counts of (target, prediction) pairs; the leading dimension of
    `pred`/`target` is split into `groups` equal parts. `use_bincount` defaults to CPU only.

    The pair index `target * C + pred` is built in the narrowest integer type that holds it
    (uint8 for up to 16 classes): at full size (8 x 768 x 1152 pixels) an int64 index alone is
    57 MB, and comparing it against every bin at once made a 64 MB boolean temporary, which
    the sum then copied to int64 (510 MB), per micro-batch.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape "
                         f"{tuple(target.shape)}")
    bins = num_classes * num_classes
    if use_bincount is None:
        use_bincount = pred.device.type == "cpu"
    if use_bincount:
        # bincount synchronizes anyway, so a range check costs little here.
        for name, t in (("labels", target), ("predictions", pred)):
            if t.numel():
                low, high = torch.aminmax(t)
                if low < 0 or high >= num_classes:
                    raise ValueError(f"{name} outside [0, {num_classes}): "
                                     f"min {low.item()}, max {high.item()}")
        # One flat bincount over all groups: group g's pairs are offset by g * bins.
        dtype = _index_dtype(groups * bins - 1)
        index = _pair_index(pred, target, num_classes, groups, dtype)
        if groups > 1:
            index += torch.arange(groups, dtype=dtype, device=index.device).unsqueeze(1) * bins
        counts = torch.bincount(index.flatten(), minlength=groups * bins)
    else:
        # torch.bincount reads the maximum back to the host on accelerators; comparisons and
        # sums are plain elementwise kernels and reductions, free of host synchronization.
        # Values must lie in [0, num_classes) (the data loader validates labels).
        dtype = _index_dtype(bins - 1)
        counts = _count_bins(_pair_index(pred, target, num_classes, groups, dtype), bins)
    return counts.view(groups, num_classes, num_classes)


def _index_dtype(largest: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


# Pixels per partial sum in _count_bins: a count of at most 255 fits the one-byte partial sums.
_BLOCK = 255


def _count_bins(index: torch.Tensor, bins: int) -> torch.Tensor:
    """int64 (groups, bins): how often each value in [0, bins) occurs in each row of `index`.

    One bin at a time, so the temporary is one byte per pixel (a comparison against all bins
    at once is bins bytes per pixel). Summing a boolean directly would first copy it to int64
    (8 bytes per pixel; PyTorch's sum converts its input to the accumulation type), so the
    comparison is summed as bytes over blocks of 255 pixels, whose counts fit a byte, and only
    the 255 times smaller partial sums are widened. The pixels after the last whole block
    (fewer than 255 per row) are counted directly.
    """
    groups, pixels = index.shape
    whole = pixels - pixels % _BLOCK
    head, tail = index[:, :whole], index[:, whole:]
    counts = []
    for b in range(bins):
        # The comparison's result is a fresh contiguous tensor, even of a sliced `head`.
        hits = (head == b).view(torch.uint8).view(groups, whole // _BLOCK, _BLOCK)
        count = hits.sum(dim=2, dtype=torch.uint8).sum(dim=1)
        if tail.shape[1]:
            count += (tail == b).sum(dim=1)
        counts.append(count)
    return torch.stack(counts, dim=1)


def _pair_index(pred: torch.Tensor, target: torch.Tensor, num_classes: int, groups: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(groups, pixels) `target * num_classes + pred` in `dtype` (values already in range)."""
    index = target.reshape(groups, -1).to(dtype, copy=True)   # a copy: changed in place
    index.mul_(num_classes).add_(pred.reshape(groups, -1).to(dtype))
    return index


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
