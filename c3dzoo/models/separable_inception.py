"""S3D (Xie et al., "Rethinking Spatiotemporal Feature Learning", 2018): separable 1×k×k then
k×1×1 convolutions and Inception blocks, with the module tree and state_dict of
``torchvision.models.video.s3d`` (8.3 M parameters).

The stock forward (``fused=False``) calls the modules as torchvision does, so checkpoints and
outputs carry over. The fused forward runs all 77 Conv3d → BatchNorm3d → ReLU chains through
``FusableModel.chain``, the stem's MaxPool3d in its second chain's epilogue; the Inception
branches' concatenation and the pools that start a branch stay stock.

One extension: torchvision's average pool (2×7×7, stride 1) fails on features smaller than its
window (inputs under 13 frames of 209×209). Here a window that does not fit a dimension covers
all of it, so 16×112×112 clips (the zoo's usual size) work; where the window fits, the result is
torchvision's, bit for bit.
"""

from typing import Optional

import torch
from torch import nn

from ._common import (AvgPool3dWithin, Chain, ChainSequential, FusableModel, call_chained, check_video_input,
                      published_weights)

Tensor = torch.Tensor

# the smallest input the features take: 5 frames leave 2 for the last (2,2,2) max-pool, and 17
# pixels leave 2 after the strided conv and three (3,3,3)-stride-2 pools (each halves, rounding up)
MIN_INPUT = (5, 17, 17)


def _batch_norm(channels: int) -> nn.BatchNorm3d:
    # torchvision's S3D normalises with these (TensorFlow's defaults)
    return nn.BatchNorm3d(channels, eps=1e-3, momentum=1e-3)


class Conv3dNormActivation(ChainSequential):
    """Conv3d (no bias) → BatchNorm3d → ReLU (``torchvision.ops.misc.Conv3dNormActivation`` as
    S3D builds it)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size=1, stride=1, padding=0):
        super().__init__(
            nn.Conv3d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=False),
            _batch_norm(out_planes),
            nn.ReLU(inplace=True),
        )


class TemporalSeparableConv(ChainSequential):
    """A k×k×k convolution factored into 1×k×k and k×1×1, each with BatchNorm and ReLU."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int, padding: int):
        super().__init__(
            Conv3dNormActivation(in_planes, out_planes, (1, kernel_size, kernel_size), (1, stride, stride),
                                 (0, padding, padding)),
            Conv3dNormActivation(out_planes, out_planes, (kernel_size, 1, 1), (stride, 1, 1), (padding, 0, 0)),
        )


class SepInceptionBlock3D(nn.Module):
    """Four branches concatenated on channels: 1×1×1; 1×1×1 → separable 3×3×3 (twice, different
    widths); 3×3×3 max-pool → 1×1×1."""

    takes_chain = True  # see call_chained

    def __init__(self, in_planes: int, b0_out: int, b1_mid: int, b1_out: int, b2_mid: int, b2_out: int,
                 b3_out: int):
        super().__init__()
        self.branch0 = Conv3dNormActivation(in_planes, b0_out)
        self.branch1 = ChainSequential(Conv3dNormActivation(in_planes, b1_mid),
                                       TemporalSeparableConv(b1_mid, b1_out, 3, 1, 1))
        self.branch2 = ChainSequential(Conv3dNormActivation(in_planes, b2_mid),
                                       TemporalSeparableConv(b2_mid, b2_out, 3, 1, 1))
        self.branch3 = ChainSequential(nn.MaxPool3d(kernel_size=(3, 3, 3), stride=1, padding=1),
                                       Conv3dNormActivation(in_planes, b3_out))

    def forward(self, x: Tensor, chain: Optional[Chain] = None) -> Tensor:
        """The block; with ``chain`` its conv chains run through it (see ``call_chained``)."""
        branches = (self.branch0, self.branch1, self.branch2, self.branch3)
        return torch.cat([call_chained(branch, x, chain) for branch in branches], 1)


class S3D(FusableModel):
    """``features`` (a separable stem, max-pools and nine Inception blocks, to 1024 channels), a
    2×7×7 average pool, ``classifier`` (dropout and a 1×1×1 conv) and the mean over the remaining
    positions."""

    def __init__(self, num_classes: int = 400, dropout: float = 0.2, *, fused: bool = False,
                 backend: Optional[str] = None):
        super().__init__(fused, backend)
        self.features = ChainSequential(
            TemporalSeparableConv(3, 64, 7, 2, 3),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            Conv3dNormActivation(64, 64),
            TemporalSeparableConv(64, 192, 3, 1, 1),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            SepInceptionBlock3D(192, 64, 96, 128, 16, 32, 32),
            SepInceptionBlock3D(256, 128, 128, 192, 32, 96, 64),
            nn.MaxPool3d(kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1)),
            SepInceptionBlock3D(480, 192, 96, 208, 16, 48, 64),
            SepInceptionBlock3D(512, 160, 112, 224, 24, 64, 64),
            SepInceptionBlock3D(512, 128, 128, 256, 24, 64, 64),
            SepInceptionBlock3D(512, 112, 144, 288, 32, 64, 64),
            SepInceptionBlock3D(528, 256, 160, 320, 32, 128, 128),
            nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=(0, 0, 0)),
            SepInceptionBlock3D(832, 256, 160, 320, 32, 128, 128),
            SepInceptionBlock3D(832, 384, 192, 384, 48, 128, 128),
        )
        self.avgpool = AvgPool3dWithin(kernel_size=(2, 7, 7), stride=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Conv3d(1024, num_classes, kernel_size=1, stride=1, bias=True),
        )
        # torchvision keeps PyTorch's default initialisation; the same module order gives a seed
        # its weights

    def _check_input(self, x: Tensor) -> None:
        check_video_input(x, self.features, MIN_INPUT, "S3D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = call_chained(self.features, x, self.chain if self.fused else None)
        x = self.avgpool(x)
        x = self.classifier(x)
        return torch.mean(x, dim=(2, 3, 4))


@published_weights
def s3d(num_classes: int = 400, *, dropout: float = 0.2, fused: bool = False,
        backend: Optional[str] = None) -> S3D:
    """S3D (torchvision ``s3d``; 8.3 M parameters). Trained on 224×224 crops; any input of at
    least ``MIN_INPUT`` runs."""
    return S3D(num_classes, dropout, fused=fused, backend=backend)
