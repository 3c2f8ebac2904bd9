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
* prologue fusion — a training-mode layer without a pool that feeds another conv (``defer=True``
  in ``conv3d_bn_act``) stops after step 1 (norm "stats": raw y + statistics), and the next layer's
  conv kernel normalises + activates every input tile as it loads it (``input_norm``; the
  ``_implicit_gemm`` input prologue, the same code as ``bn_act_pool``), so that activation is
  never written. Its backward: ``normalize_input`` recomputes the activation (``bn_act_pool``),
  the layer's backward runs on it, and ``input_norm_backward`` takes the input gradient back
  through the previous layer's activation and BatchNorm (``act_pool_backward`` + ``bn_backward_``).

Backward, in Triton too (``backward``): only x is saved between forward and backward (plus the fp32
batch mean/var); the conv output is recomputed by the forward's own kernel, then
``c3dzoo.kernels.bn_act_pool_backward`` (max-pool + activation backward with the per-channel BatchNorm
sums Σdz and Σdz·x̂ in the same pass, then BatchNorm's backward in place), ``conv3d_dgrad`` (the
forward kernel on the flipped weight, stride 1) and ``conv3d_wgrad`` (implicit GEMM over positions,
split-K). Overlapping pool windows, and the input gradient of strided convs, use stock PyTorch.

Depthwise convs (groups = C_in = C_out: CSN's and X3D's conv_b) take the direct kernels of
``c3dzoo.kernels.conv3d_depthwise`` at every step above instead of the implicit GEMM: the forward
with the same epilogues (bias + residual + activation, or the raw output + statistics) and input
prologue, the input gradient (a transposed gather, any stride) and the weight gradient; the
elementwise kernels are shared. Other grouped convs, and a depthwise conv with a fused pool, run on
``reference`` (``supports``).

Runs on CUDA, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1``; slow, for tests).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from c3dzoo.kernels.bn_act_pool import bn_act_pool
from c3dzoo.kernels.bn_act_pool_backward import act_pool_backward, bn_backward_, pool_overlaps
from c3dzoo.kernels.conv3d_bias_act_pool import conv3d_bias_act_pool, pack_weight, runs_interpreted
from c3dzoo.kernels.conv3d_bn_stats import conv3d_bn_stats
from c3dzoo.kernels.conv3d_depthwise import (conv3d_depthwise, conv3d_depthwise_bn_stats, conv3d_depthwise_dgrad,
                                             conv3d_depthwise_wgrad, pack_depthwise_weight)
from c3dzoo.kernels.conv3d_dgrad import conv3d_dgrad, dgrad_unsupported_reason, pack_dgrad_weight
from c3dzoo.kernels.conv3d_wgrad import conv3d_wgrad
from c3dzoo.kernels._limits import IndexOverflowError

from . import batch_statistics
from . import backends as _backends
from . import reference as _reference
from ._device import device_scope
from ._weight_cache import FoldedWeightCache, cached_folded
from ._registry import triton_cpu_unsupported_reason
from .backends import ConvBNActConfig, InputNorm, LayerParams

Tensor = torch.Tensor

_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")


def device_reason(device_type: str) -> Optional[str]:
    """None if the Triton kernels can take tensors of ``device_type`` now, else why not."""
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        return triton_cpu_unsupported_reason(runs_interpreted)
    return f"device {device_type!r} is not supported by the Triton backend (cuda, or cpu under TRITON_INTERPRET=1)"


def supports(cfg: ConvBNActConfig) -> Optional[str]:
    """None if the Triton kernels can run ``cfg``, else why not."""
    if cfg.norm not in ("batch", "stats", "running", "none"):
        return f"norm={cfg.norm!r} is not supported by the Triton backend"
    if cfg.activation not in ("none", "relu", "leaky_relu", "silu"):
        return f"activation {cfg.activation!r} is not supported by the Triton backend"
    if cfg.dtype == "torch.float64":
        return "float64 is not supported by the Triton kernels (no fp64 tensor-core path); use 'reference'"
    if cfg.dtype not in _DTYPES:
        return f"dtype {cfg.dtype} is not supported by the Triton backend (fp16, bf16, fp32 only)"
    reason = device_reason(cfg.device)
    if reason is not None:
        return reason
    if cfg.device == "cpu" and cfg.dtype == "torch.bfloat16":
        return "bfloat16 under the Triton interpreter gives wrong results (its bf16 dot/arithmetic is broken)"
    if len(cfg.pool) not in (0, 9):
        return f"pool {cfg.pool!r} is not kernel(3) + stride(3) + padding(3)"
    if cfg.residual and (cfg.pool or cfg.norm not in ("running", "none")):
        return "the residual epilogue is for inference (BatchNorm folded or absent) without a pool"
    if cfg.groups != 1:
        if not cfg.groups == cfg.in_channels == cfg.out_channels:
            return (f"groups={cfg.groups} with {cfg.in_channels} input and {cfg.out_channels} output channels: the "
                    f"Triton kernels run dense (groups=1) and depthwise (groups = C_in = C_out) convs")
        if cfg.pool:
            return "a depthwise conv with a fused max-pool is not implemented"
    return None


def is_depthwise(x: Tensor, weight: Tensor) -> bool:
    """Whether the conv of ``x`` by ``weight`` is depthwise (groups = C_in = C_out > 1), which the
    direct kernels of ``c3dzoo.kernels.conv3d_depthwise`` compute (the others: implicit GEMM)."""
    return weight.shape[1] == 1 and weight.shape[0] == x.shape[1] > 1


# --------------------------------------------------------------------------------------------
# folded + packed weight cache
# --------------------------------------------------------------------------------------------


_weight_cache = FoldedWeightCache()


def _folded_packed_weight(
    weight, bias, bn_weight, bn_bias, running_mean, running_var, *, norm, eps, dtype, use_cache=True,
    depthwise=False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """(packed weight in ``dtype``, fp32 bias or None), BatchNorm folded in fp32 when norm == "running"
    (``use_cache``: see ``cached_folded``). ``depthwise``: the depthwise kernels' packing, fp32 in any
    ``dtype`` (``pack_depthwise_weight``)."""
    pack = pack_depthwise_weight if depthwise else (lambda w: pack_weight(w.to(dtype)))
    return cached_folded(
        _weight_cache, lambda w, b: (pack(w), None if b is None else b.contiguous()),
        weight, bias, bn_weight, bn_bias, running_mean, running_var, norm=norm, eps=eps,
        extra=("depthwise",) if depthwise else (dtype,), use_cache=use_cache,
    )


# --------------------------------------------------------------------------------------------
# backend entry points (signatures of c3dzoo.ops.reference)
# --------------------------------------------------------------------------------------------


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    params: LayerParams,
    input_norm: Optional[InputNorm] = None,
    *,
    keep_conv_output: bool = False,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward. Returns (out, mean, var, conv output, pool argmax), out in x's dtype,
    channels_last_3d; the argmax always empty (``keeps_pool_argmax``: the backward's kernels
    recompute the pool's decisions from the conv output).

    norm "batch": mean and biased var of the conv output per channel, fp32 (C_out,), used to
    normalise (two kernels, see the module docstring); norm "stats": the conv output itself with
    those statistics (one kernel; the next layer normalises). norm "running" (BatchNorm folded) or
    "none": one kernel; mean and var are empty fp32 (no batch statistics in these modes).
    ``input_norm`` (an ``InputNorm``): the previous layer's BatchNorm + activation, applied by the
    conv kernel's input prologue (x is that layer's raw conv output). ``keep_conv_output``: as
    ``reference.forward``'s (norm "batch" writes the raw conv output anyway, so keeping it costs
    only the memory it holds until the backward). ``residual`` (norm "running" or "none", no pool):
    added in the epilogue before the activation."""
    if params.norm not in ("batch", "stats", "running", "none"):
        raise NotImplementedError(f"triton backend: norm={params.norm!r} is not implemented (see supports())")
    prologue = _prologue_arguments(input_norm)
    if residual is not None and params.norm in ("batch", "stats"):
        raise NotImplementedError("triton backend: a residual with batch statistics (see supports())")
    if params.norm in ("batch", "stats"):
        out, mean, var, y = _forward_batch_norm(x, weight, bias, bn_weight, bn_bias, params, prologue)
        return (out, mean, var, _reference.kept_conv_output(y, params, keep_conv_output),
                _reference.no_pool_argmax(x))
    depthwise = is_depthwise(x, weight)
    with torch.no_grad():
        w_packed, folded_bias = _folded_packed_weight(
            weight, bias, bn_weight, bn_bias, running_mean, running_var, norm=params.norm, eps=params.eps,
            dtype=x.dtype, depthwise=depthwise,
        )
        if depthwise:  # (supports(): no pool)
            out = conv3d_depthwise(
                x, w_packed, folded_bias, kernel_size=tuple(weight.shape[2:]), **params.geometry(),
                activation=params.activation, negative_slope=params.negative_slope, residual=residual, **prologue,
            )
        else:
            out = conv3d_bias_act_pool(
                x, w_packed, folded_bias, kernel_size=tuple(weight.shape[2:]), **params.geometry(),
                activation=params.activation, negative_slope=params.negative_slope, pool=params.pool,
                out_dtype=x.dtype, residual=residual, **prologue,
            )
    # The kernel writes channels_last_3d, which is this backend's output contract (see
    # conv3d_bn_act.output_memory_format): the next fused layer reads it without a copy.
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    mean = x.new_empty(0, dtype=torch.float32)
    var = x.new_empty(0, dtype=torch.float32)  # distinct tensors: custom op outputs must not alias
    return out, mean, var, x.new_empty(0), _reference.no_pool_argmax(x)


def _prologue_arguments(input_norm) -> dict:
    """The conv launchers' input-prologue keywords for an ``InputNorm`` (none without one)."""
    if input_norm is None:
        return {}
    return dict(input_stats=input_norm.stats, input_eps=float(input_norm.eps),
                input_activation=input_norm.activation, input_negative_slope=float(input_norm.negative_slope))


def _forward_batch_norm(x, weight, bias, bn_weight, bn_bias, params: LayerParams, prologue: dict
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward: conv + statistics epilogue, Chan finalize, then (norm "batch", not
    "stats") normalise/act/pool. Returns (out, mean, var, the raw conv output y); for "stats" out
    is y itself."""
    with torch.no_grad():
        # the conv's own weight, packed in x's dtype, and its fp32 bias; not cached (training)
        depthwise = is_depthwise(x, weight)
        w_packed, conv_bias = _folded_packed_weight(
            weight, bias, None, None, None, None, norm="none", eps=params.eps, dtype=x.dtype, use_cache=False,
            depthwise=depthwise,
        )
        y, mean, var = (conv3d_depthwise_bn_stats if depthwise else conv3d_bn_stats)(
            x, w_packed, conv_bias, kernel_size=tuple(weight.shape[2:]), **params.geometry(), **prologue,
            finalize=batch_statistics.finalize,
        )
        if params.norm == "stats":
            return y, mean, var, y
        out = bn_act_pool(
            y, mean, var, bn_weight, bn_bias, eps=params.eps, activation=params.activation,
            negative_slope=params.negative_slope, pool=params.pool,
        )
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    return out, mean, var, y


def _backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    params: LayerParams,
    needs_grad: Sequence[bool],
    conv_output: Optional[Tensor] = None,
    pool_argmax: Optional[Tensor] = None,
) -> List[Optional[Tensor]]:
    """Gradients for (x, weight, bias, bn_weight, bn_bias), as ``reference.backward`` defines them.

    Takes the conv output y the forward kept (``conv_output``, norm "batch"), or recomputes it from
    x with the forward's kernel (bit-identical values, so max-pool and activation decisions are the
    forward's either way), then ``act_pool_backward`` (dz and its per-channel
    sums Σdz, Σdz·x̂), ``bn_backward_`` (dz → dy in place), and ``conv3d_dgrad`` / ``conv3d_wgrad``.
    Overlapping pool windows go to the reference backward, as does the input gradient of a strided
    conv (``conv3d_dgrad`` covers stride 1), through ``aten.convolution_backward``."""
    if pool_overlaps(params.pool):
        return _reference.backward(grad_out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                   mean, var, params, needs_grad, conv_output, pool_argmax)
    need_x, need_w, need_b, need_g, need_beta = (bool(n) for n in needs_grad)
    norm, eps, activation, negative_slope, pool = (params.norm, params.eps, params.activation,
                                                   params.negative_slope, params.pool)
    stride, padding, dilation = params.stride, params.padding, params.dilation
    geometry = dict(kernel_size=tuple(weight.shape[2:]), **params.geometry())
    batch = norm == "batch"
    depthwise = is_depthwise(x, weight)
    with torch.no_grad():
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if norm in ("none", "stats") and activation == "none" and not pool:
            # the op's output is the conv output itself: its gradient is grad_out, nothing to recompute
            grad = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)
            sum_dz = grad.sum(dim=(0, 2, 3, 4), dtype=torch.float32) if (need_b and norm == "none") else None
        else:
            if conv_output is not None and batch:
                y = conv_output.contiguous(memory_format=torch.channels_last_3d)
            else:
                # the forward's weights: the conv's own ("batch", "none") or BatchNorm folded in ("running")
                w_packed, conv_bias = _folded_packed_weight(
                    weight, bias, bn_weight, bn_bias, running_mean, running_var,
                    norm="running" if norm == "running" else "none", eps=eps, dtype=x.dtype,
                    use_cache=not batch, depthwise=depthwise,  # as the forward packed it
                )
                if depthwise:
                    y = conv3d_depthwise(x, w_packed, conv_bias, **geometry)
                else:
                    y = conv3d_bias_act_pool(x, w_packed, conv_bias, **geometry, activation="none",
                                             negative_slope=0.0, pool=(), out_dtype=x.dtype)
            grad, sum_dz, sum_dz_xhat = act_pool_backward(
                grad_out, y, mean if batch else None, var if batch else None,
                bn_weight if batch else None, bn_bias if batch else None,
                eps=eps, activation=activation, negative_slope=negative_slope, pool=pool,
            )
            if batch:
                grad = bn_backward_(grad, y, mean, var, bn_weight, sum_dz, sum_dz_xhat, eps=eps)
            del y

        conv_weight = weight
        if norm == "running":
            conv_weight, _ = _reference.fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        grad_x = None
        if need_x and depthwise:
            grad_x = conv3d_depthwise_dgrad(grad, pack_depthwise_weight(conv_weight), x.shape, **geometry)
        elif need_x:
            if dgrad_unsupported_reason(geometry["kernel_size"], stride, padding, dilation) is None:
                grad_x = conv3d_dgrad(grad, pack_dgrad_weight(conv_weight.to(x.dtype)), **geometry)
            else:
                grad_x = _reference.convolution_backward(grad, x, conv_weight.to(x.dtype), stride, padding,
                                                         dilation, [True, False, False])[0]
        need_wgrad = need_w or (norm == "running" and need_g)
        grad_w = None
        if need_wgrad:  # fp32
            grad_w = (conv3d_depthwise_wgrad if depthwise else conv3d_wgrad)(x, grad, **geometry)

        grad_bias = grad_gamma = grad_beta = None
        if batch:
            grad_gamma, grad_beta = sum_dz_xhat, sum_dz
            if need_b:  # batch normalisation removes any per-channel shift: the exact gradient is zero
                grad_bias = torch.zeros_like(sum_dz)
        elif norm == "running":
            grad_beta = sum_dz
            grad_w, grad_bias, grad_gamma = _reference.unfold_batch_norm_grads(
                grad_w, sum_dz, weight, bias, bn_weight, running_mean, running_var, eps,
                need_w=need_w, need_b=need_b, need_g=need_g,
            )
        elif norm == "stats" and need_b:  # see reference.backward: the consumer normalises
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
        else:
            grad_bias = sum_dz

    return _reference.cast_gradients((grad_x, grad_w, grad_bias, grad_gamma, grad_beta),
                                     (x, weight, bias, bn_weight, bn_bias), needs_grad)


def _normalize_input(x: Tensor, input_norm) -> Tensor:
    """``activation(batch_norm(x))`` of an ``InputNorm`` by ``bn_act_pool``: the same code as the conv
    kernels' input prologue, so the same values (the backward recomputes from it)."""
    mean, var, gamma, beta = input_norm.stats.unbind(0)
    with torch.no_grad():
        return bn_act_pool(x, mean, var, gamma, beta, eps=float(input_norm.eps), activation=input_norm.activation,
                           negative_slope=float(input_norm.negative_slope), pool=())


def _input_norm_backward(grad_input: Tensor, x: Tensor, input_norm, *, need_x: bool) -> Tuple[Optional[Tensor], Tensor]:
    """As ``reference.input_norm_backward``, by ``act_pool_backward`` (activation backward with Σdz
    and Σdz·x̂ in the same pass) and ``bn_backward_`` (in place)."""
    mean, var, gamma, beta = input_norm.stats.unbind(0)
    eps = float(input_norm.eps)
    with torch.no_grad():
        x = x.contiguous(memory_format=torch.channels_last_3d)
        grad, sum_dz, sum_dz_xhat = act_pool_backward(
            grad_input, x, mean, var, gamma, beta, eps=eps, activation=input_norm.activation,
            negative_slope=float(input_norm.negative_slope), pool=(),
        )
        grad_x = bn_backward_(grad, x, mean, var, gamma, sum_dz, sum_dz_xhat, eps=eps) if need_x else None
        zeros = torch.zeros_like(sum_dz)
        grad_stats = torch.stack([zeros, zeros, sum_dz_xhat, sum_dz]).to(input_norm.stats.dtype)
    return grad_x, grad_stats


# --------------------------------------------------------------------------------------------
# the entry points: a call beyond the kernels' int32 index range runs on the reference backend
# --------------------------------------------------------------------------------------------


def _with_reference_fallback(kernel_path, reference_path, channels_last_output: bool):
    @functools.wraps(kernel_path)
    def run(*args, **kwargs):
        try:
            with device_scope(args[0]):  # x, or the incoming gradient: on the op's device
                return kernel_path(*args, **kwargs)
        except IndexOverflowError as exc:
            _backends.record_runtime_fallback("triton", str(exc))
            result = reference_path(*args, **kwargs)
            if channels_last_output:  # the forward: this backend's output layout, and no argmax kept
                out, mean, var, conv_output, _ = result
                return (out.contiguous(memory_format=torch.channels_last_3d), mean, var, conv_output,
                        _reference.no_pool_argmax(out))
            return result
    return run


def keeps_pool_argmax(params: LayerParams, keep_conv_output: bool) -> bool:
    """Never (see ``reference.keeps_pool_argmax``): the backward kernels fuse the pool's argmax
    into the pass that reads the conv output anyway."""
    return False


forward = _with_reference_fallback(_forward, _reference.forward, channels_last_output=True)
backward = _with_reference_fallback(_backward, _reference.backward, channels_last_output=False)
normalize_input = _with_reference_fallback(_normalize_input, _reference.normalize_input, channels_last_output=False)
input_norm_backward = _with_reference_fallback(_input_norm_backward, _reference.input_norm_backward,
                                               channels_last_output=False)
