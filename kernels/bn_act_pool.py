"""BatchNorm (given statistics) + activation (+ MaxPool3d) over a stored conv output: step 2 of the
training forward (step 1, the conv with a statistics epilogue, is ``conv3d_bn_stats``).

Elementwise over the OUTPUT: a program takes BLOCK_P (pooled) positions × BLOCK_C channels and, for
every offset of the pool window, loads the conv outputs under it (NDHWC: channels contiguous),
computes ``(y − mean)·(1/sqrt(var + eps))·γ + β`` in fp32, rounds to the output dtype, applies the
activation (``_implicit_gemm.apply_activation``) and keeps a running max; window positions in the
pool's padding or past the conv output are -inf. Without a pool the window is 1×1×1: normalise +
activation only. The order of operations is the reference's (normalise in fp32, round, activate,
pool), and (y − mean) is taken before scaling, so a large mean cancels exactly, not after scaling.

``1/tl.sqrt`` rather than ``rsqrt``: libdevice's rsqrt fails under the Triton interpreter.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._grid import cached_plan, cdiv, next_power_of_2
from ._limits import INT32_LIMIT, IndexOverflowError
from ._implicit_gemm import (batch_norm_coefficients, channel_tile, normalize_activate, pool_max,
                             pool_window_position, split_position)


@triton.jit
def bn_act_pool_kernel(
    y_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, out_ptr,
    conv_d, conv_h, conv_w, channels,
    out_d, out_h, out_w, out_positions,
    eps, negative_slope,
    POOL_KD: tl.constexpr, POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    POOL_SD: tl.constexpr, POOL_SH: tl.constexpr, POOL_SW: tl.constexpr,
    POOL_PD: tl.constexpr, POOL_PH: tl.constexpr, POOL_PW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _, offs_p, offs_c, p_mask, c_mask = channel_tile(tl.program_id(0), out_positions, channels, BLOCK_P, BLOCK_C)
    mean, _, scale, beta = batch_norm_coefficients(
        mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_c, c_mask, eps, HAS_GAMMA, HAS_BETA)

    sample, pooled_d, pooled_h, pooled_w = split_position(offs_p, out_d, out_h, out_w)
    out_dtype = out_ptr.dtype.element_ty
    pooled = tl.full((BLOCK_P, BLOCK_C), float("-inf"), out_dtype)
    for window in range(POOL_KD * POOL_KH * POOL_KW):
        position, valid = pool_window_position(
            window, sample, pooled_d, pooled_h, pooled_w, p_mask, conv_d, conv_h, conv_w,
            POOL_KH, POOL_KW, POOL_SD, POOL_SH, POOL_SW, POOL_PD, POOL_PH, POOL_PW)
        y = tl.load(
            y_ptr + position[:, None] * channels + offs_c[None, :],
            mask=valid[:, None] & c_mask[None, :], other=0.0,
        )
        # the conv input prologue's code (``normalize_activate``): bit-identical values either way
        a = normalize_activate(y, mean[None, :], scale[None, :], beta[None, :], ACTIVATION, negative_slope)
        # masked rows read 0 (normalised to anything, ±inf included): they pool as -inf. Cast back:
        # triton 3.6 computes max/where of 16-bit floats in fp32, and a loop-carried value keeps its type
        a = tl.where(valid[:, None], a, float("-inf")).to(out_dtype)
        pooled = pool_max(pooled, a).to(out_dtype)

    out_offsets = offs_p.to(tl.int64)[:, None] * channels + offs_c[None, :]
    tl.store(out_ptr + out_offsets, pooled, mask=p_mask[:, None] & c_mask[None, :])


@dataclasses.dataclass(frozen=True)
class ElementwiseConfig:
    block_p: int
    block_c: int
    num_warps: int

    @property
    def name(self) -> str:
        return f"elementwise_{self.block_p}x{self.block_c}_w{self.num_warps}"


def select_config(channels: int, positions: int, device: torch.device) -> ElementwiseConfig:
    """4096 elements a program on a GPU (channels contiguous: a warp reads whole channel rows);
    under the interpreter, which pays per program, few large blocks."""
    block_c = max(16, min(64, next_power_of_2(channels)))
    if device.type != "cuda":
        return ElementwiseConfig(max(16, min(1024, next_power_of_2(positions))), block_c, 4)
    return ElementwiseConfig(4096 // block_c, block_c, 4)


@dataclasses.dataclass(frozen=True)
class ElementwisePlan:
    config: ElementwiseConfig
    grid: Tuple[int]
    out_shape: Tuple[int, int, int, int, int]
    scalars: Dict[str, object]
    constexprs: Dict[str, object]


@cached_plan
def plan_bn_act_pool(
    y_shape: Sequence[int],
    *,
    eps: float,
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    has_gamma: bool,
    has_beta: bool,
    device: torch.device,
    config: Optional[ElementwiseConfig] = None,
) -> ElementwisePlan:
    """Output shape, block config, grid and kernel arguments (a function of shapes, for the sm_90 test)."""
    n, channels, conv_d, conv_h, conv_w = (int(s) for s in y_shape)
    pool = tuple(int(p) for p in pool) if pool else (1, 1, 1, 1, 1, 1, 0, 0, 0)
    kernel, stride, padding = pool[0:3], pool[3:6], pool[6:9]
    out_size = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip((conv_d, conv_h, conv_w), kernel, stride, padding)]
    if min(out_size) < 1:
        raise ValueError(f"conv output {tuple(y_shape)} is too small for pool {pool}")
    positions = n * out_size[0] * out_size[1] * out_size[2]
    if positions >= INT32_LIMIT:
        raise IndexOverflowError(f"bn_act_pool: output of {positions} positions is too large for int32 positions")
    if config is None:
        config = select_config(channels, positions, device)
    grid = (cdiv(positions, config.block_p) * cdiv(channels, config.block_c),)
    scalars = dict(
        conv_d=conv_d, conv_h=conv_h, conv_w=conv_w, channels=channels,
        out_d=out_size[0], out_h=out_size[1], out_w=out_size[2], out_positions=positions,
        eps=float(eps), negative_slope=float(negative_slope),
    )
    constexprs = dict(
        POOL_KD=kernel[0], POOL_KH=kernel[1], POOL_KW=kernel[2],
        POOL_SD=stride[0], POOL_SH=stride[1], POOL_SW=stride[2],
        POOL_PD=padding[0], POOL_PH=padding[1], POOL_PW=padding[2],
        HAS_GAMMA=bool(has_gamma), HAS_BETA=bool(has_beta), ACTIVATION=activation,
        BLOCK_P=config.block_p, BLOCK_C=config.block_c,
    )
    return ElementwisePlan(config, grid, (n, channels, *out_size), scalars, constexprs)


def fp32_vectors(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """Per-channel vectors (statistics, γ, β) as the kernels read them: detached contiguous fp32."""
    return tuple(None if t is None else t.detach().to(torch.float32).contiguous() for t in tensors)


def bn_act_pool(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    *,
    eps: float,
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    config: Optional[ElementwiseConfig] = None,
) -> torch.Tensor:
    """``max_pool3d(act(batch_norm(y, mean, var, γ, β)))`` (pool optional) in one launch.

    y: (N, C, D, H, W) channels_last_3d (copied if not); mean, var: fp32 (C,) (var biased);
    γ, β: (C,) or None. Returns (N, C, D', H', W') in y's dtype, channels_last_3d.
    """
    y = y.contiguous(memory_format=torch.channels_last_3d)
    plan = plan_bn_act_pool(
        y.shape, eps=eps, activation=activation, negative_slope=negative_slope, pool=pool,
        has_gamma=gamma is not None, has_beta=beta is not None, device=y.device, config=config,
    )
    out = torch.empty(plan.out_shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last_3d)
    if out.numel() == 0:
        return out
    mean, var, gamma, beta = fp32_vectors(mean, var, gamma, beta)
    bn_act_pool_kernel[plan.grid](
        y, mean, var, gamma if gamma is not None else mean, beta if beta is not None else mean, out,
        **plan.scalars, **plan.constexprs, num_warps=plan.config.num_warps,
    )
    return out
