"""X3D (Feichtenhofer 2020, "X3D: Expanding Architectures for Efficient Video Recognition") as
PyTorchVideo's ``pytorchvideo.models.x3d.create_x3d`` builds it for its hub's ``x3d_xs``,
``x3d_s``, ``x3d_m`` and ``x3d_l``: the same module tree, state_dict keys, shapes and
initialisation (a seed gives PyTorchVideo's weights), so its Kinetics-400 checkpoints load.

The residual stages reuse the ResNets' ``ResStage``, ``ResBlock`` and ``BottleneckBlock``
(``c3dzoo.models.resnet3d``): X3D's bottleneck is conv_a 1×1×1 → BN → ReLU → conv_b, a depthwise
3×3×3 conv → ``norm_b`` (PyTorchVideo's ``Sequential(BN, squeeze-excitation)``, the SE only in
every other block, an ``nn.Identity`` in the others) → Swish → conv_c 1×1×1 → BN. X3D's own parts
are here: the stem (a 1×3×3 conv and a depthwise 5×1×1 conv, PyTorchVideo's ``Conv2plus1d`` —
whose attribute names are swapped: ``conv.conv_t`` is the spatial conv, ``conv.conv_xy`` the
temporal one — then BN and ReLU), fvcore's ``SqueezeExcitation``, ``Swish`` and the head's
``ProjectedPool`` (1×1×1 conv → BN → ReLU → average pool → 1×1×1 conv to 2048 → ReLU).

The stock forward (``fused=False``) calls the modules as PyTorchVideo does. ``Swish`` is an
``nn.SiLU`` (PyTorchVideo computes x·sigmoid(x) through its own autograd function; ``F.silu``
differs from it by fp32 rounding, not bit for bit), so the fused forward takes the chains that
end in it: the stem's two convs (the first without BN or activation), every conv_a → BN → ReLU,
conv_b → BN → Swish where the block has no SE, conv_b → BN (then the stock SE and Swish) where it
has one, conv_c → BN → + shortcut → ReLU (the sum and ReLU in conv_c's chain), every projection
shortcut (stage 1's without a BN), and the head's pre_conv → BN → ReLU and post_conv → ReLU.
The SE's convs (on 1×1×1 means), the pools, dropout, proj and softmax run stock.

PyTorchVideo's head ends in a ``Softmax`` over classes (create_x3d's ``head_activation``
default), so its hub models output probabilities. Here, as every zoo model, X3D outputs logits
(what cross-entropy training, ``predict`` and ``evaluate`` take; the softmax has no parameters, so
the state_dicts are the same): ``softmax=True`` builds PyTorchVideo's head, softmax included.

One extension, as for the ResNets: the head's average pool (frames × ⌈crop / 32⌉², stride 1)
covers all of a dimension its window does not fit, so clips smaller than the ones each was built
for run; where the window fits, the result is PyTorchVideo's.
"""

import math
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn

from ._common import AvgPool3dWithin, ChainSequential, FusableModel, check_video_input, published_weights, run_blocks
from .resnet3d import BottleneckBlock, Conv2plus1d, ResBlock, ResNetBasicHead, ResStage, _init_weights

Tensor = torch.Tensor

# create_x3d's fixed choices
STAGE_DEPTHS = (1, 2, 5, 3)  # before the depth factor
STEM_DIM_IN = 12
BOTTLENECK_FACTOR = 2.25
SE_RATIO = 0.0625
HEAD_DIM_OUT = 2048
SPATIAL_STRIDE = 32  # the stem's 2 and each stage's 2


def round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """PyTorchVideo's ``round_width``: ``width × multiplier`` to a multiple of ``divisor`` (at
    least ``min_width``, and no less than 90 % of it)."""
    if not multiplier:
        return int(width)
    width *= multiplier
    out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


def round_repeats(repeats: int, multiplier: float) -> int:
    """PyTorchVideo's ``round_repeats``: ⌈multiplier × repeats⌉ blocks."""
    return int(math.ceil(multiplier * repeats)) if multiplier else repeats


class Swish(nn.SiLU):
    """x · sigmoid(x): PyTorchVideo's ``Swish``, as an ``nn.SiLU`` (no forward of its own, so a
    chain ending in it fuses as "silu"). No state: keys are as PyTorchVideo's."""

    def __init__(self):
        super().__init__()


class SqueezeExcitation(nn.Module):
    """fvcore's ``SqueezeExcitation`` (``fvcore.nn.squeeze_excitation``; module names and forward
    as there, so PyTorchVideo's keys ``norm_b.1.block.0.weight`` …): the input times
    ``block(mean over positions)``, ``block`` = conv (``num_channels`` → ``num_channels_reduced``,
    with bias) → ``activation`` (ReLU) → conv back (with bias) → Sigmoid."""

    block: nn.Module
    is_3d: bool

    def __init__(self, num_channels: int, num_channels_reduced: Optional[int] = None,
                 reduction_ratio: float = 2.0, is_3d: bool = False, activation: Optional[nn.Module] = None):
        super().__init__()
        if num_channels_reduced is None:
            num_channels_reduced = int(num_channels // reduction_ratio)
        if activation is None:
            activation = nn.ReLU()
        conv = nn.Conv3d if is_3d else nn.Conv2d
        conv1 = conv(num_channels, num_channels_reduced, kernel_size=1, bias=True)
        conv2 = conv(num_channels_reduced, num_channels, kernel_size=1, bias=True)
        self.is_3d = is_3d
        self.block = nn.Sequential(conv1, activation, conv2, nn.Sigmoid())

    def forward(self, input_tensor: Tensor) -> Tensor:
        mean = input_tensor.mean(dim=[2, 3, 4] if self.is_3d else [2, 3], keepdim=True)
        return torch.mul(input_tensor, self.block(mean))


class X3DStem(ChainSequential):
    """``conv`` (a ``Conv2plus1d``: 1×3×3 stride 1×2×2 from 3 channels, then a depthwise 5×1×1) →
    ``norm`` → ``activation`` (ReLU); printed as PyTorchVideo's ``ResNetBasicStem``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Tuple[int, int, int] = (5, 3, 3),
                 stride: Tuple[int, int, int] = (1, 2, 2)):
        padding = tuple(k // 2 for k in kernel)
        spatial = nn.Conv3d(in_channels, out_channels, (1, kernel[1], kernel[2]), stride=(1, stride[1], stride[2]),
                            padding=(0, padding[1], padding[2]), bias=False)
        temporal = nn.Conv3d(out_channels, out_channels, (kernel[0], 1, 1), stride=(stride[0], 1, 1),
                             padding=(padding[0], 0, 0), bias=False, groups=out_channels)
        # create_x3d_stem passes its spatial conv as conv_t and its temporal one as conv_xy
        super().__init__(OrderedDict(conv=Conv2plus1d(spatial, temporal), norm=nn.BatchNorm3d(out_channels),
                                     activation=nn.ReLU()))

    def _get_name(self) -> str:
        return "ResNetBasicStem"


class ProjectedPool(ChainSequential):
    """X3D's head pool: ``pre_conv`` (1×1×1, no bias) → ``pre_norm`` → ``pre_act`` (ReLU) →
    ``pool`` (average, stride 1) → ``post_conv`` (1×1×1 to ``dim_out``, no bias, no BN) →
    ``post_act`` (ReLU), PyTorchVideo's ``ProjectedPool`` with its ``post_norm`` left out."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, pool_kernel: Tuple[int, int, int]):
        super().__init__(OrderedDict(
            pre_conv=nn.Conv3d(dim_in, dim_inner, 1, bias=False),
            pre_norm=nn.BatchNorm3d(dim_inner),
            pre_act=nn.ReLU(),
            pool=AvgPool3dWithin(pool_kernel, stride=1),
            post_conv=nn.Conv3d(dim_inner, dim_out, 1, bias=False),
            post_act=nn.ReLU(),
        ))


def x3d_norm_b(se_channels: int):
    """``BottleneckBlock``'s ``norm_b`` for X3D: channels → ``Sequential(BN, SE)``, the SE
    squeezing to ``se_channels`` (0: an ``nn.Identity`` in its place)."""
    def build(channels: int) -> nn.Module:
        se = (SqueezeExcitation(channels, se_channels, is_3d=True) if se_channels > 0 else nn.Identity())
        return nn.Sequential(nn.BatchNorm3d(channels), se)
    return build


def x3d_res_block(dim_in: int, dim_inner: int, dim_out: int, stride: Tuple[int, int, int],
                  se_channels: int) -> ResBlock:
    """PyTorchVideo's ``create_x3d_res_block``: a projection shortcut where the shape changes
    (its BN only where the channels do), the X3D bottleneck (depthwise 3×3×3 conv_b with
    ``stride``; an SE of ``se_channels``, 0 for none), a ReLU after the sum. Built in its order."""
    changes = dim_in != dim_out
    shortcut = nn.Conv3d(dim_in, dim_out, 1, stride=stride, bias=False) if changes or stride != (1, 1, 1) else None
    norm = nn.BatchNorm3d(dim_out) if changes else None
    branch = BottleneckBlock(dim_in, dim_inner, dim_out, (1, 1, 1), stride, (3, 3, 3), dim_inner,
                             norm_b=x3d_norm_b(se_channels), act_b=Swish)
    return ResBlock.of(shortcut, norm, branch, nn.ReLU())


class X3D(FusableModel):
    """``blocks``: the stem, four stages of X3D blocks (``⌈depth_factor × (1, 2, 5, 3)⌉`` of them;
    24, 48, 96, 192 channels at ``width_factor`` 2, each stage halving the space, none the time)
    and the head (``ProjectedPool`` to 2048 channels, dropout, ``proj``, with ``softmax`` a softmax,
    the mean over positions). ``clip_length`` and ``crop_size`` set the head's pool window (clip_length ×
    ⌈crop_size / 32⌉²), as ``create_x3d``'s ``input_clip_length`` and ``input_crop_size`` do."""

    def __init__(self, *, clip_length: int = 13, crop_size: int = 160, depth_factor: float = 2.2,
                 width_factor: float = 2.0, num_classes: int = 400, dropout: float = 0.5, softmax: bool = False,
                 fused: bool = False, backend: Optional[str] = None):
        super().__init__(fused, backend)
        if clip_length < 1 or crop_size < SPATIAL_STRIDE:
            raise ValueError(f"X3D's head pool needs clip_length >= 1 and crop_size >= {SPATIAL_STRIDE}, got "
                             f"{clip_length} and {crop_size}")
        dim_in = round_width(STEM_DIM_IN, width_factor)
        blocks: list = [X3DStem(3, dim_in)]
        stage_dims = [STEM_DIM_IN]
        for _ in range(3):
            stage_dims.append(round_width(stage_dims[-1], 2.0))
        for repeats, stage_dim in zip(STAGE_DEPTHS, stage_dims):
            dim_out = round_width(stage_dim, width_factor)
            dim_inner = int(BOTTLENECK_FACTOR * dim_out)
            se_channels = round_width(dim_inner, SE_RATIO)
            # the first block strides space by 2; every other block, from the first, has an SE
            blocks.append(ResStage([x3d_res_block(dim_in if b == 0 else dim_out, dim_inner, dim_out,
                                                  (1, 2, 2) if b == 0 else (1, 1, 1), se_channels if b % 2 == 0 else 0)
                                    for b in range(round_repeats(repeats, depth_factor))]))
            dim_in = dim_out
        side = math.ceil(crop_size / SPATIAL_STRIDE)
        blocks.append(ResNetBasicHead(HEAD_DIM_OUT, num_classes, None, dropout,
                                      pool=ProjectedPool(dim_in, dim_inner, HEAD_DIM_OUT, (clip_length, side, side)),
                                      activation=nn.Softmax(dim=1) if softmax else None))
        self.blocks = nn.ModuleList(blocks)
        _init_weights(self)

    def min_input(self) -> Tuple[int, int, int]:
        """The smallest clip (frames, height, width) it takes."""
        return (1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_video_input(x, self.blocks[0], self.min_input(), type(self).__name__)
        return run_blocks(self, x)


# The builders: the hub's ``x3d_xs`` … ``x3d_l`` (pytorchvideo/models/hub/x3d.py) pass
# input_clip_length and input_crop_size (its training crop: XS, S 160; M 224; L 312), and L a
# depth factor of 5; everything else is create_x3d's default (its softmax with ``softmax=True``).


@published_weights
def x3d_xs(num_classes: int = 400, *, dropout: float = 0.5, softmax: bool = False, fused: bool = False,
           backend: Optional[str] = None) -> X3D:
    """X3D-XS (PyTorchVideo ``x3d_xs``; 3.79 M parameters): 3, 5, 11, 7 blocks; head pool 4×5×5
    (4 frames of 160 × 160). Trained on 4 frames, one in 12."""
    return X3D(clip_length=4, crop_size=160, num_classes=num_classes, dropout=dropout, softmax=softmax,
               fused=fused, backend=backend)


@published_weights
def x3d_s(num_classes: int = 400, *, dropout: float = 0.5, softmax: bool = False, fused: bool = False,
          backend: Optional[str] = None) -> X3D:
    """X3D-S (PyTorchVideo ``x3d_s``; 3.79 M parameters): X3D-XS's blocks; head pool 13×5×5
    (13 frames of 160 × 160). Trained on 13 frames, one in 6."""
    return X3D(clip_length=13, crop_size=160, num_classes=num_classes, dropout=dropout, softmax=softmax,
               fused=fused, backend=backend)


@published_weights
def x3d_m(num_classes: int = 400, *, dropout: float = 0.5, softmax: bool = False, fused: bool = False,
          backend: Optional[str] = None) -> X3D:
    """X3D-M (PyTorchVideo ``x3d_m``; 3.79 M parameters): X3D-XS's blocks; head pool 16×7×7
    (16 frames of 224 × 224). Trained on 16 frames, one in 5."""
    return X3D(clip_length=16, crop_size=224, num_classes=num_classes, dropout=dropout, softmax=softmax,
               fused=fused, backend=backend)


@published_weights
def x3d_l(num_classes: int = 400, *, dropout: float = 0.5, softmax: bool = False, fused: bool = False,
          backend: Optional[str] = None) -> X3D:
    """X3D-L (PyTorchVideo ``x3d_l``; 6.15 M parameters): depth factor 5, 5, 10, 25, 15 blocks;
    head pool 16×10×10 (16 frames of 312 × 312). Trained on 16 frames, one in 5."""
    return X3D(clip_length=16, crop_size=312, depth_factor=5.0, num_classes=num_classes, dropout=dropout,
               softmax=softmax, fused=fused, backend=backend)
