#!/usr/bin/env python
"""Time the per-step pieces outside the network: the optimizer step and the confusion matrix.

    python tools/bench_kernels.py optim [--device cpu] [--optimizers lamb adamw] [--steps 10]
    python tools/bench_kernels.py confusion [--device cpu] [--batch-size 8] [--size 768 1152]

``optim`` steps each optimizer over the parameters of the full DeepLabv3+ (56.5 M in 301
tensors) with fixed random gradients and prints the median milliseconds per step. ``confusion``
counts (label, prediction) pairs of one micro-batch with both code paths of
``climseg.metrics`` (bincount: the CPU's; reduction: the accelerators') and prints the time and,
on the CPU, the bytes the call allocated (profiler), on CUDA the peak allocated above the inputs.

To compare with an older version of climseg, export it and put it first on the path:
``git archive <commit> climseg | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python tools/...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Appended, so that a climseg on PYTHONPATH (an older version, see above) comes first.
sys.path.append(str(Path(__file__).resolve().parents[1]))

import climseg  # noqa: E402
from climseg.inference import select_device  # noqa: E402
from climseg.config import ConfigError  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, steps: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds per call. On a shared CPU machine the CPU time
    (with --threads 1) moves much less with other users' load than the wall time does."""
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def optim_mode(args, device: torch.device) -> None:
    from climseg.model import build_model
    from climseg.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model().to(device)
    params = list(model.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f} M parameters "
          f"on {device}; climseg from {Path(climseg.__file__).parent}")
    print(f"{'optimizer':12s} {'wall ms':>9s} {'CPU ms':>9s}")
    rows = {}
    for name in args.optimizers:
        opt = build_optimizer(params, name=name, lr=1e-4)
        for p, g in zip(params, grads):
            p.grad = g
        wall, cpu = _median_ms(opt.step, device, args.steps)
        rows[name] = {"wall_ms": wall, "cpu_ms": cpu}
        print(f"{name:12s} {wall:9.1f} {cpu:9.1f}")
    if args.json:
        write_json(args.json, {"mode": "optim", "device": str(device), "optimizers": rows})


def confusion_mode(args, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    from climseg.metrics import _pair_counts

    torch.manual_seed(0)
    shape = (args.batch_size, *args.size)
    target = torch.randint(0, 3, shape, device=device)
    pred = torch.randint(0, 3, shape, device=device)
    print(f"micro-batch {'x'.join(map(str, shape))} int64 labels on {device}; "
          f"climseg from {Path(climseg.__file__).parent}")
    print(f"{'path':12s} {'wall ms':>9s} {'CPU ms':>9s} {'allocated MiB':>14s} {'largest MiB':>12s}")
    for name, bincount in (("bincount", True), ("reduction", False)):
        if bincount and device.type != "cpu":
            continue  # bincount synchronizes on accelerators; climseg does not use it there
        fn = lambda: _pair_counts(pred, target, 3, use_bincount=bincount)  # noqa: E731
        wall, cpu = _median_ms(fn, device, args.steps)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            total, largest = None, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        else:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            sizes = [e.self_cpu_memory_usage for e in prof.events()
                     if e.name != "[memory]" and e.self_cpu_memory_usage > 0]
            total, largest = sum(sizes) / 2 ** 20, max(sizes, default=0) / 2 ** 20
        shown = "-" if total is None else f"{total:.1f}"
        print(f"{name:12s} {wall:9.1f} {cpu:9.1f} {shown:>14s} {largest:12.1f}")


def write_json(path: str, record: dict) -> None:
    from climseg.atomic import atomic_path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench_kernels.py", description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("optim", help="optimizer step over the full model's parameters")
    p.add_argument("--optimizers", nargs="+", default=["lamb", "adamw"],
                   choices=("lamb", "adam", "adamw"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--json", metavar="PATH", help="also write the times as JSON here")
    p = modes.add_parser("confusion", help="confusion-matrix counts of one micro-batch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[768, 1152], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    for p in modes.choices.values():
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        device = select_device(args.device)
    except ConfigError as err:
        print(f"bench_kernels: error: {err}", file=sys.stderr)
        return 2
    {"optim": optim_mode, "confusion": confusion_mode}[args.mode](args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
