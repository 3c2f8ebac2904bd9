"""Fused SyncBatchNorm: the training path of ``conv3d_bn_act`` with batch statistics taken over
every rank of a ``torch.distributed`` process group.

``c3dzoo.ops.conv3d_bn_act(..., sync=True, process_group=None)`` routes here when BatchNorm uses
batch statistics in training mode and the group has more than one rank (see ``sync_group`` for the
rule). The result equals ``nn.SyncBatchNorm`` on the global batch (the concatenation of every
rank's batch, uneven per-rank batch sizes included):

forward, per layer
    1. y = conv3d(x) + b with the resolved backend's forward at ``norm="none"``,
       ``activation="none"``, no pool (so the triton/cuda conv kernels still run);
    2. local per-channel (count, shifted sum, shifted sum of squares) — see ``_local_moments``;
    3. ONE ``all_reduce`` (SUM) of those 2C+1 values, in fp32 (fp64 for fp64 inputs);
    4. global mean and biased variance; running statistics updated on the device exactly as
       ``nn.BatchNorm3d`` / ``nn.SyncBatchNorm`` do (unbiased variance with the GLOBAL count,
       ``momentum=None`` as a cumulative average, ``num_batches_tracked``);
    5. normalise, γ/β, activation, max-pool: ``c3dzoo.kernels.bn_act_pool`` when the conv ran
       on the triton or cuda backend and Triton is importable, else the reference's stock ops.

backward, per layer
    recompute y = conv3d(x) (as the reference backward does), act/pool backward → dz, local
    per-channel Σdz and Σdz·x̂, ONE ``all_reduce`` (SUM) of those 2C values, then
    dy = γ·invstd·(dz − Σdz/N − x̂·Σdz·x̂/N) with the global N, then the conv's dgrad/wgrad
    (``aten.convolution_backward``). The gradients of γ and β are the LOCAL sums, as
    ``nn.SyncBatchNorm`` returns: DistributedDataParallel averages them with every other parameter
    gradient.

Saved for backward: x, the conv weight and bias, γ, β, the global mean and 1/sqrt(var + eps)
(C values each) and the global count (a 0-d tensor) — as the non-synchronised op, nothing of the
size of the conv output is kept between forward and backward.

Collectives: two per layer and training step (one in forward, one in backward; none in backward
when neither x nor the conv weight needs a gradient). No host synchronisation: the global count
stays on the device. Every rank must call the layers in the same order, as with any collective.

This path is an eager ``torch.autograd.Function``; it has not been tested under ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from . import backends as _backends
from . import reference as _reference
from ._normalize import normalize_act_pool

Tensor = torch.Tensor
_REDUCE_DIMS = (0, 2, 3, 4)


def _dist():
    import torch.distributed as dist

    return dist


def sync_group(sync: bool, process_group, batch_statistics_in_training: bool):
    """The process group to synchronise BatchNorm statistics over, or None for the local path.

    Rule (as ``nn.SyncBatchNorm``): statistics are synchronised only when ``sync`` is set, the call
    uses batch statistics in training mode, torch.distributed is initialised and the group has more
    than one rank. Otherwise (eval mode, frozen BN, a single process, world size 1) the op runs
    its ordinary local path, so the same model code runs with and without torchrun.
    ``process_group=None`` means the default (WORLD) group.
    """
    if process_group is not None and not sync:
        raise ValueError("process_group is given but sync=False: pass sync=True to synchronise "
                         "BatchNorm statistics over it")
    if not sync or not batch_statistics_in_training:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world < 0:
        raise ValueError(f"sync BatchNorm: this rank ({dist.get_rank()}) is not a member of the given process group")
    return group if world > 1 else None


def _local_moments(y: Tensor, shift: Tensor):
    """(count, Σ(y − shift), Σ(y − shift)²) per channel over this rank's conv output, in the
    statistics dtype, formed from a local two-pass (CPU) or Welford (CUDA) mean/variance
    (``reference.batch_statistics``): Σ(y − k) = n·(m − k) and Σ(y − k)² = n·v + n·(m − k)², so no
    sum of large squares is formed locally."""
    channels = y.shape[1]
    count = y.numel() // channels if channels else 0
    dtype = shift.dtype
    if count == 0:  # an empty batch on this rank still joins the collective
        zeros = shift.new_zeros(channels)
        return shift.new_full((1,), 0.0), zeros, zeros.clone()
    mean, var = _reference.batch_statistics(y)
    delta = mean.to(dtype) - shift
    return shift.new_full((1,), float(count)), count * delta, count * (var.to(dtype) + delta * delta)


def global_batch_statistics(y: Tensor, shift: Tensor, group):
    """Global per-channel mean, biased variance and count (0-d tensor) over every rank's ``y``,
    with one all_reduce of 2C+1 values.

    Numerics: the global variance is S2/N − (S1/N)² of sums shifted by ``shift``, a per-channel
    value that must be IDENTICAL on every rank (the running_mean: DDP broadcasts buffers from
    rank 0, and every rank applies the same global update to it; or zeros). That subtraction loses
    about eps·((mean − shift)/std)² relative precision, so a shift near the batch mean makes it
    as accurate as a two-pass variance; with shift 0 (no running statistics, or the first steps
    from running_mean = 0) it is the plain E[y²] − E[y]², sound while |mean| is not ≫ std, as for
    conv outputs of a normally initialised net. Per-rank sums come from a local cancellation-free
    variance, so only the cross-rank combination depends on the shift. The count is carried in the
    statistics dtype: exact up to 2^24 positions per channel in fp32, relative error ≤ 6e-8 above.
    """
    count, s1, s2 = _local_moments(y, shift)
    packed = torch.cat([count, s1, s2])
    _dist().all_reduce(packed, group=group)
    channels = y.shape[1]
    total = packed[0]
    mean_shifted = packed[1:1 + channels] / total
    var = (packed[1 + channels:] / total - mean_shifted * mean_shifted).clamp_min(0)
    return shift + mean_shifted, var, total


class _SyncConvBNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, stride, padding, dilation, activation, negative_slope, pool, backend,
                group, memory_format):
        with torch.autocast(x.device.type, enabled=False):
            conv_only = _backends.LayerParams.of("none", eps, stride, padding, dilation, "none", 0.0, ())
            y, *_ = _backends.get(backend).forward(x, weight, bias, None, None, None, None, conv_only)
            stats = _reference.stats_dtype(x.dtype)
            shift = (running_mean.detach().to(stats) if running_mean is not None
                     else torch.zeros(y.shape[1], dtype=stats, device=y.device))
            mean, var, count = global_batch_statistics(y, shift, group)
            if running_mean is not None:
                # Bessel's correction with the GLOBAL count, which stays on the device
                unbiased = var * (count / (count - 1).clamp_min(1))
                _reference.blend_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                               unbiased, momentum)
            invstd = torch.rsqrt(var + eps)
            # the Triton kernel the triton backend's training forward uses for the same step, when the
            # conv itself ran on a kernel backend
            out = normalize_act_pool(y, mean, var, bn_weight, bn_bias, eps=eps, activation=activation,
                                     negative_slope=negative_slope, pool=pool,
                                     use_kernel=backend in ("triton", "cuda"))
        ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, mean, invstd, count)
        ctx.params = (stride, padding, dilation, activation, negative_slope, pool, group)
        return out.contiguous(memory_format=memory_format)

    @staticmethod
    @once_differentiable  # a double backward through it raises, instead of dropping those terms
    def backward(ctx, grad_out):
        x, weight, bias, bn_weight, bn_bias, mean, invstd, count = ctx.saved_tensors
        stride, padding, dilation, activation, negative_slope, pool, group = ctx.params
        need_x, need_w, need_b, need_g, need_beta = ctx.needs_input_grad[:5]
        dtype = x.dtype
        grad_x = grad_w = grad_bias = grad_gamma = grad_beta = None
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            y = _reference.conv3d(x, weight, None if bias is None else bias.to(dtype), stride, padding, dilation)
            xhat, z = _reference.batch_norm_affine(y, mean, invstd, bn_weight, bn_bias)
            grad_z = _reference.act_pool_backward(grad_out, z, activation, negative_slope, pool)
            sum_dz = grad_z.sum(dim=_REDUCE_DIMS)
            sum_dz_xhat = (grad_z * xhat).sum(dim=_REDUCE_DIMS)
            if need_g:
                grad_gamma = sum_dz_xhat.to(bn_weight.dtype)
            if need_beta:
                grad_beta = sum_dz.to(bn_bias.dtype)
            if need_b:
                # batch normalisation removes any per-channel shift: the exact gradient is zero
                grad_bias = torch.zeros_like(bias)
            if need_x or need_w:
                channels = sum_dz.shape[0]
                packed = torch.cat([sum_dz, sum_dz_xhat])
                _dist().all_reduce(packed, group=group)
                grad_y = _reference.batch_norm_input_grad(
                    grad_z, xhat, invstd, bn_weight, packed[:channels], packed[channels:], count
                ).to(dtype)
                gx, gw, _ = _reference.convolution_backward(grad_y, x, weight, stride, padding, dilation,
                                                            [need_x, need_w, False])
                grad_x = gx if need_x else None
                grad_w = gw if need_w else None
        return (grad_x, grad_w, grad_bias, grad_gamma, grad_beta) + (None,) * 14


def sync_conv3d_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    *,
    momentum: Optional[float],
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    backend: str,
    group,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """Training-mode fused op with statistics over ``group`` (already validated inputs; ``backend``
    is the resolved name of the backend that runs the conv). Called by ``conv3d_bn_act``."""
    return _SyncConvBNAct.apply(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
        momentum, float(eps), tuple(stride), tuple(padding), tuple(dilation), activation,
        float(negative_slope), tuple(pool), backend, group, memory_format,
    )
