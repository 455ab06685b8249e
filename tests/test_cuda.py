"""The CUDA code paths, each against its CPU counterpart. Every test here needs a GPU and is
skipped without one; ``make test-gpu`` (tools/gpu_check.sh) runs them on a GPU node.

What each covers (docs/performance.md, "Desk check of the CUDA branches", says which hazard):
the loader's pinned ring and side-stream copy (bit for bit against the CPU loader, across
epochs, after an abandoned epoch, consumed on another stream, with the consumer's stream
busy), the training step in bf16/fp16/compiled and under deterministic algorithms, LAMB and
the confusion counts on GPU tensors, evaluate/predict, checkpoints between devices, and
Horovod's NCCL build.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading

import h5py
import numpy as np
import pytest
import torch

from climseg import evaluate, predict
from climseg.checkpoint import (Progress, load_checkpoint, restore_training_state, rng_state,
                                save_checkpoint, set_rng_state, training_state)
from climseg.data.format import DATA_KEY, LABEL_KEY, read_sample
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files
from climseg.engine import Precision, train_step
from climseg.losses import build_loss
from climseg.metrics import _pair_counts
from climseg.model import build_model
from climseg.optim import LAMB, build_scheduler
from test_evaluate_predict import make_checkpoint
from test_gpu_like import LR, SmallSegNet, flat_grads, step_difference
from test_loader import files, norm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (make test-gpu / tools/gpu_check.sh runs these on a GPU node)")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------- the loader
# The loader's fixtures (this split's files, its min-max normalization) are test_loader's.


@pytest.fixture(scope="module")
def float_label_files(files, tmp_path_factory):
    """Chunked, compressed copies with float labels: no file offsets, read through h5py."""
    folder = tmp_path_factory.mktemp("float_labels")
    copies = []
    for path in files:
        data, labels = read_sample(path)
        copies.append(folder / path.name)
        with h5py.File(copies[-1], "w") as f:
            f.create_dataset(DATA_KEY, data=data, chunks=(16, 32, 16), compression="gzip")
            f.create_dataset(LABEL_KEY, data=labels.astype(np.float32))
    return copies


def loader_kwargs(norm, channels, **kwargs):
    shift, scale = norm
    if channels is not None:
        shift, scale = shift[channels], scale[channels]
    return dict(shift=shift, scale=scale, channels=channels, **kwargs)


def on_cpu(batches):
    return [(x.cpu(), y.cpu()) for x, y in batches]


def assert_same(a, b):
    assert len(a) == len(b) and a
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


LOADER_CASES = {
    "full field, all channels": dict(channels=None),
    "random crop, channel subset": dict(channels=[0, 7, 13], crop=(32, 48), random_crop=True),
    "full-width crop, reordered channels": dict(channels=[2, 1], crop=(16, 96), random_crop=True),
}


@pytest.mark.parametrize("labels", ["uint8", "float"])
@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_loader_cuda_batches_equal_cpu_bit_for_bit_over_epochs(files, float_label_files, norm,
                                                               case, labels):
    # prefetch=1: a ring of 3 pinned slots, which 4 epochs of 5 batches wrap around 6 times.
    # The GPU batches of an epoch are all held before any is compared, so a slot refilled or
    # device memory reused too early would show.
    paths = files if labels == "uint8" else float_label_files
    kwargs = loader_kwargs(norm, seed=3, num_threads=3, prefetch=1, **LOADER_CASES[case])
    cpu = BatchLoader(paths, 3, **kwargs)
    gpu = BatchLoader(paths, 3, device=CUDA, **kwargs)
    for epoch in range(4):
        held = list(gpu.epoch(epoch))
        torch.cuda.synchronize()
        for x, y in held:
            assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
        assert_same(on_cpu(held), on_cpu(cpu.epoch(epoch)))


def test_loader_after_an_abandoned_epoch(files, norm):
    # Stopping after one batch leaves prefetched slots whose copies may still be in flight;
    # the next epochs reuse those slots.
    kwargs = loader_kwargs(norm, [0, 5], crop=(32, 48), random_crop=True, seed=1, prefetch=2)
    cpu = BatchLoader(files, 2, **kwargs)
    gpu = BatchLoader(files, 2, device=CUDA, **kwargs)
    for x, _ in gpu.epoch(0):
        break
    resumed = on_cpu(gpu.epoch(0, start_batch=3))
    assert_same(resumed, on_cpu(cpu.epoch(0, start_batch=3)))
    assert_same(on_cpu(gpu.epoch(1)), on_cpu(cpu.epoch(1)))
    assert not [t for t in threading.enumerate() if t.name.startswith("climseg-loader")]


def test_loader_consumed_on_another_stream_behind_busy_work(files, norm):
    # The batch must be complete for whichever stream is current when it is taken, even when
    # that stream is still busy with earlier work (the previous step) and the side stream is
    # not.
    kwargs = loader_kwargs(norm, None, crop=(32, 48), random_crop=True, seed=2, prefetch=2)
    expected = on_cpu(BatchLoader(files, 2, **kwargs).epoch(0))
    consumer = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(consumer):
        for x, y in BatchLoader(files, 2, device=CUDA, **kwargs).epoch(0):
            torch.cuda._sleep(2_000_000)   # the "previous step", on the consumer's stream
            got.append((x * 1, y + 0))     # read on the consumer stream, after the sleep
    torch.cuda.synchronize()
    assert_same(on_cpu(got), expected)


# ------------------------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 48, 4).permute(0, 3, 1, 2)
    y = torch.randint(0, 3, (2, 32, 48))
    return x.to(CUDA), y.to(CUDA)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return SmallSegNet().train().to(CUDA)


def cuda_step(net, batch, prec, compile_model=False, optimizer_class=None):
    model = copy.deepcopy(net)
    optimizer = (optimizer_class or (lambda p: torch.optim.SGD(p, lr=LR)))(model.parameters())
    step_model = torch.compile(model) if compile_model else model
    train_step(step_model, optimizer, build_loss(), [batch], prec)
    torch.cuda.synchronize()
    return model


def test_bf16_and_fp16_steps_are_close_to_fp32(net, batch):
    fp32 = cuda_step(net, batch, Precision.build(CUDA, "fp32", True))
    bf16 = cuda_step(net, batch, Precision.build(CUDA, "bf16", True))
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    half = cuda_step(net, batch, Precision(CUDA, torch.float16, scaler, True))
    assert scaler.get_scale() == 1024.0
    assert 1e-4 < step_difference(bf16, fp32, net) < 0.15
    assert 1e-4 < step_difference(half, fp32, net) < 0.15


def test_cuda_step_matches_cpu_step(net, batch):
    # cuDNN's convolutions (TF32 where allowed) against the CPU's, channels_last input.
    on_gpu = cuda_step(net, batch, Precision.build(CUDA, "fp32", True))
    cpu_net = copy.deepcopy(net).to(CPU)
    model = copy.deepcopy(cpu_net)
    train_step(model, torch.optim.SGD(model.parameters(), lr=LR), build_loss(),
               [(batch[0].cpu(), batch[1].cpu())], Precision.build(CPU, "fp32", False))
    g, g_ref = flat_grads(on_gpu).cpu(), flat_grads(model)
    assert (g - g_ref).norm() < 1e-2 * g_ref.norm()


def test_compiled_step_is_close_to_eager(net, batch):
    # fp32: Inductor's fused kernels against eager ones, without bf16 rounding on top.
    prec = Precision.build(CUDA, "fp32", True)
    eager = cuda_step(net, batch, prec)
    compiled = cuda_step(net, batch, prec, compile_model=True)
    assert step_difference(compiled, eager, net) < 1e-3


def test_deterministic_step_on_cuda_is_reproducible(net, batch):
    # train.deterministic: the loss used to raise here (NLLLoss2d has no deterministic kernel).
    torch.use_deterministic_algorithms(True)
    try:
        first = cuda_step(net, batch, Precision.build(CUDA, "fp32", True))
        second = cuda_step(net, batch, Precision.build(CUDA, "fp32", True))
    finally:
        torch.use_deterministic_algorithms(False)
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_full_model_bf16_step_on_cuda():
    torch.manual_seed(0)
    model = build_model(in_channels=16, num_classes=3).to(CUDA).train()
    optimizer = LAMB(model.parameters(), lr=1e-3)
    x = torch.randn(2, 64, 96, 16, device=CUDA).permute(0, 3, 1, 2)
    y = torch.randint(0, 3, (2, 64, 96), device=CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, optimizer, build_loss(), [(x, y)],
                        Precision.build(CUDA, "bf16", True))
    torch.cuda.synchronize()
    assert torch.isfinite(result.loss_sum) and result.loss_sum.is_cuda
    assert result.confusion.sum().item() == y.numel()
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in model.parameters())
    assert all(optimizer.state[p]["exp_avg"].is_cuda for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Weight decay and the trust ratio move nearly every tensor (not one whose weights and
    # gradient are both zero).
    changed = sum(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert changed >= 0.9 * len(before)


def test_lamb_on_cuda_equals_lamb_on_cpu():
    torch.manual_seed(4)
    shapes = [(64, 32, 3, 3), (64,), (3, 64, 1, 1), (1000,)]
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().to(CUDA)) for p in cpu]
    opt_cpu, opt_gpu = LAMB(cpu, lr=0.01), LAMB(gpu, lr=0.01)
    for step in range(3):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn_like(a) * (5.0 if step == 0 else 0.01)
            b.grad = a.grad.to(CUDA)
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)


def test_confusion_counts_on_cuda_without_large_temporaries():
    torch.manual_seed(5)
    shape = (8, 768, 1152)
    target = torch.randint(0, 3, shape, device=CUDA)
    pred = torch.randint(0, 3, shape, device=CUDA)
    expected = _pair_counts(pred.cpu(), target.cpu(), 3, use_bincount=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    counts = _pair_counts(pred, target, 3)
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(counts.cpu(), expected)
    # The old all-bins comparison needed 9 bytes per pixel (and 72 more for its int64 sum);
    # now the index and one comparison, a byte per pixel each, are alive at a time.
    assert peak < 3 * target.numel(), f"{peak / 2**20:.1f} MiB of temporaries"


# ------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def deeplab_checkpoint(tiny_root, tmp_path_factory):
    # A freshly initialised DeepLabv3+ with its default batch-norm statistics: finite logits
    # (~1e5) that vary in class over the field. (make_checkpoint's sharpened statistics are
    # made for its tiny net; through this depth they overflow to NaN.)
    torch.manual_seed(3)
    state = build_model(in_channels=16, num_classes=3).state_dict()
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "deeplab.pt", tiny_root,
                           name="deeplabv3plus", state=state)


@pytest.fixture
def exact_fp32():
    # fp32 on the GPU compared with the CPU: no TF32 in convolutions and matrix products.
    # (torch.backends.cuda.matmul's flags are properties, which monkeypatch cannot restore.)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_evaluate(ckpt, root, out, device, precision):
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(root), "--batch-size", "2",
                          "--device", device, "--precision", precision, "--quiet",
                          "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_evaluate_on_cuda_equals_cpu(deeplab_checkpoint, tiny_root, tmp_path, exact_fp32):
    cpu = run_evaluate(deeplab_checkpoint, tiny_root, tmp_path / "cpu.json", "cpu", "fp32")
    gpu = run_evaluate(deeplab_checkpoint, tiny_root, tmp_path / "gpu.json", "cuda", "fp32")
    bf16 = run_evaluate(deeplab_checkpoint, tiny_root, tmp_path / "bf16.json", "cuda", "bf16")
    confusion = np.array(cpu["confusion"])
    pixels = confusion.sum()
    assert gpu["samples"] == cpu["samples"] and pixels > 0
    assert (confusion.sum(0) > 0).sum() >= 2, "the test model predicts a single class"
    # Pixels whose two best logits nearly tie may flip between devices; very few do.
    assert np.abs(np.subtract(gpu["confusion"], confusion)).sum() <= 1e-2 * pixels
    assert gpu["mean_iou"] == pytest.approx(cpu["mean_iou"], abs=5e-3)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    assert bf16["mean_iou"] == pytest.approx(cpu["mean_iou"], abs=5e-2)


def test_predict_on_cuda_equals_cpu(deeplab_checkpoint, tiny_root, tmp_path, exact_fp32):
    files = [str(f) for f in list_files(tiny_root / "test")]
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert predict.main(["--checkpoint", str(deeplab_checkpoint), "--output", str(out),
                             "--device", device, "--precision", "fp32", "--probabilities",
                             "--quiet", *files]) == 0
        outputs[device] = out
    for f in files:
        name = os.path.basename(f)[:-len(".h5")] + "-mask.h5"
        with h5py.File(outputs["cpu"] / name) as a, h5py.File(outputs["cuda"] / name) as b:
            mask_cpu, mask_gpu = a[predict.PREDICTION_KEY][...], b[predict.PREDICTION_KEY][...]
            probs_cpu = a[predict.PROBABILITIES_KEY][...].astype(np.float32)
            probs_gpu = b[predict.PROBABILITIES_KEY][...].astype(np.float32)
        assert (mask_cpu != mask_gpu).mean() <= 1e-2
        assert (probs_cpu.argmax(-1) == mask_cpu).all()
        np.testing.assert_allclose(probs_gpu, probs_cpu, atol=2e-2)


# ------------------------------------------------------------------------------- checkpoints
def _run_objects(device):
    torch.manual_seed(6)
    model = SmallSegNet().to(device)
    optimizer = LAMB(model.parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, type="cosine", t_max=10, warmup_steps=2)
    scaler = torch.amp.GradScaler(device.type, init_scale=512.0)
    return model, optimizer, scheduler, scaler


def _steps(objects, batch, n):
    model, optimizer, scheduler, scaler = objects
    prec = Precision(batch[0].device, torch.float16, scaler, True)
    for _ in range(n):
        train_step(model, optimizer, build_loss(), [batch], prec)
        scheduler.step()


def test_checkpoint_saved_on_cuda_loads_on_cpu_and_back(batch, tmp_path):
    run = _run_objects(CUDA)
    _steps(run, batch, 2)
    rng = rng_state()
    state = training_state(model=run[0], optimizer=run[1], scheduler=run[2], scaler=run[3],
                           progress=Progress(step=2), rng=[rng], config={})
    path = save_checkpoint(state, tmp_path / "ckpt.pt")

    # On a CPU machine: everything lands on the CPU and restores into CPU objects.
    loaded = load_checkpoint(path, map_location="cpu")
    on_cpu_run = _run_objects(CPU)
    progress = restore_training_state(loaded, model=on_cpu_run[0], optimizer=on_cpu_run[1],
                                      scheduler=on_cpu_run[2], scaler=None)
    assert progress.step == 2
    for p, q in zip(on_cpu_run[0].state_dict().values(), run[0].state_dict().values()):
        assert not p.is_cuda and torch.equal(p, q.cpu())
    set_rng_state(loaded["rng"][0])   # CUDA generator state from CPU tensors (resume defect)

    # Back on the GPU, from the CPU-loaded dict: the run continues exactly.
    again = _run_objects(CUDA)
    restore_training_state(loaded, model=again[0], optimizer=again[1], scheduler=again[2],
                           scaler=again[3])
    assert all(s["exp_avg"].is_cuda for s in again[1].state.values())
    assert again[3].get_scale() == run[3].get_scale()
    _steps(run, batch, 1)
    _steps(again, batch, 1)
    for p, q in zip(again[0].parameters(), run[0].parameters()):
        assert torch.equal(p, q)
    assert again[2].get_last_lr() == run[2].get_last_lr()


# ------------------------------------------------------------------------------- Horovod
_NCCL_ALLREDUCE = textwrap.dedent("""
    import json, sys
    import torch
    import horovod.torch as hvd
    hvd.init()
    torch.cuda.set_device(hvd.local_rank())
    x = torch.arange(6, dtype=torch.float32, device="cuda")
    total = hvd.allreduce(x, op=hvd.Sum, name="check")
    mean = hvd.allreduce(x, name="check_mean")
    print(json.dumps({"nccl": hvd.nccl_built(), "size": hvd.size(), "cuda": total.is_cuda,
                      "total": total.tolist(), "mean": mean.tolist()}))
    hvd.shutdown()
""")


def test_horovod_nccl_allreduce_in_one_rank(horovod, tmp_path):
    # A fresh process: Horovod's init and shutdown must not leak into the other tests.
    timeline = tmp_path / "timeline.json"
    env = dict(os.environ, HOROVOD_TIMELINE=str(timeline))
    proc = subprocess.run([sys.executable, "-c", _NCCL_ALLREDUCE], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nccl"], "Horovod was built without NCCL (tools/install_horovod.sh on a GPU)"
    assert result["size"] == 1 and result["cuda"]
    assert result["total"] == result["mean"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert "NCCL_ALLREDUCE" in timeline.read_text(), "the allreduce did not go through NCCL"

