"""BatchNorm's batch statistics from per-tile partials, and the running-statistics update, on the
device in three small launches, in place of the ~20 torch ops per training layer that
``_statistics.finalize_statistics`` and a torch running-statistics update take (each a launch of its
own, and host time for each). The same algorithm as the CUDA extension's kernels (csrc/), for
installs without it.

Finalize (two launches): every training-forward kernel emits per-tile (mean, M2) partials
([tiles, C] fp32; every tile holds ``block_m`` positions but the last, which holds the rest, so the
counts follow from the shape and nothing is read back). Chan's combination in float64:

1. ``chan_fold_tiles_kernel`` — program (channel block, split) folds the tiles of its split,
   ``BLOCK_T`` at a time (each block of rows combined at once, then merged into the running
   result), into one (count, mean, M2) per (split, channel) in a float64 workspace;
2. ``chan_fold_splits_kernel`` — program (channel block) folds the splits the same way and writes
   the batch mean and biased variance (fp32).

No Σy² is formed, so |mean| ≫ std costs no precision beyond the partials' own.

Update (one launch, after ``num_batches_tracked += 1`` by the caller): ``running_stats_update_kernel``
blends as ``nn.BatchNorm3d`` does, running = running·(1 − f) + batch·f in fp32 with the unbiased
variance var·count/(count − 1); f = momentum, or 1/num_batches_tracked for momentum=None.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._grid import cdiv, is_interpreted

BLOCK_C = 32  # channels per program: coalesced [rows, 32] fp32 reads of the partials
BLOCK_T = 32  # partial rows folded at once
MIN_TILES_PER_SPLIT = 256  # a program folds at least 8 blocks of rows: the fold, not the launch, dominates
MAX_PROGRAMS = 1024  # a few waves on a Hopper-sized GPU
NUM_WARPS = 4


@triton.jit
def _merge_rows(acc_n, acc_mean, acc_m2, n, mean, m2):
    """Chan's combination: the running (count, mean, M2) per channel ([BLOCK_C] float64) absorbs
    rows of (count, mean, M2) ([rows, BLOCK_C] float64; a row with count 0 counts for nothing)."""
    rows_n = tl.sum(n, axis=0)
    rows_mean = tl.sum(n * mean, axis=0) / tl.maximum(rows_n, 1.0)
    deviation = mean - rows_mean[None, :]
    rows_m2 = tl.sum(m2 + n * deviation * deviation, axis=0)
    total = acc_n + rows_n
    weight = tl.where(total > 0, rows_n / tl.maximum(total, 1.0), 0.0)  # n_rows / n
    delta = rows_mean - acc_mean
    return total, acc_mean + delta * weight, acc_m2 + rows_m2 + delta * delta * acc_n * weight


@triton.jit
def chan_fold_tiles_kernel(
    part_mean_ptr, part_m2_ptr, ws_ptr, channels, tiles, positions, block_m, per_split, splits,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    split = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    begin = split * per_split
    end = tl.minimum(begin + per_split, tiles)
    last_count = positions - (tiles - 1) * block_m
    acc_n = tl.zeros([BLOCK_C], tl.float64)
    acc_mean = tl.zeros([BLOCK_C], tl.float64)
    acc_m2 = tl.zeros([BLOCK_C], tl.float64)
    for first in range(begin, end, BLOCK_T):
        offs_t = first + tl.arange(0, BLOCK_T)
        mask = (offs_t < end)[:, None] & c_mask[None, :]
        offsets = offs_t.to(tl.int64)[:, None] * channels + offs_c[None, :]
        mean = tl.load(part_mean_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        m2 = tl.load(part_m2_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        count = tl.where(offs_t == tiles - 1, last_count, block_m).to(tl.float64)
        n = tl.where(mask, count[:, None], 0.0)
        acc_n, acc_mean, acc_m2 = _merge_rows(acc_n, acc_mean, acc_m2, n, mean, m2)
    row = split.to(tl.int64) * channels + offs_c  # workspace: [3 (count, mean, M2), splits, C]
    plane = splits * channels  # (at most MAX_PROGRAMS splits: far inside int32)
    tl.store(ws_ptr + row, acc_n, mask=c_mask)
    tl.store(ws_ptr + plane + row, acc_mean, mask=c_mask)
    tl.store(ws_ptr + 2 * plane + row, acc_m2, mask=c_mask)


@triton.jit
def chan_fold_splits_kernel(ws_ptr, mean_ptr, var_ptr, channels, splits,
                            BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    plane = splits * channels
    acc_n = tl.zeros([BLOCK_C], tl.float64)
    acc_mean = tl.zeros([BLOCK_C], tl.float64)
    acc_m2 = tl.zeros([BLOCK_C], tl.float64)
    for first in range(0, splits, BLOCK_S):
        offs_s = first + tl.arange(0, BLOCK_S)
        mask = (offs_s < splits)[:, None] & c_mask[None, :]
        offsets = offs_s.to(tl.int64)[:, None] * channels + offs_c[None, :]
        n = tl.load(ws_ptr + offsets, mask=mask, other=0.0)
        mean = tl.load(ws_ptr + plane + offsets, mask=mask, other=0.0)
        m2 = tl.load(ws_ptr + 2 * plane + offsets, mask=mask, other=0.0)
        acc_n, acc_mean, acc_m2 = _merge_rows(acc_n, acc_mean, acc_m2, n, mean, m2)
    tl.store(mean_ptr + offs_c, acc_mean.to(tl.float32), mask=c_mask)
    tl.store(var_ptr + offs_c, (acc_m2 / tl.maximum(acc_n, 1.0)).to(tl.float32), mask=c_mask)


@triton.jit
def running_stats_update_kernel(
    mean_ptr, var_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, channels,
    unbias, momentum, keep,
    CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    if CUMULATIVE:  # momentum=None: f = 1/num_batches_tracked (already incremented), in fp32 as torch takes it
        factor = 1.0 / tl.maximum(tl.load(num_batches_tracked_ptr), 1).to(tl.float32)
        keep = 1.0 - factor
    else:
        factor = momentum
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    unbiased = tl.load(var_ptr + offs_c, mask=c_mask, other=0.0) * unbias
    running_mean = tl.load(running_mean_ptr + offs_c, mask=c_mask, other=0.0)
    running_var = tl.load(running_var_ptr + offs_c, mask=c_mask, other=0.0)
    tl.store(running_mean_ptr + offs_c, running_mean * keep + mean * factor, mask=c_mask)
    tl.store(running_var_ptr + offs_c, running_var * keep + unbiased * factor, mask=c_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def runs_on(device: torch.device) -> bool:
    """Whether these kernels take tensors on ``device``: interpreted kernels (TRITON_INTERPRET=1 when
    this module was imported) take CPU tensors, compiled ones GPU tensors."""
    return device.type == ("cpu" if is_interpreted(chan_fold_tiles_kernel) else "cuda")


def splits_for(tiles: int, channels: int) -> int:
    """How many programs share each channel block's tiles in the first launch."""
    return max(1, min(cdiv(tiles, MIN_TILES_PER_SPLIT), MAX_PROGRAMS // cdiv(channels, BLOCK_C)))


def finalize_statistics(part_mean: torch.Tensor, part_m2: torch.Tensor, positions: int,
                        block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch (mean, biased var), fp32 (C,), from fp32 [tiles, C] per-tile (mean, M2) partials of
    ``block_m`` positions each (the last tile holds the rest of ``positions``): two launches, no
    host synchronisation. ``_statistics.finalize_statistics`` computes the same in torch ops."""
    if part_mean.dtype != torch.float32 or part_m2.dtype != torch.float32 or part_mean.dim() != 2 \
            or part_mean.shape != part_m2.shape:
        raise ValueError(f"partials must be two float32 [tiles, C] tensors, got {part_mean.dtype} "
                         f"{tuple(part_mean.shape)} and {part_m2.dtype} {tuple(part_m2.shape)}")
    tiles, channels = part_mean.shape
    if tiles < 1 or block_m < 1 or not (tiles - 1) * block_m < positions <= tiles * block_m:
        raise ValueError(f"finalize_statistics: {tiles} tiles of {block_m} positions and {positions} positions "
                         "disagree (every tile but the last is full, the last is not empty)")
    part_mean, part_m2 = part_mean.contiguous(), part_m2.contiguous()
    splits = splits_for(tiles, channels)
    per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, per_split)  # no empty split
    workspace = torch.empty((3, splits, channels), dtype=torch.float64, device=part_mean.device)
    mean = torch.empty(channels, dtype=torch.float32, device=part_mean.device)
    var = torch.empty_like(mean)
    chan_fold_tiles_kernel[(cdiv(channels, BLOCK_C), splits)](
        part_mean, part_m2, workspace, channels, tiles, positions, block_m, per_split, splits,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )
    chan_fold_splits_kernel[(cdiv(channels, BLOCK_C),)](
        workspace, mean, var, channels, splits, BLOCK_S=BLOCK_T, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )
    return mean, var


def update_running_stats_(running_mean: torch.Tensor, running_var: torch.Tensor,
                          num_batches_tracked: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                          count: int, momentum: Optional[float]) -> None:
    """running_mean/var ← as ``nn.BatchNorm3d`` in training mode, in place, one launch; all five
    vectors contiguous fp32 of one length. For momentum=None (a cumulative average) the caller has
    already incremented ``num_batches_tracked`` (an int64 scalar), which sets the factor."""
    channels = running_mean.numel()
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("mean", mean), ("var", var)):
        if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous() or t.numel() != channels:
            raise ValueError(f"update_running_stats_: {name} must be a contiguous float32 vector of {channels}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if momentum is None and (num_batches_tracked is None or num_batches_tracked.dtype != torch.int64
                             or num_batches_tracked.numel() != 1):
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, an int64 scalar")
    cumulative = momentum is None
    momentum = 0.0 if cumulative else float(momentum)
    running_stats_update_kernel[(cdiv(channels, BLOCK_C),)](
        mean, var, running_mean, running_var, num_batches_tracked if cumulative else mean, channels,
        float(count) / float(max(count - 1, 1)), momentum, 1.0 - momentum,
        CUMULATIVE=cumulative, BLOCK_C=BLOCK_C, num_warps=1,
    )
