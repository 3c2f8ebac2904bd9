"""The ``reference`` backend: stock PyTorch ops, BatchNorm folded when it uses running statistics.

It runs everywhere and defines the semantics every other backend is tested against.
Its backward recomputes the conv output from the saved input (as activation checkpointing
does), so it stores no intermediate activation between forward and backward.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._weight_cache import FoldedWeightCache, cached_folded
from .backends import InputNorm, LayerParams

Tensor = torch.Tensor
_REDUCE_DIMS = (0, 2, 3, 4)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BatchNorm math and statistics use for inputs of ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t: Tensor) -> Tensor:
    # fp16/bf16/fp32 → fp32, fp64 stays fp64: accumulate in at least fp32, never lose fp64
    return t.to(stats_dtype(t.dtype))


def fold_batch_norm(
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in, computed in fp32.

    s = γ / sqrt(running_var + eps);  W' = W·s;  b' = (b − running_mean)·s + β.
    Returned in fp32; callers cast to the compute dtype.
    """
    scale = torch.rsqrt(_acc(running_var) + eps)
    if bn_weight is not None:
        scale = scale * _acc(bn_weight)
    shift = -_acc(running_mean)
    if bias is not None:
        shift = shift + _acc(bias)
    folded_bias = shift * scale
    if bn_bias is not None:
        folded_bias = folded_bias + _acc(bn_bias)
    folded_weight = _acc(weight) * scale.view(-1, *([1] * (weight.dim() - 1)))
    return folded_weight, folded_bias


def conv_groups(x: Tensor, weight: Tensor) -> int:
    """The conv's ``groups``, which its shapes determine: x has C_in channels, the weight
    (C_out, C_in / groups, kD, kH, kW) — 1 for a dense conv, C_in for a depthwise one."""
    return int(x.shape[1]) // int(weight.shape[1])


def conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation) -> Tensor:
    """``F.conv3d`` with the groups the shapes imply (``conv_groups``)."""
    return F.conv3d(x, weight, bias, stride, padding, dilation, conv_groups(x, weight))


def _onednn_backward_unsafe(x: Tensor, weight: Tensor, stride: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether the CPU oneDNN (mkldnn) conv3d backward may be wrong for this conv. torch 2.13's
    returns a garbage weight gradient, or corrupts the heap, for strided convs over few positions
    along the strided dimension: found for 7×1×1 stride 2 on 5-7 frames (S3D's stem) and 9×1×1
    stride 2 or 3 on 6-10, batches over 1 (never for 3- or 5-wide kernels, nor for larger inputs).
    Conservatively: any strided dimension shorter than twice the kernel's extent."""
    return x.device.type == "cpu" and any(
        s > 1 and size < 2 * (d * (k - 1) + 1)
        for s, d, k, size in zip(stride, dilation, weight.shape[2:], x.shape[2:]))


def convolution_backward(grad_y: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``aten.convolution_backward`` of a conv3d without bias (groups from the shapes), through
    PyTorch's own CPU kernel where oneDNN's may be wrong (``_onednn_backward_unsafe``)."""
    args = (grad_y, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0, 0],
            conv_groups(x, weight),
            [bool(m) for m in output_mask])
    if _onednn_backward_unsafe(x, weight, stride, dilation) and torch.backends.mkldnn.enabled:
        # the switch alone (mkldnn.flags() would also set, and warn about, its TF32 flag)
        torch.backends.mkldnn.enabled = False
        try:
            return torch.ops.aten.convolution_backward(*args)
        finally:
            torch.backends.mkldnn.enabled = True
    return torch.ops.aten.convolution_backward(*args)


def apply_activation(y: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    return y


def _pool_channels_last(t: Tensor) -> bool:
    """Whether to max-pool ``t`` through a channels-last copy: torch's CPU max-pool kernel walks an
    NCDHW tensor one output at a time and runs ~3× slower than its channels-last kernel, both
    conversions included (a 2M-value C3D stem output: 12 → 4 ms). Max is exact and both kernels
    scan a window in the same order, so values and chosen indices are the same either way. Not under
    torch.func transforms (vmap cannot make channels-last copies of batched tensors)."""
    return (t.device.type == "cpu" and t.dim() == 5
            and not t.is_contiguous(memory_format=torch.channels_last_3d)
            and (torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(t)))


def pool_geometry(pool: Sequence[int]) -> Tuple[List[int], List[int], List[int]]:
    """(kernel, stride, padding) of a pool given as kernel(3) + stride(3) + padding(3)."""
    return list(pool[0:3]), list(pool[3:6]), list(pool[6:9])


def max_pool(y: Tensor, pool: Sequence[int]) -> Tensor:
    """``F.max_pool3d`` with a pool given as kernel(3) + stride(3) + padding(3), in y's layout."""
    return F.max_pool3d(y, *pool_geometry(pool))


def apply_pool(y: Tensor, pool: Sequence[int]) -> Tensor:
    if not pool:
        return y
    if _pool_channels_last(y):
        return apply_pool(y.contiguous(memory_format=torch.channels_last_3d), pool).contiguous()
    return max_pool(y, pool)


# Activations that commute with a max-pool, argmax included: pool(act(z)) = act(pool(z)) bit for bit,
# and z's window maximum is where act(z)'s gradient goes (ReLU maps z ≤ 0 to ties at 0, whose gradient
# is 0 wherever the pool puts it). LeakyReLU is monotone too, but rounding z·slope can tie two
# distinct negative z, and the pool then picks another position than stock's; SiLU is not monotone.
_COMMUTES_WITH_POOL = ("none", "relu")


def act_pool(z: Tensor, activation: str, negative_slope: float, pool: Sequence[int]) -> Tensor:
    """``max_pool3d(act(z))`` (pool optional), the same values as stock's order; where the
    activation commutes with the pool it runs on the pooled tensor (a quarter or an eighth of z)."""
    if pool and activation in _COMMUTES_WITH_POOL:
        return apply_activation(apply_pool(z, pool), activation, negative_slope)
    return apply_pool(apply_activation(z, activation, negative_slope), pool)


def batch_statistics(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``y`` (N, C, D, H, W), in the statistics dtype (fp32;
    fp64 for fp64): stock BatchNorm's own reduction (two-pass on the CPU, Welford on CUDA, so sound
    when |mean| ≫ std; several times faster than ``torch.var_mean``, which accumulates in double).
    The running-statistic arguments are scratch: statistics-dtype tensors make a bf16/fp16 input
    report fp32 statistics (momentum 0 leaves them alone); an fp32/fp64 input on the CPU needs none
    (two small ops fewer per layer, the same statistics bit for bit)."""
    channels, stats = y.shape[1], stats_dtype(y.dtype)
    if y.dtype == stats and y.device.type == "cpu":
        return torch.ops.aten.batch_norm_update_stats(y, None, None, 0.0)
    scratch_mean = torch.zeros(channels, dtype=stats, device=y.device)
    scratch_var = torch.ones(channels, dtype=stats, device=y.device)
    return torch.ops.aten.batch_norm_update_stats(y, scratch_mean, scratch_var, 0.0)


def _affine(xhat: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], in_place: bool) -> Tensor:
    """x̂·γ + β (fp32), in x̂'s storage if ``in_place``."""
    shape = (1, -1, 1, 1, 1)
    z = xhat
    if bn_weight is not None:
        z = z.mul_(_acc(bn_weight).view(shape)) if in_place else z * _acc(bn_weight).view(shape)
        in_place = True
    if bn_bias is not None:
        z = z.add_(_acc(bn_bias).view(shape)) if in_place else z + _acc(bn_bias).view(shape)
    return z


def _normalized(y: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """x̂ = (y − mean)·invstd in the statistics dtype, a new tensor. (y − mean) is taken before
    scaling, so a large mean cancels exactly."""
    shape = (1, -1, 1, 1, 1)
    acc = _acc(y)
    xhat = acc.sub_(mean.view(shape)) if acc is not y else y - mean.view(shape)
    return xhat.mul_(invstd.view(shape))


def batch_norm_affine(
    y: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """(x̂, z) for per-channel ``mean`` and ``invstd`` (C,): x̂ = (y − mean)·invstd in fp32 (fp64 for
    fp64), z = x̂·γ + β rounded to y's dtype; z equals ``batch_norm_output``'s bit for bit."""
    xhat = _normalized(y, mean, invstd)
    return xhat, _affine(xhat, bn_weight, bn_bias, in_place=False).to(y.dtype)


def batch_norm_output(
    y: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]
) -> Tensor:
    """``batch_norm_affine``'s z alone, with one temporary instead of three (each new full-size
    temporary costs page faults on the CPU: this step ran 4× slower out of place)."""
    return _affine(_normalized(y, mean, invstd), bn_weight, bn_bias, in_place=True).to(y.dtype)


def batch_norm_backward(grad_z: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                        *, need_y: bool = True) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """(gradient for y, Σdz·x̂, Σdz) of a training-mode BatchNorm with batch statistics (mean,
    invstd), all in the statistics dtype: stock's fused kernel, fed fp32 (fp64) operands so a
    bf16/fp16 y loses nothing to rounding. The y gradient (None unless ``need_y``) is
    γ·invstd·(dz − Σdz/n − x̂·Σdz·x̂/n) (``batch_norm_input_grad``)."""
    gamma = None if bn_weight is None else _acc(bn_weight)
    return torch.ops.aten.native_batch_norm_backward(
        _acc(grad_z), _acc(y), gamma, None, None, mean, invstd, True, 0.0,  # eps: train mode reads invstd
        [need_y, True, True])


_fold_cache = FoldedWeightCache()


def _folded(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps: float, dtype: torch.dtype):
    """``fold_batch_norm`` cast to ``dtype``; outside autograd, cached as the kernel backends cache
    theirs (an eval-mode model folds each layer once, not on every call)."""
    if torch.is_grad_enabled():  # differentiable: never a cached, detached value
        w, b = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return w.to(dtype), b.to(dtype)
    return cached_folded(_fold_cache, lambda w, b: (w.to(dtype), b.to(dtype)), weight, bias, bn_weight, bn_bias,
                         running_mean, running_var, norm="running", eps=eps, extra=(dtype,))


def _forward_graph(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params: LayerParams,
                   keep_pool_argmax: bool = False):
    """The fused computation written with stock ops, for ``forward`` (under no_grad: the batch
    statistics come from a kernel without autograd; ``differentiable_forward`` is the differentiable
    form). Returns (out, mean, var, y, argmax), y the conv output (BatchNorm folded in for norm
    "running"), argmax the pool's ``encode_pool_argmax`` where ``keep_pool_argmax`` (see
    ``keeps_pool_argmax``), else None."""
    norm, eps, stride, padding, dilation = params.norm, params.eps, params.stride, params.padding, params.dilation
    dtype = x.dtype
    mean = x.new_empty(0, dtype=stats_dtype(dtype))
    var = x.new_empty(0, dtype=stats_dtype(dtype))  # distinct tensors: custom op outputs must not alias
    if norm == "running":
        w, b = _folded(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype)
        y = conv3d(x, w, b, stride, padding, dilation)
    else:
        y = conv3d(
            x, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, dilation
        )
        if norm in ("batch", "stats"):
            mean, var = batch_statistics(y)
    z = y
    if norm == "batch":
        z = batch_norm_output(y, mean, torch.rsqrt(var + eps), bn_weight, bn_bias)
    if keep_pool_argmax:
        pooled, indices = _pool_argmax(z, params.pool, pool_argmax_dtype(y.shape))
        argmax = encode_pool_argmax(indices, pooled, params.activation)
        return apply_activation(pooled, params.activation, params.negative_slope), mean, var, y, argmax
    return act_pool(z, params.activation, params.negative_slope, params.pool), mean, var, y, None


def normalize_input_differentiably(x: Tensor, input_norm) -> Tensor:
    """``normalize_input`` with stock differentiable ops: ``F.batch_norm`` recomputes x's batch
    statistics, so the gradient goes through them as a stock BatchNorm's does; γ and β are rows 2
    and 3 of ``input_norm.stats`` (an ``InputNorm``, or anything with its fields)."""
    _, _, gamma, beta = input_norm.stats.unbind(0)
    z = F.batch_norm(_acc(x), None, None, gamma, beta, training=True, eps=input_norm.eps).to(x.dtype)
    return apply_activation(z, input_norm.activation, input_norm.negative_slope)


def differentiable_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params: LayerParams,
                           input_norm=None) -> Tensor:
    """The fused op's output written with stock ops whose autograd differentiates everything, the
    batch statistics included (``F.batch_norm``), and to any order: what ``backward(create_graph=True)``
    differentiates. Slower than ``forward``; the same values within rounding. ``input_norm``: x is
    normalised by its own batch statistics and the γ, β rows of ``input_norm.stats`` first."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = x.dtype
        if input_norm is not None:
            x = normalize_input_differentiably(x, input_norm)
        y = conv3d(x, weight.to(dtype), None if bias is None else bias.to(dtype), params.stride, params.padding,
                     params.dilation)
        if params.norm in ("batch", "running"):
            training = params.norm == "batch"
            y = F.batch_norm(_acc(y), None if training else _acc(running_mean), None if training else _acc(running_var),
                             None if bn_weight is None else _acc(bn_weight), None if bn_bias is None else _acc(bn_bias),
                             training=training, eps=params.eps).to(dtype)
        return apply_pool(apply_activation(y, params.activation, params.negative_slope), params.pool)


def stock_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                  params: LayerParams, momentum: Optional[float]) -> Tensor:
    """The layer as the stock modules compute it, op for op (``F.conv3d``, ``F.batch_norm``, the
    activation, ``F.max_pool3d``, in the caller's autocast), running statistics updated as
    ``nn.BatchNorm3d.forward`` updates them: for exporters that translate standard ops (ONNX), to
    which the fused op is an unknown operator. ``params.norm`` "batch" normalises with batch
    statistics (updating running_mean/var when given), "running" with the running ones."""
    y = conv3d(x, weight, bias, params.stride, params.padding, params.dilation)
    if params.norm in ("batch", "running"):
        training = params.norm == "batch"
        factor = 0.0 if momentum is None else momentum
        if training and running_mean is not None and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, factor, params.eps)
    y = apply_activation(y, params.activation, params.negative_slope)
    # no channels-last detour (apply_pool's): the exported graph is the stock twin's, op for op
    return max_pool(y, params.pool) if params.pool else y


def _input_norm_terms(x: Tensor, input_norm) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, γ, β) of an ``InputNorm`` (c3dzoo.ops.backends) over x, in the statistics dtype."""
    mean, var, gamma, beta = input_norm.stats.to(stats_dtype(x.dtype)).unbind(0)
    return mean, torch.rsqrt(var + input_norm.eps), gamma, beta


def normalize_input(x: Tensor, input_norm) -> Tensor:
    """``activation(batch_norm(x))`` of an ``InputNorm``: the tensor a deferred-normalisation
    layer's conv reads, in x's dtype (normalised in fp32, rounded, activated)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        z = batch_norm_output(x, *_input_norm_terms(x, input_norm))
        return apply_activation(z, input_norm.activation, input_norm.negative_slope)


def activation_sign_kept(activation: str, negative_slope: float) -> bool:
    """Whether the activation's output is > 0 exactly where its input is (none; ReLU; leaky ReLU
    with a slope ≥ 0; NaN stays NaN), so its backward may read the output in place of the input:
    ``threshold_backward`` and ``leaky_relu_backward`` only ask whether it is > 0."""
    return activation in ("none", "relu") or (activation == "leaky_relu" and negative_slope >= 0)


def input_norm_backward_reads_normalized(activation: str, negative_slope: float) -> bool:
    """Whether ``input_norm_backward`` reads ``normalized=`` for this activation (see
    backends.Backend): where the activation's backward needs a mask the output gives
    (``activation_sign_kept``; none needs no mask). Elsewhere the op frees that tensor first."""
    return activation != "none" and activation_sign_kept(activation, negative_slope)


def input_norm_backward(grad_input: Tensor, x: Tensor, input_norm, *, need_x: bool,
                        normalized: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Tensor]:
    """(gradient for x, gradient for ``input_norm.stats``) from ``grad_input``, the gradient of the
    normalised + activated input: activation backward, then BatchNorm's full backward with the
    batch statistics as functions of x (see ``InputNorm``); stats' gradient rows: 0, 0, γ's, β's.
    ``normalized``: ``normalize_input(x, input_norm)`` where the caller has it; the activation's
    backward then reads it instead of normalising x again (where ``activation_sign_kept``: the
    same gradient bit for bit)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        mean, invstd, gamma, beta = _input_norm_terms(x, input_norm)
        activation, slope = input_norm.activation, input_norm.negative_slope
        if activation == "none":
            grad = _acc(grad_input)
        else:
            z = (normalized if normalized is not None and activation_sign_kept(activation, slope)
                 else batch_norm_output(x, mean, invstd, gamma, beta))
            grad = act_pool_backward(grad_input, z, activation, slope, ())
        grad_x, sum_dz_xhat, sum_dz = batch_norm_backward(grad, x, mean, invstd, gamma, need_y=need_x)
        grad_x = grad_x.to(x.dtype) if need_x else None
        zeros = torch.zeros_like(sum_dz)
        grad_stats = torch.stack([zeros, zeros, sum_dz_xhat, sum_dz]).to(input_norm.stats.dtype)
    return grad_x, grad_stats


def forward(
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
    """Fused forward. Returns (out, batch mean, biased batch var, conv output, pool argmax); the
    statistics are fp32 and empty unless norm is "batch" or "stats". ``input_norm`` (an
    ``InputNorm``): x is first normalised and activated (``normalize_input``). ``keep_conv_output``
    (norm "batch" only): the fourth tensor is the raw conv output, for ``backward(conv_output=...)``
    to use instead of recomputing it, and where ``keeps_pool_argmax`` the fifth is the pool's
    argmax (``encode_pool_argmax``), for ``backward(pool_argmax=...)``; otherwise they are empty.
    ``residual`` (no pool): added before the activation, as a residual block adds its shortcut
    (stock's order: the BatchNorm output, then the sum)."""
    layout = _memory_format(x)
    if input_norm is not None:
        x = normalize_input(x, input_norm)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        if residual is not None:
            if params.pool:
                raise ValueError("a residual is added before the activation; it does not combine with a pool")
            z, mean, var, y, _ = _forward_graph(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                dataclasses.replace(params, activation="none"))
            out = apply_activation(z + residual, params.activation, params.negative_slope)
            return (out.contiguous(memory_format=layout), mean, var, kept_conv_output(y, params, keep_conv_output),
                    no_pool_argmax(x))
        keep_argmax = keeps_pool_argmax(params, keep_conv_output)
        out, mean, var, y, argmax = _forward_graph(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                                   params, keep_argmax)
    return (out.contiguous(memory_format=layout), mean, var, kept_conv_output(y, params, keep_conv_output),
            argmax.contiguous(memory_format=layout) if keep_argmax else no_pool_argmax(x))


def conv_output_is_kept(norm: str, keep: bool) -> bool:
    """Whether a forward asked to keep its raw conv output returns it: for norm "batch" only, the one
    mode whose forward computes that tensor anyway and whose backward needs it."""
    return bool(keep) and norm == "batch"


def kept_conv_output(y: Tensor, params: LayerParams, keep: bool) -> Tensor:
    """A backend forward's fourth result: y where ``conv_output_is_kept``, else an empty tensor."""
    return y if conv_output_is_kept(params.norm, keep) else y.new_empty(0)


def keeps_pool_argmax(params: LayerParams, keep_conv_output: bool) -> bool:
    """Whether ``forward`` returns the pool's argmax: with the conv output it keeps (norm "batch"),
    where it pools after an activation that commutes with the pool (``act_pool``), so the backward
    needs neither the BatchNorm output nor the pool again (``act_pool_backward_from_argmax``)."""
    return (conv_output_is_kept(params.norm, keep_conv_output) and bool(params.pool)
            and params.activation in _COMMUTES_WITH_POOL)


def pool_argmax_dtype(conv_shape: Sequence[int]) -> torch.dtype:
    """The kept argmax's dtype for a conv output of ``conv_shape``: int32 (half of max_pool3d's int64
    indices) while a (D, H, W) plane's flat positions fit it."""
    d, h, w = conv_shape[2:]  # (no int(): a traced shape's symbols stay symbols)
    return torch.int32 if d * h * w < 2 ** 31 else torch.int64


def no_pool_argmax(x: Tensor) -> Tensor:
    """A forward's fifth result where it keeps no argmax: empty (the op's outputs are tensors)."""
    return x.new_empty(0, dtype=torch.int32)


def encode_pool_argmax(indices: Tensor, pooled: Tensor, activation: str) -> Tensor:
    """The pool's window argmax as the backward needs it: max_pool3d's ``indices`` (flat positions
    in each (n, c) plane; a new int tensor, which this overwrites), a window whose ReLU output is
    zero (``pooled`` ≤ 0, where ReLU's backward gives 0; a NaN passes, as it does there) stored as
    ``~index`` (negative), so one tensor carries both. ``act_pool_backward_from_argmax`` reads it."""
    if activation == "relu":  # index ^ -1 = ~index where dead, index ^ 0 = index elsewhere
        indices.bitwise_xor_((pooled <= 0).to(indices.dtype).neg_())
    return indices


def act_pool_backward_from_argmax(grad_out: Tensor, like: Tensor, argmax: Tensor, activation: str,
                                  pool: Sequence[int]) -> Tensor:
    """``act_pool_backward`` from the forward's ``encode_pool_argmax``: the gradient w.r.t. the
    pre-activation z in fp32 (fp64 for fp64), in the dtype and layout of ``like`` (z's, e.g. the conv
    output); z itself is not needed. The same values bit for bit: ReLU's backward zeroes the windows
    whose pooled z is ≤ 0, and the scatter puts each window's gradient at the same position."""
    grad = grad_out.to(like.dtype)
    if activation == "relu":
        # ReLU's backward with the sign for its input: 0 where argmax ≤ -1 (a dead window), else the
        # gradient (the comparison runs in the gradient's dtype, exact for the sign of any int)
        grad = torch.ops.aten.threshold_backward(grad, argmax, -1)
        # ~a where a < 0 (its sign bit shifted all the way down is -1, and a ^ -1 = ~a), else a ^ 0 = a
        argmax = argmax ^ (argmax >> (argmax.element_size() * 8 - 1))
    return _acc(_pool_backward(grad, like, pool, argmax.to(torch.int64)))


def _pool_argmax(a: Tensor, pool: Sequence[int], index_dtype: torch.dtype = torch.int64) -> Tuple[Tensor, Tensor]:
    """(window maxima, their indices in ``index_dtype``) of the max-pool over ``a``, through a
    channels-last copy where ``_pool_channels_last`` says. An index is the flat d·H·W + h·W + w
    position within its (n, c) plane whatever the layout, so it addresses ``a`` itself. Both come in
    a's layout (the scatter converts mixed layouts at a's size)."""
    geometry = pool_geometry(pool)
    if _pool_channels_last(a):
        values, indices = F.max_pool3d(a.contiguous(memory_format=torch.channels_last_3d), *geometry,
                                       return_indices=True)
        return values.contiguous(), indices.to(index_dtype, memory_format=torch.contiguous_format)
    values, indices = F.max_pool3d(a, *geometry, return_indices=True)
    return values, indices.to(index_dtype)


def _pool_backward(grad_out: Tensor, a: Tensor, pool: Sequence[int], indices: Tensor) -> Tensor:
    """Gradient w.r.t. ``a`` of its max-pool (window maxima at ``indices``: ``_pool_argmax``), in
    a's layout: stock's scatter kernel, whose NCDHW form is as fast as its channels-last one."""
    return torch.ops.aten.max_pool3d_with_indices_backward(
        grad_out.to(a.dtype), a, *pool_geometry(pool), [1, 1, 1], False, indices
    )


def _activation_backward(grad: Tensor, z: Tensor, activation: str, negative_slope: float) -> Tensor:
    # stock's one-pass kernels: grad where z > 0, else 0 (relu) or grad·slope (leaky_relu)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad, z, negative_slope, False)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad.to(z.dtype), z)
    return grad


def act_pool_backward(grad_out: Tensor, z: Tensor, activation: str, negative_slope: float,
                      pool: Sequence[int]) -> Tensor:
    """Gradient w.r.t. the pre-activation ``z`` (BN output, compute dtype) of pool(act(z)), in fp32
    (fp64 for fp64). Where the activation commutes with the pool (``act_pool``), its backward runs
    on the pooled side: the window maxima of z decide it, and only the scatter touches z's size."""
    if not pool:
        return _acc(_activation_backward(grad_out, z, activation, negative_slope))
    if activation in _COMMUTES_WITH_POOL:
        pooled, indices = _pool_argmax(z, pool)
        grad = _activation_backward(grad_out.to(z.dtype), pooled, activation, negative_slope)
        return _acc(_pool_backward(grad, z, pool, indices))
    a = apply_activation(z, activation, negative_slope)
    grad = _pool_backward(grad_out, a, pool, _pool_argmax(a, pool)[1])
    return _acc(_activation_backward(grad, z, activation, negative_slope))


def batch_norm_input_grad(grad_z: Tensor, xhat: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                          sum_dz: Tensor, sum_dz_xhat: Tensor, count) -> Tensor:
    """BatchNorm's input gradient from the per-channel sums Σdz and Σdz·x̂ over ``count`` values
    (an int, or a tensor when the count is only known on the device):
    gy = γ·invstd·(gz − Σgz/count − x̂·Σgz·x̂/count)."""
    shape = (1, -1, 1, 1, 1)
    gamma = _acc(bn_weight) if bn_weight is not None else torch.ones_like(invstd)
    return (gamma * invstd).view(shape) * (
        grad_z - (sum_dz / count).view(shape) - xhat * (sum_dz_xhat / count).view(shape)
    )


def backward(
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
    """Gradients for (x, weight, bias, bn_weight, bn_bias); None where not needed or not present.

    Recomputes the conv output from the saved input unless the forward kept it (``conv_output``,
    norm "batch": see ``forward(keep_conv_output=True)``), then runs pool,
    activation and BatchNorm backward in fp32 and the conv's dgrad/wgrad in the compute dtype.
    Where the forward kept the pool's argmax too (``pool_argmax`` non-empty), the pool and
    activation backward neither recompute the BatchNorm output nor pool it again
    (``act_pool_backward_from_argmax``).
    In "running" mode the BN is folded, so γ's gradient comes from the wgrad result:
    Σ gy'·(conv(x,W)+b−rm) = Σ W·wgrad(x, gy') + (b−rm)·Σ gy'.
    """
    need_x, need_w, need_b, need_g, need_beta = (bool(n) for n in needs_grad)
    norm, eps, activation, negative_slope, pool = (params.norm, params.eps, params.activation,
                                                   params.negative_slope, params.pool)
    stride, padding, dilation = list(params.stride), list(params.padding), list(params.dilation)
    dtype = x.dtype
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        conv_weight = weight.to(dtype)
        if norm == "running":
            conv_weight, folded_b = _folded(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype)
            y = conv3d(x, conv_weight, folded_b, stride, padding, dilation)
        elif conv_output is not None and norm == "batch":
            y = conv_output
        elif norm in ("none", "stats") and activation == "none" and not pool:
            y = None  # the op's output is the conv output itself: its gradient is grad_out, nothing to recompute
        else:
            y = conv3d(x, conv_weight, None if bias is None else bias.to(dtype), stride, padding, dilation)
        if norm == "batch":
            invstd = torch.rsqrt(var + eps)
        if conv_output is not None and y is conv_output and pool_argmax is not None and pool_argmax.numel():
            grad = act_pool_backward_from_argmax(grad_out, y, pool_argmax, activation, pool)
        elif activation == "none" and not pool:  # z's gradient is the output's: no z needed
            grad = _acc(grad_out)
        else:
            z = batch_norm_output(y, mean, invstd, bn_weight, bn_bias) if norm == "batch" else y
            grad = act_pool_backward(grad_out, z, activation, negative_slope, pool)

        grad_gamma = grad_beta = None
        if norm == "batch":
            grad, grad_gamma, grad_beta = batch_norm_backward(grad, y, mean, invstd, bn_weight)
        elif norm == "running":
            grad_beta = grad.sum(dim=_REDUCE_DIMS)
        grad_y = grad.to(dtype)

        need_wgrad = need_w or (norm == "running" and need_g)
        gx, gw, _ = convolution_backward(grad_y, x, conv_weight, stride, padding, dilation,
                                         [need_x, need_wgrad, False])
        grad_bias = None
        if norm == "running":
            gw, grad_bias, grad_gamma = unfold_batch_norm_grads(
                gw, grad_beta, weight, bias, bn_weight, running_mean, running_var, eps,
                need_w=need_w, need_b=need_b, need_g=need_g,
            )
        elif norm in ("batch", "stats") and need_b:
            # batch normalisation removes any per-channel shift: the exact gradient is zero. For
            # "stats" too: its raw output is only ever consumed by a batch normalisation of it (the
            # next layer's InputNorm; "stats" is reached by deferral alone)
            grad_bias = torch.zeros(weight.shape[0], dtype=stats_dtype(dtype), device=x.device)
        elif need_b:
            grad_bias = grad.sum(dim=_REDUCE_DIMS)

    return cast_gradients((gx, gw, grad_bias, grad_gamma, grad_beta), (x, weight, bias, bn_weight, bn_bias),
                          needs_grad)


def cast_gradients(grads: Sequence[Optional[Tensor]], inputs: Sequence[Optional[Tensor]],
                   needs_grad: Sequence[bool]) -> List[Optional[Tensor]]:
    """Each gradient in its input's dtype; None where not needed, not computed or no input."""
    return [g.to(t.dtype) if (need and t is not None and g is not None) else None
            for g, t, need in zip(grads, inputs, needs_grad)]


def unfold_batch_norm_grads(
    grad_folded_weight: Optional[Tensor],
    sum_grad: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    *,
    need_w: bool,
    need_b: bool,
    need_g: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(conv weight grad, conv bias grad, γ grad) of the "running" (folded) mode, in fp32, from the
    gradient of the folded weight W·s and ``sum_grad`` = Σ of the folded conv output's gradient
    per channel (which is also β's gradient); s = γ/sqrt(running_var + eps). γ's gradient is
    Σ gy'·(conv(x,W)+b−rm)/σ = (Σ W·wgrad(x, gy') + (b−rm)·Σ gy')/σ: no extra conv is needed."""
    invstd = torch.rsqrt(_acc(running_var) + eps)
    scale = invstd * _acc(bn_weight) if bn_weight is not None else invstd
    grad_w = grad_bias = grad_gamma = None
    if need_g:
        w_dot = (_acc(grad_folded_weight) * _acc(weight)).sum(dim=(1, 2, 3, 4))
        shift = -_acc(running_mean) + (_acc(bias) if bias is not None else 0.0)
        grad_gamma = invstd * (w_dot + shift * sum_grad)
    if need_w:
        grad_w = _acc(grad_folded_weight) * scale.view(-1, 1, 1, 1, 1)
    if need_b:
        grad_bias = sum_grad * scale
    return grad_w, grad_bias, grad_gamma


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Union[int, Tensor],
    momentum: Optional[float],
) -> None:
    """In place, exactly as ``nn.BatchNorm3d`` in training mode, without a host synchronisation.

    ``var`` is the biased batch variance over ``count`` values per channel; running_var gets the
    unbiased one. ``momentum=None`` means a cumulative average (factor 1/num_batches_tracked).
    ``count`` may be a 0-d tensor (a TorchScript trace's count, taken from the traced shape).
    """
    denominator = (count - 1).clamp_min(1) if isinstance(count, Tensor) else max(count - 1, 1)
    with torch.no_grad():
        blend_running_stats(running_mean, running_var, num_batches_tracked, mean,
                            var * (count / denominator), momentum)


def blend_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    unbiased_var: Tensor,
    momentum: Optional[float],
) -> None:
    """In place: increment num_batches_tracked, then running = (1 − f)·running + f·batch with
    f = momentum, or 1/num_batches_tracked for ``momentum=None``. ``unbiased_var`` is the batch
    variance with Bessel's correction already applied (the caller knows the count)."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            # convert first: an int64 tensor's reciprocal is fp32, which rounds fp64 statistics' 1/n
            factor = num_batches_tracked.to(stats_dtype(mean.dtype)).reciprocal()
        else:
            factor = momentum
        new_mean = _acc(running_mean) * (1 - factor) + mean * factor
        new_var = _acc(running_var) * (1 - factor) + unbiased_var * factor
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
