"""Weight gradient of Conv3d as an implicit GEMM: dW = Σ over output positions of x-patch ⊗ dy.

In the packed layout of the forward (``pack_weight``: rows K = (kd, kh, kw, c_in), columns C_out):

    dW_packed[r, co] = Σ_m  x[position m shifted by tap(r), channel(r)] · dy[m, co]

i.e. a GEMM whose OUTPUT is small (K × C_out) and whose reduction runs over all N·D'·H'·W' output
positions. A program computes one [BLOCK_R, BLOCK_N] tile of dW over one slice ("split") of the
positions; the splits' fp32 partials go to a ``[splits, K, C_out]`` buffer that one torch sum
reduces (deterministic: no atomics), so that a few hundred weight tiles still fill the GPU.

Rows are walked like the forward's main loops (``_implicit_gemm``): by (tap, channel block), one tap
per tile and BLOCK_R contiguous input channels, or — for tiny C_in (``FLAT_K``, C3D's conv1) — as
flat K indices decoded into (tap, channel) per element. x is channels-last (NDHWC), dy too, so both
operand tiles are [positions, channels] with channels contiguous; x's tile is transposed in the dot.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._grid import cached_plan, cdiv
from ._limits import INT32_LIMIT, IndexOverflowError
from ._implicit_gemm import dot, split_position
from .conv3d_bias_act_pool import (
    FLAT_K_MAX_IN_CHANNELS, LaunchPlan, TileConfig, _next_pow2, _sm_count, _triple, _uses_tf32, autotuned_plan,
)



@triton.jit
def conv3d_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    in_d, in_h, in_w, in_c,
    out_d, out_h, out_w, out_c, positions, positions_per_split,
    stride_d, stride_h, stride_w,
    pad_d, pad_h, pad_w,
    dil_d, dil_h, dil_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    FLAT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_blocks = tl.cdiv(out_c, BLOCK_N)
    pid_r = pid // n_blocks
    pid_n = pid - pid_r * n_blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_c
    rows = KD * KH * KW * in_c
    if FLAT_K:
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rows
        tap = tl.minimum(offs_r // in_c, KD * KH * KW - 1)
        channel = offs_r - tap * in_c
    else:
        channel_blocks = tl.cdiv(in_c, BLOCK_R)
        tap = pid_r // channel_blocks
        channel = (pid_r - tap * channel_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = channel < in_c
        offs_r = tap * in_c + channel
    tap_d = (tap // (KH * KW)) * dil_d
    tap_h = ((tap // KW) % KH) * dil_h
    tap_w = (tap % KW) * dil_w

    m_start = split * positions_per_split
    m_end = tl.minimum(m_start + positions_per_split, positions)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        sample, pos_d, pos_h, pos_w = split_position(offs_m, out_d, out_h, out_w)
        d0 = pos_d * stride_d - pad_d
        h0 = pos_h * stride_h - pad_h
        w0 = pos_w * stride_w - pad_w
        if FLAT_K:  # every element has its own tap: 2-D coordinates
            d = d0[:, None] + tap_d[None, :]
            h = h0[:, None] + tap_h[None, :]
            w = w0[:, None] + tap_w[None, :]
            inside = (m_mask[:, None] & r_mask[None, :] & (d >= 0) & (d < in_d)
                      & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w))
            in_position = ((sample[:, None] * in_d + d) * in_h + h) * in_w + w
            a = tl.load(x_ptr + in_position.to(tl.int64) * in_c + channel[None, :], mask=inside, other=0.0)
        else:  # one tap per tile: 1-D coordinates, BLOCK_R contiguous channels per position
            d = d0 + tap_d
            h = h0 + tap_h
            w = w0 + tap_w
            inside = m_mask & (d >= 0) & (d < in_d) & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
            in_position = ((sample * in_d + d) * in_h + h) * in_w + w
            a = tl.load(
                x_ptr + (in_position.to(tl.int64) * in_c)[:, None] + channel[None, :],
                mask=inside[:, None] & r_mask[None, :], other=0.0,
            )
        b = tl.load(
            dy_ptr + offs_m.to(tl.int64)[:, None] * out_c + offs_n[None, :],
            mask=m_mask[:, None] & n_mask[None, :], other=0.0,
        )
        acc = dot(tl.trans(a), b, acc, INPUT_PRECISION)

    out = dw_ptr + split.to(tl.int64) * rows * out_c + offs_r[:, None] * out_c + offs_n[None, :]
    tl.store(out, acc, mask=r_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# tile configurations: TileConfig with block_m = BLOCK_R (weight rows), block_n = BLOCK_N (output
# channels), block_k = BLOCK_M (positions per reduction step)
# --------------------------------------------------------------------------------------------

# Hopper: 128×128 weight tiles on two warpgroups, 64 positions a step, 3 stages of loads (96 KB of
# shared memory in bf16); 64-row tiles where C_in per tap is 64 (C3D's conv2); flat K for C_in < 16.
WGRAD_128x128x64 = TileConfig(128, 128, 64, num_warps=8, num_stages=3)  # C_in ≥ 128, C_out > 64
WGRAD_64x128x64 = TileConfig(64, 128, 64, num_warps=4, num_stages=3)  # 16 ≤ C_in < 128, C_out > 64
WGRAD_64x64x64 = TileConfig(64, 64, 64, num_warps=4, num_stages=3)  # C_out ≤ 64
# C_in < 16: 32 positions a step (64 spilled 4 B under triton 3.6)
WGRAD_FLAT_K_64x64x32 = TileConfig(64, 64, 32, num_warps=4, num_stages=3, flat_k=True)
WGRAD_HOPPER_CONFIGS: Tuple[TileConfig, ...] = (WGRAD_128x128x64, WGRAD_64x128x64, WGRAD_64x64x64, WGRAD_FLAT_K_64x64x32)

# at least this many reduction steps per split: fewer would spend the program on its prologue
_MIN_STEPS_PER_SPLIT = 8


def select_wgrad_config(in_c: int, out_c: int, dtype: torch.dtype, device: torch.device, tf32: bool) -> TileConfig:
    if device.type != "cuda":  # the interpreter pays per program and per step: few, large tiles
        flat_k = in_c < FLAT_K_MAX_IN_CHANNELS
        return TileConfig(64 if flat_k else _next_pow2(in_c, 16, 64), _next_pow2(out_c, 16, 64), 128,
                          num_warps=4, num_stages=1, flat_k=flat_k)
    if in_c < FLAT_K_MAX_IN_CHANNELS:
        config = WGRAD_FLAT_K_64x64x32
    elif out_c <= 64:
        config = WGRAD_64x64x64
    elif in_c < 128:
        config = WGRAD_64x128x64
    else:
        config = WGRAD_128x128x64
    return config.for_dtype(dtype, tf32)


@cached_plan
def plan_wgrad_launch(
    x_shape: Sequence[int],
    dy_shape: Sequence[int],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    config: Optional[TileConfig] = None,
    splits: Optional[int] = None,
) -> LaunchPlan:
    """Tile config, split count, grid and arguments (``out_shape`` is the partial buffer's shape)."""
    n, in_c, in_d, in_h, in_w = (int(s) for s in x_shape)
    _, out_c, out_d, out_h, out_w = (int(s) for s in dy_shape)
    kd, kh, kw = _triple(kernel_size)
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    positions = n * out_d * out_h * out_w
    rows = kd * kh * kw * in_c
    if n * in_d * in_h * in_w >= INT32_LIMIT or positions >= INT32_LIMIT or rows * out_c >= INT32_LIMIT:
        raise IndexOverflowError(f"conv3d_wgrad: input {tuple(x_shape)} is too large for the kernel's int32 positions")
    tf32 = _uses_tf32(dtype, device)
    if config is None:
        config = select_wgrad_config(in_c, out_c, dtype, device, tf32)
    if config.flat_k:
        row_tiles = cdiv(rows, config.block_m)
    else:
        row_tiles = kd * kh * kw * cdiv(in_c, config.block_m)
    tiles = row_tiles * cdiv(out_c, config.block_n)
    steps = cdiv(positions, config.block_k)
    if splits is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            wanted = cdiv(4 * _sm_count(index), tiles)  # about four programs per SM
            splits = max(1, min(wanted, steps // _MIN_STEPS_PER_SPLIT))
        else:
            splits = 1
    steps_per_split = cdiv(steps, splits)
    splits = cdiv(steps, steps_per_split)  # no empty split
    scalars = dict(
        in_d=in_d, in_h=in_h, in_w=in_w, in_c=in_c,
        out_d=out_d, out_h=out_h, out_w=out_w, out_c=out_c,
        positions=positions, positions_per_split=steps_per_split * config.block_k,
        stride_d=stride[0], stride_h=stride[1], stride_w=stride[2],
        pad_d=padding[0], pad_h=padding[1], pad_w=padding[2],
        dil_d=dilation[0], dil_h=dilation[1], dil_w=dilation[2],
    )
    constexprs = dict(
        KD=kd, KH=kh, KW=kw, FLAT_K=config.flat_k, INPUT_PRECISION="tf32" if tf32 else "ieee",
        BLOCK_R=config.block_m, BLOCK_N=config.block_n, BLOCK_M=config.block_k,
    )
    return LaunchPlan(config, (tiles, splits), (splits, rows, out_c), scalars, constexprs)


def conv3d_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    config: Optional[TileConfig] = None,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """The gradient of conv3d(x, W) with respect to W, given dy = ∂L/∂conv3d(x, W): fp32
    (C_out, C_in, kD, kH, kW), contiguous. x and dy in the same dtype, any layout (made channels-last)."""
    if x.dtype != dy.dtype:
        raise TypeError(f"x is {x.dtype} but dy is {dy.dtype}")
    x = x.contiguous(memory_format=torch.channels_last_3d)
    dy = dy.contiguous(memory_format=torch.channels_last_3d)
    settings = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, splits=splits)

    def make_plan(tile_config: Optional[TileConfig]) -> LaunchPlan:
        return plan_wgrad_launch(x.shape, dy.shape, dtype=x.dtype, device=x.device, config=tile_config, **settings)

    plan = make_plan(config)
    if config is None:
        plan = autotuned_plan("conv3d_wgrad", x, plan, make_plan, lambda p: _launch(p, x, dy), settings,
                              (tuple(dy.shape),), shipped=WGRAD_HOPPER_CONFIGS, channel_step=lambda c: c.block_m)
    partial = _launch(plan, x, dy)
    kd, kh, kw = _triple(kernel_size)
    packed = partial.sum(dim=0) if partial.shape[0] > 1 else partial[0]
    # packed rows are (kd, kh, kw, c_in): back to (C_out, C_in, kD, kH, kW)
    return packed.view(kd, kh, kw, x.shape[1], dy.shape[1]).permute(4, 3, 0, 1, 2).contiguous()


def _launch(plan: LaunchPlan, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """One launch; returns the split-K partial sums, fp32 [splits, rows, C_out]."""
    partial = torch.empty(plan.out_shape, dtype=torch.float32, device=x.device)
    conv3d_wgrad_kernel[plan.grid](
        x, dy, partial, **plan.scalars, **plan.constexprs,
        num_warps=plan.config.num_warps, num_stages=plan.config.num_stages,
    )
    return partial
