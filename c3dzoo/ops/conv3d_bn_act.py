"""``conv3d_bn_act``: Conv3d → BatchNorm3d → activation (→ MaxPool3d) as one op.

Three ``torch.library`` custom ops make it traceable by ``torch.compile`` (each has a fake
implementation) and differentiable:

* ``c3dzoo::conv3d_bn_act_forward``  — functional; returns (out, batch mean, batch var, and the raw
  conv output when it is kept for the backward, see ``keeps_conv_output``, with the pool's argmax
  where the backend keeps that too, see ``reference.keeps_pool_argmax``),
* ``c3dzoo::conv3d_bn_act_backward`` — gradients for x, conv weight/bias, BN γ/β,
* ``c3dzoo::bn_update_running_stats_`` — mutates running_mean/var/num_batches_tracked.

The backend is chosen here (``c3dzoo.ops.backends``) and passed to the custom ops by name.
In eager mode on plain tensors the same implementations run through an ``autograd.Function``
instead (``_EagerForward``): the custom-op dispatch costs tens of µs of Python per call, which a
GPU step of small layers would otherwise wait on.

Prologue fusion: with ``defer=True`` a training-mode BatchNorm without a pool returns a
``PendingBatchNorm`` (the raw conv output and its statistics; norm "stats" in the op), and the next
call takes it as ``x`` and applies that BatchNorm + activation while loading its input
(``input_stats`` and friends of the forward op; ``InputNorm`` in the backends).
With ``sync=True`` under torch.distributed, training-mode calls take ``sync_batch_norm``'s path
(an eager autograd.Function whose statistics are all-reduced across ranks) instead.
"""

from __future__ import annotations

import functools
import sys
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _python_dispatch

from . import backends as _backends
from . import batch_statistics as _batch_statistics
from . import reference as _reference
from . import sync_batch_norm as _sync_batch_norm

Tensor = torch.Tensor
IntOrTriple = Union[int, Sequence[int]]

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu")
NORMS = ("batch", "running", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _impl(backend: str):
    return _backends.get(backend)


@torch.compiler.assume_constant_result
def _resolve_backend(backend: Optional[str], cfg_fields: tuple) -> str:
    # a pure function of its constant arguments and the environment: torch.compile runs it once
    # while tracing and bakes the answer into the graph (so it takes plain values, not the dataclass)
    return _backends.resolve(backend, _backends.ConvBNActConfig(*cfg_fields))


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


def _forward_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    norm: str,
    eps: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    activation: str,
    negative_slope: float,
    pool: Optional[List[int]],
    input_stats: Optional[Tensor],
    input_eps: float,
    input_activation: str,
    input_negative_slope: float,
    backend: str,
    keep_conv_output: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation, negative_slope, pool)
    return _impl(_backends.runnable_on(backend, x.device.type)).forward(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params,
        _input_norm(input_stats, input_eps, input_activation, input_negative_slope),
        keep_conv_output=keep_conv_output,
    )


_forward_op = torch.library.custom_op("c3dzoo::conv3d_bn_act_forward", _forward_impl, mutates_args=())


def _input_norm(input_stats, input_eps, input_activation, input_negative_slope) -> Optional[_backends.InputNorm]:
    if input_stats is None:
        return None
    return _backends.InputNorm(input_stats, input_eps, input_activation, input_negative_slope)


def output_shape(x_shape, weight_shape, stride, padding, dilation, pool) -> List[int]:
    """Shape of the fused op's output (conv, then the optional pool)."""
    n, _, *spatial = x_shape
    c_out, _, *kernel = weight_shape
    size = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(spatial, kernel, stride, padding, dilation)
    ]
    return pooled_shape([n, c_out, *size], pool)


def pooled_shape(shape, pool) -> List[int]:
    """Shape after the optional pool (9 ints or ()) of a tensor of ``shape``."""
    if not pool:
        return list(shape)
    n, c, *size = shape
    return [n, c, *((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, pool[0:3], pool[3:6], pool[6:9]))]


# Backends whose kernels compute over channels-last activations return channels_last_3d outputs, so
# a chain of fused layers never converts layouts between layers; the reference keeps x's layout.
_CHANNELS_LAST_BACKENDS = ("triton", "cuda")


def output_memory_format(x: Tensor, backend: str) -> torch.memory_format:
    """The layout ``backend`` writes its output in (see ``layout="any"`` of ``conv3d_bn_act``)."""
    if backend in _CHANNELS_LAST_BACKENDS:
        return torch.channels_last_3d
    return _reference._memory_format(x)


LAYOUTS = ("stock", "any")


def stock_memory_format(x: Tensor, *weights: Optional[Tensor]) -> torch.memory_format:
    """The layout stock Conv3d gives (cuDNN, oneDNN), which BatchNorm3d, ReLU and MaxPool3d keep:
    channels_last_3d when the input or the weight is channels_last_3d, else contiguous; always
    contiguous for float64 on a CPU (oneDNN takes no float64). Several weights: those of a run of
    such layers fed by ``x``. (On a CPU, stock also falls back to contiguous for some small
    problems, e.g. a batch of one; there the fused output may be channels_last_3d where stock's is
    not.)"""
    cl = torch.channels_last_3d
    if x.dtype == torch.float64 and x.device.type == "cpu":
        return torch.contiguous_format
    return cl if any(t is not None and _reference._memory_format(t) == cl for t in (x, *weights)) else torch.contiguous_format


def in_layout(out: Tensor, layout: str, x: Tensor, *weights: Optional[Tensor]) -> Tensor:
    """``out`` in the layout ``layout`` asks for (see ``conv3d_bn_act``); ``x`` and ``weights``: the
    input and weight(s) stock's layout follows (``stock_memory_format``). Only a channels_last_3d output where
    stock gives a contiguous one is converted: that is the difference user code sees (``view``
    fails on it). The other way round (the reference backend keeps x's layout) every view works."""
    if layout == "stock" and not out.is_contiguous() and stock_memory_format(x, *weights) == torch.contiguous_format:
        return out.contiguous()
    return out


@_forward_op.register_fake
def _forward_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, norm, eps,
                  stride, padding, dilation, activation, negative_slope, pool,
                  input_stats, input_eps, input_activation, input_negative_slope, backend, keep_conv_output):
    backend = _backends.runnable_on(backend, x.device.type)  # what _forward_impl runs, layouts included
    layout = output_memory_format(x, backend)
    conv_shape = output_shape(x.shape, weight.shape, stride, padding, dilation, ())
    shape = pooled_shape(conv_shape, pool)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)
    stats = weight.shape[0] if norm in ("batch", "stats") else 0
    dtype = _reference.stats_dtype(x.dtype)
    if _reference.conv_output_is_kept(norm, keep_conv_output):
        conv_out = torch.empty(conv_shape, dtype=x.dtype, device=x.device, memory_format=layout)
    else:
        conv_out = x.new_empty(0)
    params = _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation, negative_slope, pool)
    keeps_pool_argmax = getattr(_impl(backend), "keeps_pool_argmax", None)
    if keeps_pool_argmax is not None and keeps_pool_argmax(params, keep_conv_output):
        argmax = torch.empty(shape, dtype=_reference.pool_argmax_dtype(conv_shape), device=x.device,
                             memory_format=layout)
    else:
        argmax = _reference.no_pool_argmax(x)
    return out, x.new_empty(stats, dtype=dtype), x.new_empty(stats, dtype=dtype), conv_out, argmax


def _backward_impl(
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
    conv_output: Optional[Tensor],
    pool_argmax: Optional[Tensor],
    norm: str,
    eps: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    activation: str,
    negative_slope: float,
    pool: Optional[List[int]],
    input_stats: Optional[Tensor],
    input_eps: float,
    input_activation: str,
    input_negative_slope: float,
    backend: str,
    needs_grad: List[bool],
) -> List[Tensor]:
    """Gradients for (x, weight, bias, bn_weight, bn_bias, input_stats). ``conv_output``: the raw
    conv output the forward kept (else None: the backend recomputes it); ``pool_argmax``: the pool
    argmax it kept (else empty). With an input prologue the
    backend's backward runs on the normalised input it recomputes (``normalize_input``), and
    ``input_norm_backward`` takes that input's gradient back through the previous layer's
    activation and BatchNorm."""
    impl = _impl(_backends.runnable_on(backend, x.device.type))
    input_norm = _input_norm(input_stats, input_eps, input_activation, input_negative_slope)
    need_input = input_norm is not None and bool(needs_grad[5])
    layer_input = x if input_norm is None else impl.normalize_input(x, input_norm)
    params = _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation, negative_slope, pool)
    grads = impl.backward(
        grad_out, layer_input, weight, bias, bn_weight, bn_bias, running_mean, running_var, mean, var, params,
        [bool(needs_grad[0]) or need_input, *needs_grad[1:5]], conv_output, pool_argmax,
    )
    # the normalised input, to a backend that reads it for this activation rather than normalising
    # x again; otherwise freed before the input-norm backward (it is a whole activation)
    reads = getattr(impl, "input_norm_backward_reads_normalized", None)
    reuse = ({"normalized": layer_input} if input_norm is not None and reads is not None
             and reads(input_norm.activation, input_norm.negative_slope) else {})
    del layer_input
    grads = list(grads) + [None]
    if input_norm is not None and (needs_grad[0] or need_input):
        grads[0], grads[5] = impl.input_norm_backward(grads[0], x, input_norm, need_x=bool(needs_grad[0]), **reuse)
    del reuse
    # custom ops cannot return None: an empty tensor stands for "no gradient"
    inputs = (x, weight, bias, bn_weight, bn_bias, input_stats)
    return [_gradient_like(g, t) if (t is not None and need) else x.new_empty(0)
            for g, t, need in zip(grads, inputs, needs_grad)]


def _gradient_like(grad: Optional[Tensor], t: Tensor) -> Tensor:
    """``grad`` with the strides of its input ``t``, as the fake implementation says (a conv's
    weight gradient comes channels-last from channels-last activations; autograd would copy it into
    the parameter's layout anyway); zeros for an input the layer does not use (γ, β without a
    BatchNorm), whose gradient the backend left out."""
    if grad is None:
        return torch.zeros_like(t)
    return grad if grad.stride() == t.stride() else torch.empty_like(t).copy_(grad)


_backward_op = torch.library.custom_op("c3dzoo::conv3d_bn_act_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _backward_fake(grad_out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                   mean, var, conv_output, pool_argmax, norm, eps, stride, padding, dilation, activation, negative_slope,
                   pool, input_stats, input_eps, input_activation, input_negative_slope, backend, needs_grad):
    inputs = (x, weight, bias, bn_weight, bn_bias, input_stats)
    return [
        torch.empty_like(t) if (t is not None and need) else x.new_empty(0)
        for t, need in zip(inputs, needs_grad)
    ]


_INPUT_STATS_INDEX = 15  # position of input_stats among _forward_op's arguments


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, norm, eps,
     stride, padding, dilation, activation, negative_slope, pool,
     input_stats, input_eps, input_activation, input_negative_slope, backend, keep_conv_output) = inputs
    _, mean, var, conv_output, pool_argmax = output
    kept = _reference.conv_output_is_kept(norm, keep_conv_output)  # else conv_output is empty
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, mean, var,
                          conv_output if kept else None, pool_argmax, input_stats)  # (an empty argmax: none kept)
    ctx.params = (norm, eps, stride, padding, dilation, activation, negative_slope, pool,
                  input_eps, input_activation, input_negative_slope, backend)


def _stock_layer_of(ctx_params, running_mean, running_var, inputs, active):
    """The layer recomputed in stock differentiable ops as a function of the entries ``active`` of
    ``inputs`` (x, weight, bias, bn_weight, bn_bias, input_stats), the others held: what the
    create_graph backward (torch.func.vjp) and the jvp rule (torch.func.jvp) differentiate."""
    (norm, eps, stride, padding, dilation, activation, negative_slope, pool,
     input_eps, input_activation, input_negative_slope, _) = ctx_params
    params = _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation, negative_slope, pool)

    def layer(*values):
        x, weight, bias, bn_weight, bn_bias, stats = (
            values[active.index(i)] if i in active else t for i, t in enumerate(inputs))
        return _reference.differentiable_forward(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params,
            _input_norm(stats, input_eps, input_activation, input_negative_slope))
    return layer


def _backward(ctx, grad_out, _grad_mean, _grad_var, _grad_conv_output, _grad_pool_argmax, run_backward=None):
    *saved, input_stats = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]] + [bool(ctx.needs_input_grad[_INPUT_STATS_INDEX])]
    n_inputs = len(ctx.needs_input_grad)
    if not any(needs) or grad_out is None:  # None: the output was not used (eager, unmaterialised)
        return (None,) * n_inputs
    if torch.is_grad_enabled():
        # backward(create_graph=True): gradient penalties, Hessian-vector products, MAML. The
        # backends' backward computes values without a graph, so the layer is recomputed with stock
        # differentiable ops and differentiated instead (torch.compile traces backward without grad).
        # torch.func.vjp rather than autograd.grad: under torch.func transforms (vjp, jacrev, vmap of
        # grad) the saved tensors belong to the level below the transform's, where autograd.grad
        # sees no path from them (their gradient came out as zero); vjp differentiates at the level
        # it runs in, and its result stays differentiable for regular autograd too.
        inputs = (*saved[:5], input_stats)
        wanted_at = [i for i, need in enumerate(needs) if need]
        layer = _stock_layer_of(ctx.params, saved[5], saved[6], inputs, wanted_at)
        _, pullback = torch.func.vjp(layer, *(inputs[i] for i in wanted_at))
        wanted = iter(pullback(grad_out))
        grads = [next(wanted) if need else None for need in needs]
    else:
        (norm, eps, stride, padding, dilation, activation, negative_slope, pool,
         input_eps, input_activation, input_negative_slope, backend) = ctx.params
        grads = (run_backward or _backward_op)(
            grad_out.contiguous(memory_format=_reference._memory_format(grad_out)), *saved,
            norm, eps, stride, padding, dilation, activation, negative_slope, pool,
            input_stats, input_eps, input_activation, input_negative_slope, backend, needs,
        )
        grads = [g if need else None for g, need in zip(grads, needs)]
        if grads[0] is not None:
            # x's gradient in the layout stock's conv backward gives: torch.autograd.grad(loss, x)
            # hands it to user code as is (a gradient penalty's g.view(N, -1)); a copy only for a
            # contiguous x and weight on the channels-last backends, never between fused layers
            grads[0] = in_layout(grads[0], "stock", saved[0], saved[1])
    out = [None] * n_inputs
    out[:5] = grads[:5]
    out[_INPUT_STATS_INDEX] = grads[5]
    return tuple(out)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_vmap(call, info, in_dims, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, norm, *rest):
    """torch.func.vmap of the forward op (per-sample gradients, jacobians), computed by ``call`` (the
    op, or ``_EagerForward.apply``). When only x is batched and the layer's samples are independent
    (BatchNorm folded or absent, no input prologue), the vmapped dimension folds into the batch: one
    call. Otherwise one call per slice — a training-mode BatchNorm then takes each slice's own
    statistics, as stock BatchNorm does under vmap."""
    tensors = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    input_stats = rest[_INPUT_STATS_INDEX - 8]
    dims = tuple(in_dims[:7]) + (in_dims[_INPUT_STATS_INDEX],)
    if norm in ("running", "none") and input_stats is None and all(d is None for d in dims[1:]):
        xb = x.movedim(dims[0], 0)
        out, mean, var, conv_out, argmax = call(xb.flatten(0, 1), *tensors[1:], norm, *rest)
        return (out.unflatten(0, xb.shape[:2]), mean, var, conv_out, argmax), (0, None, None, None, None)
    sliced_rest = list(rest)
    results = []
    for b in range(info.batch_size):
        args = [t if d is None or t is None else t.select(d, b) for t, d in zip(tensors, dims)]
        if dims[7] is not None:
            sliced_rest[_INPUT_STATS_INDEX - 8] = input_stats.select(dims[7], b)
        results.append(call(*args, norm, *sliced_rest))
    return tuple(torch.stack(parts) for parts in zip(*results)), (0, 0, 0, 0, 0)


if hasattr(torch.library, "register_vmap"):  # not in every torch README admits; eager vmap takes _EagerForward.vmap
    torch.library.register_vmap(_forward_op, functools.partial(_forward_vmap, _forward_op))


class _EagerForward(torch.autograd.Function):
    """The forward op's autograd without the custom-op dispatch, for plain tensors in eager mode:
    the same implementation, context and backward, minus tens of µs of Python per call and per
    backward (torch's custom-op machinery; a training step of C3D makes dozens of these calls).
    torch.compile, tensor subclasses (FakeTensor, …) and dispatch modes take the custom ops."""

    @staticmethod
    def forward(*inputs):
        return _forward_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # a separate setup_context: torch.func's grad transforms work
        ctx.set_materialize_grads(False)  # the statistics and conv-output "gradients" are never read
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:7], inputs[_INPUT_STATS_INDEX])  # for jvp
        # the statistics and conv output's tangents are zeros (jvp); only their geometry is kept
        ctx.side_outputs = tuple((t.size(), t.stride(), t.dtype, t.device) for t in output[1:])

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward-mode AD (torch.func.jvp, jacfwd, hessian): the output's tangent, by torch.func.jvp
        of the layer in stock differentiable ops (as the create_graph backward differentiates it).
        The statistics and conv-output outputs get zero tangents, the integer argmax none: they only
        feed the running statistics and the backward, never a differentiated value."""
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, input_stats = ctx.saved_tensors
        primals = (x, weight, bias, bn_weight, bn_bias, input_stats)
        moving = (*tangents[:5], tangents[_INPUT_STATS_INDEX])
        active = [i for i, (p, t) in enumerate(zip(primals, moving)) if p is not None and t is not None]
        if not active:
            return (None,) * 5
        layer = _stock_layer_of(ctx.params, running_mean, running_var, primals, active)
        forward_ad = torch.autograd.forward_ad
        if torch._C._functorch.maybe_current_level() is None:
            # torch.autograd.forward_ad: its dual level is open and levels do not nest, so duals at
            # that level, of detached primals, with forward gradients on (a jvp rule runs with them off)
            with forward_ad._set_fwd_grad_enabled(True):
                duals = [forward_ad.make_dual(primals[i].detach(), moving[i]) for i in active]
                out_tangent = forward_ad.unpack_dual(layer(*duals)).tangent
        else:
            _, out_tangent = torch.func.jvp(layer, tuple(primals[i] for i in active),
                                            tuple(moving[i] for i in active))
        # zero tangents, not None: functorch's forward-mode handling of None here trips an assert;
        # None for the integer argmax, which has no tangent
        zeros = (torch.empty_strided(size, stride, dtype=dtype, device=device).zero_() if dtype.is_floating_point
                 else None for size, stride, dtype, device in ctx.side_outputs)
        return (out_tangent, *zeros)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads, run_backward=_backward_impl)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return _forward_vmap(_EagerForward.apply, info, in_dims, *inputs)


class _EagerForwardUntransformed(torch.autograd.Function):
    """``_EagerForward`` in the older form (the context as forward's first argument), for calls
    outside torch.func transforms, which need the separate ``setup_context``: torch's
    ``Function.apply`` binds a call's arguments through ``inspect.signature`` whenever a Function
    defines ``setup_context`` (~25 µs, about a twentieth of a fused training layer's host time).
    The same forward, context, backward and jvp (``torch.autograd.forward_ad``'s dual tensors)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _EagerForward.setup_context(ctx, inputs, output)
        return output

    jvp = staticmethod(_EagerForward.jvp)
    backward = staticmethod(_EagerForward.backward)


def _runs_eagerly(x: Tensor) -> bool:
    """Whether a call may skip the custom ops (plain eager tensors): not while torch.compile,
    torch.jit.trace (which must record the op, not what its implementation does) or a dispatch mode
    (export, fake tensors) watches. Under torch.func transforms the call goes through
    ``_EagerForward`` (see ``_functorch_wrapped``)."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and x.device.type != "meta"
            and _python_dispatch._get_current_dispatch_mode() is None and not torch.jit.is_tracing())


def _exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is tracing this call; never imports torch.onnx
    (nothing exports before it is imported)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _functorch_wrapped(*tensors: Optional[Tensor]) -> bool:
    """Whether any of these is a torch.func transform's tensor (vmap's batched tensors, grad's
    tracking tensors): the input, or only the parameters (an ensemble vmapped over stacked weights)."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _carry_tangents(*tensors: Optional[Tensor]) -> bool:
    """Whether any of these is a ``torch.autograd.forward_ad`` dual tensor: forward-mode AD carries
    its tangent through every op whatever the grad mode, so such a call takes the autograd.Function
    and its jvp rule even when nothing needs a gradient (the kernels alone would drop the tangent).
    Free while no dual level is open (torch.func's jvp wraps its tensors instead: ``_functorch_wrapped``)."""
    forward_ad = torch.autograd.forward_ad
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _update_running_stats_impl(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
    backend: str,
) -> None:
    _batch_statistics.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                                           momentum, backend=backend)


_update_running_stats_op = torch.library.custom_op(
    "c3dzoo::bn_update_running_stats_", _update_running_stats_impl,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)


@_update_running_stats_op.register_fake
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum,
                               backend):
    return None


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------


def _triple(value: IntOrTriple, name: str) -> Tuple[int, int, int]:
    if isinstance(value, int):
        return (value,) * 3
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}") from None
    if len(value) != 3 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    return value


def normalize_pool(pool) -> Tuple[int, ...]:
    """``None``, an ``nn.MaxPool3d``, or (kernel, stride, padding) → 9 ints (or ())."""
    if pool is None:
        return ()
    if isinstance(pool, torch.nn.MaxPool3d):
        reason = unsupported_pool_reason(pool)
        if reason:
            raise ValueError(f"pool: {reason}")
        kernel, stride, padding = pool.kernel_size, pool.stride, pool.padding
    elif isinstance(pool, dict):
        kernel, stride, padding = pool["kernel_size"], pool.get("stride"), pool.get("padding", 0)
    else:
        try:
            if not isinstance(pool, (tuple, list)):
                raise TypeError
            kernel, stride, padding = pool
        except (TypeError, ValueError):
            raise ValueError(
                f"pool must be None, an nn.MaxPool3d or (kernel_size, stride, padding); got {pool!r}"
            ) from None
    kernel = _triple(kernel, "pool kernel_size")
    stride = kernel if stride is None else _triple(stride, "pool stride")
    padding = _triple(padding, "pool padding")
    if any(k < 1 for k in kernel) or any(s < 1 for s in stride):
        raise ValueError(f"pool kernel_size and stride must be positive, got {kernel}, {stride}")
    if any(p < 0 or 2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"pool padding must be between 0 and half the kernel size, got {padding} for {kernel}")
    return kernel + stride + padding


def unsupported_pool_reason(pool: torch.nn.MaxPool3d) -> Optional[str]:
    """Why a MaxPool3d cannot be fused (None if it can)."""
    if pool.ceil_mode:
        return "ceil_mode=True is not supported"
    if pool.return_indices:
        return "return_indices=True is not supported"
    if _triple(pool.dilation, "pool dilation") != (1, 1, 1):
        return "dilation other than 1 is not supported"
    return None


_PARAMETER_NAMES = ("conv_weight", "conv_bias", "bn_weight", "bn_bias", "running_mean", "running_var")


def _check_inputs(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, norm, activation):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        hint = " (an unbatched clip (C, D, H, W): pass x.unsqueeze(0))" if x.dim() == 4 else ""
        raise ValueError(f"x must be 5-D (N, C, D, H, W), got shape {tuple(x.shape)}{hint}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"conv_weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 5:
        raise ValueError(f"conv_weight must be 5-D (C_out, C_in, kD, kH, kW), got shape {tuple(weight.shape)}")
    if weight.shape[1] == 0 or x.shape[1] % weight.shape[1] or weight.shape[0] % (x.shape[1] // weight.shape[1]):
        raise ValueError(
            f"x has {x.shape[1]} channels but conv_weight (C_out, C_in / groups, kD, kH, kW) expects "
            f"{weight.shape[1]} per group, and the groups must divide C_out (x shape {tuple(x.shape)}, "
            f"weight shape {tuple(weight.shape)})"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    c_out = weight.shape[0]
    device = x.device
    vector_shape = (c_out,)
    for i, t in enumerate((weight, bias, bn_weight, bn_bias, running_mean, running_var)):
        if t is None:
            continue
        name = _PARAMETER_NAMES[i]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if i > 0 and t.shape != vector_shape:
            raise ValueError(f"{name} must have shape ({c_out},) to match conv_weight, got {tuple(t.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if norm == "running" and running_mean is None:
        raise ValueError("norm='running' (eval-mode BatchNorm) needs running_mean and running_var")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type == "meta":  # shape inference: meta tensors have no autocast (torch raises)
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _config_fields(x, weight, norm, activation, stride, padding, dilation, pool, input_norm=False,
                   residual=False) -> tuple:
    """ConvBNActConfig's fields, in order, as plain Python values."""
    return (
        norm, activation, tuple(stride), tuple(padding), tuple(dilation),
        tuple(map(int, weight.shape[2:])), tuple(pool), str(x.dtype), x.device.type,
        int(x.shape[1]), int(weight.shape[0]), bool(input_norm), bool(residual),
        _reference.conv_groups(x, weight),
    )


class PendingBatchNorm(NamedTuple):
    """The output of a layer whose training-mode BatchNorm and activation are deferred to the next
    layer (``conv3d_bn_act(..., defer=True)``): ``y`` is the raw conv output and the next
    ``conv3d_bn_act`` applies ``activation(batch_norm(y))`` while loading it (prologue fusion), so the
    normalised activation is never written. ``stats``: [4, C] rows (batch mean and biased var of y,
    detached; γ and β, through which their gradients flow), fp32 (fp64 for fp64).
    ``materialize()`` gives the ordinary tensor (stock ops) for any other consumer."""

    y: Tensor
    stats: Tensor
    eps: float
    activation: str
    negative_slope: float

    def materialize(self) -> Tensor:
        """``activation(batch_norm(y))`` with stock ops, differentiable (BatchNorm recomputes the
        batch statistics of y, so the gradient goes through them as a stock BatchNorm's does)."""
        return _reference.normalize_input_differentiably(self.y, self)


def _deferred_stats(mean: Tensor, var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]) -> Tensor:
    """[4, C] (mean, var, γ, β) of a deferred BatchNorm: statistics detached (the next layer's
    backward differentiates through them itself), γ and β with their autograd history."""
    gamma = bn_weight.to(mean.dtype) if bn_weight is not None else torch.ones_like(mean)
    beta = bn_bias.to(mean.dtype) if bn_bias is not None else torch.zeros_like(mean)
    return torch.stack([mean.detach(), var.detach(), gamma, beta])


# A stem (a raw clip's few input channels) recomputes its conv in the backward on a GPU: there that
# conv is cheap (C_in·kd·kh·kw MACs per output: 81 for C3D's conv1; a memory-bound kernel) and its
# output is the model's largest activation. Every other training-mode layer keeps the conv output its
# forward writes anyway, which spares the backward a whole conv (recomputing it would also write and
# read that tensor again). On the CPU the stem keeps it too: oneDNN's conv over 3 channels is not
# cheap there (the recompute cost ~7 % of the main job's training step), and what the fused op keeps
# is still well below what stock keeps.
RECOMPUTE_MAX_IN_CHANNELS = 4


def keeps_conv_output(keep: Optional[bool], norm: str, in_channels: int, needs_grad: bool,
                      device_type: str = "cuda") -> bool:
    """Whether a fused call keeps its raw conv output for the backward: only for norm "batch" (the
    mode that writes it), only when a backward can follow; then ``keep`` if given, else the policy
    above for a tensor on ``device_type``."""
    if norm != "batch" or not needs_grad:
        return False
    if keep is not None:
        return bool(keep)
    return in_channels > RECOMPUTE_MAX_IN_CHANNELS or device_type == "cpu"


def _empty_batch(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                 params: _backends.LayerParams) -> Tensor:
    """What stock modules do with an empty batch (N = 0: the last shard of an uneven split): an
    empty output, zero gradients (autograd through stock ops), running statistics untouched, and
    ``num_batches_tracked`` counted as ``nn.BatchNorm3d`` counts it. No kernel is sized for no work."""
    out = _reference.differentiable_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return out


def _check_residual(residual, shape, device, pool) -> None:
    """``residual`` must be a floating tensor of the output's ``shape`` on its ``device``, and there
    must be no pool (it is added before the activation, at every conv output)."""
    shape = tuple(shape)
    if pool:
        raise ValueError(f"residual: it is added before the activation, at every conv output, so it does not "
                         f"combine with a pool ({pool})")
    if not isinstance(residual, Tensor) or not residual.is_floating_point() or tuple(residual.shape) != shape:
        got = (f"{tuple(residual.shape)} {residual.dtype}" if isinstance(residual, Tensor)
               else type(residual).__name__)
        raise ValueError(f"residual must be a floating-point tensor of the output's shape {shape}, got {got}")
    if residual.device != device:
        raise ValueError(f"residual is on {residual.device}, the output on {device}")


def _residual_in_epilogue(x, residual, tensors, norm, group, pending) -> bool:
    """Whether ``conv3d_bn_act`` adds ``residual`` in the backend's forward (eager inference with
    folded or no BatchNorm, nothing needing a gradient, the compute dtype's residual), rather than
    composing the layer with a stock add and activation."""
    needs_grad = (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, *tensors))
                  or _carry_tangents(x, residual, *tensors))
    cast = _autocast_dtype(x.device.type)
    compute_dtype = cast if cast is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.dtype
    return (norm != "batch" and group is None and pending is None and not needs_grad and _runs_eagerly(x)
            and not _exporting_onnx() and not torch.jit.is_tracing() and x.shape[0] > 0
            and isinstance(residual, Tensor) and residual.dtype == compute_dtype
            and not _functorch_wrapped(x, residual, *tensors))


def _forward_with_residual(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, norm, eps, stride,
                           padding, dilation, activation, negative_slope, pool, residual, backend, out_shape,
                           plan_key=None, cast=None):
    """The inference forward with the residual added in the epilogue, on the backend chosen for it
    (kept as an ``_InferencePlan`` under ``plan_key``)."""
    _check_residual(residual, out_shape, x.device, pool)
    fields = _config_fields(x, weight, norm, activation, stride, padding, dilation, pool, residual=True)
    name = _resolve_backend(backend, fields)
    params = _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation, negative_slope, pool)
    out, *_ = _impl(_backends.runnable_on(name, x.device.type)).forward(
        x, weight, bias, bn_weight, bn_bias, running_mean if norm == "running" else None,
        running_var if norm == "running" else None, params, None, residual=residual)
    _keep_inference_plan(plan_key, backend, fields, name, params, cast)
    return out


# --------------------------------------------------------------------------------------------
# inference plans: what an eager inference call decided, kept for the next call like it
# --------------------------------------------------------------------------------------------


class _InferencePlan(NamedTuple):
    """What ``conv3d_bn_act`` decided for an eager inference call (BatchNorm folded or absent,
    nothing needing a gradient): the backend, the layer's parameters, the autocast dtype. A later
    call with the same ``_inference_plan_key`` runs it directly: the argument checks, the shape
    arithmetic and the backend choice cost ~30 µs of Python a call (a third of a fused layer's host
    time), which a GPU running a model of many small layers (X3D, S3D) at small batches waits on."""

    backend: str
    params: _backends.LayerParams
    cast: Optional[torch.dtype]

    def run(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, layout) -> Tensor:
        if self.cast is not None:
            x, weight = x.to(self.cast), weight.to(self.cast)
            bias = None if bias is None else bias.to(self.cast)
        running = self.params.norm == "running"
        # the backend's forward called as the full path calls it (a residual only where there is one)
        extra = {} if residual is None else dict(residual=residual)
        out = _impl(self.backend).forward(
            x, weight, bias, bn_weight, bn_bias, running_mean if running else None, running_var if running else None,
            self.params, None, **extra)[0]
        return in_layout(out, layout, x, weight)


_INFERENCE_PLANS: dict = {}
_INFERENCE_PLANS_LIMIT = 4096


def _pool_key(pool):
    if isinstance(pool, torch.nn.MaxPool3d):  # its settings, not the module: they can be changed
        return (type(pool), pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                pool.return_indices)
    return pool


def _inference_plan_key(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, stride,
                        padding, dilation, activation, negative_slope, pool, batch_norm, backend, sync,
                        process_group, layout, residual) -> Optional[tuple]:
    """The key of a call's ``_InferencePlan``, or None for a call that gets none (training, a
    gradient to follow, torch.compile, tracing, export, torch.func transforms, a PendingBatchNorm).
    It holds everything the checks and choices of ``conv3d_bn_act`` read: every tensor's shape,
    dtype and device, every setting, the autocast state and the backend choice's state
    (``backends.choice_state``). Layouts are not in it: what depends on them is done on every call."""
    if type(x) is not Tensor or (batch_norm and (training or running_mean is None)):
        return None
    try:
        if not _runs_eagerly(x) or _exporting_onnx():
            return None
        grad_enabled = torch.is_grad_enabled()
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        tensor_keys = []
        for t in (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual):
            if t is None:
                tensor_keys.append(None)
                continue
            if (grad_enabled and t.requires_grad) or wrapped(t):  # autograd or torch.func: the op's full path
                return None
            tensor_keys.append((t.shape, t.dtype, t.device))
        if _carry_tangents(x, weight, bias, bn_weight, bn_bias, residual):  # forward-mode AD: its jvp rule
            return None
        key = (tuple(tensor_keys), training, batch_norm, eps, stride, padding, dilation, activation, negative_slope,
               _pool_key(pool), backend, sync, process_group is None, layout, _autocast_dtype(x.device.type),
               _backends.choice_state())
        hash(key)
    except (AttributeError, TypeError, RuntimeError):  # not tensors, unhashable settings: the checks will say
        return None
    return key


def _keep_inference_plan(key, backend, cfg_fields, name, params, cast) -> None:
    """Keep the plan of an eager inference call that ran on ``name`` (see ``_InferencePlan``), when
    the backend choice is final (not waiting to measure contenders)."""
    if key is None:
        return
    resolved, final = _backends.resolution(backend, _backends.ConvBNActConfig(*cfg_fields))
    if final and resolved == name:
        if len(_INFERENCE_PLANS) >= _INFERENCE_PLANS_LIMIT:
            _INFERENCE_PLANS.clear()
        _INFERENCE_PLANS[key] = _InferencePlan(name, params, cast)


def make_config(x, weight, norm, activation, stride, padding, dilation, pool) -> _backends.ConvBNActConfig:
    return _backends.ConvBNActConfig(*_config_fields(x, weight, norm, activation, stride, padding, dilation, pool))


def conv3d_bn_act(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor] = None,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    training: bool,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    dilation: IntOrTriple = 1,
    activation: str = "relu",
    negative_slope: float = 0.01,
    pool=None,
    num_batches_tracked: Optional[Tensor] = None,
    batch_norm: bool = True,
    backend: Optional[str] = None,
    sync: bool = False,
    process_group=None,
    defer: bool = False,
    keep_conv_output: Optional[bool] = None,
    layout: str = "stock",
    residual: Optional[Tensor] = None,
) -> Union[Tensor, PendingBatchNorm]:
    """``pool(act(batch_norm(conv3d(x))))`` in one op, with BatchNorm semantics of ``nn.BatchNorm3d``.

    ``training`` — use batch statistics (and update running statistics when given), as
    ``F.batch_norm(training=True)``; with ``training=False`` the running statistics are folded
    into the conv (they are required then, unless ``running_mean is None``, in which case the batch
    statistics are used as for ``track_running_stats=False``). ``momentum=None`` is a cumulative
    average and needs ``num_batches_tracked``, which is incremented on every training call.
    ``batch_norm=False`` leaves BatchNorm out (conv → activation → pool).
    ``pool``: None, an ``nn.MaxPool3d``, or (kernel_size, stride, padding).
    ``backend``: "reference", "triton", "cuda" or "auto" (default: ``$C3DZOO_BACKEND`` or "auto").
    ``sync=True``: SyncBatchNorm — in training mode the batch statistics are taken over every rank
    of ``process_group`` (default: the WORLD group), see ``c3dzoo.ops.sync_batch_norm``; without an
    initialised torch.distributed, with one rank, in eval mode or with a frozen BN it changes nothing.

    Prologue fusion: ``x`` may be a ``PendingBatchNorm`` (the previous call's output with
    ``defer=True``); this op then normalises and activates it while loading it. ``defer=True`` says
    the caller passes the result straight to another ``conv3d_bn_act``: when this layer normalises
    with batch statistics and has no pool (and no SyncBatchNorm), it returns a ``PendingBatchNorm``
    (raw conv output + statistics; running statistics are updated here as usual) instead of the
    normalised tensor; otherwise a Tensor as always.

    ``keep_conv_output``: whether a training-mode BatchNorm keeps its raw conv output for the
    backward (which otherwise recomputes the conv from x): faster, for the memory of that tensor.
    None (default) keeps it except in a stem on a GPU (see ``keeps_conv_output``); it changes
    nothing else. The reference backend keeps the pool's argmax with it (int32 at the pooled shape;
    ``reference.keeps_pool_argmax``), so its backward neither normalises nor pools again.

    ``layout``: "stock" (default) gives the output the memory layout stock ops give on a GPU
    (``stock_memory_format``: channels_last_3d if x or the conv weight is, else contiguous), so code
    that ``view``s it works as with stock modules. The triton and cuda backends compute in
    channels_last_3d: a contiguous x and weight cost a layout copy on the way in and one on the way
    out, none when either is channels_last_3d (``model.to(memory_format=torch.channels_last_3d)``).
    "any": whatever the backend writes (channels_last_3d on triton and cuda), for callers that only
    hand the result to layout-agnostic ops or another fused layer (the zoo models, ``c3dzoo.fuse``'s
    inner chains).

    ``residual`` (a tensor of the output's shape; no pool): ``act(batch_norm(conv3d(x)) + residual)``,
    a residual block's last layer with its shortcut. In inference (BatchNorm folded or absent, eager,
    nothing needing a gradient) the add runs in the conv kernel's epilogue where the backend has one
    (Triton); otherwise the layer runs without its activation, then the sum and the activation as
    stock ops (training, autograd, torch.compile: what they differentiate or fuse themselves).

    An eager inference call keeps what its checks and backend choice decided (``_InferencePlan``),
    and a later call with the same shapes, dtypes, devices, settings, autocast state and backend
    environment runs that directly.
    """
    # an eager inference call like an earlier one runs that call's plan (see _InferencePlan)
    plan_key = _inference_plan_key(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                   training, eps, stride, padding, dilation, activation, negative_slope, pool,
                                   batch_norm, backend, sync, process_group, layout, residual)
    if plan_key is not None:
        plan = _INFERENCE_PLANS.get(plan_key)
        if plan is not None:
            return plan.run(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, residual,
                            layout)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pending = x if isinstance(x, PendingBatchNorm) else None
    if pending is not None:
        x = pending.y
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or tuple(pending.stats.shape) != (4, x.shape[1]):
            raise ValueError(
                f"PendingBatchNorm: stats must be (4, C) for y of shape (N, C, D, H, W), got stats "
                f"{tuple(pending.stats.shape)} and y {tuple(getattr(x, 'shape', ()))}"
            )
    if not batch_norm:
        norm = "none"
    elif training or running_mean is None:
        norm = "batch"
    else:
        norm = "running"
    _check_inputs(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, norm, activation)
    group = _sync_batch_norm.sync_group(sync, process_group, norm == "batch" and training)
    stride, padding, dilation = _triple(stride, "stride"), _triple(padding, "padding"), _triple(dilation, "dilation")
    if residual is not None and not _residual_in_epilogue(
            x, residual, (conv_weight, conv_bias, bn_weight, bn_bias, None if pending is None else pending.stats),
            norm, group, pending):
        # the layer without its activation, then the sum and the activation as stock ops
        y = conv3d_bn_act(
            pending if pending is not None else x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
            running_var, training=training, momentum=momentum, eps=eps, stride=stride, padding=padding,
            dilation=dilation, activation="none", negative_slope=negative_slope, pool=pool,
            num_batches_tracked=num_batches_tracked, batch_norm=batch_norm, backend=backend, sync=sync,
            process_group=process_group, keep_conv_output=keep_conv_output, layout=layout)
        _check_residual(residual, y.shape, y.device, pool)
        return _reference.apply_activation(y + residual, activation, float(negative_slope))
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"unsupported stride/padding/dilation {stride}/{padding}/{dilation}")
    pool = normalize_pool(pool)
    # conv output positions per channel, over which batch statistics are taken
    conv_shape = output_shape(x.shape, conv_weight.shape, stride, padding, dilation, ())
    out_shape = pooled_shape(conv_shape, pool)
    if any(s < 1 for s in out_shape[2:]) or any(s < 1 for s in conv_shape[2:]):
        raise ValueError(
            f"input of shape {tuple(x.shape)} is too small for kernel {tuple(conv_weight.shape[2:])}, "
            f"stride {stride}, padding {padding}, dilation {dilation} and pool {pool or None}"
        )
    count = conv_shape[0] * conv_shape[2] * conv_shape[3] * conv_shape[4]
    updates_running_stats = norm == "batch" and training and running_mean is not None
    if updates_running_stats and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    if norm == "batch" and count == 1 and group is None:  # synchronised: the global count counts
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )

    eager = _runs_eagerly(x)  # (autocast's cast below keeps x's type and device)
    if group is None and not eager and _exporting_onnx():
        # ONNX has no c3dzoo operator: the exported graph gets the stock layer's standard ops
        # (Conv, BatchNormalization, Relu, MaxPool), which ONNX runtimes fuse themselves
        out = _reference.stock_forward(
            pending.materialize() if pending is not None else x, conv_weight, conv_bias, bn_weight, bn_bias,
            running_mean, running_var, num_batches_tracked if updates_running_stats else None,
            _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation, negative_slope, pool),
            None if momentum is None else float(momentum))
        return in_layout(out, layout, x, conv_weight)

    # autocast: the conv runs in the autocast dtype, BatchNorm statistics and parameters stay fp32,
    # and the output has the autocast dtype (as stock autocast gives on CUDA)
    cast = _autocast_dtype(x.device.type)
    if cast is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = x.to(cast)
        conv_weight = conv_weight.to(cast)
        conv_bias = None if conv_bias is None else conv_bias.to(cast)
    elif conv_weight.dtype != x.dtype:
        raise TypeError(
            f"x is {x.dtype} but conv_weight is {conv_weight.dtype}; cast one of them or use autocast"
        )
    else:
        cast = None  # (an inference plan repeats only the casts made)

    if x.shape[0] == 0 and group is None:
        return _empty_batch(pending.materialize() if pending is not None else x, conv_weight, conv_bias, bn_weight,
                            bn_bias, running_mean, running_var, num_batches_tracked if updates_running_stats else None,
                            _backends.LayerParams.of(norm, eps, stride, padding, dilation, activation,
                                                     negative_slope, pool))
    if pending is not None and group is not None:  # the sync path has no input prologue
        x, pending = pending.materialize(), None
    if group is not None:
        # the backend runs only the conv (norm "none"); statistics, normalisation, activation and
        # pool follow the all_reduce in the sync path
        name = _resolve_backend(backend, _config_fields(x, conv_weight, "none", "none", stride, padding, dilation, ()))
        return _sync_batch_norm.sync_conv3d_bn_act(
            x, conv_weight, conv_bias, bn_weight, bn_bias,
            running_mean if updates_running_stats else None, running_var if updates_running_stats else None,
            num_batches_tracked if updates_running_stats else None,
            momentum=None if momentum is None else float(momentum), eps=float(eps), stride=stride,
            padding=padding, dilation=dilation, activation=activation, negative_slope=float(negative_slope),
            pool=pool, backend=name, group=group,
            memory_format=(stock_memory_format(x, conv_weight) if layout == "stock" else output_memory_format(x, name)),
        )
    if residual is not None:  # (_residual_in_epilogue: eager inference, which picks its own backend)
        return in_layout(_forward_with_residual(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                                running_var, norm, eps, stride, padding, dilation, activation,
                                                negative_slope, pool, residual, backend, out_shape, plan_key,
                                                cast),
                         layout, x, conv_weight)
    # defer this layer's normalisation + activation into the next layer's input (see PendingBatchNorm)
    deferred = defer and norm == "batch" and not pool
    op_norm, op_activation = ("stats", "none") if deferred else (norm, activation)
    fields = _config_fields(x, conv_weight, op_norm, op_activation, stride, padding, dilation, pool,
                            input_norm=pending is not None)
    name = _resolve_backend(backend, fields)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
        x, conv_weight, conv_bias, bn_weight, bn_bias, None if pending is None else pending.stats))
    keep = keeps_conv_output(keep_conv_output, op_norm, x.shape[1], needs_grad, x.device.type)
    # eager without a backward to follow (inference): the implementation itself, no autograd node
    # (under torch.func transforms always the autograd.Function: its vmap rule, its grad support)
    transformed = eager and _functorch_wrapped(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    if not eager:
        forward = _forward_op
    elif transformed:
        forward = _EagerForward.apply
    else:
        tangents = _carry_tangents(x, conv_weight, conv_bias, bn_weight, bn_bias,
                                   None if pending is None else pending.stats)
        forward = _EagerForwardUntransformed.apply if needs_grad or tangents else _forward_impl
    out, mean, var, _, _ = forward(
        # deferred: γ and β reach the next layer through the PendingBatchNorm, not this op
        x, conv_weight, conv_bias, None if deferred else bn_weight, None if deferred else bn_bias,
        running_mean if norm == "running" else None, running_var if norm == "running" else None,
        op_norm, float(eps), list(stride), list(padding), list(dilation), op_activation,
        # no pool is None, never []: AOTInductor's proxy executor hands an op an empty int list as
        # None, which a List[int] argument rejects (pytorch/pytorch#194324)
        float(negative_slope), list(pool) or None,
        None if pending is None else pending.stats,
        0.0 if pending is None else float(pending.eps),
        "none" if pending is None else pending.activation,
        0.0 if pending is None else float(pending.negative_slope),
        name,
        keep,
    )
    if updates_running_stats and torch.jit.is_tracing():
        # a TorchScript trace takes the element count from its input's (traced) shape: through the
        # op's int argument it would bake the traced batch's count into the running_var update
        _reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(),
                                        torch.as_tensor(count, dtype=mean.dtype, device=mean.device),
                                        None if momentum is None else float(momentum))
    elif updates_running_stats:
        (_update_running_stats_impl if eager else _update_running_stats_op)(
            running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(), count,
            None if momentum is None else float(momentum),
            "reference" if transformed else name,  # vmap's batched statistics: torch ops, no kernel
        )
    if deferred:
        return PendingBatchNorm(out, _deferred_stats(mean, var, bn_weight, bn_bias), float(eps), activation,
                                float(negative_slope))
    if forward is _forward_impl and plan_key is not None:  # eager inference: the next call like it runs the plan
        _keep_inference_plan(plan_key, backend, fields, name, _backends.LayerParams.of(
            norm, eps, stride, padding, dilation, activation, negative_slope, pool), cast)
    return in_layout(out, layout, x, conv_weight)
