"""Weighted cross-entropy and the IoU metrics on hand-built tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from climseg.losses import DEEPCAM_CLASS_FREQUENCIES, build_loss
from climseg.metrics import _pair_counts, confusion_matrix, iou_from_confusion, mlperf_iou


def test_loss_matches_hand_computation():
    freqs, power = (0.5, 0.25, 0.25), -0.5
    w = [f ** power for f in freqs]            # sqrt(2), 2, 2
    logits = torch.tensor([[0.0, 0.0, 0.0],    # pixel 0, label 1: -log(1/3)
                           [2.0, 0.0, 0.0],    # pixel 1, label 0: -log(e^2 / (e^2 + 2))
                           [0.0, 1.0, 3.0]])   # pixel 2, label 2: -log(e^3 / (1 + e + e^3))
    logits = logits.T.reshape(1, 3, 1, 3)
    labels = torch.tensor([[[1, 0, 2]]])
    expected = (w[1] * math.log(3)
                + w[0] * math.log(1 + 2 * math.exp(-2))
                + w[2] * math.log((1 + math.e + math.exp(3)) / math.exp(3))) / 3
    loss = build_loss(freqs, power)(logits, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_default_weights_are_the_reference_ones():
    loss = build_loss()
    expected = torch.tensor([f ** -0.125 for f in DEEPCAM_CLASS_FREQUENCIES])
    torch.testing.assert_close(loss.weight, expected)


def test_loss_accepts_low_precision_logits_and_is_differentiable():
    logits = torch.randn(2, 3, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 6))
    loss = build_loss()(logits, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def nll_oracle(logits, labels, weight):
    """The loss as it was first written: PyTorch's fused weighted cross-entropy."""
    return F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum") / labels.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_loss_and_gradient_equal_fused_cross_entropy(dtype):
    torch.manual_seed(3)
    loss_fn = build_loss()
    logits = (8 * torch.randn(3, 3, 16, 24)).to(dtype)
    labels = torch.randint(0, 3, (3, 16, 24))
    ours_in = logits.clone().requires_grad_()
    oracle_in = logits.clone().requires_grad_()
    ours = loss_fn(ours_in, labels)
    oracle = nll_oracle(oracle_in, labels, loss_fn.weight)
    ours.backward()
    oracle.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, oracle, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_in.grad, oracle_in.grad, rtol=1e-5, atol=1e-9)


def test_loss_of_a_confident_wrong_class_is_finite():
    # Logits far apart give a log-probability of -inf to no class in float32, but a huge one;
    # the mask must not turn another class's value into NaN.
    logits = torch.tensor([[1e30, -1e30, 0.0]]).view(1, 3, 1, 1)
    loss = build_loss()(logits, torch.tensor([[[0]]]))
    assert loss.item() == 0.0


def _graph_ops(loss):
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_loss_backward_uses_no_scatter_or_nll_kernel():
    # NLLLoss2d and gather/scatter-add have no deterministic CUDA backward (train.deterministic
    # raised in the loss on a GPU); the loss must stay elementwise + reductions.
    logits = torch.randn(2, 3, 4, 6, requires_grad=True)
    loss = build_loss()(logits, torch.randint(0, 3, (2, 4, 6)))
    ops = _graph_ops(loss)
    assert "LogSoftmaxBackward0" in ops
    assert not [op for op in ops if "Nll" in op or "Gather" in op or "Scatter" in op
                or "Index" in op], ops


def test_loss_runs_under_deterministic_algorithms():
    logits = torch.randn(2, 3, 4, 6, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 6))
    torch.use_deterministic_algorithms(True)
    try:
        first = build_loss()(logits, labels)
        first.backward()
        grad = logits.grad.clone()
        logits.grad = None
        second = build_loss()(logits, labels)
        second.backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second) and torch.equal(grad, logits.grad)


def test_class_count_mismatch_names_the_key():
    with pytest.raises(ValueError, match="loss.class_frequencies"):
        build_loss((0.5, 0.5))(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# Two 2x3 samples. Sample a: every class has IoU 1/2. Sample b: truth all background,
# one pixel predicted as AR; TC absent from both.
TARGET = torch.tensor([[[0, 0, 1], [2, 2, 0]],
                       [[0, 0, 0], [0, 0, 0]]])
PRED = torch.tensor([[[0, 1, 1], [2, 0, 0]],
                     [[0, 0, 0], [0, 0, 2]]])


def test_confusion_matrix_rows_are_truth():
    expected = torch.tensor([[7, 1, 1],
                             [0, 1, 0],
                             [1, 0, 1]])
    cm = confusion_matrix(PRED, TARGET, 3)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)


@pytest.mark.parametrize("num_classes", [3, 16, 17])   # 17: 289 pairs no longer fit uint8
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.uint8])
def test_reduction_counting_agrees_with_bincount_and_a_loop(num_classes, label_dtype):
    torch.manual_seed(num_classes)
    pred = torch.randint(0, num_classes, (4, 16, 24))
    target = torch.randint(0, num_classes, (4, 16, 24)).to(label_dtype)
    by_loop = torch.zeros(4, num_classes, num_classes, dtype=torch.int64)
    for g in range(4):
        for t, p in zip(target[g].flatten().tolist(), pred[g].flatten().tolist()):
            by_loop[g, t, p] += 1
    for groups in (1, 2, 4):
        expected = by_loop.view(groups, -1, num_classes, num_classes).sum(1)
        a = _pair_counts(pred, target, num_classes, groups=groups, use_bincount=True)
        b = _pair_counts(pred, target, num_classes, groups=groups, use_bincount=False)
        assert a.dtype == b.dtype == torch.int64
        assert torch.equal(a, expected) and torch.equal(b, expected)


@pytest.mark.parametrize("pixels", [255, 510, 7 * 11, 2 * 255 + 7])
def test_reduction_counting_of_full_blocks(pixels):
    # Every pixel in one bin: each block of 255 byte-sized partial sums is full (255), and
    # the pixels after the last whole block (all of them for 77) are counted on their own.
    same = torch.ones(2, pixels, dtype=torch.int64)
    counts = _pair_counts(same, same, 3, groups=2, use_bincount=False)
    expected = torch.zeros(2, 3, 3, dtype=torch.int64)
    expected[:, 1, 1] = pixels
    assert torch.equal(counts, expected)


def test_device_counting_allocates_at_most_a_byte_per_pixel_at_a_time():
    # The device path once compared an int64 index with all 9 bins at once (9 bytes per
    # pixel) and torch's sum widened that to int64 (72 more). Labels and predictions here are
    # int64 (8 bytes per pixel) as the trainer has them; no temporary may come near that.
    from torch.profiler import ProfilerActivity, profile

    target = torch.randint(0, 3, (2, 256, 384))
    pred = torch.randint(0, 3, (2, 256, 384))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        counts = _pair_counts(pred, target, 3, use_bincount=False)
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    assert sizes and max(sizes) <= target.numel()
    assert torch.equal(counts, _pair_counts(pred, target, 3, use_bincount=True))


def test_iou_from_confusion():
    per_class, mean = iou_from_confusion(confusion_matrix(PRED, TARGET, 3))
    assert per_class.dtype == torch.float64
    torch.testing.assert_close(per_class, torch.tensor([7 / 10, 1 / 2, 1 / 3], dtype=torch.float64))
    assert mean.item() == pytest.approx((7 / 10 + 1 / 2 + 1 / 3) / 3)


def test_iou_of_an_absent_class_is_nan_and_left_out_of_the_mean():
    cm = torch.tensor([[3, 0, 1],
                       [0, 0, 0],
                       [1, 0, 2]])
    per_class, mean = iou_from_confusion(cm)
    assert per_class[0].item() == pytest.approx(3 / 5)
    assert math.isnan(per_class[1].item())
    assert per_class[2].item() == pytest.approx(2 / 4)
    assert mean.item() == pytest.approx((3 / 5 + 2 / 4) / 2)


def test_mlperf_iou_is_a_per_sample_mean_with_absent_classes_counting_one():
    sample_a = (1 / 2 + 1 / 2 + 1 / 2) / 3
    sample_b = (5 / 6 + 1 + 0) / 3
    assert mlperf_iou(PRED, TARGET, 3).item() == pytest.approx((sample_a + sample_b) / 2)
    assert mlperf_iou(PRED[1:], TARGET[1:], 3).item() == pytest.approx(sample_b)


def test_perfect_prediction_scores_one():
    target = torch.randint(0, 3, (2, 8, 8))
    assert mlperf_iou(target, target, 3).item() == 1.0
    assert iou_from_confusion(confusion_matrix(target, target, 3))[1].item() == 1.0


def test_shape_mismatch_and_out_of_range_labels_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[0], TARGET, 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match="labels outside"):
        mlperf_iou(torch.tensor([[0, 1]]), torch.tensor([[0, -1]]), 3)
