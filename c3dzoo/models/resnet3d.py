"""ResNet video networks of PyTorchVideo's model zoo: Slow (the slow pathway of SlowFast,
Feichtenhofer et al. 2019), I3D (inflated ResNet-50, Carreira and Zisserman 2017) and C2D, with
the module tree and state_dict of ``pytorchvideo.models.resnet.create_resnet`` (``slow_r50``,
``i3d_r50``, ``c2d_r50`` on its hub); R(2+1)D R50 (``create_r2plus1d``, ``r2plus1d_r50``), whose
bottlenecks' middle convs are (2+1)D; CSN R101 (channel-separated, Tran et al. 2019:
``pytorchvideo.models.csn.create_csn``, ``csn_r101``), whose bottlenecks' middle convs are
depthwise 3×3×3; and SlowFast R50 and R101 (``create_slowfast``, ``slowfast_r50``, ``slowfast_r101``,
``slowfast_16x8_r101_50_50``),
built of the same stems and stages.

The stock forward (``fused=False``) calls the modules as PyTorchVideo does, so checkpoints and
outputs carry over. The fused forward runs every Conv3d → BatchNorm3d (→ ReLU) chain through
``FusableModel.chain``: the stem with its MaxPool3d in the epilogue, each bottleneck's three
convs (the first two may leave their BatchNorm to the next conv's input prologue in training)
and each shortcut; the residual add and the block's ReLU join conv_c's chain (in inference, the
conv kernel's epilogue) unless a hook must see the branch's own output; the head stays stock. CSN's
depthwise conv_b chains go through it alike (the fused op reads the groups from the weight's
shape); a chain it does not take (``c3dzoo.nn``'s ``unsupported_reason``) runs stock inside the
fused forward, its input BatchNorm applied first.

One extension, as for S3D: the head's average pool (8×7×7 or 4×7×7, stride 1) covers all of a
dimension its window does not fit, so clips smaller than the 8×224×224 these were trained on run;
where the window fits, the result is PyTorchVideo's.
"""

from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import nn

from ._common import (AvgPool3dWithin, Chain, ChainSequential, FusableModel, add_residual_chained, call_chained,
                      check_video_input, published_weights, run_blocks)

Tensor = torch.Tensor
Kernel = Tuple[int, int, int]
Stride = Union[int, Sequence[int]]  # an int strides height and width only; else (time, height, width)

# blocks per stage for each depth (PyTorchVideo's _MODEL_STAGE_DEPTH)
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _half(kernel: Sequence[int]) -> Tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


def _stride3(stride: Stride) -> Tuple[int, int, int]:
    """A block's stride as (time, height, width): an int ``s`` is (1, s, s)."""
    if isinstance(stride, int):
        return (1, stride, stride)
    t, h, w = (int(s) for s in stride)
    return (t, h, w)


class ResNetBasicStem(ChainSequential):
    """Conv3d (T×7×7, stride 1×2×2, no bias) → BN → ReLU → MaxPool3d 1×3×3 stride 1×2×2 (none
    with ``pool=False``: R(2+1)D's stem, whose first stage strides space instead)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Kernel, pool: bool = True):
        parts = OrderedDict(
            conv=nn.Conv3d(in_channels, out_channels, kernel, stride=(1, 2, 2), padding=_half(kernel), bias=False),
            norm=nn.BatchNorm3d(out_channels),
            activation=nn.ReLU(),
        )
        if pool:
            parts["pool"] = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        super().__init__(parts)


class Conv2plus1d(ChainSequential):
    """PyTorchVideo's ``Conv2plus1d``: ``conv_t`` → [``norm`` → ``activation``] → ``conv_xy``,
    registered in that order (its keys: ``conv_b.conv_t.weight``, ``conv_b.norm.weight``, …). A
    ChainSequential, so a fused model runs conv_t → norm → ReLU as one chain and conv_xy → the
    BatchNorm after this module as another (``run_chained`` looks through it)."""

    def __init__(self, conv_t: nn.Module, conv_xy: nn.Module, norm: Optional[nn.Module] = None,
                 activation: Optional[nn.Module] = None):
        parts = OrderedDict(conv_t=conv_t)
        if norm is not None:
            parts["norm"] = norm
        if activation is not None:
            parts["activation"] = activation
        parts["conv_xy"] = conv_xy
        super().__init__(parts)


def conv_2plus1d(channels: int, kernel: Kernel, stride: Tuple[int, int, int]) -> Conv2plus1d:
    """PyTorchVideo's ``create_conv_2plus1d`` as R(2+1)D's bottlenecks build it: a kT×1×1 conv
    striding time → BN → ReLU → a 1×kH×kW conv striding space, ``channels`` throughout, no bias."""
    t, h, w = kernel
    conv_t = nn.Conv3d(channels, channels, (t, 1, 1), stride=(stride[0], 1, 1), padding=(t // 2, 0, 0), bias=False)
    norm = nn.BatchNorm3d(channels)
    activation = nn.ReLU()
    conv_xy = nn.Conv3d(channels, channels, (1, h, w), stride=(1, stride[1], stride[2]), padding=(0, h // 2, w // 2),
                        bias=False)
    return Conv2plus1d(conv_t, conv_xy, norm, activation)


class BottleneckBlock(ChainSequential):
    """conv_a (``kernel_a``: T×1×1 or 1×1×1) → BN → ReLU → conv_b (``kernel_b``, 1×3×3 unless
    given; ``stride``; ``groups_b`` groups: CSN's is depthwise) → ``norm_b`` → ``act_b`` → conv_c
    (1×1×1, to ``dim_out``) → BN, whose γ starts at zero.

    ``norm_b`` (called with conv_b's channels) and ``act_b`` build those two modules: a BN and a
    ReLU unless given (X3D's: a Sequential of a BN and a squeeze-excitation, and a Swish). They
    are built between conv_b and conv_c, as PyTorchVideo builds them, so a seed draws the same
    numbers. ``separable_b``: conv_b is R(2+1)D's ``Conv2plus1d`` of ``kernel_b`` instead (see
    ``conv_2plus1d``; one group)."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kernel_a: Kernel, stride: Stride,
                 kernel_b: Kernel = (1, 3, 3), groups_b: int = 1, *,
                 norm_b: Callable[[int], nn.Module] = nn.BatchNorm3d, act_b: Callable[[], nn.Module] = nn.ReLU,
                 separable_b: bool = False):
        if separable_b and groups_b != 1:
            raise ValueError(f"a (2+1)D conv_b has one group, got groups_b={groups_b}")
        conv_a = nn.Conv3d(dim_in, dim_inner, kernel_a, padding=_half(kernel_a), bias=False)
        norm_a, act_a = nn.BatchNorm3d(dim_inner), nn.ReLU()
        conv_b = (conv_2plus1d(dim_inner, kernel_b, _stride3(stride)) if separable_b else
                  nn.Conv3d(dim_inner, dim_inner, kernel_b, stride=_stride3(stride), padding=_half(kernel_b),
                            groups=groups_b, bias=False))
        super().__init__(OrderedDict(
            conv_a=conv_a,
            norm_a=norm_a,
            act_a=act_a,
            conv_b=conv_b,
            norm_b=norm_b(dim_inner),
            act_b=act_b(),
            conv_c=nn.Conv3d(dim_inner, dim_out, 1, bias=False),
            norm_c=nn.BatchNorm3d(dim_out),
        ))
        self.norm_c.block_final_bn = True  # what PyTorchVideo's initialisation looks for


class ResBlock(nn.Module):
    """``branch2`` (a bottleneck) added to the input, or to ``branch1_conv`` → ``branch1_norm``
    (a 1×1×1 projection with conv_b's stride) where the shape changes; then a ReLU.
    ``ResBlock.of`` makes one of given parts (X3D's: a projection without its BN where only the
    stride changes)."""

    takes_chain = True  # see call_chained

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, kernel_a: Kernel, stride: Stride,
                 kernel_b: Kernel = (1, 3, 3), groups_b: int = 1, separable_b: bool = False):
        super().__init__()
        stride = _stride3(stride)
        projects = dim_in != dim_out or stride != (1, 1, 1)
        # registration order (and so state_dict and modules() order) as PyTorchVideo's
        self.branch1_conv = nn.Conv3d(dim_in, dim_out, 1, stride=stride, bias=False) if projects else None
        self.branch1_norm = nn.BatchNorm3d(dim_out) if projects else None
        self.branch2 = BottleneckBlock(dim_in, dim_inner, dim_out, kernel_a, stride, kernel_b, groups_b,
                                       separable_b=separable_b)
        self.activation = nn.ReLU()

    @classmethod
    def of(cls, branch1_conv: Optional[nn.Module], branch1_norm: Optional[nn.Module], branch2: nn.Module,
           activation: nn.Module) -> "ResBlock":
        """A block of these parts (as PyTorchVideo's ``ResBlock(branch1_conv=..., ...)``); the
        shortcut's norm may be None where its conv is not."""
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.branch1_conv, block.branch1_norm, block.branch2, block.activation = (branch1_conv, branch1_norm,
                                                                                 branch2, activation)
        return block

    def forward(self, x: Tensor, chain: Optional[Chain] = None) -> Tensor:
        """The block; with ``chain`` its conv chains run through it (see ``call_chained``)."""
        shortcut = x
        if self.branch1_conv is not None:  # first, as PyTorchVideo (hooks see the same order)
            if chain is not None:
                shortcut = chain(x, self.branch1_conv, self.branch1_norm, "none")
            else:
                shortcut = self.branch1_conv(x)
                if self.branch1_norm is not None:
                    shortcut = self.branch1_norm(shortcut)
        if chain is None:
            return self.activation(shortcut + self.branch2(x))
        # the sum and the ReLU join conv_c's chain where no hook needs the branch's own output
        return add_residual_chained(self.branch2, x, shortcut, self.activation, chain)


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
    """Average pool (stride 1; none without ``pool_kernel``), dropout, ``proj`` (a Linear over
    channels at each position), ``activation`` (where given: X3D's softmax) and the mean over the
    remaining positions. ``pool``: a module to pool with instead (X3D's ``ProjectedPool``, whose
    conv chains run through the model's chain)."""

    takes_chain = True  # see call_chained

    def __init__(self, in_features: int, num_classes: int, pool_kernel: Optional[Kernel], dropout: float, *,
                 pool: Optional[nn.Module] = None, activation: Optional[nn.Module] = None):
        super().__init__()
        if pool is None and pool_kernel is not None:
            pool = AvgPool3dWithin(pool_kernel, stride=(1, 1, 1))
        self.pool = pool
        # PyTorchVideo leaves the dropout out at rate 0, and so does this (state_dict and repr alike)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.proj = nn.Linear(in_features, num_classes)
        self.activation = activation  # None: a plain attribute, as PyTorchVideo's (no module, no repr line)
        self.output_pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: Tensor, chain: Optional[Chain] = None) -> Tensor:
        if self.pool is not None:
            x = call_chained(self.pool, x, chain)
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.proj(x.permute((0, 2, 3, 4, 1))).permute((0, 4, 1, 2, 3))
        if self.activation is not None:
            x = self.activation(x)
        x = self.output_pool(x)
        return x.view(x.shape[0], -1)


def _init_weights(model: nn.Module) -> None:
    """PyTorchVideo's initialisation (init_net_weights), in the same module order, so a seed gives
    its weights: He-normal convs (fan out) with zero bias (X3D's squeeze-excitation convs have
    one), BN γ 1 (0 for a block's last), β 0, the Linear N(0, 0.01²) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.constant_(m.weight, 0.0 if getattr(m, "block_final_bn", False) else 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _stage(count: int, dim_in: int, dim_inner: int, dim_out: int, kernels: Sequence[Kernel], stride: Stride,
           kernel_b: Kernel = (1, 3, 3), width_per_group: Optional[int] = None,
           separable_b: bool = False) -> ResStage:
    """``count`` blocks; the first strides (``stride``: an int in space only) and projects, the
    rest keep the shape; block ``b``'s first conv has ``kernels[b % len(kernels)]`` (PyTorchVideo
    repeats the list). conv_b: ``kernel_b``, in groups of ``width_per_group`` channels (None: one
    group; 1: depthwise, as CSN's), or with ``separable_b`` R(2+1)D's (2+1)D conv of that kernel."""
    groups = 1 if width_per_group is None else dim_inner // width_per_group
    return ResStage([ResBlock(dim_in if b == 0 else dim_out, dim_inner, dim_out, tuple(kernels[b % len(kernels)]),
                              stride if b == 0 else 1, tuple(kernel_b), groups, separable_b)
                     for b in range(count)])


class ResNet3D(FusableModel):
    """``blocks``: the stem, four stages of bottleneck blocks (256, 512, 1024, 2048 channels;
    stages 2–4 halve the space, and with ``stage_strides`` CSN's the time too), where asked a
    temporal max-pool after stage 1, and the head.

    ``stem_kernel``: the stem conv's (T×7×7). ``conv_a_kernels``: per stage, the first bottleneck
    conv's kernel for each block in turn (repeated to the stage's depth). ``conv_b_kernel``: every
    bottleneck's middle conv's (1×3×3; CSN's 3×3×3), in groups of ``conv_b_width_per_group``
    channels (None: one group; 1: depthwise, CSN's). ``stage_strides``: per stage, its first
    conv_b's (and projection's) stride, an int in space only or (time, height, width).
    ``stage1_pool``: a 2×1×1 max-pool after stage 1 (I3D, C2D). ``head_pool``: the head's
    average-pool window. R(2+1)D's choices: ``stem_pool=False`` (no max-pool after the stem),
    ``separable_b`` (every conv_b a ``Conv2plus1d`` of ``conv_b_kernel``) and ``softmax`` (a
    softmax over classes ending the head, as ``create_r2plus1d``'s; logits without it).
    """

    def __init__(self, stem_kernel: Kernel, conv_a_kernels: Sequence[Sequence[Kernel]], *, depth: int = 50,
                 conv_b_kernel: Kernel = (1, 3, 3), conv_b_width_per_group: Optional[int] = None,
                 separable_b: bool = False, stage_strides: Sequence[Stride] = (1, 2, 2, 2), stem_pool: bool = True,
                 stage1_pool: bool = False, head_pool: Kernel = (4, 7, 7), num_classes: int = 400,
                 dropout: float = 0.5, softmax: bool = False, fused: bool = False, backend: Optional[str] = None):
        super().__init__(fused, backend)
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
        self.stage1_pool = bool(stage1_pool)
        blocks: list = [ResNetBasicStem(3, 64, stem_kernel, pool=stem_pool)]
        dim_in, dim_out = 64, 256
        for index, (count, kernels, stride) in enumerate(zip(STAGE_DEPTHS[depth], conv_a_kernels, stage_strides)):
            blocks.append(_stage(count, dim_in, dim_out // 4, dim_out, kernels, stride, conv_b_kernel,
                                 conv_b_width_per_group, separable_b))
            if index == 0 and stage1_pool:
                blocks.append(nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0)))
            dim_in, dim_out = dim_out, dim_out * 2
        blocks.append(ResNetBasicHead(dim_in, num_classes, head_pool, dropout,
                                      activation=nn.Softmax(dim=1) if softmax else None))
        self.blocks = nn.ModuleList(blocks)
        _init_weights(self)

    def min_input(self) -> Tuple[int, int, int]:
        """The smallest clip (frames, height, width) it takes: 2 frames for the temporal pool."""
        return (2, 1, 1) if self.stage1_pool else (1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_video_input(x, self.blocks[0], self.min_input(), type(self).__name__)
        return run_blocks(self, x)


_STAGES = 4


# --------------------------------------------------------------------------------------------
# SlowFast: a slow pathway (few frames, wide) and a fast one (alpha times the frames, 1/8 the
# width), the fast one's features fused into the slow one after the stem and stages 1-3
# --------------------------------------------------------------------------------------------


class FuseFastToSlow(nn.Module):
    """``conv_fast_to_slow`` (T×1×1, stride alpha in time: the fast pathway's frames down to the
    slow one's) → ``norm`` → ``activation``, concatenated after the slow pathway's channels."""

    takes_chain = True  # see call_chained

    def __init__(self, fast_channels: int, channel_ratio: int, kernel: Kernel, alpha: int):
        super().__init__()
        self.conv_fast_to_slow = nn.Conv3d(fast_channels, fast_channels * channel_ratio, kernel,
                                           stride=(alpha, 1, 1), padding=_half(kernel), bias=False)
        self.norm = nn.BatchNorm3d(fast_channels * channel_ratio)
        self.activation = nn.ReLU()

    def forward(self, x: List[Tensor], chain: Optional[Chain] = None) -> List[Tensor]:
        slow, fast = x[0], x[1]
        if chain is None:
            fuse = self.activation(self.norm(self.conv_fast_to_slow(fast)))
        else:
            fuse = chain(fast, self.conv_fast_to_slow, self.norm, "relu", activation_module=self.activation)
        return [torch.cat([slow, fuse], 1), fast]


class MultiPathWayWithFuse(nn.Module):
    """Each pathway through its own block (``multipathway_blocks``: a stem or a stage each), then
    ``multipathway_fusion`` (``FuseFastToSlow``, or ``nn.Identity`` after the last stage)."""

    takes_chain = True  # see call_chained

    def __init__(self, blocks: Sequence[nn.Module], fusion: nn.Module):
        super().__init__()
        self.multipathway_blocks = nn.ModuleList(blocks)
        self.multipathway_fusion = fusion

    def forward(self, x: List[Tensor], chain: Optional[Chain] = None) -> List[Tensor]:
        """The pathways' blocks and the fusion; with ``chain`` their conv chains run through it."""
        out = [call_chained(block, x[i], chain) for i, block in enumerate(self.multipathway_blocks)]
        return call_chained(self.multipathway_fusion, out, chain)


class PoolConcatPathway(nn.Module):
    """Each pathway average-pooled (``pool``: one per pathway), then concatenated on channels."""

    def __init__(self, kernels: Sequence[Kernel]):
        super().__init__()
        self.pool = nn.ModuleList([AvgPool3dWithin(k, stride=(1, 1, 1)) for k in kernels])

    def forward(self, x: List[Tensor]) -> Tensor:
        return torch.cat([pool(x[i]) for i, pool in enumerate(self.pool)], 1)


@torch.fx.wrap  # a call in traced graphs (c3dzoo.fuse): the frame indices depend on the clip's length
def slow_frames(clip: Tensor, alpha: int) -> Tensor:
    """The slow pathway's frames of a clip: ``frames // alpha`` of them, evenly spaced from the
    first to the last (PyTorchVideo's PackPathway)."""
    frames = clip.shape[2]
    index = torch.linspace(0, frames - 1, frames // alpha, device=clip.device).long()
    return clip.index_select(2, index)


class SlowFast(FusableModel):
    """SlowFast (Feichtenhofer et al., 2019) as PyTorchVideo's ``create_slowfast`` builds it:
    ``blocks`` = the two stems with a fusion, four stages of (slow, fast) bottleneck stages with a
    fusion after the first three, ``PoolConcatPathway`` and the head.

    The input is one clip (N × 3 × T × H × W, T a multiple of ``alpha``: the fast pathway's
    frames; the slow pathway takes T / alpha of them as PyTorchVideo's PackPathway does), or
    PyTorchVideo's ``[slow, fast]`` pair of clips.

    ``conv_a_kernels``: per pathway (slow, fast), per stage, the first bottleneck conv's kernel
    for each block in turn (repeated to the stage's depth); None: ``create_slowfast``'s default
    (slow 1×1×1, 1×1×1, 3×1×1, 3×1×1; fast 3×1×1 throughout). ``head_pools``: the head's
    average-pool window per pathway (8×7×7 and 32×7×7: 32-frame clips).
    """

    def __init__(self, *, depth: int = 50, num_classes: int = 400, dropout: float = 0.5, alpha: int = 4,
                 beta_inv: int = 8, fusion_channel_ratio: int = 2, fusion_kernel: Kernel = (7, 1, 1),
                 conv_a_kernels: Optional[Tuple[Sequence[Sequence[Kernel]], Sequence[Sequence[Kernel]]]] = None,
                 head_pools: Sequence[Kernel] = ((8, 7, 7), (32, 7, 7)), fused: bool = False,
                 backend: Optional[str] = None):
        super().__init__(fused, backend)
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(STAGE_DEPTHS)}, got {depth}")
        self.alpha = int(alpha)
        if conv_a_kernels is None:
            conv_a_kernels = ([[(1, 1, 1)], [(1, 1, 1)], [(3, 1, 1)], [(3, 1, 1)]], [[(3, 1, 1)]] * _STAGES)
        slow_kernels, fast_kernels = conv_a_kernels

        def fusion(fast_channels: int) -> nn.Module:
            return FuseFastToSlow(fast_channels, fusion_channel_ratio, fusion_kernel, self.alpha)

        blocks: list = [MultiPathWayWithFuse([ResNetBasicStem(3, 64, (1, 7, 7)),
                                              ResNetBasicStem(3, 64 // beta_inv, (5, 7, 7))],
                                             fusion(64 // beta_inv))]
        dim_in, dim_out = 64, 256
        for index, count in enumerate(STAGE_DEPTHS[depth]):
            stride = 1 if index == 0 else 2
            slow_in = dim_in + dim_in * fusion_channel_ratio // beta_inv
            stages = [_stage(count, slow_in, dim_out // 4, dim_out, slow_kernels[index], stride),
                      _stage(count, dim_in // beta_inv, dim_out // 4 // beta_inv, dim_out // beta_inv,
                             fast_kernels[index], stride)]
            last = index == _STAGES - 1
            blocks.append(MultiPathWayWithFuse(stages, nn.Identity() if last else fusion(dim_out // beta_inv)))
            dim_in, dim_out = dim_out, dim_out * 2
        blocks.append(PoolConcatPathway(head_pools))
        blocks.append(ResNetBasicHead(dim_in + dim_in // beta_inv, num_classes, None, dropout))
        self.blocks = nn.ModuleList(blocks)
        _init_weights(self)

    def _pathways(self, x) -> List[Tensor]:
        if isinstance(x, (list, tuple)):
            if len(x) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() == 5 for t in x):
                raise ValueError(f"SlowFast takes one clip (N, 3, frames, height, width) or a [slow, fast] pair of "
                                 f"them, got a {type(x).__name__} of {len(x)}")
            slow, fast = x
            check_video_input(fast, self.blocks[0].multipathway_blocks[1], (1, 1, 1), "SlowFast's fast pathway")
            check_video_input(slow, self.blocks[0].multipathway_blocks[0], (1, 1, 1), "SlowFast's slow pathway")
            if (slow.shape[0], *slow.shape[3:]) != (fast.shape[0], *fast.shape[3:]) or \
                    fast.shape[2] != slow.shape[2] * self.alpha:
                raise ValueError(f"SlowFast's [slow, fast] clips must share batch, height and width, the fast one "
                                 f"with {self.alpha} × the frames; got {tuple(slow.shape)} and {tuple(fast.shape)}")
            return [slow, fast]
        check_video_input(x, self.blocks[0].multipathway_blocks[1], (self.alpha, 1, 1), "SlowFast")
        if not isinstance(x, torch.fx.Proxy) and x.shape[2] % self.alpha:
            raise ValueError(f"SlowFast takes clips of a multiple of {self.alpha} frames (its slow pathway takes one "
                             f"in {self.alpha}), got {x.shape[2]}")
        return [slow_frames(x, self.alpha), x]

    def forward(self, x) -> Tensor:
        return run_blocks(self, self._pathways(x))


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


@published_weights
def csn_r101(num_classes: int = 400, *, dropout: float = 0.0, fused: bool = False,
             backend: Optional[str] = None) -> ResNet3D:
    """CSN R101 (PyTorchVideo ``csn_r101``, an ir-CSN: Tran et al. 2019; 22.2 M parameters):
    ResNet-101's 3, 4, 23, 3 bottlenecks whose middle convs are depthwise 3×3×3 (one channel a
    group), striding time and space by 2 in stages 2–4; a 3×7×7 stem; no dropout, as
    ``create_csn``. Trained on 32 frames (one in 2) of 224×224. The fused forward runs all 104
    Conv3d → BN (→ ReLU) chains through the fused op, the depthwise conv_b ones included (the
    Triton backend's depthwise kernels; the reference backend on a CPU)."""
    return ResNet3D((3, 7, 7), [[(1, 1, 1)]] * _STAGES, depth=101, conv_b_kernel=(3, 3, 3), conv_b_width_per_group=1,
                    stage_strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
                    head_pool=(4, 7, 7), num_classes=num_classes, dropout=dropout, fused=fused, backend=backend)


@published_weights
def r2plus1d_r50(num_classes: int = 400, *, dropout: float = 0.5, softmax: bool = False, fused: bool = False,
                 backend: Optional[str] = None) -> ResNet3D:
    """R(2+1)D R50 (PyTorchVideo ``r2plus1d_r50``, Tran et al. 2018; 28.1 M parameters): a 1×7×7
    stem without max-pool, ResNet-50's bottlenecks whose conv_b is a (2+1)D conv (3×1×1 → BN →
    ReLU → 1×3×3), every stage striding space by 2 and stages 3–4 time by 2 too, a 4×7×7 head
    pool. Trained on 16 frames (one in 4) of 224×224. PyTorchVideo's head ends in a softmax
    (``softmax=True`` builds it); logits by default, as every zoo model. The fused forward runs
    all 69 Conv3d → BN (→ ReLU) chains through the fused op: each (2+1)D conv is two."""
    return ResNet3D((1, 7, 7), [[(1, 1, 1)]] * _STAGES, conv_b_kernel=(3, 3, 3), separable_b=True,
                    stage_strides=((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)), stem_pool=False,
                    head_pool=(4, 7, 7), num_classes=num_classes, dropout=dropout, softmax=softmax, fused=fused,
                    backend=backend)


@published_weights
def slowfast_r50(num_classes: int = 400, *, dropout: float = 0.5, fused: bool = False,
                 backend: Optional[str] = None) -> SlowFast:
    """SlowFast R50 (PyTorchVideo ``slowfast_r50``; 34.6 M parameters): a slow pathway of
    ResNet-50 width on one frame in 4 and a fast one of 1/8 the width on every frame, fused by
    7×1×1 stride-4 convs. Trained on 32 frames (one in 2) of 224×224."""
    return SlowFast(num_classes=num_classes, dropout=dropout, fused=fused, backend=backend)


@published_weights
def slowfast_r101(num_classes: int = 400, *, dropout: float = 0.5, fused: bool = False,
                  backend: Optional[str] = None) -> SlowFast:
    """SlowFast R101 (PyTorchVideo ``slowfast_r101``; 62.8 M parameters): ``slowfast_r50``'s
    pathways with ResNet-101's 3, 4, 23, 3 blocks, fused by 5×1×1 stride-4 convs. Trained on 32
    frames (one in 2) of 224×224."""
    return SlowFast(depth=101, fusion_kernel=(5, 1, 1), num_classes=num_classes, dropout=dropout, fused=fused,
                    backend=backend)


@published_weights
def slowfast_16x8_r101_50_50(num_classes: int = 400, *, dropout: float = 0.5, fused: bool = False,
                             backend: Optional[str] = None) -> SlowFast:
    """SlowFast R101 50/50 16×8 (PyTorchVideo ``slowfast_16x8_r101_50_50``; 53.8 M parameters):
    ``slowfast_r101``'s pathways whose stage 3 has 3×1×1 first convs in only its first 6 of 23
    blocks (1×1×1 after), in both pathways, and head pools of 16×7×7 and 64×7×7. Trained on 64
    frames, one in 2 (the slow pathway 16 of them)."""
    stage3 = [(3, 1, 1)] * 6 + [(1, 1, 1)] * (STAGE_DEPTHS[101][2] - 6)
    kernels = ([[(1, 1, 1)], [(1, 1, 1)], stage3, [(3, 1, 1)]], [[(3, 1, 1)], [(3, 1, 1)], stage3, [(3, 1, 1)]])
    return SlowFast(depth=101, fusion_kernel=(5, 1, 1), conv_a_kernels=kernels, head_pools=((16, 7, 7), (64, 7, 7)),
                    num_classes=num_classes, dropout=dropout, fused=fused, backend=backend)
