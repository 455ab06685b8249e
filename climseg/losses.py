"""Loss functions; `build_loss(**config["loss"])` is the entry point."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from climseg.data.format import DEEPCAM_CLASS_FREQUENCIES, DEEPCAM_WEIGHT_POW


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with per-class weights, averaged over all pixels.

    As in the reference (`CrossEntropyLoss(weight, reduction='none')` then `mean()`), the sum of
    the weighted per-pixel losses is divided by the number of pixels, not by the sum of the
    weights that PyTorch's `reduction='mean'` would use. The reference's false-positive term
    is left out: its mask `eq(p, 1) & ne(p, 1)` is always false.

    Logits (N, C, H, W) of any floating dtype are scored in float32; labels are int64 (N, H, W).
    """

    weight: torch.Tensor

    def __init__(self, weight: Sequence[float]):
        super().__init__()
        self.register_buffer("weight", torch.tensor(list(weight), dtype=torch.float32),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.weight.numel():
            raise ValueError(f"loss.class_frequencies: {self.weight.numel()} classes configured "
                             f"but the logits have {logits.shape[1]} channels")
        weight = self.weight.to(logits.device)
        losses = F.cross_entropy(logits.float(), target, weight=weight, reduction="sum")
        return losses / target.numel()

    def extra_repr(self) -> str:
        return "weight=" + ", ".join(f"{w:.6g}" for w in self.weight.tolist())


def class_weights(class_frequencies: Sequence[float], weight_pow: float) -> list[float]:
    """`frequency ** weight_pow` per class, after checking both arguments."""
    if isinstance(class_frequencies, (str, bytes)) or not isinstance(class_frequencies, Sequence):
        raise ValueError(f"loss.class_frequencies: must be a list of numbers, "
                         f"got {class_frequencies!r}")
    if len(class_frequencies) < 2:
        raise ValueError(f"loss.class_frequencies: need one frequency per class (at least 2), "
                         f"got {list(class_frequencies)}")
    for f in class_frequencies:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"loss.class_frequencies: every frequency must be a number in "
                             f"(0, 1], got {f!r}")
    if isinstance(weight_pow, bool) or not isinstance(weight_pow, (int, float)) \
            or not math.isfinite(weight_pow):
        raise ValueError(f"loss.weight_pow: must be a finite number, got {weight_pow!r}")
    return [float(f) ** float(weight_pow) for f in class_frequencies]


def build_loss(class_frequencies: Sequence[float] = DEEPCAM_CLASS_FREQUENCIES,
               weight_pow: float = DEEPCAM_WEIGHT_POW) -> nn.Module:
    """Weighted cross-entropy with weights `class_frequencies ** weight_pow`."""
    return WeightedCrossEntropy(class_weights(class_frequencies, weight_pow))
