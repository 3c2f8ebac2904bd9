"""The ``triton`` backend: Triton kernels for the fused Conv3d → BatchNorm3d → activation (→ MaxPool3d).

Forward, all in Triton:

* inference — BatchNorm with running statistics (folded into the conv weight and bias) or no
  BatchNorm: one implicit-GEMM kernel with a bias + activation (+ max-pool) epilogue
  (``c3dzoo.kernels.conv3d_bias_act_pool``);
* training — BatchNorm with batch statistics (norm "batch"): the same implicit-GEMM main loop with
  an epilogue that stores the raw conv output and per-tile (mean, M2) partial statistics
  (``c3dzoo.kernels.conv3d_bn_stats``), a Chan combination of the partials into the batch mean and
  biased variance (torch ops on the small partial buffer, no host synchronisation), then one
  elementwise kernel for normalise + γ/β + activation (+ max-pool) (``c3dzoo.kernels.bn_act_pool``).
  The running statistics are updated from the returned mean/var by the op wrapper.

Backward (every mode) is ``reference.backward``: stock PyTorch, recomputing the conv output from the
saved input, so nothing but x is stored between forward and backward. Triton dgrad/wgrad (and BN
backward via a statistics epilogue on the gradient GEMMs) are not written yet.

Runs on CUDA, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1``; slow, for tests).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from c3dzoo.kernels.bn_act_pool import bn_act_pool
from c3dzoo.kernels.conv3d_bias_act_pool import conv3d_bias_act_pool, pack_weight, runs_interpreted
from c3dzoo.kernels.conv3d_bn_stats import conv3d_bn_stats

from . import reference as _reference
from ._weight_cache import FoldedWeightCache, cached_folded
from ._registry import triton_interpreter_enabled
from .backends import ConvBNActConfig

Tensor = torch.Tensor

_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")


def supports(cfg: ConvBNActConfig) -> Optional[str]:
    """None if the Triton kernels can run ``cfg``, else why not."""
    if cfg.norm not in ("batch", "running", "none"):
        return f"norm={cfg.norm!r} is not supported by the Triton backend"
    if cfg.activation not in ("none", "relu", "leaky_relu"):
        return f"activation {cfg.activation!r} is not supported by the Triton backend"
    if cfg.dtype == "torch.float64":
        return "float64 is not supported by the Triton kernels (no fp64 tensor-core path); use 'reference'"
    if cfg.dtype not in _DTYPES:
        return f"dtype {cfg.dtype} is not supported by the Triton backend (fp16, bf16, fp32 only)"
    if cfg.device == "cpu":
        if not triton_interpreter_enabled():
            return "a CPU tensor needs TRITON_INTERPRET=1 (the Triton interpreter) for the Triton backend"
        if not runs_interpreted():
            return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported (compiled for "
                    "a GPU); set it before the first use of the triton backend")
        if cfg.dtype == "torch.bfloat16":
            return "bfloat16 under the Triton interpreter gives wrong results (its bf16 dot/arithmetic is broken)"
    elif cfg.device != "cuda":
        return f"device {cfg.device!r} is not supported by the Triton backend (cuda, or cpu under TRITON_INTERPRET=1)"
    if len(cfg.pool) not in (0, 9):
        return f"pool {cfg.pool!r} is not kernel(3) + stride(3) + padding(3)"
    return None


# --------------------------------------------------------------------------------------------
# folded + packed weight cache
# --------------------------------------------------------------------------------------------


_weight_cache = FoldedWeightCache()


def _folded_packed_weight(
    weight, bias, bn_weight, bn_bias, running_mean, running_var, *, norm, eps, dtype
) -> Tuple[Tensor, Optional[Tensor]]:
    """(packed weight in ``dtype``, fp32 bias or None), BatchNorm folded in fp32 when norm == "running"."""
    return cached_folded(
        _weight_cache, lambda w, b: (pack_weight(w.to(dtype)), None if b is None else b.contiguous()),
        weight, bias, bn_weight, bn_bias, running_mean, running_var, norm=norm, eps=eps, extra=(dtype,),
    )


# --------------------------------------------------------------------------------------------
# backend entry points (signatures of c3dzoo.ops.reference)
# --------------------------------------------------------------------------------------------


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    norm: str,
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    negative_slope: float,
    pool: Sequence[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward. Returns (out, mean, var), out in x's dtype, channels_last_3d.

    norm "batch": mean and biased var of the conv output per channel, fp32 (C_out,), used to
    normalise (two kernels, see the module docstring). norm "running" (BatchNorm folded) or "none":
    one kernel; mean and var are empty fp32 (no batch statistics in these modes)."""
    if norm not in ("batch", "running", "none"):
        raise NotImplementedError(f"triton backend: norm={norm!r} is not implemented (see supports())")
    if norm == "batch":
        return _forward_batch_norm(
            x, weight, bias, bn_weight, bn_bias, eps=eps, stride=stride, padding=padding,
            dilation=dilation, activation=activation, negative_slope=negative_slope, pool=pool,
        )
    with torch.no_grad():
        w_packed, folded_bias = _folded_packed_weight(
            weight, bias, bn_weight, bn_bias, running_mean, running_var, norm=norm, eps=eps, dtype=x.dtype
        )
        out = conv3d_bias_act_pool(
            x, w_packed, folded_bias,
            kernel_size=tuple(weight.shape[2:]), stride=stride, padding=padding, dilation=dilation,
            activation=activation, negative_slope=negative_slope, pool=tuple(pool), out_dtype=x.dtype,
        )
    # The kernel writes channels_last_3d, which is this backend's output contract (see
    # conv3d_bn_act.output_memory_format): the next fused layer reads it without a copy.
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    mean = x.new_empty(0, dtype=torch.float32)
    var = x.new_empty(0, dtype=torch.float32)  # distinct tensors: custom op outputs must not alias
    return out, mean, var


def _forward_batch_norm(
    x, weight, bias, bn_weight, bn_bias, *, eps, stride, padding, dilation, activation, negative_slope, pool
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward: conv + statistics epilogue, Chan finalize, then normalise/act/pool."""
    with torch.no_grad():
        # norm "none" in the cache: the conv's own weight, packed in x's dtype, and its fp32 bias
        w_packed, conv_bias = _folded_packed_weight(
            weight, bias, None, None, None, None, norm="none", eps=eps, dtype=x.dtype
        )
        y, mean, var = conv3d_bn_stats(
            x, w_packed, conv_bias,
            kernel_size=tuple(weight.shape[2:]), stride=stride, padding=padding, dilation=dilation,
        )
        out = bn_act_pool(
            y, mean, var, bn_weight, bn_bias, eps=eps, activation=activation,
            negative_slope=negative_slope, pool=tuple(pool),
        )
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    return out, mean, var


# Gradients: the reference backward (stock PyTorch, recomputing the conv output from x; in "batch"
# mode it normalises with the mean/var this backend's forward returned). Triton dgrad/wgrad kernels
# are not written yet.
backward = _reference.backward
