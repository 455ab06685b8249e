"""``climseg bench allreduce``: the gradient allreduce alone, on the ranks it is launched on.

The tensors are the model's real gradient set (one per parameter, 56.45 M values for
DeepLabv3+ with 16 input channels), filled with noise; each round starts one asynchronous sum
per tensor, in backward order, and waits for all of them, as the trainer's step does. Horovod
fuses them in its fusion buffer (``--fusion-mb``, sets HOROVOD_FUSION_THRESHOLD before the
engine starts; 0 turns fusion off); the torch engine sums each tensor, or with
``--fusion-mb`` flattened buckets of that size (what DDP does with its 25 MB buckets).
``--fp16`` sums half-precision copies (``train.gradient_compression: fp16``).

Figures, the slowest rank's (the reduction is only as fast as it): seconds per round, the
algorithm bandwidth (gradient bytes / time) and the bus bandwidth, algbw x 2(n-1)/n, the
per-link figure nccl-tests prints, comparable across rank counts (a ring moves that much over
each link).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from climseg import dist
from climseg.bench.common import log, pick_device, synchronize
from climseg.config import ConfigError
from climseg.model import build_model

FUSION_ENV = "HOROVOD_FUSION_THRESHOLD"


def gradient_set(in_channels: int, device: torch.device) -> list[torch.Tensor]:
    """Noise shaped like the model's gradients, in the order backward produces them."""
    torch.manual_seed(dist.rank())
    model = build_model(in_channels=in_channels, num_classes=3)
    return [torch.randn(p.shape, device=device) for p in reversed(list(model.parameters()))]


def buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[torch.Tensor]:
    """``tensors`` flattened into consecutive buckets of at least ``bucket_bytes`` (the last
    one smaller); 0: the tensors as they are."""
    if bucket_bytes <= 0:
        return tensors
    out, group, size = [], [], 0
    for t in tensors:
        group.append(t.reshape(-1))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            out.append(torch.cat(group))
            group, size = [], 0
    if group:
        out.append(torch.cat(group))
    return out


def one_round(tensors: list[torch.Tensor], tag: str) -> None:
    handles = [dist.start_sum(t, f"{tag}.{i}") for i, t in enumerate(tensors)]
    for handle in handles:
        dist.wait_sum(handle)


def allreduce_mode(args) -> tuple[list, dict[str, Any]]:
    if args.engine == "horovod" and args.fusion_mb is not None:
        os.environ[FUSION_ENV] = str(int(args.fusion_mb * 2**20))  # read when Horovod starts
    try:
        dist.init(args.engine)
    except RuntimeError as err:  # not installed, a launch the engine does not read: one line
        raise ConfigError(str(err)) from None
    device = pick_device(args.device if args.device != "auto" else
                         (f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu"))
    grads = gradient_set(args.in_channels, device)
    tensors = [g.half() for g in grads] if args.fp16 else grads
    if args.engine == "torch" and args.fusion_mb:
        tensors = buckets(tensors, int(args.fusion_mb * 2**20))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    n = dist.size()
    log.info("allreduce: %d tensors, %.1f MB (%s), %d rank(s), engine %s, fusion %s, %s",
             len(tensors), nbytes / 1e6, "fp16" if args.fp16 else "fp32", n, args.engine,
             "default" if args.fusion_mb is None else f"{args.fusion_mb:g} MiB", device)
    for i in range(args.warmup):
        one_round(tensors, f"warm{i}")
    synchronize(device)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        one_round(tensors, f"round{i}")
        synchronize(device)
        times.append(time.perf_counter() - start)
    # The slowest rank's median: the collective ends when its last participant does.
    mine = sorted(times)[len(times) // 2]
    seconds = max(dist.allgather_object(mine, name="bench_times"))
    algbw = nbytes / seconds
    summary = {"engine": args.engine, "ranks": n, "tensors": len(tensors), "bytes": nbytes,
               "fp16": args.fp16, "fusion_mb": args.fusion_mb, "device": str(device),
               "seconds": seconds, "algbw_gb_s": algbw / 1e9,
               "busbw_gb_s": algbw * 2 * (n - 1) / n / 1e9 if n > 1 else None,
               "runs_s": times}
    return [], summary


def format_summary(s: dict[str, Any]) -> str:
    bus = "n/a (one rank)" if s["busbw_gb_s"] is None else f"{s['busbw_gb_s']:.3f} GB/s"
    return (f"allreduce of {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB "
            f"({'fp16' if s['fp16'] else 'fp32'}) on {s['ranks']} rank(s), {s['engine']}, "
            f"{s['device']}: {1e3 * s['seconds']:.1f} ms per round (slowest rank's median), "
            f"algbw {s['algbw_gb_s']:.3f} GB/s, busbw {bus}")
