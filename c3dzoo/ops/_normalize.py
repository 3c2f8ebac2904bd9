"""Step 2 of every training forward that has the conv output y and its batch statistics in hand:
normalise + γ/β + activation (+ max-pool), by the Triton kernel where it can run, else stock ops."""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

from . import reference as _reference
from ._device import device_scope
from ._registry import triton_interpreter_enabled

Tensor = torch.Tensor


def kernel_available(y: Tensor) -> bool:
    """Whether ``c3dzoo.kernels.bn_act_pool`` can run on ``y``: a CUDA tensor with Triton
    installed, or a CPU tensor with the kernels built for the Triton interpreter (TRITON_INTERPRET=1
    set before they were imported: compiled ones would be handed host pointers)."""
    if not (y.is_cuda or triton_interpreter_enabled()):
        return False
    try:
        module = importlib.import_module("c3dzoo.kernels.bn_act_pool")
    except Exception:  # no (working) Triton: the stock ops do the same step
        return False
    from c3dzoo.kernels._grid import is_interpreted

    return y.is_cuda or is_interpreted(module.bn_act_pool_kernel)


def normalize_act_pool(
    y: Tensor,
    mean: Tensor,
    var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    *,
    eps: float,
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
    use_kernel: bool,
) -> Tensor:
    """``max_pool3d(act(batch_norm(y, mean, var, γ, β)))`` (pool optional) in y's dtype: normalised
    in fp32, rounded, activated, pooled — the reference's order either way. ``use_kernel`` asks for
    the Triton kernel (ignored where ``kernel_available`` is False)."""
    if use_kernel and kernel_available(y):
        from c3dzoo.kernels.bn_act_pool import bn_act_pool

        with device_scope(y):
            return bn_act_pool(y, mean, var, bn_weight, bn_bias, eps=eps, activation=activation,
                               negative_slope=negative_slope, pool=tuple(pool))
    z = _reference.batch_norm_output(y, mean, torch.rsqrt(var + eps), bn_weight, bn_bias)
    return _reference.act_pool(z, activation, negative_slope, pool)
