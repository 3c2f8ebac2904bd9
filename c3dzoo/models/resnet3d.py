"""ResNet-50 video networks of PyTorchVideo's model zoo: Slow (the slow pathway of SlowFast,
Feichtenhofer et al. 2019), I3D (inflated ResNet-50, Carreira and Zisserman 2017) and C2D, with
the module tree and state_dict of ``pytorchvideo.models.resnet.create_resnet`` (``slow_r50``,
``i3d_r50``, ``c2d_r50`` on its hub).

The stock forward (``fused=False``) calls the modules as PyTorchVideo does, so checkpoints and
outputs carry over. The fused forward runs every Conv3d → BatchNorm3d (→ ReLU) chain through
``FusableModel.chain``: the stem with its MaxPool3d in the epilogue, each bottleneck's three
convs (the first two may leave their BatchNorm to the next conv's input prologue in training)
and each shortcut; the residual add, the block's ReLU and the head stay stock.

One extension, as for S3D: the head's average pool (8×7×7 or 4×7×7, stride 1) covers all of a
dimension its window does not fit, so clips smaller than the 8×224×224 these were trained on run;
where the window fits, the result is PyTorchVideo's.
"""

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ._common import (AvgPool3dWithin, Chain, ChainSequential, FusableModel, call_chained, check_video_input,
                      published_weights)

Tensor = torch.Tensor
Kernel = Tuple[int, int, int]

# blocks per stage for each depth (PyTorchVideo's _MODEL_STAGE_DEPTH)
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _half(kernel: Sequence[int]) -> Tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class ResNetBasicStem(ChainSequential):
    """Conv3d 3→64 (stride 1×2×2, no bias) → BN → ReLU → MaxPool3d 1×3×3 stride 1×2×2."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Kernel):
        super().__init__(OrderedDict(
            conv=nn.Conv3d(in_channels, out_channels, kernel, stride=(1, 2, 2), padding=_half(kernel), bias=False),
            norm=nn.BatchNorm3d(out_channels),
            activation=nn.ReLU(),
            pool=nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        ))


class BottleneckBlock(ChainSequential):
    """conv_a (``kernel_a``: T×1×1 or 1×1×1) → BN → ReLU → conv_b (1×3×3, ``stride`` in space)
    → BN → ReLU → conv_c (1×1×1, to ``dim_out``) → BN, whose γ starts at zero."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kernel_a: Kernel, stride: int):
        super().__init__(OrderedDict(
            conv_a=nn.Conv3d(dim_in, dim_inner, kernel_a, padding=_half(kernel_a), bias=False),
            norm_a=nn.BatchNorm3d(dim_inner),
            act_a=nn.ReLU(),
            conv_b=nn.Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                             bias=False),
            norm_b=nn.BatchNorm3d(dim_inner),
            act_b=nn.ReLU(),
            conv_c=nn.Conv3d(dim_inner, dim_out, 1, bias=False),
            norm_c=nn.BatchNorm3d(dim_out),
        ))
        self.norm_c.block_final_bn = True  # what PyTorchVideo's initialisation looks for


class ResBlock(nn.Module):
    """``branch2`` (a bottleneck) added to the input, or to ``branch1_conv`` → ``branch1_norm``
    (a strided 1×1×1 projection) where the shape changes; then a ReLU."""

    takes_chain = True  # see call_chained

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kernel_a: Kernel, stride: int):
        super().__init__()
        projects = dim_in != dim_out or stride != 1
        # registration order (and so state_dict and modules() order) as PyTorchVideo's
        self.branch1_conv = (nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride), bias=False)
                             if projects else None)
        self.branch1_norm = nn.BatchNorm3d(dim_out) if projects else None
        self.branch2 = BottleneckBlock(dim_in, dim_inner, dim_out, kernel_a, stride)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor, chain: Optional[Chain] = None) -> Tensor:
        """The block; with ``chain`` its conv chains run through it (see ``call_chained``)."""
        shortcut = x
        if self.branch1_conv is not None:  # first, as PyTorchVideo (hooks see the same order)
            shortcut = (self.branch1_norm(self.branch1_conv(x)) if chain is None
                        else chain(x, self.branch1_conv, self.branch1_norm, "none"))
        return self.activation(shortcut + call_chained(self.branch2, x, chain))


class ResStage(nn.Module):
    """``res_blocks``, one after another (the first may stride and project)."""

    takes_chain = True  # see call_chained

    def __init__(self, blocks: Sequence[ResBlock]):
        super().__init__()
        self.res_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, chain: Optional[Chain] = None) -> Tensor:
        """The stage; with ``chain`` its conv chains run through it (see ``call_chained``)."""
        for block in self.res_blocks:
            x = call_chained(block, x, chain)
        return x


class ResNetBasicHead(nn.Module):
    """Average pool (stride 1), dropout, ``proj`` (a Linear over channels at each position) and
    the mean over the remaining positions."""

    def __init__(self, in_features: int, num_classes: int, pool_kernel: Kernel, dropout: float):
        super().__init__()
        self.pool = AvgPool3dWithin(pool_kernel, stride=(1, 1, 1))
        # PyTorchVideo leaves the dropout out at rate 0, and so does this (state_dict and repr alike)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.proj = nn.Linear(in_features, num_classes)
        self.output_pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.proj(x.permute((0, 2, 3, 4, 1))).permute((0, 4, 1, 2, 3))
        x = self.output_pool(x)
        return x.view(x.shape[0], -1)


class ResNet3D(FusableModel):
    """``blocks``: the stem, four stages of bottleneck blocks (256, 512, 1024, 2048 channels;
    stages 2–4 halve the space), where asked a temporal max-pool after stage 1, and the head.

    ``stem_kernel``: the stem conv's (T×7×7). ``conv_a_kernels``: per stage, the first bottleneck
    conv's kernel for each block in turn (repeated to the stage's depth). ``stage1_pool``: a 2×1×1
    max-pool after stage 1 (I3D, C2D). ``head_pool``: the head's average-pool window.
    """

    def __init__(self, stem_kernel: Kernel, conv_a_kernels: Sequence[Sequence[Kernel]], *, depth: int = 50,
                 stage1_pool: bool = False, head_pool: Kernel = (4, 7, 7), num_classes: int = 400,
                 dropout: float = 0.5, fused: bool = False, backend: Optional[str] = None):
        super().__init__(fused, backend)
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
        self.stage1_pool = bool(stage1_pool)
        blocks: list = [ResNetBasicStem(3, 64, stem_kernel)]
        dim_in, dim_out = 64, 256
        for index, (count, kernels) in enumerate(zip(STAGE_DEPTHS[depth], conv_a_kernels)):
            stride = 1 if index == 0 else 2
            stage = [ResBlock(dim_in if b == 0 else dim_out, dim_out // 4, dim_out, tuple(kernels[b % len(kernels)]),
                              stride if b == 0 else 1) for b in range(count)]
            blocks.append(ResStage(stage))
            if index == 0 and stage1_pool:
                blocks.append(nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0)))
            dim_in, dim_out = dim_out, dim_out * 2
        blocks.append(ResNetBasicHead(dim_in, num_classes, head_pool, dropout))
        self.blocks = nn.ModuleList(blocks)
        # PyTorchVideo's initialisation (init_net_weights), in the same module order, so a seed
        # gives its weights: He-normal convs (fan out), BN γ 1 (0 for a block's last), β 0, the
        # Linear N(0, 0.01²) with zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 0.0 if getattr(m, "block_final_bn", False) else 1.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def min_input(self) -> Tuple[int, int, int]:
        """The smallest clip (frames, height, width) it takes: 2 frames for the temporal pool."""
        return (2, 1, 1) if self.stage1_pool else (1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_video_input(x, self.blocks[0], self.min_input(), type(self).__name__)
        chain = self.chain if self.fused else None
        for block in self.blocks:  # each through nn.Module.__call__ (its hooks run), fused or not
            x = call_chained(block, x, chain)
        return x


_STAGES = 4


@published_weights
def slow_r50(num_classes: int = 400, *, dropout: float = 0.5, fused: bool = False,
             backend: Optional[str] = None) -> ResNet3D:
    """Slow R50 (PyTorchVideo ``slow_r50``; 32.5 M parameters): a 1×7×7 stem, 3×1×1 first convs in
    stages 3–4, no temporal striding. Trained on 8 frames (one in 8) of 224×224."""
    kernels = [[(1, 1, 1)], [(1, 1, 1)], [(3, 1, 1)], [(3, 1, 1)]]
    return ResNet3D((1, 7, 7), kernels, head_pool=(8, 7, 7), num_classes=num_classes, dropout=dropout,
                    fused=fused, backend=backend)


@published_weights
def i3d_r50(num_classes: int = 400, *, dropout: float = 0.5, fused: bool = False,
            backend: Optional[str] = None) -> ResNet3D:
    """I3D R50 (PyTorchVideo ``i3d_r50``; 28.0 M parameters): a 5×7×7 stem, 3×1×1 first convs in
    every other block, a 2×1×1 max-pool after stage 1. Trained on 8 frames (one in 8) of 224×224."""
    kernels = [[(3, 1, 1)], [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)], [(1, 1, 1), (3, 1, 1)]]
    return ResNet3D((5, 7, 7), kernels, stage1_pool=True, num_classes=num_classes, dropout=dropout,
                    fused=fused, backend=backend)


@published_weights
def c2d_r50(num_classes: int = 400, *, dropout: float = 0.5, fused: bool = False,
            backend: Optional[str] = None) -> ResNet3D:
    """C2D R50 (PyTorchVideo ``c2d_r50``; 24.3 M parameters): a ResNet-50 of 2D (1×k×k) convs
    with a 2×1×1 max-pool after stage 1, its only temporal operation before the head."""
    kernels = [[(1, 1, 1)]] * _STAGES
    return ResNet3D((1, 7, 7), kernels, stage1_pool=True, num_classes=num_classes, dropout=dropout,
                    fused=fused, backend=backend)
