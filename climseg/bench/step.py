"""``climseg bench step``: forward + backward + optimizer step on a synthetic batch."""

from __future__ import annotations

import time
from typing import Any

import torch

from climseg.bench.common import (CHANNELS_LAST, Result, log, peak_memory_gib, pick_device,
                                  reset_peak_memory, synchronize)
from climseg.engine import Precision, tflop_per_sample, train_step
from climseg.losses import build_loss
from climseg.model import build_model
from climseg.optim import build_optimizer


def step_mode(args) -> tuple[list[Result], dict[str, Any]]:
    device = pick_device(args.device)   # sets the current CUDA device too
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as the trainer: fixed shapes, tuned kernels
    torch.manual_seed(0)
    prec = Precision.build(device, args.precision, CHANNELS_LAST[args.channels_last])
    model = build_model(in_channels=args.in_channels, num_classes=3).to(device)
    # As the trainer: weights contiguous (Horovod needs them so), the input in prec's layout.
    # --channels-last-weights measures the other choice on one device.
    if args.channels_last_weights:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss().to(device)
    optimizer = build_optimizer(model.parameters(), name=args.optimizer, lr=1e-4)
    step_model = torch.compile(model) if args.compile else model
    model.train()

    height, width = args.size
    bs = args.batch_size
    x = torch.randn(bs, height, width, args.in_channels, device=device).permute(0, 3, 1, 2)
    y = torch.randint(0, 3, (bs, height, width), device=device)
    batch = [(x, y)]
    log.info("step: batch %d of %dx%dx%d on %s, %s, channels_last %s, optimizer %s%s",
             bs, height, width, args.in_channels, device, prec.name, prec.channels_last,
             args.optimizer, ", torch.compile" if args.compile else "")

    reset_peak_memory(device)
    synchronize(device)
    first_start = time.perf_counter()
    train_step(step_model, optimizer, loss_fn, batch, prec)
    synchronize(device)
    first_step = time.perf_counter() - first_start
    for _ in range(max(0, args.warmup - 1)):
        train_step(step_model, optimizer, loss_fn, batch, prec)
    synchronize(device)
    step_times = []
    start_all = time.perf_counter()
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(step_model, optimizer, loss_fn, batch, prec)
        if args.sync_each_step:
            synchronize(device)
            step_times.append(time.perf_counter() - start)
    synchronize(device)
    # Without --sync-each-step the host queues steps ahead of the GPU, as in training.
    total = sum(step_times) if args.sync_each_step else time.perf_counter() - start_all
    seconds_per_step = total / args.steps
    rate = bs / seconds_per_step
    name = f"step {prec.name}{' channels_last' if prec.channels_last else ''}" \
           f"{' CL weights' if args.channels_last_weights else ''}" \
           f"{' compiled' if args.compile else ''}, batch {bs}"
    result = Result(name=name, samples_per_s=rate, ms_per_step=1e3 * seconds_per_step,
                    batch_size=bs, steps=args.steps, data_wait_share=0.0,
                    peak_memory_gib=peak_memory_gib(device),
                    tflops=rate * tflop_per_sample(height, width),
                    extra={"first_step_s": first_step,
                           "compile_s": max(0.0, first_step - seconds_per_step)
                           if args.compile else None})
    summary = {"size": [height, width], "in_channels": args.in_channels,
               "precision": prec.name, "channels_last": prec.channels_last,
               "channels_last_weights": args.channels_last_weights,
               "compile": args.compile, "optimizer": args.optimizer,
               "first_step_s": first_step}
    return [result], summary
