"""Backward of BatchNorm + activation (+ MaxPool3d) over a stored conv output: the training backward's
first step (then ``conv3d_dgrad`` and ``conv3d_wgrad`` take the gradient of the conv output).

Two kernels, because BatchNorm's backward needs two per-channel sums over the whole batch before any
element's gradient is known:

1. ``act_pool_backward_reduce_kernel`` — over the OUTPUT (pooled positions × channels), like the
   forward ``bn_act_pool``: recompute every window's pre-pool values from the conv output y
   (normalise in fp32, round to the compute dtype, activate: the forward's exact values), find the
   window's first maximum (MaxPool3d's choice), and write the gradient of the pre-activation z
   at that position and 0 at the others of the window. The activation's derivative at the maximum
   follows from the maximum (relu: z > 0 iff relu(z) > 0) or from z recomputed from the kept y
   (leaky_relu, whose slope may be negative; silu, which is not monotone), so no z is stored. The
   same pass adds up, per tile and channel, Σdz and Σdz·x̂ (x̂ = (y − mean)/σ at the maximum) in fp32
   into a ``[tiles, C]`` partial buffer; a few torch ops sum the tiles (no host synchronisation).
2. ``bn_backward_kernel`` — elementwise over the conv output, in place:
   dy = γ/σ · (dz − Σdz/N − x̂·Σdz·x̂/N).

Windows must not overlap (pool stride ≥ kernel in every dimension; C3D's pools), so that every conv
position gets its gradient from at most one window; conv positions no window covers get 0, from a
zero-filled buffer (only when the pool leaves gaps). Without BatchNorm statistics (folded eval-mode
BN, or none) step 1 runs with the identity normalisation and step 2 is not needed.

Compute-dtype dz: for relu it is exactly the upstream gradient or 0, so the buffer loses nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._grid import cached_plan, cdiv
from ._implicit_gemm import (apply_activation, batch_norm_coefficients, channel_tile,
                             pool_window_position, silu_derivative, split_position)
from .bn_act_pool import ElementwiseConfig, ElementwisePlan, fp32_vectors, plan_bn_act_pool, select_config


@triton.jit
def act_pool_backward_reduce_kernel(
    grad_out_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, dz_ptr, part_sum_ptr, part_dot_ptr,
    conv_d, conv_h, conv_w, channels,
    out_d, out_h, out_w, out_positions,
    eps, negative_slope,
    POOL_KD: tl.constexpr, POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    POOL_SD: tl.constexpr, POOL_SH: tl.constexpr, POOL_SW: tl.constexpr,
    POOL_PD: tl.constexpr, POOL_PH: tl.constexpr, POOL_PW: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p, offs_p, offs_c, p_mask, c_mask = channel_tile(
        tl.program_id(0), out_positions, channels, BLOCK_P, BLOCK_C)
    mask = p_mask[:, None] & c_mask[None, :]
    if HAS_NORM:
        mean, invstd, scale, beta = batch_norm_coefficients(
            mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_c, c_mask, eps, HAS_GAMMA, HAS_BETA)

    sample, pooled_d, pooled_h, pooled_w = split_position(offs_p, out_d, out_h, out_w)
    dz_dtype = dz_ptr.dtype.element_ty
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dz_dtype)  # the forward's pooled value
    best_window = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)
    best_y = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for window in range(POOL_KD * POOL_KH * POOL_KW):
        position, valid = pool_window_position(
            window, sample, pooled_d, pooled_h, pooled_w, p_mask, conv_d, conv_h, conv_w,
            POOL_KH, POOL_KW, POOL_SD, POOL_SH, POOL_SW, POOL_PD, POOL_PH, POOL_PW)
        y = tl.load(
            y_ptr + position[:, None] * channels + offs_c[None, :],
            mask=valid[:, None] & c_mask[None, :], other=0.0,
        ).to(tl.float32)
        z = y
        if HAS_NORM:
            z = (y - mean[None, :]) * scale[None, :] + beta[None, :]
        a = apply_activation(z.to(dz_dtype), ACTIVATION, negative_slope).to(dz_dtype)  # as the forward stores it
        # taps in the pool's padding pool as -inf AFTER the activation, as in the forward (a negative
        # slope maps a -inf z to +inf)
        a = tl.where(valid[:, None], a, float("-inf")).to(dz_dtype)
        # strict: the first maximum in window order wins, as in MaxPool3d, which also takes every NaN
        take = (a > best) | (a != a)
        best = tl.where(take, a, best).to(dz_dtype)  # triton 3.6 widens 16-bit where
        best_window = tl.where(take, window, best_window).to(tl.int32)
        best_y = tl.where(take, y, best_y).to(tl.float32)

    g = tl.load(grad_out_ptr + offs_p.to(tl.int64)[:, None] * channels + offs_c[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    if ACTIVATION == "relu":
        dz = tl.where(best <= 0, 0.0, g)  # relu's backward passes NaN positions' gradient, as stock's
    elif ACTIVATION == "leaky_relu" or ACTIVATION == "silu":
        # leaky_relu: the sign of z, not of act(z): a negative slope makes act(z) > 0 for z < 0. z
        # as the loop rounded it (a tiny z that rounds to 0 takes the slope, as stock's stored BN
        # output does); silu's derivative at that rounded z too
        best_z = best_y
        if HAS_NORM:
            best_z = (best_y - mean[None, :]) * scale[None, :] + beta[None, :]
        if ACTIVATION == "silu":
            dz = g * silu_derivative(best_z.to(dz_dtype).to(tl.float32))
        else:
            dz = tl.where(best_z.to(dz_dtype) > 0, g, g * negative_slope)
    else:
        dz = g
    dz = tl.where(mask, dz, 0.0)

    for window in range(POOL_KD * POOL_KH * POOL_KW):
        position, valid = pool_window_position(
            window, sample, pooled_d, pooled_h, pooled_w, p_mask, conv_d, conv_h, conv_w,
            POOL_KH, POOL_KW, POOL_SD, POOL_SH, POOL_SW, POOL_PD, POOL_PH, POOL_PW)
        others = 0.0
        if ACTIVATION == "silu" and POOL_KD * POOL_KH * POOL_KW > 1:
            # stock multiplies the pool's zero gradient by silu'(z) at every position: NaN where z
            # is NaN or ±inf (a second NaN in a window), so a diverging run shows as in stock. z is
            # finite where y is (finite BatchNorm coefficients): y alone decides, no recomputation
            y = tl.load(y_ptr + position[:, None] * channels + offs_c[None, :],
                        mask=valid[:, None] & c_mask[None, :], other=0.0)
            others = tl.where((y == y) & (tl.abs(y) != float("inf")), 0.0, float("nan"))
        tl.store(
            dz_ptr + position[:, None] * channels + offs_c[None, :],
            tl.where(best_window == window, dz, others).to(dz_dtype),
            mask=valid[:, None] & c_mask[None, :],
        )

    part = pid_p * channels + offs_c
    tl.store(part_sum_ptr + part, tl.sum(dz, axis=0), mask=c_mask)
    if HAS_NORM:
        xhat = (best_y - mean[None, :]) * invstd[None, :]
        tl.store(part_dot_ptr + part, tl.sum(dz * xhat, axis=0), mask=c_mask)


@triton.jit
def bn_backward_kernel(
    dz_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, sum_dz_ptr, sum_dz_xhat_ptr, dy_ptr,
    positions, channels, eps,
    HAS_GAMMA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dy = γ/σ·(dz − Σdz/N − x̂·Σdz·x̂/N), N = positions; dy may be dz (in place). The per-channel
    coefficients come from the statistics here, as the forward's normalisation takes them, rather
    than from a few torch ops per layer (each a launch of its own)."""
    _, offs_p, offs_c, p_mask, c_mask = channel_tile(tl.program_id(0), positions, channels, BLOCK_P, BLOCK_C)
    mask = p_mask[:, None] & c_mask[None, :]
    offsets = offs_p.to(tl.int64)[:, None] * channels + offs_c[None, :]
    mean, invstd, coef, _ = batch_norm_coefficients(
        mean_ptr, var_ptr, gamma_ptr, gamma_ptr, offs_c, c_mask, eps, HAS_GAMMA, False)
    mean_dz = tl.load(sum_dz_ptr + offs_c, mask=c_mask, other=0.0) / positions
    mean_dz_xhat = tl.load(sum_dz_xhat_ptr + offs_c, mask=c_mask, other=0.0) / positions
    dz = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = (tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
    dy = coef[None, :] * (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :])
    tl.store(dy_ptr + offsets, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def pool_overlaps(pool: Sequence[int]) -> bool:
    """Whether some conv position lies in two windows of ``pool`` (kernel(3) + stride(3) + padding(3))."""
    return bool(pool) and any(s < k for k, s in zip(pool[0:3], pool[3:6]))


def _pool_covers(conv_size: Sequence[int], out_size: Sequence[int], pool: Sequence[int]) -> bool:
    """Whether the windows (non-overlapping) together cover every conv position."""
    if not pool:
        return True
    kernel, stride, padding = pool[0:3], pool[3:6], pool[6:9]
    # stride = kernel: the windows tile [-padding, out·stride − padding) without gaps
    return all(k == s and o * s - p >= c for c, o, k, s, p in zip(conv_size, out_size, kernel, stride, padding))


@cached_plan
def plan_act_pool_backward(
    y_shape: Sequence[int],
    *,
    eps: float,
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    has_norm: bool,
    has_gamma: bool,
    has_beta: bool,
    device: torch.device,
    config: Optional[ElementwiseConfig] = None,
) -> ElementwisePlan:
    """The forward ``bn_act_pool``'s plan, with this kernel's extra flag. On a GPU half the forward's
    positions per program: each element carries more state through the window loop (the running
    maximum, its window and its y), and 4096 elements a program needed ~210 registers a thread."""
    if config is None and device.type == "cuda":
        forward = select_config(int(y_shape[1]), 1, device)
        config = dataclasses.replace(forward, block_p=max(1, forward.block_p // 2))
    plan = plan_bn_act_pool(
        y_shape, eps=eps, activation=activation, negative_slope=negative_slope, pool=pool,
        has_gamma=has_gamma, has_beta=has_beta, device=device, config=config,
    )
    return dataclasses.replace(plan, constexprs=dict(plan.constexprs, HAS_NORM=bool(has_norm)))


def act_pool_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    mean: Optional[torch.Tensor],
    var: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    eps: float,
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    config: Optional[ElementwiseConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dz, Σdz, Σdz·x̂): the gradient of the normalised pre-activation z = γ·x̂ + β, in y's dtype and
    channels_last_3d, and its per-channel sums (fp32; Σdz·x̂ is None without statistics).

    y: the conv output (N, C, D, H, W); grad_out: the gradient of the op's output; mean/var: fp32
    batch statistics (var biased), or None for no normalisation (z = y); γ, β: (C,) or None."""
    if pool_overlaps(pool):
        raise ValueError(f"act_pool_backward: pool {tuple(pool)} has overlapping windows (stride < kernel)")
    has_norm = mean is not None
    y = y.contiguous(memory_format=torch.channels_last_3d)
    grad_out = grad_out.to(y.dtype).contiguous(memory_format=torch.channels_last_3d)
    plan = plan_act_pool_backward(
        y.shape, eps=eps, activation=activation, negative_slope=negative_slope, pool=pool,
        has_norm=has_norm, has_gamma=has_norm and gamma is not None, has_beta=has_norm and beta is not None,
        device=y.device, config=config,
    )
    if tuple(grad_out.shape) != tuple(plan.out_shape):
        raise ValueError(f"grad_out of shape {tuple(grad_out.shape)} does not match the output {plan.out_shape}")
    channels = y.shape[1]
    covered = _pool_covers(y.shape[2:], plan.out_shape[2:], tuple(pool))
    dz = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last_3d)
    if not covered:
        dz.zero_()
    tiles = cdiv(plan.scalars["out_positions"], plan.config.block_p)
    part_sum = torch.empty((tiles, channels), dtype=torch.float32, device=y.device)
    part_dot = torch.empty((tiles, channels), dtype=torch.float32, device=y.device) if has_norm else part_sum
    mean, var, gamma, beta = fp32_vectors(mean, var, gamma, beta)
    dummy = part_sum
    act_pool_backward_reduce_kernel[plan.grid](
        grad_out, y, *(t if t is not None else dummy for t in (mean, var, gamma, beta)), dz, part_sum, part_dot,
        **plan.scalars, **plan.constexprs, num_warps=plan.config.num_warps,
    )
    return dz, part_sum.sum(dim=0), part_dot.sum(dim=0) if has_norm else None


def bn_backward_(
    dz: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: Optional[torch.Tensor],
    sum_dz: torch.Tensor,
    sum_dz_xhat: torch.Tensor,
    *,
    eps: float,
    config: Optional[ElementwiseConfig] = None,
) -> torch.Tensor:
    """dz ← dy = γ/σ·(dz − Σdz/N − x̂·Σdz·x̂/N) in place (N: positions per channel); returns dz.
    dz and y: channels_last_3d, same shape and dtype; the rest fp32 (C,)."""
    if not dz.is_contiguous(memory_format=torch.channels_last_3d) or dz.shape != y.shape:
        raise ValueError("bn_backward_: dz must be channels_last_3d and shaped like y")
    y = y.contiguous(memory_format=torch.channels_last_3d)
    channels = y.shape[1]
    positions = y.numel() // channels
    plan = plan_bn_act_pool(
        y.shape, eps=eps, activation="none", negative_slope=0.0, pool=(), has_gamma=False, has_beta=False,
        device=y.device, config=config,
    )
    grid = (cdiv(positions, plan.config.block_p) * cdiv(channels, plan.config.block_c),)
    mean, var, gamma, sum_dz, sum_dz_xhat = fp32_vectors(mean, var, gamma, sum_dz, sum_dz_xhat)
    bn_backward_kernel[grid](
        dz, y, mean, var, gamma if gamma is not None else var, sum_dz, sum_dz_xhat, dz,
        positions, channels, float(eps),
        HAS_GAMMA=gamma is not None, BLOCK_P=plan.config.block_p, BLOCK_C=plan.config.block_c,
        num_warps=plan.config.num_warps,
    )
    return dz
