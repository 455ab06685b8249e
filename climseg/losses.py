"""Loss functions; `build_loss(**config["loss"])` is the entry point."""

from __future__ import annotations

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

    Logits (N, C, H, W) of any floating dtype are scored in float32; labels are integers
    (N, H, W) in [0, C) (the data loader checks them; a label outside contributes nothing).

    Computed with elementwise operations and plain reductions only, forward and backward:
    `F.cross_entropy` with weights runs NLLLoss2d, which has no deterministic CUDA kernel and
    raises under `torch.use_deterministic_algorithms(True)` (train.deterministic), and a
    gather over the class dimension has a scatter-add backward that is not deterministic on
    CUDA either. Selecting the true class's log-probability with a comparison mask costs a few
    more elementwise passes over the logits, small next to the network.
    """

    weight: torch.Tensor

    def __init__(self, weight: Sequence[float]):
        super().__init__()
        self.register_buffer("weight", torch.tensor(list(weight), dtype=torch.float32),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        if num_classes != self.weight.numel():
            raise ValueError(f"loss.class_frequencies: {self.weight.numel()} classes configured "
                             f"but the logits have {num_classes} channels")
        log_probs = F.log_softmax(logits.float(), dim=1)
        weight = self.weight.to(log_probs.device).view(1, num_classes, 1, 1)
        classes = torch.arange(num_classes, device=log_probs.device).view(1, num_classes, 1, 1)
        # One term per pixel survives the mask, so the sum over classes adds exact zeros: each
        # pixel's value is w[t] * log p_t exactly as NLLLoss computes it. `where` rather than a
        # multiplication by the mask, so that a -inf log-probability of another class stays out.
        picked = torch.where(target.unsqueeze(1) == classes, log_probs * weight, 0.0).sum(dim=1)
        return -picked.sum() / target.numel()

    def extra_repr(self) -> str:
        return "weight=" + ", ".join(f"{w:.6g}" for w in self.weight.tolist())


def class_weights(class_frequencies: Sequence[float], weight_pow: float) -> list[float]:
    """`frequency ** weight_pow` per class (values validated with the config, LossConfig)."""
    return [float(f) ** float(weight_pow) for f in class_frequencies]


def build_loss(class_frequencies: Sequence[float] = DEEPCAM_CLASS_FREQUENCIES,
               weight_pow: float = DEEPCAM_WEIGHT_POW) -> nn.Module:
    """Weighted cross-entropy with weights `class_frequencies ** weight_pow`."""
    return WeightedCrossEntropy(class_weights(class_frequencies, weight_pow))
