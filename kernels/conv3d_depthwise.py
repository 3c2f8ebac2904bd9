"""Depthwise Conv3d (groups = C_in = C_out) over channels-last activations, with the fused op's
epilogues: its forward (inference: bias + residual + activation; training: the raw output and
per-tile batch statistics), its input gradient and its weight gradient.

A depthwise conv reduces over no channels: each output channel reads its own input channel through
the kd·kh·kw taps (CSN's and X3D's 3×3×3 conv_b). There is no GEMM to give tensor cores, and the layer
is bound by memory traffic, so this is a direct convolution: a program takes BLOCK_P output
positions × BLOCK_C channels (channels are contiguous in NDHWC, so each row of a load is one
coalesced segment), walks the taps and accumulates x·w in fp32 registers. Neighbouring positions
share most of their taps' inputs, which L1/L2 serve.

The packed weight is fp32 ``[taps, C]`` (``pack_depthwise_weight``): BatchNorm folds into it in fp32
and it is not rounded to the activations' dtype (it is small, and the fold stays exact).

Input gradient (``TRANSPOSED``): input position i receives from the outputs o with
o·s − p + k·d = i, i.e. it gathers dy[(i + p − k·d) / s] · w[k] wherever that is a whole, in-range
position: any stride, no flipped weight, no scatter.

Weight gradient: dW[k, c] = Σ_o dy[o, c] · x[o·s − p + k·d, c], a reduction over every position. The
grid is (position splits × channel blocks, taps); each program reduces its share of the positions
into an fp32 partial ``[splits, taps, C]``, which the launcher sums in a fixed order: no atomics, so
the result repeats bit for bit.

Indices: positions are int32 (the launchers check), element offsets int64.

Tile configurations: a fixed per-shape rule (``select_config``); with autotuning on
(``c3dzoo.set_triton_autotune``, see ``_autotune``) the first GPU launch of each shape times every
shipped config (``HOPPER_CONFIGS``, each compiled for sm_90 in the CPU tests) and keeps the fastest.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _autotune
from ._grid import _hashable, cached_plan, cdiv, next_power_of_2
from ._implicit_gemm import (apply_activation, channel_tile, input_norm_coefficients, normalize_activate,
                             split_position, tile_statistics)
from ._limits import INT32_LIMIT, IndexOverflowError
from ._statistics import finalize_statistics
from .conv3d_bias_act_pool import checked_input_stats


@triton.jit
def _source(o, k, stride, pad, dil, size, TRANSPOSED: tl.constexpr):
    """(source coordinate, valid) along one dimension of tap ``k`` for coordinates ``o`` of the
    grid being computed: the forward reads input o·s − p + k·d; the transposed conv (the input
    gradient) reads output (o + p − k·d) / s where that divides exactly."""
    if TRANSPOSED:
        t = o + pad - k * dil
        src = t // stride
        valid = (t >= 0) & (src * stride == t) & (src < size)
    else:
        src = o * stride - pad + k * dil
        valid = (src >= 0) & (src < size)
    return src, valid


@triton.jit
def depthwise_tile(
    x_ptr, w_ptr, offs_p, p_mask, offs_c, c_mask,
    src_d, src_h, src_w, channels, grid_d, grid_h, grid_w,
    stride_d, stride_h, stride_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    in_stats_ptr, in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TRANSPOSED: tl.constexpr,
    INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 ``[BLOCK_P, BLOCK_C]``: positions ``offs_p`` of a grid_d × grid_h × grid_w grid per
    sample, channels ``offs_c``, of the depthwise conv of the NDHWC source (src_d × src_h × src_w
    per sample) with the fp32 ``[taps, C]`` weight. ``INPUT_NORM``: the source is a raw conv output
    whose deferred BatchNorm + activation is applied on load (as ``conv_tile``'s prologue)."""
    n, od, oh, ow = split_position(offs_p, grid_d, grid_h, grid_w)
    sample_row = n.to(tl.int64) * src_d
    c_ok = c_mask[None, :]
    if INPUT_NORM:
        mean, scale, beta = input_norm_coefficients(in_stats_ptr, offs_c, c_mask, channels, in_eps)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kd in range(KD):
        sd, ok_d = _source(od, kd, stride_d, pad_d, dil_d, src_d, TRANSPOSED)
        for kh in range(KH):
            sh, ok_h = _source(oh, kh, stride_h, pad_h, dil_h, src_h, TRANSPOSED)
            for kw in range(KW):
                sw, ok_w = _source(ow, kw, stride_w, pad_w, dil_w, src_w, TRANSPOSED)
                inside = (p_mask & ok_d & ok_h & ok_w)[:, None] & c_ok
                row = ((sample_row + sd) * src_h + sh) * src_w + sw
                a = tl.load(x_ptr + row[:, None] * channels + offs_c[None, :], mask=inside, other=0.0)
                if INPUT_NORM:
                    a = normalize_activate(a, mean[None, :], scale[None, :], beta[None, :], INPUT_ACTIVATION, in_slope)
                    a = tl.where(inside, a, 0.0)  # the padding reads zeros of the normalised tensor
                w = tl.load(w_ptr + ((kd * KH + kh) * KW + kw) * channels + offs_c, mask=c_mask, other=0.0)
                acc += a.to(tl.float32) * w[None, :]
    return acc


@triton.jit
def conv3d_depthwise_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, part_mean_ptr, part_m2_ptr, in_stats_ptr,
    src_d, src_h, src_w, channels,
    out_d, out_h, out_w, out_positions,
    pad_d, pad_h, pad_w,
    dil_d, dil_h, dil_w,
    negative_slope, in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    # constexpr: the input gradient divides by the stride (a shift for 2, nothing for 1; a division
    # by a runtime value made triton 3.6's 16-bit variants spill)
    STRIDE_D: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr,
    TRANSPOSED: tl.constexpr, INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p, offs_p, offs_c, p_mask, c_mask = channel_tile(tl.program_id(0), out_positions, channels, BLOCK_P, BLOCK_C)
    acc = depthwise_tile(
        x_ptr, w_ptr, offs_p, p_mask, offs_c, c_mask, src_d, src_h, src_w, channels, out_d, out_h, out_w,
        STRIDE_D, STRIDE_H, STRIDE_W, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w, in_stats_ptr, in_eps, in_slope,
        KD, KH, KW, TRANSPOSED, INPUT_NORM, INPUT_ACTIVATION, BLOCK_P, BLOCK_C,
    )
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
    offsets = offs_p.to(tl.int64)[:, None] * channels + offs_c[None, :]
    mask = p_mask[:, None] & c_mask[None, :]
    if HAS_RESIDUAL:
        acc = acc + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = apply_activation(acc, ACTIVATION, negative_slope).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, y, mask=mask)
    if STATS:  # the training forward: per-tile (mean, M2) of the stored values, as conv3d_bn_stats
        count = tl.minimum(out_positions - pid_p * BLOCK_P, BLOCK_P).to(tl.float32)
        tile_mean, tile_m2 = tile_statistics(y, mask, count)
        tl.store(part_mean_ptr + pid_p * channels + offs_c, tile_mean, mask=c_mask)
        tl.store(part_m2_ptr + pid_p * channels + offs_c, tile_m2, mask=c_mask)


@triton.jit
def conv3d_depthwise_wgrad_kernel(
    x_ptr, dy_ptr, part_ptr,
    in_d, in_h, in_w, channels,
    out_d, out_h, out_w, out_positions, tiles_per_split,
    stride_d, stride_h, stride_w,
    pad_d, pad_h, pad_w,
    dil_d, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c_blocks = tl.cdiv(channels, BLOCK_C)
    split = tl.program_id(0) // c_blocks
    offs_c = (tl.program_id(0) - split * c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    tap = tl.program_id(1)
    kd = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t in range(tiles_per_split):
        offs_p = (split * tiles_per_split + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < out_positions
        n, od, oh, ow = split_position(offs_p, out_d, out_h, out_w)
        sd, ok_d = _source(od, kd, stride_d, pad_d, dil_d, in_d, False)
        sh, ok_h = _source(oh, kh, stride_h, pad_h, dil_h, in_h, False)
        sw, ok_w = _source(ow, kw, stride_w, pad_w, dil_w, in_w, False)
        row = ((n.to(tl.int64) * in_d + sd) * in_h + sh) * in_w + sw
        inside = (p_mask & ok_d & ok_h & ok_w)[:, None] & c_mask[None, :]
        xv = tl.load(x_ptr + row[:, None] * channels + offs_c[None, :], mask=inside, other=0.0)
        dy = tl.load(dy_ptr + offs_p.to(tl.int64)[:, None] * channels + offs_c[None, :],
                     mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        acc += xv.to(tl.float32) * dy.to(tl.float32)
    taps = tl.num_programs(1)
    tl.store(part_ptr + (split * taps + tap) * channels + offs_c, tl.sum(acc, axis=0), mask=c_mask)


# --------------------------------------------------------------------------------------------
# tile configurations and launch plans
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DepthwiseConfig:
    """BLOCK_P positions × BLOCK_C channels per program. No tensor cores and no pipelined K loop:
    the registers hold the fp32 accumulator and one loaded tile."""

    block_p: int
    block_c: int
    num_warps: int

    @property
    def name(self) -> str:
        return f"depthwise_{self.block_p}x{self.block_c}_w{self.num_warps}"


# Hopper: 64 channels of 16-bit activations are a 128-byte row segment (one full cache line per row
# of a load); fewer channels take taller tiles, so that a program still covers 4K elements. 8 warps:
# every element of a load carries a 64-bit address, and on 4 warps the fp32 variants spilled. Both
# are compiled for sm_90 in every dtype and launch kind in tests/test_triton_sm90.py (shared memory,
# no spills, no MMA).
DEPTHWISE_64x64 = DepthwiseConfig(64, 64, num_warps=8)
DEPTHWISE_128x32 = DepthwiseConfig(128, 32, num_warps=8)
HOPPER_CONFIGS: Tuple[DepthwiseConfig, ...] = (DEPTHWISE_64x64, DEPTHWISE_128x32)
# the weight gradient's programs loop over their share of the positions: at most this many splits
# of the positions per (channel block, tap), so its fp32 partials stay small
WGRAD_MAX_SPLITS = 64


def select_config(positions: int, channels: int, device: torch.device) -> DepthwiseConfig:
    """A fixed per-shape choice on CUDA; few big tiles under the interpreter (which pays per program
    and per loop step, not per element)."""
    if device.type != "cuda":
        block_c = max(16, min(64, next_power_of_2(channels)))
        return DepthwiseConfig(max(16, min(128, next_power_of_2(positions))), block_c, num_warps=4)
    return DEPTHWISE_64x64 if channels > 32 else DEPTHWISE_128x32


def _tuned(kernel: str, src: torch.Tensor, plan: "DepthwisePlan", make_plan: Callable[[DepthwiseConfig], "DepthwisePlan"],
           launch: Callable[["DepthwisePlan"], None], settings: dict) -> "DepthwisePlan":
    """``plan`` (the rule's), or with autotuning on, the plan of the fastest shipped config for this
    launch (``_autotune.pick``: timed once per shape on a GPU, never under the interpreter).
    ``launch(plan)`` runs a candidate on the real arguments into buffers of its own where their
    shape depends on the config (the statistics' and weight gradient's partials)."""
    if not _autotune.enabled():
        return plan
    candidates = (plan.config, *(c for c in HOPPER_CONFIGS if c != plan.config))
    key = (tuple(src.shape), src.dtype, src.device.index, tuple((k, _hashable(v)) for k, v in settings.items()))
    best = _autotune.pick(kernel, key, plan.config, candidates, lambda c: launch(make_plan(c)), src.device,
                          name=lambda c: c.name)
    return plan if best == plan.config else make_plan(best)


@dataclasses.dataclass(frozen=True)
class DepthwisePlan:
    """A launch besides its tensors (shared by the launchers and the sm_90 tests)."""

    config: DepthwiseConfig
    grid: Tuple[int, ...]
    out_shape: Tuple[int, int, int, int, int]
    scalars: dict  # the kernel's non-constexpr scalar arguments, in order
    constexprs: dict


def _triple(v) -> Tuple[int, int, int]:
    return tuple(int(i) for i in v)  # type: ignore[return-value]


def _check_index_range(*positions: int) -> None:
    if max(positions) >= INT32_LIMIT:
        raise IndexOverflowError(f"the depthwise kernels index positions in int32: {max(positions)} positions")


def _geometry_scalars(stride, padding, dilation, with_stride=True) -> dict:
    names = ("stride_d", "stride_h", "stride_w", "pad_d", "pad_h", "pad_w", "dil_d", "dil_h", "dil_w")
    scalars = dict(zip(names, (*_triple(stride), *_triple(padding), *_triple(dilation))))
    return scalars if with_stride else {k: v for k, v in scalars.items() if not k.startswith("stride")}


@cached_plan
def plan_depthwise_launch(
    src_shape: Sequence[int],
    grid_spatial: Sequence[int],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str = "none",
    negative_slope: float = 0.0,
    has_bias: bool = False,
    has_residual: bool = False,
    stats: bool = False,
    transposed: bool = False,
    input_activation: Optional[str] = None,
    input_eps: float = 0.0,
    input_negative_slope: float = 0.0,
    device: torch.device,
    config: Optional[DepthwiseConfig] = None,
) -> DepthwisePlan:
    """The launch of ``conv3d_depthwise_kernel`` computing a grid of ``grid_spatial`` positions per
    sample from a source of ``src_shape`` (N, C, D, H, W)."""
    n, channels, *src_spatial = (int(s) for s in src_shape)
    grid_spatial = _triple(grid_spatial)
    positions = n * grid_spatial[0] * grid_spatial[1] * grid_spatial[2]
    _check_index_range(positions, n * src_spatial[0] * src_spatial[1] * src_spatial[2])
    config = config or select_config(positions, channels, device)
    scalars = dict(
        src_d=src_spatial[0], src_h=src_spatial[1], src_w=src_spatial[2], channels=channels,
        out_d=grid_spatial[0], out_h=grid_spatial[1], out_w=grid_spatial[2], out_positions=positions,
        **_geometry_scalars(stride, padding, dilation, with_stride=False),
        negative_slope=float(negative_slope), in_eps=float(input_eps), in_slope=float(input_negative_slope),
    )
    kd, kh, kw = _triple(kernel_size)
    constexprs = dict(
        KD=kd, KH=kh, KW=kw, **dict(zip(("STRIDE_D", "STRIDE_H", "STRIDE_W"), _triple(stride))),
        HAS_BIAS=bool(has_bias), ACTIVATION=activation, HAS_RESIDUAL=bool(has_residual),
        STATS=bool(stats), TRANSPOSED=bool(transposed), INPUT_NORM=input_activation is not None,
        INPUT_ACTIVATION=input_activation or "none", BLOCK_P=config.block_p, BLOCK_C=config.block_c,
    )
    grid = (cdiv(positions, config.block_p) * cdiv(channels, config.block_c),)
    return DepthwisePlan(config, grid, (n, channels, *grid_spatial), scalars, constexprs)


@cached_plan
def plan_depthwise_wgrad_launch(
    x_shape: Sequence[int],
    dy_shape: Sequence[int],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    device: torch.device,
    config: Optional[DepthwiseConfig] = None,
) -> DepthwisePlan:
    """The launch of ``conv3d_depthwise_wgrad_kernel``; out_shape is the partials' (splits, taps, C)."""
    n, channels, *in_spatial = (int(s) for s in x_shape)
    out_spatial = _triple(dy_shape[2:])
    positions = n * out_spatial[0] * out_spatial[1] * out_spatial[2]
    _check_index_range(positions, n * in_spatial[0] * in_spatial[1] * in_spatial[2])
    config = config or select_config(positions, channels, device)
    tiles = cdiv(positions, config.block_p)
    splits = min(tiles, WGRAD_MAX_SPLITS) if device.type == "cuda" else 1
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)
    kd, kh, kw = _triple(kernel_size)
    scalars = dict(
        in_d=in_spatial[0], in_h=in_spatial[1], in_w=in_spatial[2], channels=channels,
        out_d=out_spatial[0], out_h=out_spatial[1], out_w=out_spatial[2], out_positions=positions,
        tiles_per_split=tiles_per_split, **_geometry_scalars(stride, padding, dilation),
    )
    constexprs = dict(KH=kh, KW=kw, BLOCK_P=config.block_p, BLOCK_C=config.block_c)
    grid = (splits * cdiv(channels, config.block_c), kd * kh * kw)
    return DepthwisePlan(config, grid, (splits, kd * kh * kw, channels), scalars, constexprs)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def pack_depthwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, kD, kH, kW) → fp32 ``[kD·kH·kW, C]``: tap-major, a tap's channels contiguous as they
    are in an NDHWC activation."""
    return weight.detach().to(torch.float32).reshape(weight.shape[0], -1).t().contiguous()


def _checked(x: torch.Tensor, w_packed: torch.Tensor, kernel_size) -> torch.Tensor:
    taps = 1
    for k in _triple(kernel_size):
        taps *= k
    if w_packed.dtype != torch.float32 or tuple(w_packed.shape) != (taps, x.shape[1]):
        raise ValueError(f"w_packed must be fp32 of shape ({taps}, {x.shape[1]}) (pack_depthwise_weight), "
                         f"got {w_packed.dtype} {tuple(w_packed.shape)}")
    return x.contiguous(memory_format=torch.channels_last_3d)


def _conv_spatial(x_shape, kernel_size, stride, padding, dilation) -> Tuple[int, int, int]:
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1  # type: ignore[return-value]
                 for s, k, st, p, d in zip(x_shape[2:], _triple(kernel_size), _triple(stride), _triple(padding),
                                           _triple(dilation)))


def _launch(plan: DepthwisePlan, x, w_packed, bias, out, residual=None, part_mean=None, part_m2=None,
            input_stats=None) -> None:
    conv3d_depthwise_kernel[plan.grid](
        x, w_packed, bias if bias is not None else w_packed, out, residual if residual is not None else out,
        part_mean if part_mean is not None else w_packed, part_m2 if part_m2 is not None else w_packed,
        input_stats if input_stats is not None else w_packed,
        **plan.scalars, **plan.constexprs, num_warps=plan.config.num_warps,
    )


def _prologue(input_stats, input_eps, input_activation, input_negative_slope) -> dict:
    return dict(input_activation=None if input_stats is None else input_activation,
                input_eps=float(input_eps), input_negative_slope=float(input_negative_slope))


def conv3d_depthwise(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str = "none",
    negative_slope: float = 0.0,
    residual: Optional[torch.Tensor] = None,
    input_stats: Optional[torch.Tensor] = None,
    input_eps: float = 0.0,
    input_activation: str = "none",
    input_negative_slope: float = 0.0,
    config: Optional[DepthwiseConfig] = None,
) -> torch.Tensor:
    """``act(conv3d(x, w, groups=C) + bias (+ residual))`` as (N, C, D', H', W') in x's dtype,
    channels_last_3d. w_packed from ``pack_depthwise_weight`` (fp32), bias fp32 (C,) or None;
    ``residual`` of the output's shape; ``input_stats`` etc.: the input prologue, as in
    ``conv3d_bias_act_pool``."""
    x = _checked(x, w_packed, kernel_size)
    input_stats = checked_input_stats(input_stats, x)
    settings = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, activation=activation,
                    negative_slope=negative_slope, has_bias=bias is not None, has_residual=residual is not None,
                    **_prologue(input_stats, input_eps, input_activation, input_negative_slope))

    def make_plan(tile_config: Optional[DepthwiseConfig]) -> DepthwisePlan:
        return plan_depthwise_launch(tuple(x.shape), _conv_spatial(x.shape, kernel_size, stride, padding, dilation),
                                     device=x.device, config=tile_config, **settings)

    plan = make_plan(config)
    out = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    if residual is not None:
        if tuple(residual.shape) != plan.out_shape:
            raise ValueError(f"residual must have the output's shape {plan.out_shape}, got {tuple(residual.shape)}")
        residual = residual.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)
    bias = None if bias is None else bias.contiguous()

    def launch(p: DepthwisePlan) -> None:
        _launch(p, x, w_packed, bias, out, residual=residual, input_stats=input_stats)

    if config is None:
        plan = _tuned("conv3d_depthwise", x, plan, make_plan, launch, settings)
    launch(plan)
    return out


def conv3d_depthwise_bn_stats(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    input_stats: Optional[torch.Tensor] = None,
    input_eps: float = 0.0,
    input_activation: str = "none",
    input_negative_slope: float = 0.0,
    finalize: Callable[..., Tuple[torch.Tensor, torch.Tensor]] = finalize_statistics,
    config: Optional[DepthwiseConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var), as ``conv3d_bn_stats`` returns them, for the depthwise conv: y the raw output
    (+ bias) in x's dtype, channels_last_3d; mean and biased var of y per channel, fp32."""
    x = _checked(x, w_packed, kernel_size)
    input_stats = checked_input_stats(input_stats, x)
    settings = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                    has_bias=bias is not None, stats=True,
                    **_prologue(input_stats, input_eps, input_activation, input_negative_slope))

    def make_plan(tile_config: Optional[DepthwiseConfig]) -> DepthwisePlan:
        return plan_depthwise_launch(tuple(x.shape), _conv_spatial(x.shape, kernel_size, stride, padding, dilation),
                                     device=x.device, config=tile_config, **settings)

    plan = make_plan(config)
    positions = plan.scalars["out_positions"]
    if positions == 0:
        raise ValueError("batch statistics of an empty tensor")
    y = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    bias = None if bias is None else bias.contiguous()

    def launch(p: DepthwisePlan) -> Tuple[torch.Tensor, torch.Tensor]:
        """One launch into y; the per-tile (mean, M2) partials, [tiles, C] fp32 each (tiles: the config's)."""
        part_mean = torch.empty((cdiv(positions, p.config.block_p), x.shape[1]), dtype=torch.float32,
                                device=x.device)
        part_m2 = torch.empty_like(part_mean)
        _launch(p, x, w_packed, bias, y, part_mean=part_mean, part_m2=part_m2, input_stats=input_stats)
        return part_mean, part_m2

    if config is None:
        plan = _tuned("conv3d_depthwise_bn_stats", x, plan, make_plan, launch, settings)
    part_mean, part_m2 = launch(plan)
    mean, var = finalize(part_mean, part_m2, positions, plan.config.block_p)
    return y, mean, var


def conv3d_depthwise_dgrad(
    grad: torch.Tensor,
    w_packed: torch.Tensor,
    input_shape: Sequence[int],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    config: Optional[DepthwiseConfig] = None,
) -> torch.Tensor:
    """The input gradient (``input_shape``: x's (N, C, D, H, W)) of the depthwise conv from the
    output gradient, in grad's dtype, channels_last_3d: the transposed gather (module docstring)."""
    grad = _checked(grad, w_packed, kernel_size)
    settings = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, transposed=True)

    def make_plan(tile_config: Optional[DepthwiseConfig]) -> DepthwisePlan:
        return plan_depthwise_launch(tuple(grad.shape), tuple(input_shape[2:]), device=grad.device,
                                     config=tile_config, **settings)

    plan = make_plan(config)
    dx = torch.empty(plan.out_shape, dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last_3d)

    def launch(p: DepthwisePlan) -> None:
        _launch(p, grad, w_packed, None, dx)

    if config is None:
        plan = _tuned("conv3d_depthwise_dgrad", grad, plan, make_plan, launch, settings)
    launch(plan)
    return dx


def conv3d_depthwise_wgrad(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    config: Optional[DepthwiseConfig] = None,
) -> torch.Tensor:
    """The conv weight's gradient, fp32 (C, 1, kD, kH, kW), from x and the output gradient."""
    x = x.contiguous(memory_format=torch.channels_last_3d)
    grad = grad.contiguous(memory_format=torch.channels_last_3d)
    settings = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)

    def make_plan(tile_config: Optional[DepthwiseConfig]) -> DepthwisePlan:
        return plan_depthwise_wgrad_launch(tuple(x.shape), tuple(grad.shape), device=x.device, config=tile_config,
                                           **settings)

    def launch(p: DepthwisePlan) -> torch.Tensor:
        """The fp32 partials [splits, taps, C] (splits: the config's)."""
        parts = torch.empty(p.out_shape, dtype=torch.float32, device=x.device)
        conv3d_depthwise_wgrad_kernel[p.grid](x, grad, parts, **p.scalars, **p.constexprs,
                                              num_warps=p.config.num_warps)
        return parts

    plan = make_plan(config)
    if config is None:
        plan = _tuned("conv3d_depthwise_wgrad", x, plan, make_plan, launch, settings)
    # the splits summed in a fixed order; (taps, C) → (C, 1, kD, kH, kW)
    return launch(plan).sum(dim=0).t().reshape(x.shape[1], 1, *_triple(kernel_size))
