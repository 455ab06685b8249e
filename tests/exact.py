"""Exact oracles for tests that run one training two ways (resumed or not, elastic or not, N
ranks or one process) and must get the same training.

The runs use :data:`EXACT`: SGD with momentum in fp32 on one thread per process. SGD's update
is linear in the gradient, so where the two ways differ only in the order of float additions
(an allreduce instead of an accumulation, a batch-norm group's sums) the difference stays at
float32 rounding level through training. LAMB and Adam divide by the gradient's own running
scale: rounding noise in a near-zero gradient element becomes a full-size update of either
sign, and the runs drift apart by ~1 % within a few steps (docs/reliability.md); their tests
keep a separate, measured tolerance (:data:`LAMB_NOISE`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from climseg.checkpoint import load_checkpoint, step_checkpoints

# lr 0.01: large enough that every step moves the weights far beyond rounding (a skipped or
# repeated step changes the loss by ~1e-3 relative), small enough that 30 steps stay stable.
EXACT = ["optimizer.name=sgd", "optimizer.lr=0.01", "optimizer.momentum=0.9",
         "train.precision=fp32", "train.cpu_threads=1"]
# Relative tolerance of the exact oracles, on each step's loss and on each final tensor.
# float32 rounding is 6e-8 relative; a few hundred kernels of differently ordered sums per
# step and 30 steps of accumulation leave the two runs within ~1e-6 (the figures measured are
# in each test); a real fault (a sample or step skipped or repeated, an update not applied,
# state not restored) moves the loss and the weights by 1e-4 or more. 1e-5 sits between.
REL = 1e-5


def losses(out: Path) -> dict[int, float]:
    """Each step's training loss from ``out/metrics.jsonl`` (a step logged twice, as after an
    elastic roll-back, counts with its last value)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps,
                       rel: float = REL) -> float:
    """Every step of ``steps`` logged in both, with losses within ``rel``; returns the largest
    relative difference seen."""
    steps = list(steps)
    assert steps and all(s in got for s in steps), (steps, sorted(got))
    diffs = {s: abs(got[s] - expected[s]) / abs(expected[s]) for s in steps}
    worst = max(diffs.values())
    assert all(math.isfinite(got[s]) for s in steps), got
    assert worst <= rel, {s: f"{got[s]:.8g} vs {expected[s]:.8g} ({d:.2g})"
                          for s, d in diffs.items() if d > rel}
    return worst


def final_model(out: Path, step: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, model state) of the newest step checkpoint in ``out``, or of the one of
    ``step``."""
    checkpoints = dict(step_checkpoints(out))
    step = max(checkpoints) if step is None else step
    assert step in checkpoints, (step, sorted(checkpoints))
    return step, load_checkpoint(checkpoints[step])["model"]


def assert_same_weights(got: Path, expected: Path, rel: float = REL, buffers: bool = True,
                        step: int | None = None) -> float:
    """The newest checkpoints of two runs (or those of ``step``) hold the same step and the
    same model: every
    floating-point tensor within ``rel`` of the other, measured as ||a - b|| / ||b||, and every
    integer tensor (batch counts) equal. Returns the largest relative difference seen.

    Why the norm of the tensor: rounding noise in an update is relative to the update, which
    is at most the size of the tensor it changes; a per-element relative measure would
    fail on elements that happen to be near zero (a batch-norm bias), a max-abs one is the
    same figure within a factor of sqrt(numel). A tensor whose norm is 0 in both runs is
    compared exactly. ``buffers=False`` leaves out the batch-norm running statistics (ranks
    keep their own: rank 0's are saved, one process has seen every micro-batch)."""
    step_a, a = final_model(got, step)
    step_b, b = final_model(expected, step_a)
    assert step_a == step_b and set(a) == set(b)
    worst, names = 0.0, []
    for name, x in a.items():
        y = b[name]
        if not buffers and ("running_" in name or "num_batches_tracked" in name):
            continue
        if not x.is_floating_point():
            assert torch.equal(x, y), name
            continue
        norm = y.double().norm().item()
        diff = (x.double() - y.double()).norm().item()
        r = diff / norm if norm > 0 else diff
        worst = max(worst, r)
        if r > rel:
            names.append(f"{name}: {r:.2g}")
    assert not names, f"{len(names)} tensors differ by more than {rel}: {names[:10]}"
    return worst
