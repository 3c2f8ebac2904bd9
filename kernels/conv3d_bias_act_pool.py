"""Conv3d + bias (+ residual) + activation (+ MaxPool3d) in one Triton kernel: the inference path.

With BatchNorm folded into the weight and bias (eval mode), Conv3d → BatchNorm3d → activation →
MaxPool3d is one implicit-GEMM convolution (``_implicit_gemm``) with an epilogue that adds the bias,
applies the activation and max-pools, so only the pooled tensor is ever written.

Pool fusion: the rows of a tile (BLOCK_M) are POOLED output positions. For every offset of the pool
window the kernel computes the conv tile of the conv positions under that offset, applies bias and
activation, replaces rows that fall in the pool's padding or outside the conv output by -inf, and
keeps a running max. Without a pool, the pool is 1×1×1 / stride 1 / padding 0: one window, and the
same code. With stride = kernel (C3D's pools) every conv output is computed exactly once; overlapping
pools recompute the shared conv positions instead of storing them.

Residual fusion (no pool): a residual block's last conv adds the block's shortcut tensor (laid out
as the output) before the activation, so ``act(bn(conv(x)) + shortcut)`` is one pass instead of
a conv write, then an add and an activation reading it back.

The running max is kept in the output dtype: rounding is monotonic, so max-then-round equals
round-then-max, and a bf16/fp16 running max lives in fewer registers than an fp32 one (it stays
live across the whole K loop, next to the fp32 accumulator).

Tensors in: x (N, C_in, D, H, W) in any layout (made channels-last, NDHWC), the weight packed by
``pack_weight``, an fp32 bias or None. Out: (N, C_out, D', H', W') in channels_last_3d.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _autotune
from ._grid import _hashable, cached_plan, cdiv, conv_allows_tf32, is_interpreted, next_power_of_2
from ._limits import INT32_LIMIT, IndexOverflowError
from ._implicit_gemm import apply_activation, conv_tile, output_tile, pool_max



@triton.jit
def conv3d_bias_act_pool_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, in_stats_ptr, res_ptr,
    in_d, in_h, in_w, in_c,
    conv_d, conv_h, conv_w, out_c,
    out_d, out_h, out_w, out_positions,
    stride_d, stride_h, stride_w,
    pad_d, pad_h, pad_w,
    dil_d, dil_h, dil_w,
    negative_slope, in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    POOL_KD: tl.constexpr, POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    POOL_SD: tl.constexpr, POOL_SH: tl.constexpr, POOL_SW: tl.constexpr,
    POOL_PD: tl.constexpr, POOL_PH: tl.constexpr, POOL_PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    FLAT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    sample_size = in_d * in_h * in_w * in_c
    (offs_m, offs_n, m_mask, n_mask, pooled_d, pooled_h, pooled_w, first_sample, row_offset) = output_tile(
        tl.program_id(0), out_c, out_positions, out_d, out_h, out_w, sample_size, BLOCK_M, BLOCK_N)
    x_tile_ptr = x_ptr + first_sample.to(tl.int64) * sample_size
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
    out_offsets = offs_m.to(tl.int64)[:, None] * out_c + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]

    out_dtype = out_ptr.dtype.element_ty
    pooled = tl.full((BLOCK_M, BLOCK_N), float("-inf"), out_dtype)
    for window in range(POOL_KD * POOL_KH * POOL_KW):
        conv_pd = pooled_d * POOL_SD - POOL_PD + window // (POOL_KH * POOL_KW)
        conv_ph = pooled_h * POOL_SH - POOL_PH + (window // POOL_KW) % POOL_KH
        conv_pw = pooled_w * POOL_SW - POOL_PW + window % POOL_KW
        # rows under the pool's padding (or past the end) read nothing and pool as -inf
        conv_valid = (
            m_mask
            & (conv_pd >= 0) & (conv_pd < conv_d)
            & (conv_ph >= 0) & (conv_ph < conv_h)
            & (conv_pw >= 0) & (conv_pw < conv_w)
        )
        acc = conv_tile(
            x_tile_ptr, w_ptr, row_offset,
            conv_pd * stride_d - pad_d, conv_ph * stride_h - pad_h, conv_pw * stride_w - pad_w,
            conv_valid, offs_n,
            in_d, in_h, in_w, in_c, out_c, dil_d, dil_h, dil_w, in_stats_ptr, in_eps, in_slope,
            KD, KH, KW, BLOCK_M, BLOCK_N, BLOCK_K, FLAT_K, INPUT_PRECISION,
            INPUT_NORM, INPUT_ACTIVATION,
        )
        if HAS_BIAS:
            acc = acc + bias[None, :]
        if HAS_RESIDUAL:  # only without a pool (the launcher's check): the rows are output positions
            acc = acc + tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        y = apply_activation(acc, ACTIVATION, negative_slope)
        y = tl.where(conv_valid[:, None], y, float("-inf"))
        pooled = pool_max(pooled, y.to(out_dtype)).to(out_dtype)  # triton 3.6: max of bf16 is fp32

    tl.store(out_ptr + out_offsets, pooled, mask=out_mask)


def runs_interpreted() -> bool:
    """Whether the conv kernels were built for the Triton interpreter (``_grid.is_interpreted``)."""
    return is_interpreted(conv3d_bias_act_pool_kernel)


# --------------------------------------------------------------------------------------------
# tile configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One tiling of the kernel: BLOCK_M (pooled) positions × BLOCK_N channels, K in BLOCK_K steps."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    flat_k: bool = False  # the tiny-C_in main loop (K = taps·C_in in BLOCK_K chunks)

    @property
    def name(self) -> str:
        loop = "flat_k" if self.flat_k else "channel_blocks"
        return f"{loop}_{self.block_m}x{self.block_n}x{self.block_k}_w{self.num_warps}_s{self.num_stages}"

    def for_dtype(self, dtype: torch.dtype, tf32: bool) -> "TileConfig":
        """The variant for ``dtype`` (the configs below are for bf16/fp16).

        fp32 as TF32 (tensor cores): half the K depth, so shared memory per stage stays the same,
        and at most 64 columns on 8 warps, since the fused pool's running max is fp32 too.
        Full-precision fp32 has no tensor-core path (``tl.dot`` runs on FMA units and holds its
        operands in registers): small 64×64×16 tiles, 8 warps, one stage (no
        cp.async pipeline to feed; with a fused pool two stages spilled under triton 3.6).
        """
        if dtype != torch.float32:
            return self
        if not tf32:
            return TileConfig(64, 64, 16, num_warps=8, num_stages=1, flat_k=self.flat_k)
        block_n = min(self.block_n, 64)
        return dataclasses.replace(
            self, block_k=max(16, self.block_k // 2), block_n=block_n,
            num_warps=8 if self.block_m * block_n >= 128 * 64 else self.num_warps,
        )


# Tuned for Hopper (H100/H200): 128-row tiles keep one or two warpgroups of wgmma busy, 3–4 stages of
# cp.async loads. Register budget (255 a thread): the fp32 accumulator plus, with a fused pool, the
# running max, so 128×128 and 128×64 tiles take 8 warps. Every entry, in every dtype variant, is
# compiled for sm_90 in tests/test_triton_sm90.py (wgmma, shared memory, no spills).
CHANNEL_BLOCKS_128x128x64 = TileConfig(128, 128, 64, num_warps=8, num_stages=3)  # C_in ≥ 64, C_out > 64
CHANNEL_BLOCKS_128x128x32 = TileConfig(128, 128, 32, num_warps=8, num_stages=4)  # 16 ≤ C_in < 64
CHANNEL_BLOCKS_128x64x64 = TileConfig(128, 64, 64, num_warps=8, num_stages=3)  # C_out ≤ 64
CHANNEL_BLOCKS_64x64x64 = TileConfig(64, 64, 64, num_warps=4, num_stages=3)  # too few tiles to fill the GPU
# C_in < 16 (C3D's conv1, the ResNet stems): 128 rows on 8 warps with 16-deep K steps. Triton 3.6 (our
# GPU machine's) generates far more registers for the gathered flat-K loads than 3.9: 4 warps at
# 128x64x32 used 255 registers and spilled 0.5-1.4 KB there; this config spills on neither
# (tests/test_triton_sm90.py compiles every config with the installed triton)
FLAT_K_128x64x16 = TileConfig(128, 64, 16, num_warps=8, num_stages=3, flat_k=True)
HOPPER_CONFIGS: Tuple[TileConfig, ...] = (
    CHANNEL_BLOCKS_128x128x64, CHANNEL_BLOCKS_128x128x32, CHANNEL_BLOCKS_128x64x64,
    CHANNEL_BLOCKS_64x64x64, FLAT_K_128x64x16,
)

def tuning_candidates(default: TileConfig, shipped: Sequence[TileConfig], in_c: int, dtype: torch.dtype,
                      tf32: bool, channel_step=lambda c: c.block_k, variant=None) -> Tuple[TileConfig, ...]:
    """What autotuning (``_autotune``) may launch instead of ``default``, the per-shape rule's choice:
    every ``shipped`` channel-block config whose step over the input channels (``channel_step``)
    the channels fill, in the launch's dtype variant (then ``variant(config)``, if given) — each one
    compiled for sm_90 in tests/test_triton_sm90.py. A flat-K launch (C_in < 16) has its one config."""
    if default.flat_k:
        return (default,)
    candidates = [default]
    for config in shipped:
        if config.flat_k or channel_step(config) > next_power_of_2(in_c):
            continue  # flat K is for C_in < 16; else most of every step would be masked-off channels
        config = config.for_dtype(dtype, tf32)
        if variant is not None:
            config = variant(config)
        if config not in candidates:
            candidates.append(config)
    return tuple(candidates)


def autotuned_plan(kernel: str, x: torch.Tensor, plan: LaunchPlan, make_plan, launch, settings: dict,
                   shape_key: tuple, shipped: Sequence[TileConfig] = HOPPER_CONFIGS,
                   channel_step=lambda c: c.block_k, prologue_and_pool: bool = False) -> LaunchPlan:
    """``plan`` (the per-shape rule's), or with autotuning on, the plan of the fastest candidate
    config for this launch (``_autotune.pick``). ``make_plan(config)`` plans the launch with
    ``config``, ``launch(plan)`` runs it on the real arguments; ``settings`` (the planner's keyword
    arguments) and ``shape_key`` (shapes besides x's) identify the launch."""
    if not _autotune.enabled():
        return plan
    tf32 = _uses_tf32(x.dtype, x.device)
    variant = (lambda c: with_prologue_and_pool(c, x.dtype, tf32)) if prologue_and_pool else None
    candidates = tuning_candidates(plan.config, shipped, int(x.shape[1]), x.dtype, tf32, channel_step, variant)
    key = (tuple(x.shape), x.dtype, tf32, x.device.index, shape_key,
           tuple((k, _hashable(v)) for k, v in settings.items()))
    best = _autotune.pick(kernel, key, plan.config, candidates, lambda c: launch(make_plan(c)), x.device,
                          name=lambda c: c.name)
    return plan if best is plan.config else make_plan(best)


def _uses_tf32(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.float32 and device.type == "cuda" and conv_allows_tf32()


NO_POOL = (1, 1, 1, 1, 1, 1, 0, 0, 0)  # kernel, stride, padding of a pool that changes nothing


def _prologue_and_pool(input_activation: Optional[str], pool: Sequence[int]) -> bool:
    """Whether a launch has both the input prologue and a real pool (``with_prologue_and_pool``)."""
    return input_activation is not None and bool(pool) and tuple(int(p) for p in pool) != NO_POOL


def with_prologue_and_pool(config: TileConfig, dtype: torch.dtype, tf32: bool) -> TileConfig:
    """The variant of a (dtype-adjusted) config for a launch with BOTH the input prologue and a
    fused pool: the prologue's fp32 temporaries on every input tile come on top of the accumulator
    and the pool's running max. Measured on sm_90 (tests/test_triton_sm90.py, triton 3.6 and 3.9):
    128-column tiles spilled up to 84 B, so at most 64 columns on 8 warps; full-precision fp32 (no
    tensor cores, operands in registers) 4 warps, and 32 rows for flat K; TF32 flat K 64 rows."""
    if dtype == torch.float32 and not tf32:
        return dataclasses.replace(config, block_m=32 if config.flat_k else 64, num_warps=4)
    if config.flat_k:
        return dataclasses.replace(config, block_m=64) if dtype == torch.float32 else config
    return dataclasses.replace(config, block_n=min(config.block_n, 64), num_warps=8)


# Below this many input channels a channel block would mostly multiply zeros: flatten K instead.
FLAT_K_MAX_IN_CHANNELS = 16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(1, n))))


def _use_flat_k(in_c: int, taps: int) -> bool:
    return in_c < FLAT_K_MAX_IN_CHANNELS


def _interpreter_config(in_c: int, out_c: int, taps: int, positions: int) -> TileConfig:
    """The interpreter pays per program instance and per loop step, not per element: few big tiles."""
    flat_k = _use_flat_k(in_c, taps)
    block_k = _next_pow2(taps * in_c, 16, 128) if flat_k else _next_pow2(in_c, 16, 64)
    return TileConfig(
        _next_pow2(positions, 16, 128), _next_pow2(out_c, 16, 64), block_k,
        num_warps=4, num_stages=1, flat_k=flat_k,
    )


def select_config(
    in_c: int, out_c: int, taps: int, positions: int, dtype: torch.dtype, device: torch.device, tf32: bool
) -> TileConfig:
    """A deterministic per-shape choice from ``HOPPER_CONFIGS`` on CUDA, big tiles for the
    interpreter elsewhere (no autotuning: it needs a GPU, and several configs fail under the
    interpreter)."""
    if device.type != "cuda":
        return _interpreter_config(in_c, out_c, taps, positions)
    if _use_flat_k(in_c, taps):
        config = FLAT_K_128x64x16
    elif out_c <= 64:
        config = CHANNEL_BLOCKS_128x64x64
    elif in_c < 64:
        config = CHANNEL_BLOCKS_128x128x32
    else:
        config = CHANNEL_BLOCKS_128x128x64
    if not config.flat_k:
        tiles = cdiv(positions, config.block_m) * cdiv(out_c, config.block_n)
        if tiles < _sm_count(device.index if device.index is not None else torch.cuda.current_device()):
            config = CHANNEL_BLOCKS_64x64x64
    return config.for_dtype(dtype, tf32)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, kD, kH, kW) → the GEMM matrix [kD·kH·kW·C_in, C_out], K ordered (kd, kh, kw, c_in)."""
    c_out = weight.shape[0]
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, c_out).contiguous()


def checked_input_stats(input_stats: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """The prologue's [4, C_in] (mean, var, γ, β) as the kernels read them: contiguous fp32."""
    if input_stats is None:
        return None
    if tuple(input_stats.shape) != (4, x.shape[1]):
        raise ValueError(f"input_stats must have shape (4, {x.shape[1]}) (mean, var, γ, β of x's "
                         f"channels), got {tuple(input_stats.shape)}")
    return input_stats.detach().to(torch.float32).contiguous()


def _triple(v) -> Tuple[int, int, int]:
    return tuple(int(i) for i in v)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch needs besides the tensors (shared by the launcher and the sm_90 tests)."""

    config: TileConfig
    grid: Tuple[int]
    out_shape: Tuple[int, int, int, int, int]
    scalars: Dict[str, object]  # the kernel's non-constexpr scalar arguments, in order
    constexprs: Dict[str, object]


@cached_plan
def plan_launch(
    x_shape: Sequence[int],
    out_c: int,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    has_bias: bool,
    dtype: torch.dtype,
    device: torch.device,
    config: Optional[TileConfig] = None,
    input_activation: Optional[str] = None,
    input_eps: float = 0.0,
    input_negative_slope: float = 0.0,
    has_residual: bool = False,
) -> LaunchPlan:
    """Output geometry, tile config, grid and kernel arguments of one launch. A function of shapes
    alone (no tensors), so the sm_90 tests compile exactly what the launcher would launch.
    ``input_activation`` (not None): the input prologue normalises and activates x (see
    ``_implicit_gemm``)."""
    n, in_c, in_d, in_h, in_w = (int(s) for s in x_shape)
    kd, kh, kw = _triple(kernel_size)
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    conv_size = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip((in_d, in_h, in_w), (kd, kh, kw), stride, padding, dilation)
    ]
    pool = tuple(int(p) for p in pool) if pool else NO_POOL
    pool_kernel, pool_stride, pool_padding = pool[0:3], pool[3:6], pool[6:9]
    out_size = [
        (s + 2 * p - k) // st + 1 for s, k, st, p in zip(conv_size, pool_kernel, pool_stride, pool_padding)
    ]
    if min(conv_size) < 1 or min(out_size) < 1:
        raise ValueError(f"input {tuple(x_shape)} is too small for kernel {(kd, kh, kw)} and pool {pool}")
    if has_residual and pool != NO_POOL:
        raise ValueError(f"a residual is added before the activation of the conv output; with pool {pool} the "
                         f"kernel writes pooled rows, so residual and pool do not combine")
    positions_per_sample = out_size[0] * out_size[1] * out_size[2]
    positions = n * positions_per_sample
    tf32 = _uses_tf32(dtype, device)
    if config is None:
        config = select_config(in_c, out_c, kd * kh * kw, positions, dtype, device, tf32)
        if _prologue_and_pool(input_activation, pool) and device.type == "cuda":
            config = with_prologue_and_pool(config, dtype, tf32)
    # int32 in the kernel: input offsets within the samples one tile spans, the pooled position
    # index, and weight offsets
    samples_per_tile = (config.block_m - 1) // positions_per_sample + 2
    sample_size = in_d * in_h * in_w * in_c
    if (
        min(samples_per_tile, n) * sample_size >= INT32_LIMIT
        or positions >= INT32_LIMIT
        or kd * kh * kw * in_c * out_c >= INT32_LIMIT
    ):
        raise IndexOverflowError(f"conv3d_bias_act_pool: input {tuple(x_shape)} is too large for the kernel's int32 offsets")
    grid = (cdiv(positions, config.block_m) * cdiv(out_c, config.block_n),)
    scalars = dict(
        in_d=in_d, in_h=in_h, in_w=in_w, in_c=in_c,
        conv_d=conv_size[0], conv_h=conv_size[1], conv_w=conv_size[2], out_c=out_c,
        out_d=out_size[0], out_h=out_size[1], out_w=out_size[2], out_positions=positions,
        stride_d=stride[0], stride_h=stride[1], stride_w=stride[2],
        pad_d=padding[0], pad_h=padding[1], pad_w=padding[2],
        dil_d=dilation[0], dil_h=dilation[1], dil_w=dilation[2],
        negative_slope=float(negative_slope),
        in_eps=float(input_eps), in_slope=float(input_negative_slope),
    )
    constexprs = dict(
        KD=kd, KH=kh, KW=kw,
        POOL_KD=pool_kernel[0], POOL_KH=pool_kernel[1], POOL_KW=pool_kernel[2],
        POOL_SD=pool_stride[0], POOL_SH=pool_stride[1], POOL_SW=pool_stride[2],
        POOL_PD=pool_padding[0], POOL_PH=pool_padding[1], POOL_PW=pool_padding[2],
        HAS_BIAS=bool(has_bias), ACTIVATION=activation, HAS_RESIDUAL=bool(has_residual),
        FLAT_K=config.flat_k, INPUT_PRECISION="tf32" if tf32 else "ieee",
        INPUT_NORM=input_activation is not None, INPUT_ACTIVATION=input_activation or "none",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )
    return LaunchPlan(config, grid, (n, out_c, *out_size), scalars, constexprs)


def conv3d_bias_act_pool(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    out_dtype: torch.dtype,
    config: Optional[TileConfig] = None,
    input_stats: Optional[torch.Tensor] = None,
    input_eps: float = 0.0,
    input_activation: str = "none",
    input_negative_slope: float = 0.0,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``max_pool3d(act(conv3d(x, w) + bias))`` (pool optional) with one kernel launch.

    x: (N, C_in, D, H, W), any layout (copied to channels-last if it is not); w_packed: from
    ``pack_weight``, in x's dtype; bias: fp32 (C_out,) or None; pool: () or kernel(3) + stride(3) +
    padding(3). Returns (N, C_out, D', H', W') in ``out_dtype``, channels_last_3d.
    ``input_stats`` ([4, C_in] fp32: mean, biased var, γ, β): x is a raw conv output, and the conv
    reads ``input_activation(batch_norm(x))`` instead (prologue fusion, see ``_implicit_gemm``).
    ``residual`` (no pool): a tensor of the output's shape, added (in fp32) before the activation:
    ``act(conv3d(x, w) + bias + residual)``. ``config`` overrides the tile choice (tests).
    """
    if w_packed.dtype != x.dtype:
        raise TypeError(f"w_packed is {w_packed.dtype} but x is {x.dtype}")
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w_packed = w_packed.contiguous()
    out_c = w_packed.shape[1]
    input_stats = checked_input_stats(input_stats, x)
    settings = dict(
        kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
        activation=activation, negative_slope=negative_slope, pool=pool, has_bias=bias is not None,
        input_activation=None if input_stats is None else input_activation,
        input_eps=input_eps, input_negative_slope=input_negative_slope, has_residual=residual is not None,
    )

    def make_plan(tile_config: Optional[TileConfig]) -> LaunchPlan:
        return plan_launch(x.shape, out_c, dtype=x.dtype, device=x.device, config=tile_config, **settings)

    plan = make_plan(config)
    kd, kh, kw = _triple(kernel_size)
    if w_packed.shape[0] != kd * kh * kw * x.shape[1]:
        raise ValueError(
            f"w_packed of shape {tuple(w_packed.shape)} does not match x {tuple(x.shape)} and kernel {(kd, kh, kw)}"
        )
    if residual is not None:
        if tuple(residual.shape) != tuple(plan.out_shape) or residual.device != x.device:
            raise ValueError(f"residual of shape {tuple(residual.shape)} on {residual.device} does not match the "
                             f"output {tuple(plan.out_shape)} on {x.device}")
        if not residual.is_floating_point():
            raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
        residual = residual.contiguous(memory_format=torch.channels_last_3d)  # the output's layout
    out = torch.empty(plan.out_shape, dtype=out_dtype, device=x.device, memory_format=torch.channels_last_3d)
    if out.numel() == 0:
        return out
    tensors = (x, w_packed, bias if bias is not None else w_packed, out,
               input_stats if input_stats is not None else w_packed, residual if residual is not None else out)
    if config is None:
        plan = autotuned_plan("conv3d_bias_act_pool", x, plan, make_plan, lambda p: _launch(p, tensors), settings,
                              (out_c,), prologue_and_pool=_prologue_and_pool(settings["input_activation"], pool))
    _launch(plan, tensors)
    return out


def _launch(plan: LaunchPlan, tensors: Tuple[torch.Tensor, ...]) -> None:
    conv3d_bias_act_pool_kernel[plan.grid](
        *tensors, **plan.scalars, **plan.constexprs,
        num_warps=plan.config.num_warps, num_stages=plan.config.num_stages,
    )
