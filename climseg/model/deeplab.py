"""DeepLabv3+ with the modified aligned Xception backbone of the MLPerf HPC DeepCAM reference.

Layer sizes, strides and dilations follow `mlcommons/hpc`, `deepcam/src/deepCam/architecture/
deeplab_xception.py`; with 16 input and 3 output channels the network has 56,454,720
parameters, as the reference does. Differences from the reference, all without effect on the
parameter count or on what the layers compute at the reference tile size:

- The image-pooling branch of ASPP is broadcast to the size of the feature map it is
  concatenated with; the reference tiles it to a fixed 48x72 (a 768x1152 input only).
- No `rank`, no printing, no process group: batch norm layers are plain `nn.BatchNorm2d`;
  `climseg.batchnorm.convert_batchnorm` swaps them for group batch norm when a run asks.
- Only output stride 16 exists: the reference's deconvolution decoder is built for it
  (two stride-2 deconvolutions from 1/16 to the 1/4 low-level features).

Input (N, C, H, W) with H and W divisible by 16, in any memory format; output logits
(N, num_classes, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

# Total downsampling of the encoder; inputs must be divisible by it.
OUTPUT_STRIDE = 16

# Channel widths of the aligned Xception backbone and of the head (reference values).
_STEM_CHANNELS = (32, 64)
_ENTRY_CHANNELS = (128, 256, 728)
_MIDDLE_BLOCKS = 16
_EXIT_CHANNELS = (1024, 1536, 1536, 2048)
_ASPP_RATES = (1, 6, 12, 18)
_ASPP_CHANNELS = 256
_LOW_LEVEL_CHANNELS = 48


def scaled(channels: int, width: float) -> int:
    """A reference channel count at ``width`` (a multiplier), never below 4; at 1.0 exactly
    the reference's."""
    return max(4, round(channels * width))


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 convolution followed by a pointwise 1x1 one, both without bias.

    Padding equals the dilation, which keeps the spatial size at stride 1 and halves it
    (rounding up) at stride 2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=dilation,
                                   dilation=dilation, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)


class XceptionBlock(nn.Module):
    """Residual block of `reps` separable convolutions (each with batch norm, ReLU between).

    `grow_first` decides whether the first or the last convolution changes the width. A
    trailing separable convolution without batch norm downsamples (`stride=2`) or, in the
    last block of a flow (`extra_conv`), keeps the size. The shortcut is a strided 1x1
    convolution with batch norm whenever width or size change, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1,
                 dilation: int = 1, grow_first: bool = True, extra_conv: bool = False,
                 relu_out: bool = True):
        super().__init__()
        widths = [in_channels] + [out_channels if grow_first else in_channels] * (reps - 1)
        widths.append(out_channels)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            layers += [SeparableConv2d(cin, cout, dilation=dilation), nn.BatchNorm2d(cout)]
        if stride != 1:
            layers.append(SeparableConv2d(out_channels, out_channels, stride=stride))
        elif extra_conv:
            layers.append(SeparableConv2d(out_channels, out_channels))
        self.body = nn.Sequential(*layers)

        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x) + self.shortcut(x)
        return torch.relu(out) if self.relu_out else out


class AlignedXception(nn.Module):
    """Modified aligned Xception at output stride 16.

    Returns the 1/16 features (2048 channels) and the rectified 1/4 features of the first
    entry block (128 channels) that the decoder fuses.
    """

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c1, c2 = (scaled(c, width) for c in _STEM_CHANNELS)
        e1, e2, e3 = (scaled(c, width) for c in _ENTRY_CHANNELS)
        x1, x2, x3, x4 = (scaled(c, width) for c in _EXIT_CHANNELS)
        self.out_channels, self.low_level_channels = x4, e1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1, bias=False), *_bn_relu(c1),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), *_bn_relu(c2))
        self.entry1 = XceptionBlock(c2, e1, reps=2, stride=2, relu_out=False)
        self.entry2 = XceptionBlock(e1, e2, reps=2, stride=2)
        self.entry3 = XceptionBlock(e2, e3, reps=2, stride=2)
        self.middle = nn.Sequential(*(XceptionBlock(e3, e3, reps=3) for _ in range(_MIDDLE_BLOCKS)))
        self.exit_block = XceptionBlock(e3, x1, reps=2, grow_first=False, extra_conv=True,
                                        relu_out=False)
        self.exit_convs = nn.Sequential(
            SeparableConv2d(x1, x2, dilation=2), *_bn_relu(x2),
            SeparableConv2d(x2, x3, dilation=2), *_bn_relu(x3),
            SeparableConv2d(x3, x4, dilation=2), *_bn_relu(x4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        # The reference rectifies the entry-1 output in place, so the decoder sees it
        # rectified as well.
        low_level = torch.relu(self.entry1(x))
        x = self.entry3(self.entry2(low_level))
        x = self.exit_convs(self.exit_block(self.middle(x)))
        return x, low_level


class ChannelAffine(nn.Module):
    """Learned per-channel scale and shift (the reference's batch-norm-free pooling branch)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv -> affine -> ReLU, broadcast back to the input size.

    A batch of one image has a single value per channel after pooling, so batch norm would be
    degenerate here; the reference uses a learned affine instead.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.affine = ChannelAffine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        y = torch.relu(self.affine(self.conv(pooled)))
        # Materialized in the layout of `x`, which the other ASPP branches' outputs follow:
        # torch.cat keeps channels_last only when all its inputs have it, and a broadcast view
        # counts as contiguous, so the concatenation (and everything after it: projection and
        # decoder) fell back to NCHW.
        return y.expand(-1, -1, x.shape[2], x.shape[3]).contiguous(
            memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when `x` is stored so (and not also plain contiguous, as 1x1 maps are)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, 3x3 branches at the other rates, image
    pooling; concatenated and projected back to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...] = _ASPP_RATES):
        super().__init__()
        branches = []
        for rate in rates:
            if rate == 1:
                conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            else:
                conv = nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate,
                                 bias=False)
            branches.append(nn.Sequential(conv, *_bn_relu(out_channels)))
        self.branches = nn.ModuleList(branches)
        self.pooling = ImagePooling(in_channels, out_channels)
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * (len(rates) + 1), out_channels, 1, bias=False),
            *_bn_relu(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [branch(x) for branch in self.branches]
        features.append(self.pooling(x))
        return self.project(torch.cat(features, dim=1))


def _upsample2x(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    # kernel 3, stride 2, padding 1, output padding 1: exactly doubles height and width.
    return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1,
                              output_padding=1, bias=False)


class DeconvDecoder(nn.Module):
    """The reference's decoder: deconvolve 1/16 -> 1/4, fuse the low-level features, refine,
    deconvolve 1/4 -> 1/2 -> 1/1. The final deconvolution has no bias and no batch norm."""

    def __init__(self, channels: int, low_level_channels: int, num_classes: int):
        super().__init__()
        self.up_to_quarter = nn.Sequential(
            _upsample2x(channels, channels), *_bn_relu(channels),
            _upsample2x(channels, channels), *_bn_relu(channels))
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + low_level_channels, channels, 3, padding=1, bias=False),
            *_bn_relu(channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), *_bn_relu(channels),
            nn.Conv2d(channels, channels, 1))
        self.up_to_half = nn.Sequential(_upsample2x(channels, channels), *_bn_relu(channels))
        self.classifier = _upsample2x(channels, num_classes)

    def forward(self, x: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.up_to_quarter(x), low_level), dim=1)
        return self.classifier(self.up_to_half(self.fuse(x)))


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ (aligned Xception, output stride 16, deconvolution decoder).

    ``width`` multiplies every channel count but the input's and the classes' (1.0: the
    reference). Narrower models keep the architecture, depth and output stride; the test suite
    trains them, so that a step and a checkpoint cost a fraction of the reference's."""

    def __init__(self, in_channels: int = 16, num_classes: int = 3, width: float = 1.0):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.backbone = AlignedXception(in_channels, width)
        aspp, low = scaled(_ASPP_CHANNELS, width), scaled(_LOW_LEVEL_CHANNELS, width)
        self.aspp = ASPP(self.backbone.out_channels, aspp)
        self.low_level = nn.Sequential(
            nn.Conv2d(self.backbone.low_level_channels, low, 1, bias=False), *_bn_relu(low))
        self.decoder = DeconvDecoder(aspp, low, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference: He-normal for the backbone and ASPP branch convolutions, the rest
        # (projection, pooling branch, decoder) keeps PyTorch's default initialization.
        for module in (self.backbone, self.aspp.branches):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % OUTPUT_STRIDE or x.shape[-1] % OUTPUT_STRIDE:
            raise ValueError(f"DeepLabV3Plus: input height and width must be divisible by "
                             f"{OUTPUT_STRIDE}, got {tuple(x.shape[-2:])}")
        features, low_level = self.backbone(x)
        return self.decoder(self.aspp(features), self.low_level(low_level))


MODELS = {
    "deeplabv3plus": DeepLabV3Plus,
}


def build_model(name: str = "deeplabv3plus", in_channels: int = 16, num_classes: int = 3,
                width: float = 1.0, **kwargs) -> nn.Module:
    """Build a segmentation model from the `model` config section.

    Raises ValueError naming the config key for an unknown name, a bad channel count or an
    option the model does not take.
    """
    if name not in MODELS:
        raise ValueError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key}: must be a positive integer, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"model.num_classes: need at least 2 classes, got {num_classes}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise ValueError(f"model.width: must be a number in (0, 4], got {width!r}")
    for key in kwargs:
        raise ValueError(f"model.{key}: unknown option for model {name!r}")
    options = {"width": float(width)} if width != 1 else {}  # other models may not take it
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, **options)
