"""Conv3d (+ bias) with a batch-statistics epilogue: step 1 of the training forward.

Training-mode BatchNorm normalises with the statistics of the whole batch, which exist only once
every conv output is known, so the training forward is two kernels (kernels.md, "Training"):

1. this one: the implicit-GEMM convolution (``_implicit_gemm.conv_tile``, the same main loop as
   the inference kernel) whose epilogue stores the raw conv output y (NDHWC, compute dtype, conv
   bias added) and, per tile of BLOCK_M positions, the tile's per-channel mean and M2 (sum of
   squared deviations from the tile mean, by the corrected two-pass algorithm within the tile) in fp32 into a ``[num_m_tiles, C_out]`` partial buffer;
   ``finalize_statistics`` (or the caller's ``finalize``: c3dzoo's ops pass the CUDA kernels of
   c3dzoo._C where they run, else ``batch_norm_statistics``' Triton kernels) then combines the partials with Chan's parallel formula into the batch
   mean and biased variance (fp32) on the device (no host synchronisation);
2. ``bn_act_pool``: normalise + γ/β + activation (+ max-pool) over y.

Why mean/M2 per tile and not Σy, Σy²: var = E[y²] − E[y]² in fp32 cancels catastrophically when
|mean| ≫ std (a conv bias of 1000 and unit-scale data leave nothing of the variance). Deviations
from a tile's own mean are small, and combining tiles adds only n_i·(mean_i − mean)², which is
small too: the variance keeps its precision whatever the mean.

The statistics are taken over the values y is STORED as (rounded to the compute dtype), i.e. the
values step 2 normalises, as stock BatchNorm takes them over its conv's output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._grid import cached_plan, cdiv
from ._implicit_gemm import conv_tile, output_tile, tile_statistics
from ._statistics import finalize_statistics
from .conv3d_bias_act_pool import (LaunchPlan, TileConfig, _triple, autotuned_plan, checked_input_stats,
                                   plan_launch)


@triton.jit
def conv3d_bn_stats_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, part_mean_ptr, part_m2_ptr, in_stats_ptr,
    in_d, in_h, in_w, in_c,
    out_d, out_h, out_w, out_c, out_positions,
    stride_d, stride_h, stride_w,
    pad_d, pad_h, pad_w,
    dil_d, dil_h, dil_w,
    in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, FLAT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    sample_size = in_d * in_h * in_w * in_c
    (offs_m, offs_n, m_mask, n_mask, conv_pd, conv_ph, conv_pw, first_sample, row_offset) = output_tile(
        tl.program_id(0), out_c, out_positions, out_d, out_h, out_w, sample_size, BLOCK_M, BLOCK_N)
    x_tile_ptr = x_ptr + first_sample.to(tl.int64) * sample_size
    pid_m = tl.program_id(0) // tl.cdiv(out_c, BLOCK_N)  # the tile's row in the partial-statistics buffers
    acc = conv_tile(
        x_tile_ptr, w_ptr, row_offset,
        conv_pd * stride_d - pad_d, conv_ph * stride_h - pad_h, conv_pw * stride_w - pad_w,
        m_mask, offs_n,
        in_d, in_h, in_w, in_c, out_c, dil_d, dil_h, dil_w, in_stats_ptr, in_eps, in_slope,
        KD, KH, KW, BLOCK_M, BLOCK_N, BLOCK_K, FLAT_K, INPUT_PRECISION,
        INPUT_NORM, INPUT_ACTIVATION,
    )
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * out_c + offs_n[None, :], y, mask=mask)

    count = tl.minimum(out_positions - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    tile_mean, tile_m2 = tile_statistics(y, mask, count)
    part = pid_m * out_c + offs_n
    tl.store(part_mean_ptr + part, tile_mean, mask=n_mask)
    tl.store(part_m2_ptr + part, tile_m2, mask=n_mask)


@cached_plan
def plan_stats_launch(
    x_shape: Sequence[int],
    out_c: int,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    has_bias: bool,
    dtype: torch.dtype,
    device: torch.device,
    config: Optional[TileConfig] = None,
    input_activation: Optional[str] = None,
    input_eps: float = 0.0,
    input_negative_slope: float = 0.0,
) -> LaunchPlan:
    """The launch of ``conv3d_bn_stats_kernel``: the inference plan without pool or activation
    (same tile choice, grid and int32 checks), its arguments renamed to this kernel's."""
    plan = plan_launch(
        x_shape, out_c, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
        activation="none", negative_slope=0.0, pool=(), has_bias=has_bias, dtype=dtype, device=device,
        config=config, input_activation=input_activation, input_eps=input_eps,
        input_negative_slope=input_negative_slope,
    )
    s, c = plan.scalars, plan.constexprs
    names = [n for n in conv3d_bn_stats_kernel.arg_names if not n.endswith("_ptr")]
    scalars = {n: s[n] for n in names if n in s}
    constexprs = {n: c[n] for n in names if n in c}
    missing = set(names) - set(scalars) - set(constexprs)
    assert not missing, missing
    return dataclasses.replace(plan, scalars=scalars, constexprs=constexprs)


def conv3d_bn_stats(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    config: Optional[TileConfig] = None,
    input_stats: Optional[torch.Tensor] = None,
    input_eps: float = 0.0,
    input_activation: str = "none",
    input_negative_slope: float = 0.0,
    finalize: Callable[..., Tuple[torch.Tensor, torch.Tensor]] = finalize_statistics,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = conv3d(x, w) + bias as (N, C_out, D', H', W') in x's dtype,
    channels_last_3d; mean and biased var of y per channel, fp32 (C_out,).

    x: any layout (copied to channels-last if it is not); w_packed from ``pack_weight`` in x's dtype;
    bias fp32 (C_out,) or None. ``input_stats`` etc.: the input prologue, as in
    ``conv3d_bias_act_pool``. ``config`` overrides the tile choice (tests). ``finalize(part_mean,
    part_m2, positions, block_m)`` combines the per-tile partials (the caller may run its own kernel).
    """
    if w_packed.dtype != x.dtype:
        raise TypeError(f"w_packed is {w_packed.dtype} but x is {x.dtype}")
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w_packed = w_packed.contiguous()
    out_c = w_packed.shape[1]
    kd, kh, kw = _triple(kernel_size)
    if w_packed.shape[0] != kd * kh * kw * x.shape[1]:
        raise ValueError(
            f"w_packed of shape {tuple(w_packed.shape)} does not match x {tuple(x.shape)} and kernel {(kd, kh, kw)}"
        )
    input_stats = checked_input_stats(input_stats, x)
    settings = dict(
        kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, has_bias=bias is not None,
        input_activation=None if input_stats is None else input_activation,
        input_eps=input_eps, input_negative_slope=input_negative_slope,
    )

    def make_plan(tile_config: Optional[TileConfig]) -> LaunchPlan:
        return plan_stats_launch(x.shape, out_c, dtype=x.dtype, device=x.device, config=tile_config, **settings)

    plan = make_plan(config)
    y = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    positions = plan.scalars["out_positions"]
    if positions == 0:
        raise ValueError("batch statistics of an empty tensor")
    tensors = (x, w_packed, bias if bias is not None else w_packed, y, input_stats)
    if config is None:
        plan = autotuned_plan("conv3d_bn_stats", x, plan, make_plan, lambda p: _launch(p, tensors), settings,
                              (out_c,))
    part_mean, part_m2 = _launch(plan, tensors)
    mean, var = finalize(part_mean, part_m2, positions, plan.config.block_m)
    return y, mean, var


def _launch(plan: LaunchPlan, tensors: Tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch into y; returns the per-tile (mean, M2) partials, [tiles, C_out] fp32 each."""
    x, w_packed, bias_or_w, y, input_stats = tensors
    tiles, out_c = cdiv(plan.scalars["out_positions"], plan.config.block_m), y.shape[1]
    part_mean = torch.empty((tiles, out_c), dtype=torch.float32, device=x.device)
    part_m2 = torch.empty((tiles, out_c), dtype=torch.float32, device=x.device)
    conv3d_bn_stats_kernel[plan.grid](
        x, w_packed, bias_or_w, y, part_mean, part_m2,
        input_stats if input_stats is not None else part_mean,
        **plan.scalars, **plan.constexprs,
        num_warps=plan.config.num_warps, num_stages=plan.config.num_stages,
    )
    return part_mean, part_m2
