"""DeepLabv3+ model: reference parameter count, shapes at several sizes, gradients, errors."""

import pytest
import torch

from climseg.model import DeepLabV3Plus, build_model

# Parameter count of the MLPerf HPC DeepCAM reference network with 16 inputs and 3 classes.
REFERENCE_PARAMETERS = 56_454_720


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("deeplabv3plus", in_channels=16, num_classes=3)


def test_parameter_count_matches_reference(model):
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMETERS


def test_batch_norm_layers_are_plain(model):
    # The trainer converts these to synchronized batch norm; the model itself knows no ranks.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is torch.nn.BatchNorm2d for m in bns)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size", [(64, 96), (96, 160)])
def test_output_shape(model, size, train):
    model.train(train)
    with torch.no_grad():
        out = model(torch.randn(2, 16, *size))
    assert out.shape == (2, 3, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_channels_last_input_gives_same_logits(model):
    model.eval()
    x = torch.randn(1, 16, 64, 96)
    with torch.no_grad():
        ref = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
    # Untrained, in eval mode, the logits reach ~1e6: compare relative to their scale.
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def _conv_output_layouts(model, x):
    """Names of the convolutions whose output is / is not channels_last, in one forward."""
    layouts, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            handles.append(module.register_forward_hook(
                lambda m, i, out, name=name: layouts.__setitem__(
                    name, out.is_contiguous(memory_format=torch.channels_last))))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return layouts, out


def test_channels_last_input_stays_channels_last_to_the_logits():
    # Weights stay contiguous (Horovod broadcasts and allreduces only contiguous tensors);
    # a channels_last input alone must carry the layout through every convolution, the ASPP
    # concatenation and the decoder (cuDNN's fast NHWC kernels on a GPU).
    torch.manual_seed(0)
    model = build_model(in_channels=4, num_classes=3).train()
    x = torch.randn(2, 4, 64, 96).contiguous(memory_format=torch.channels_last)
    layouts, out = _conv_output_layouts(model, x)
    assert len(layouts) == 146
    assert [name for name, cl in layouts.items() if not cl] == []
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out.float().square().mean().backward()
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in model.parameters())


def test_contiguous_input_stays_contiguous():
    model = build_model(in_channels=4, num_classes=3).eval()
    with torch.no_grad():
        layouts, out = _conv_output_layouts(model, torch.randn(1, 4, 64, 96))
    # The pooling convolution's 1x1 output is both layouts; every other one must be NCHW.
    assert [name for name, cl in layouts.items() if cl] == ["aspp.pooling.conv"]
    assert out.is_contiguous()


def test_every_parameter_gets_a_finite_gradient():
    # Other channel counts than the reference's, to check that nothing hard-codes 16 or 3.
    torch.manual_seed(0)
    model = build_model(in_channels=4, num_classes=5).train()
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 4, 32, 48))
    assert out.shape == (2, 5, 32, 48)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero


def test_input_not_divisible_by_16_is_rejected(model):
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 16, 40, 96))


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="model.name"):
        build_model("unet")


@pytest.mark.parametrize("kwargs, key", [
    ({"in_channels": 0}, "model.in_channels"),
    ({"num_classes": 1}, "model.num_classes"),
    ({"num_classes": 2.5}, "model.num_classes"),
    ({"dropout": 0.1}, "model.dropout"),
    ({"width": 0}, "model.width"),
    ({"width": "half"}, "model.width"),
])
def test_bad_options_are_rejected(kwargs, key):
    with pytest.raises(ValueError, match=key):
        build_model(**kwargs)


def test_builder_returns_the_reference_architecture():
    assert isinstance(build_model(), DeepLabV3Plus)


def test_a_narrower_model_is_the_same_network_with_scaled_channels(model):
    """model.width (the suite trains 0.25): the same layers in the same order, every channel
    count but the input's and the classes' scaled, and the same output."""
    narrow = build_model(width=0.25)
    wide_shapes = {k: v.shape for k, v in model.state_dict().items()}
    narrow_shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    assert list(narrow_shapes) == list(wide_shapes)
    assert narrow_shapes["backbone.stem.0.weight"] == (8, 16, 3, 3)      # 32 x 0.25 from 16 in
    assert narrow_shapes["backbone.exit_convs.6.pointwise.weight"][0] == 512  # 2048 x 0.25
    assert narrow_shapes["decoder.classifier.weight"][1] == 3
    assert sum(p.numel() for p in narrow.parameters()) == 3_623_628
    assert narrow(torch.zeros(1, 16, 32, 48)).shape == (1, 3, 32, 48)
