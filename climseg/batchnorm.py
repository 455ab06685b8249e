"""Batch norm over groups of ranks (``train.batchnorm_group_size``), as DeepCAM runs it at scale.

With a local batch of 1 or 2 fields, per-rank batch statistics are too noisy; the MLPerf
reference and NVIDIA's submissions normalise over a few ranks instead. Horovod's own
``SyncBatchNorm`` knows only all ranks and runs only on GPUs; this module reduces the
statistics with Horovod's differentiable ``allreduce`` on a *process set*, so any group size
works on any device Horovod runs on (Gloo on CPU included).

Group size: 1 = plain batch norm (nothing changes), N = groups of N consecutive ranks
(ranks 0..N-1, N..2N-1, ...), 0 or None = all ranks.

The groups are made by :func:`climseg.dist.rank_group`: Horovod process sets (``dist.init``
starts Horovod with dynamic process sets, so they can be added once the config is known) or
torch.distributed ``new_group``s; :func:`convert_batchnorm` must be called on every rank, in
the same order, since making a group is itself a collective.
"""

from __future__ import annotations

import torch
from torch import nn

from climseg import dist

def resolve_group_size(group_size: int | None, world_size: int) -> int:
    """The number of ranks per group: ``world_size`` for 0/None; must divide ``world_size``."""
    if group_size is None or group_size == 0:
        return world_size
    if group_size < 0:
        raise ValueError(f"train.batchnorm_group_size: must be 0, null or positive, got {group_size}")
    if world_size % group_size:
        raise ValueError(f"train.batchnorm_group_size: {group_size} does not divide the "
                         f"{world_size} ranks into whole groups")
    return group_size


def group_ranks(rank: int, group_size: int) -> list[int]:
    """The consecutive ranks sharing statistics with ``rank``."""
    first = rank // group_size * group_size
    return list(range(first, first + group_size))


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-time statistics come from every rank of ``process_set`` (a
    :func:`climseg.dist.rank_group`).

    Each rank sums x and x² per channel and counts its pixels; one allreduce (Sum) over the
    group gives the group's mean and biased variance, with which every rank normalises its own
    batch. Horovod's allreduce is an autograd function whose backward is the allreduce of the
    gradients, so the gradient flows through the group statistics exactly as it would through
    one BatchNorm2d over the group's concatenated batch. Running statistics are updated from
    the group statistics (unbiased variance), so they agree within a group. In eval mode, or
    with ``process_set=None``, it is a plain BatchNorm2d. Its state dict is BatchNorm2d's.
    """

    def __init__(self, *args, process_set=None, name: str = "group_bn", **kwargs):
        super().__init__(*args, **kwargs)
        self.process_set = process_set
        # Horovod pairs up the ranks' collectives by name: the same layer must use the same
        # name on every rank (its path in the model), and different layers different names.
        self.collective_name = name

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_set,
                       name: str = "group_bn") -> "GroupBatchNorm2d":
        group = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    process_set=process_set, name=name)
        group.load_state_dict(bn.state_dict())
        return group.to(device=_device_of(bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        if self.process_set is None or not use_batch_stats:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GroupBatchNorm2d: expected a 4-D input, got shape {tuple(x.shape)}")
        c = self.num_features
        xf = x.float()
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        local = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        # float64 for the combination: E[x²] - E[x]² loses digits in float32 over large groups.
        total = dist.group_allreduce_sum(local.double(), self.process_set, self.collective_name)
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        invstd = torch.rsqrt(var + self.eps).float()
        y = (xf - mean.float().view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor,
                              n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None is PyTorch's cumulative moving average.
        m = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        # Tensor arithmetic, not float(n): no host synchronisation per layer on a GPU.
        unbiased = torch.where(n > 1, var * n / (n - 1).clamp_min(1), var)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def convert_batchnorm(module: nn.Module, group_size: int | None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` in ``module`` replaced by a :class:`GroupBatchNorm2d` over
    groups of ``group_size`` consecutive ranks (keeping parameters and running statistics).

    Returns ``module`` unchanged for a group of one rank (or a single-process run). Call it on
    every rank, before the optimizer takes the parameters. Raises ValueError (naming
    ``train.batchnorm_group_size``) for a size that does not divide the ranks.
    """
    size = dist.size()
    group = resolve_group_size(group_size, size)
    if group == 1 or size == 1:
        return module
    return _replace(module, dist.rank_group(group), "group_bn")


def _replace(module: nn.Module, process_set, path: str) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        return GroupBatchNorm2d.from_batchnorm(module, process_set, name=path)
    for name, child in module.named_children():
        setattr(module, name, _replace(child, process_set, f"{path}.{name}"))
    return module


def _device_of(module: nn.Module) -> torch.device:
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else torch.device("cpu")
