"""Run under ``horovodrun -np 4 --gloo`` or ``torchrun --nproc_per_node 4`` (the launcher picks
the engine): group batch norm against one BatchNorm2d per group.

``python group_batchnorm.py OUT_DIR`` writes OUT_DIR/rank<r>.json with, for each group size
tried (2, 1 and 0 = all ranks), the largest differences between this rank's converted model
and a single-process copy fed the group's concatenated batch: forward output, input gradient,
parameter gradients summed over the group, running statistics after two steps, and the eval
output; plus the running mean itself for comparisons across ranks. Needs
HOROVOD_DYNAMIC_PROCESS_SETS=1 (or an init with process_sets="dynamic").
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from climseg import dist
from climseg.batchnorm import GroupBatchNorm2d, convert_batchnorm, group_ranks, resolve_group_size

B, C, H, W = 2, 3, 5, 4


def build_model() -> nn.Module:
    torch.manual_seed(1)   # the same weights on every rank and in the reference
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, momentum=None))
    with torch.no_grad():  # non-trivial affine parameters so their gradients mean something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def batches(size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's input and output-gradient weights for ``step`` (rank r's data is shifted
    and scaled by r, so that groups see different statistics)."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, B, C, H, W, generator=gen)
    x = x * (1 + torch.arange(size).view(size, 1, 1, 1, 1)) + torch.arange(size).view(size, 1, 1, 1, 1)
    g = torch.randn(size, B, 2, H, W, generator=gen)
    return x, g


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def compare(group_arg: int) -> dict:
    rank, size = dist.rank(), dist.size()
    group = resolve_group_size(group_arg, size)
    members = group_ranks(rank, group)
    me = members.index(rank)
    reference = build_model()
    model = convert_batchnorm(build_model(), group_arg)
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.BatchNorm2d)})
    result = {"group_size": group, "members": members, "bn_types": kinds, "steps": []}

    for step in range(2):
        x_all, g_all = batches(size, step)
        model.zero_grad()
        reference.zero_grad()
        x = x_all[rank].clone().requires_grad_(True)
        out = model(x)
        (out * g_all[rank]).sum().backward()

        xs = torch.cat([x_all[r] for r in members]).requires_grad_(True)
        out_ref = reference(xs)
        (out_ref * torch.cat([g_all[r] for r in members])).sum().backward()
        mine = slice(me * B, (me + 1) * B)

        # The group's parameter gradient is the sum of its members' local gradients.
        local = [p.grad.detach().clone() for p in model.parameters()]
        gathered = dist.allgather_object(local, name=f"grads.{group_arg}.{step}")
        summed = [sum(gathered[r][i] for r in members) for i in range(len(local))]
        result["steps"].append({
            "output": max_diff(out.detach(), out_ref.detach()[mine]),
            "input_grad": max_diff(x.grad, xs.grad[mine]),
            "param_grad": max(max_diff(s, p.grad) for s, p in zip(summed, reference.parameters())),
            "output_scale": out_ref.abs().max().item(),
            "param_grad_scale": max(p.grad.abs().max().item() for p in reference.parameters()),
        })

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ref_bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    result["running"] = max(max(max_diff(a.running_mean, b.running_mean),
                                max_diff(a.running_var, b.running_var))
                            for a, b in zip(bns, ref_bns))
    result["batches_tracked"] = [int(m.num_batches_tracked) for m in bns]
    result["running_mean"] = bns[0].running_mean.tolist()
    model.eval()
    reference.eval()
    with torch.no_grad():
        x_all, _ = batches(size, 2)
        result["eval_output"] = max_diff(model(x_all[rank]), reference(x_all[rank]))
    result["is_group_bn"] = any(isinstance(m, GroupBatchNorm2d) for m in model.modules())
    return result


def main() -> int:
    out = Path(sys.argv[1])
    dist.init()
    if dist.size() != 4:
        print(f"needs 4 ranks, got {dist.size()}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    results = {str(g): compare(g) for g in (2, 1, 0)}
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
