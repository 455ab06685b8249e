"""What every ``climseg bench`` mode shares: the result row and its table, the device and
memory helpers, the environment record, and the command line of all three modes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from climseg.cli import ArgumentParser, positive_int
from climseg.config import PRECISIONS
from climseg.data.format import HEIGHT, WIDTH

log = logging.getLogger("climseg.bench")

MB = 1e6
GIB = 2.0 ** 30


@dataclass
class Result:
    """One row of the table."""

    name: str
    samples_per_s: float
    ms_per_step: float
    batch_size: int
    steps: int
    mb_per_s: float | None = None          # climate/data bytes read per second
    data_wait_share: float | None = None   # of step time, blocked waiting for the next batch
    peak_memory_gib: float | None = None   # CUDA: max allocated; CPU: the process's peak RSS
    tflops: float | None = None
    runs: list[float] = field(default_factory=list)  # samples/s of each repeat (median shown)
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    """--device: auto (this rank's GPU if there is one, else the CPU), cpu, cuda, cuda:N; the
    trainer's, evaluate's and predict's rule (climseg.inference.select_device)."""
    from climseg.inference import select_device
    return select_device(None if name == "auto" else name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: max allocated. CPU: this process's peak resident set (not worker processes')."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def format_table(results: list[Result]) -> str:
    def num(value, fmt):
        width = int(fmt.split(".")[0])
        return f"{'-':>{width}s}" if value is None else format(value, fmt)

    name_width = max([44] + [len(r.name) for r in results])   # one table for all modes
    header = (f"{'what':{name_width}s} {'samples/s':>10s} {'ms/step':>9s} {'MB/s':>9s} "
              f"{'data wait':>9s} {'peak GiB':>9s} {'TFLOP/s':>8s}")
    lines = [header, "-" * len(header)]
    for r in results:
        wait = None if r.data_wait_share is None else 100 * r.data_wait_share
        percent = " " if wait is None else "%"
        lines.append(f"{r.name:{name_width}s} {r.samples_per_s:10.2f} {r.ms_per_step:9.1f} "
                     f"{num(r.mb_per_s, '9.0f')} {num(wait, '8.1f')}{percent} "
                     f"{num(r.peak_memory_gib, '9.2f')} {num(r.tflops, '8.3g')}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "host": platform.node(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        env["loadavg"] = os.getloadavg()
    return env


CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def add_allreduce_parser(modes, common) -> None:
    """``bench allreduce``'s command line."""
    p = modes.add_parser("allreduce", help="the gradient allreduce alone, across the ranks it "
                         "is launched on (horovodrun, torchrun, srun): time and bus bandwidth")
    common(p)
    p.add_argument("--warmup", type=int, default=2, help="rounds before timing")
    p.add_argument("--engine", default="horovod", choices=("horovod", "torch"),
                   help="dist engine (as dist.engine)")
    p.add_argument("--fp16", action="store_true",
                   help="sum fp16 copies (train.gradient_compression: fp16)")
    p.add_argument("--fusion-mb", type=float, default=None,
                   help="Horovod: fusion buffer MiB (HOROVOD_FUSION_THRESHOLD; 0 = no fusion; "
                        "default: Horovod's own); torch: bucket MiB (default: one tensor each)")
    p.add_argument("--in-channels", type=int, default=16,
                   help="input channels of the model whose gradients are summed")


def _precision_options(p) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="as train.precision (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--channels-last", default="auto", choices=tuple(CHANNELS_LAST),
                   help="model input layout, as train.channels_last (auto: on CUDA only)")


def add_step_parser(modes, common) -> None:
    p = modes.add_parser("step", help="training step on a synthetic batch on the device")
    common(p)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (>= 1)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--size", type=positive_int, nargs=2, default=[HEIGHT, WIDTH],
                   metavar=("H", "W"))
    p.add_argument("--in-channels", type=positive_int, default=16)
    _precision_options(p)
    p.add_argument("--channels-last-weights", action="store_true",
                   help="also convert the weights to channels_last (the trainer does not: "
                        "Horovod refuses non-contiguous tensors); to compare layouts")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--optimizer", default="adamw", choices=("adam", "adamw", "lamb"))
    p.add_argument("--sync-each-step", action="store_true",
                   help="synchronize the device after every step (per-step times)")


def add_loader_parser(modes, common) -> None:
    p = modes.add_parser("loader", help="BatchLoader vs the reference-style DataLoader")
    common(p)
    p.add_option("--data", required=True,
                 help="data-set root (or, as before, a split folder of data-*.h5 files)")
    p.add_argument("--split", default=None, help="split folder under --data (default train)")
    p.add_argument("--stats", help="stats.h5 (default: DATA/stats.h5 or DATA/../stats.h5)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--warmup", type=int, default=None,
                   help="batches before timing (default: one epoch)")
    p.add_argument("--crop", type=positive_int, nargs=2, metavar=("H", "W"))
    p.add_argument("--channels", type=int, nargs="+", help="channel indices (default: all)")
    p.add_workers("BatchLoader reader threads; several counts are each timed", [2, 4],
                  "--threads", nargs="+", shown="2 4")
    p.add_argument("--prefetch", type=positive_int, default=2)
    _precision_options(p)
    p.add_argument("--ref-workers", type=int, nargs="+", default=[1, 2, 4],
                   help="reference DataLoader worker processes to try (0: main process)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="interleaved runs; median reported")
    p.add_argument("--cold", action="store_true",
                   help="evict the files from the page cache before each run and time one "
                        "pass over them")


def add_train_parser(modes, common) -> None:
    p = modes.add_parser("train", help="the real trainer for N steps on staged data (it picks "
                         "the device: CUDA when present)")
    common(p, device=False)
    p.add_argument("--config", required=True, help="YAML config, e.g. yaml/workstation.yaml")
    p.add_option("--data", help="data-set root (data.root=...)")
    p.add_workers("reader threads (data.loader_threads=...)", None, shown="the config's")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing")
    p.add_option("--run-dir", "--output-dir",
                 help="keep the trainer's run folder here (default: a temporary folder, "
                      "deleted at the end)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.local_batch_size=4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        "bench",
        description="Throughput of the training step, the data loader and the trainer; one "
                    "table on stdout, JSON with --output. docs/performance.md has the commands "
                    "behind every published figure.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def common(p, device=True):
        if device:
            p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
        p.add_argument("--steps", type=positive_int, default=20,
                       help="measured steps/batches per run")
        p.add_option("--output", "--json", metavar="PATH",
                     help="also write the results as JSON to this file")
        p.add_quiet("no log lines on stderr, only warnings and errors (the table stays)")

    add_step_parser(modes, common)
    add_loader_parser(modes, common)
    add_allreduce_parser(modes, common)
    add_train_parser(modes, common)
    args, extra = parser.parse_known_args(argv)
    mode = modes.choices[args.mode]
    if extra:   # the mode's parser names it, with its own flags to suggest
        mode.error(f"unrecognized arguments: {' '.join(extra)}")
    mode.check_required(args)
    if args.warmup is not None and args.warmup < 0:
        mode.error(f"argument --warmup: must be at least 0, got {args.warmup}")
    if args.mode == "step" and args.warmup < 1:
        mode.error("argument --warmup: must be at least 1 (the first step is timed on its own)")
    return args
