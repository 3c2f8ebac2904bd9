"""Video ResNets (Tran et al., "A Closer Look at Spatiotemporal Convolutions", 2018): R3D-18, MC3-18
and R(2+1)D-18, with the module tree and state_dict of ``torchvision.models.video``.

The stock forward (``fused=False``) calls the modules exactly as torchvision does, so checkpoints
and outputs carry over. The fused forward reads the same modules but runs every
Conv3d → BatchNorm3d (→ ReLU) chain through ``FusableModel.chain``; the residual add and the
block's final ReLU join conv2's last chain (in inference, the conv kernel's epilogue) unless a
hook must see conv2's own output.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn import runs_hooks
from ._common import (Chain, ChainSequential, FusableModel, add_residual_chained, call_chained, check_video_input,
                      published_weights)

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# conv builders: (in_planes, out_planes, midplanes, stride) → module, plus the stride its
# shortcut must use. Plain nn.Conv3d (not subclasses, as torchvision has) so that the fused op
# and c3dzoo.fuse, which accept exactly nn.Conv3d, take them.
# --------------------------------------------------------------------------------------------


class ConvBuilder:
    """How one kind of block convolution is built, and the stride of the matching 1×1×1 shortcut."""

    def __call__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1) -> nn.Module:
        raise NotImplementedError

    def downsample_stride(self, stride: int) -> Tuple[int, int, int]:
        return (stride, stride, stride)


class Conv3DSimple(ConvBuilder):
    """A full 3×3×3 convolution (R3D)."""

    def __call__(self, in_planes, out_planes, midplanes, stride=1):
        return nn.Conv3d(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=1, bias=False)


class Conv3DNoTemporal(ConvBuilder):
    """A 1×3×3 spatial-only convolution (the 2D layers of MC3); it never strides in time."""

    def __call__(self, in_planes, out_planes, midplanes, stride=1):
        return nn.Conv3d(in_planes, out_planes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                         padding=(0, 1, 1), bias=False)

    def downsample_stride(self, stride):
        return (1, stride, stride)


class Conv2Plus1D(ChainSequential):
    """A 3×3×3 convolution factored into a 1×3×3 spatial conv → BN → ReLU → 3×1×1 temporal conv
    through ``midplanes`` channels (R(2+1)D)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                      padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1),
                      padding=(1, 0, 0), bias=False),
        )


class _Conv2Plus1DBuilder(ConvBuilder):
    def __call__(self, in_planes, out_planes, midplanes, stride=1):
        return Conv2Plus1D(in_planes, out_planes, midplanes, stride)


# --------------------------------------------------------------------------------------------
# running a Sequential of convs, BNs and ReLUs as fused chains
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# stems, block, network
# --------------------------------------------------------------------------------------------


class BasicStem(ChainSequential):
    """Conv3d 3→64 (3×7×7, stride 1×2×2) → BN → ReLU (R3D, MC3)."""

    def __init__(self):
        super().__init__(
            nn.Conv3d(3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )


class R2Plus1dStem(ChainSequential):
    """The factored stem of R(2+1)D: Conv3d 3→45 (1×7×7, stride 1×2×2) → BN → ReLU →
    Conv3d 45→64 (3×1×1) → BN → ReLU."""

    def __init__(self):
        super().__init__(
            nn.Conv3d(3, 45, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(45),
            nn.ReLU(inplace=True),
            nn.Conv3d(45, 64, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(64),
            nn.ReLU(inplace=True),
        )


def _midplanes(inplanes: int, planes: int) -> int:
    """The (2+1)D middle width with about the parameters of a full 3×3×3 conv."""
    return (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)


class BasicBlock(nn.Module):
    """Two convolutions with BN, a shortcut (a strided 1×1×1 conv + BN when the shape changes),
    the residual add and a ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv_builder: ConvBuilder, stride: int = 1,
                 downsample: Optional[nn.Module] = None, own_midplanes: bool = False):
        # torchvision derives one midplanes from inplanes and uses it for both convs (it only
        # matters for Conv2Plus1D); keep that, or the shapes would not match its checkpoints.
        # Caffe2's R(2+1)D (VMZ, whose IG-65M weights r2plus1d_34 loads) derives each conv's own
        # (own_midplanes): conv2's from planes → planes
        midplanes = _midplanes(inplanes, planes)
        super().__init__()
        self.conv1 = ChainSequential(
            conv_builder(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True)
        )
        conv2_midplanes = _midplanes(planes, planes) if own_midplanes else midplanes
        self.conv2 = ChainSequential(conv_builder(planes, planes, conv2_midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    takes_chain = True  # see call_chained

    def forward(self, x: Tensor, chain: Optional[Chain] = None) -> Tensor:
        """The block; with ``chain`` its conv chains run through it (see ``call_chained``), and
        where no hook could tell the order, the shortcut first, so that the sum and the ReLU join
        conv2's last chain (``add_residual_chained``)."""
        if chain is not None and not runs_hooks(*self.modules()):
            residual = x if self.downsample is None else call_chained(self.downsample, x, chain)
            return add_residual_chained(self.conv2, call_chained(self.conv1, x, chain), residual, self.relu, chain)
        residual = x
        out = call_chained(self.conv2, call_chained(self.conv1, x, chain), chain)
        if self.downsample is not None:
            residual = call_chained(self.downsample, x, chain)
        out += residual
        return self.relu(out)


class VideoResNet(FusableModel):
    """ResNet-18-style video network: ``stem``, ``layer1``…``layer4`` of BasicBlocks (64, 128,
    256, 512 channels; layers 2–4 stride 2), global average pool and ``fc``.

    ``conv_makers`` gives the block convolution of each of the four layers, ``layers`` the blocks
    of each. ``own_midplanes`` and ``bn_eps`` (1e-3) build Caffe2's variant (see BasicBlock).
    """

    def __init__(self, stem: Callable[[], nn.Module], conv_makers: Sequence[ConvBuilder],
                 layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 400, *,
                 fused: bool = False, backend: Optional[str] = None, own_midplanes: bool = False,
                 bn_eps: float = 1e-5):
        super().__init__(fused, backend)
        self.own_midplanes = own_midplanes
        self.inplanes = 64
        self.stem = stem()
        self.layer1 = self._make_layer(conv_makers[0], 64, layers[0], stride=1)
        self.layer2 = self._make_layer(conv_makers[1], 128, layers[1], stride=2)
        self.layer3 = self._make_layer(conv_makers[2], 256, layers[2], stride=2)
        self.layer4 = self._make_layer(conv_makers[3], 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        # torchvision's initialisation, in the same module order, so a seed gives its weights
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)
            if isinstance(m, nn.BatchNorm3d):
                m.eps = bn_eps

    def _make_layer(self, conv_builder: ConvBuilder, planes: int, blocks: int, stride: int) -> ChainSequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = ChainSequential(
                nn.Conv3d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1,
                          stride=conv_builder.downsample_stride(stride), bias=False),
                nn.BatchNorm3d(planes * BasicBlock.expansion),
            )
        own = self.own_midplanes
        layers = [BasicBlock(self.inplanes, planes, conv_builder, stride, downsample, own_midplanes=own)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, conv_builder, own_midplanes=own) for _ in range(1, blocks)]
        return ChainSequential(*layers)

    def _check_input(self, x: Tensor) -> None:
        check_video_input(x, self.stem, (1, 1, 1), type(self).__name__)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        # every part is called through nn.Module.__call__ (its hooks run) fused or not
        chain = self.chain if self.fused else None
        for part in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = call_chained(part, x, chain)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)


@published_weights
def r3d_18(num_classes: int = 400, *, fused: bool = False, backend: Optional[str] = None) -> VideoResNet:
    """R3D-18: 3×3×3 convolutions throughout (torchvision ``r3d_18``; 33.4 M parameters)."""
    simple = Conv3DSimple()
    return VideoResNet(BasicStem, [simple] * 4, num_classes=num_classes, fused=fused, backend=backend)


@published_weights
def mc3_18(num_classes: int = 400, *, fused: bool = False, backend: Optional[str] = None) -> VideoResNet:
    """MC3-18: 3×3×3 convolutions in layer1, 1×3×3 in layers 2–4 (torchvision ``mc3_18``; 11.7 M parameters)."""
    no_temporal = Conv3DNoTemporal()
    return VideoResNet(BasicStem, [Conv3DSimple()] + [no_temporal] * 3, num_classes=num_classes,
                       fused=fused, backend=backend)


@published_weights
def r2plus1d_18(num_classes: int = 400, *, fused: bool = False, backend: Optional[str] = None) -> VideoResNet:
    """R(2+1)D-18: every 3×3×3 convolution factored into 1×3×3 and 3×1×1 (torchvision
    ``r2plus1d_18``; 31.5 M parameters)."""
    return VideoResNet(R2Plus1dStem, [_Conv2Plus1DBuilder()] * 4, num_classes=num_classes,
                       fused=fused, backend=backend)


@published_weights
def r2plus1d_34(num_classes: int = 400, *, fused: bool = False, backend: Optional[str] = None) -> VideoResNet:
    """R(2+1)D-34 as Caffe2's VMZ built it (3, 4, 6, 3 blocks; each conv's own (2+1)D width; BatchNorm
    eps 1e-3; 63.7 M parameters): the layout of the IG-65M weights (Ghadiyaram et al., 2019, as
    converted by moabitcoin/ig65m-pytorch), ``weights="ig65m"`` / ``"ig65m_kinetics"``."""
    return VideoResNet(R2Plus1dStem, [_Conv2Plus1DBuilder()] * 4, (3, 4, 6, 3), num_classes=num_classes,
                       fused=fused, backend=backend, own_midplanes=True, bn_eps=1e-3)
