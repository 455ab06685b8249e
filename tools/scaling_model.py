"""The step-time model of docs/scaling.md: prints its tables (the doc holds this output).

    python tools/scaling_model.py

Every input is a named constant below, with where it comes from; docs/scaling.md explains the
model and its assumptions. Nothing here is measured on a GPU by this project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TRAIN_SAMPLES, EVAL_SAMPLES = 121_266, 15_158
GRAD_BYTES_FP32 = 56_454_720 * 4   # the gradient set of DeepLabv3+ with 16 input channels
BUCKET_BYTES = 25 * 2**20          # what is left to reduce after backward ends (one bucket)
BACKWARD_SHARE = 2 / 3             # of a step's compute: the window allreduce can hide in
EVAL_COST = 1 / 3                  # a forward pass, relative to a training step per sample
# Epochs to the 0.82 IoU target by global batch: MLPerf HPC v3.0 reference convergence points.
EPOCHS = {128: 7, 512: 11, 2048: 22.5}


@dataclass(frozen=True)
class Gpu:
    name: str
    rate_b1: float    # samples/s per GPU at local batch 1 (MLPerf HPC logs)
    rate_b8: float    # ... at local batch 8
    busbw: float      # bytes/s, allreduce bus bandwidth per GPU across nodes
    nvlink: float     # bytes/s, within one 8-GPU node
    alpha: float      # s, latency per allreduce hop
    published: dict   # GPUs -> minutes to train at global batch 2048 (MLPerf HPC)

    def step_compute(self, b: int) -> float:
        """Seconds per step at local batch b: a line through the two published rates
        (b * per-sample cost + a fixed per-step cost)."""
        t1, t8 = 1 / self.rate_b1, 8 / self.rate_b8
        per_sample = (t8 - t1) / 7
        return b * per_sample + (t1 - per_sample)


H100 = Gpu("H100", 30, 82, 40e9, 350e9, 8e-6, {2048: 0.83})
A100 = Gpu("A100", 21, 41, 20e9, 200e9, 8e-6, {2048: 1.57})


def allreduce_seconds(gpu: Gpu, n: int, nbytes: float) -> float:
    """Bandwidth term of a ring (2(n-1)/n of the bytes over each link) plus a tree's latency
    term (NCCL switches to trees at scale); NVLink inside one node, the network beyond."""
    if n == 1:
        return 0.0
    bw = gpu.nvlink if n <= 8 else gpu.busbw
    return 2 * (n - 1) / n * nbytes / bw + 2 * math.log2(n) * gpu.alpha


def step_seconds(gpu: Gpu, n: int, b: int, nbytes: float,
                 compute: float | None = None) -> tuple[float, float]:
    """(step time, exposed communication): the allreduce overlaps backward, except what
    exceeds it and the last bucket. ``compute``: the step's compute time (default: the fit)."""
    compute = gpu.step_compute(b) if compute is None else compute
    total = allreduce_seconds(gpu, n, nbytes)
    tail = allreduce_seconds(gpu, n, min(BUCKET_BYTES, nbytes))
    exposed = max(total - BACKWARD_SHARE * compute, tail)
    return compute + exposed, exposed


def minutes_to_train(gpu: Gpu, gbs: int, b: int, nbytes: float) -> float:
    n = gbs // b
    step, _ = step_seconds(gpu, n, b, nbytes)
    epochs = EPOCHS[gbs]
    train = epochs * TRAIN_SAMPLES / gbs * step
    evals = epochs * math.ceil(EVAL_SAMPLES / n) * EVAL_COST * gpu.step_compute(1)
    return (train + evals) / 60


def table(gpu: Gpu, nbytes: float) -> list[str]:
    rows = ["| global batch | local batch | GPUs | step ms | of which exposed allreduce ms | "
            "samples/s per GPU | parallel efficiency | minutes to train |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for gbs in EPOCHS:
        for b in (1, 2, 8):
            n = gbs // b
            if n < 1 or n > 2048:
                continue
            step, exposed = step_seconds(gpu, n, b, nbytes)
            alone = gpu.step_compute(b)
            rows.append(f"| {gbs} | {b} | {n} | {1e3 * step:.1f} | {1e3 * exposed:.1f} | "
                        f"{b / step:.1f} | {alone / step:.0%} | "
                        f"{minutes_to_train(gpu, gbs, b, nbytes):.2f} |")
    return rows


def lean_table() -> list[str]:
    """Local batch 1 if the fixed per-step cost were gone (CUDA graphs, fused optimizer): only
    the per-sample compute is left to hide the allreduce behind."""
    rows = ["| GPU | GPUs | compute ms | allreduce ms fp32 / fp16 | exposed ms fp32 / fp16 | "
            "efficiency fp32 / fp16 |", "| --- | --- | --- | --- | --- | --- |"]
    for gpu in (H100, A100):
        compute = gpu.step_compute(8) / 8
        for n in (8, 64, 512, 2048):
            cells = [step_seconds(gpu, n, 1, nbytes, compute)
                     for nbytes in (GRAD_BYTES_FP32, GRAD_BYTES_FP32 / 2)]
            ar = [allreduce_seconds(gpu, n, nb) for nb in (GRAD_BYTES_FP32, GRAD_BYTES_FP32 / 2)]
            rows.append(f"| {gpu.name} | {n} | {1e3 * compute:.1f} | "
                        f"{1e3 * ar[0]:.1f} / {1e3 * ar[1]:.1f} | "
                        f"{1e3 * cells[0][1]:.1f} / {1e3 * cells[1][1]:.1f} | "
                        f"{compute / cells[0][0]:.0%} / {compute / cells[1][0]:.0%} |")
    return rows


def report() -> str:
    out = []
    for gpu in (H100, A100):
        out.append(f"### {gpu.name}, fp32 gradients\n")
        out.extend(table(gpu, GRAD_BYTES_FP32))
        out.append("")
    out.append("### Against the published results (global batch 2048, local batch 1)\n")
    out.append("| GPU | GPUs | model | published |")
    out.append("| --- | --- | --- | --- |")
    for gpu in (H100, A100):
        for n, minutes in gpu.published.items():
            model = minutes_to_train(gpu, 2048, 2048 // n, GRAD_BYTES_FP32)
            out.append(f"| {gpu.name} | {n} | {model:.2f} min | {minutes} min |")
    out.append("")
    out.append("### Without the fixed per-step cost (local batch 1)\n")
    out.extend(lean_table())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(report(), end="")
