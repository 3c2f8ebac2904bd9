"""The ``cuda`` backend: hand-written CUDA C++ kernels from csrc/, through the ``c3dzoo._C`` module.

As a conv backend it implements the stem only — Conv3d with C_in ≤ 4 (conv1 of C3D, the r3d /
r2plus1d stems):

* inference — BatchNorm with running statistics folded into the weight and bias (or no BatchNorm) +
  activation (+ MaxPool3d), one direct-convolution kernel that writes only the pooled NDHWC output;
* training (batch statistics) — a direct-convolution kernel that writes the raw conv output and
  per-block (mean, M2) partials (``stem_conv_stats``), the Chan combination of the partials
  (``batch_statistics.finalize``), then normalise + activation (+ pool) (``_normalize``: the Triton
  kernel when Triton runs, else stock ops).

It also holds the BatchNorm statistics kernels every training backend uses where ``c3dzoo._C`` runs
(``finalize_statistics``, ``update_running_stats``; ``batch_statistics`` chooses).

Every other configuration is declined by ``supports`` (the registry then falls back, with the reason).
Backward: the Triton backend's (recompute the conv output from x, Triton act/pool/BN backward, dgrad,
wgrad) when Triton runs on the device, else ``reference.backward``.

``c3dzoo._C`` takes raw device pointers and a stream handle, so it has no libtorch linkage; this
module does the tensor bookkeeping: BatchNorm folding in fp32 (cached), weight packing, layout.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

from . import batch_statistics
from . import reference as _reference
from ._device import device_scope
from ._normalize import kernel_available, normalize_act_pool
from .conv3d_bn_act import output_shape
from ._weight_cache import FoldedWeightCache, cached_folded, mark_changed
from .backends import ConvBNActConfig, InputNorm, LayerParams

Tensor = torch.Tensor

MAX_STEM_CIN = 4
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPES = tuple(str(d) for d in _DTYPE_CODES)
_ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2}
_CHANNELS_PER_THREAD = 8  # c3dzoo._C.STEM_CHANNELS_PER_THREAD; packed weight rows are padded to it

_SCOPE = "the cuda backend implements only the stem (C_in ≤ 4) in this version"


def extension():
    """The ``c3dzoo._C`` module (imported on first use)."""
    from c3dzoo import _C  # noqa: PLC0415 - imported lazily: the registry probes it first

    return _C


@functools.lru_cache(maxsize=None)
def _extension_loads() -> bool:
    try:
        extension()
    except ImportError:
        return False
    return True


_DEFAULT_EXTENSION = extension

# The device whose memory the pointers given to ``extension()`` address. Only tests change it (with
# ``extension``): tests/host_lib.py runs this module's tensor bookkeeping on CPU through c3dzoo._C_host,
# the host build of the same per-element math.
DEVICE_TYPE = "cuda"


def stream_handle(t: Tensor) -> int:
    """The handle of the current stream on ``t``'s device (0 for a host run)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def supports(cfg: ConvBNActConfig) -> Optional[str]:
    """None if the CUDA kernels can run ``cfg``, else why not."""
    if cfg.norm not in ("running", "none", "batch", "stats"):
        return f"{_SCOPE}; norm={cfg.norm!r} is not implemented"
    if cfg.input_norm:
        return f"{_SCOPE}; it has no input prologue for a deferred BatchNorm of the previous layer"
    if cfg.groups != 1:
        return f"{_SCOPE}; this layer has groups={cfg.groups} (the stem kernel is a dense conv)"
    if cfg.in_channels > MAX_STEM_CIN:
        return f"{_SCOPE}; this layer has C_in = {cfg.in_channels}"
    if cfg.device != "cuda":
        return f"{_SCOPE}, on CUDA tensors; got device {cfg.device!r}"
    if cfg.dtype not in _DTYPES:
        return f"{_SCOPE}, in fp16, bf16 or fp32; got {cfg.dtype}"
    if cfg.activation not in _ACTIVATIONS:
        return f"{_SCOPE}; activation {cfg.activation!r} is not supported (none, relu, leaky_relu)"
    if len(cfg.pool) not in (0, 9):
        return f"{_SCOPE}; pool {cfg.pool!r} is not kernel(3) + stride(3) + padding(3)"
    if cfg.pool and any(2 * p > k for k, p in zip(cfg.pool[0:3], cfg.pool[6:9])):
        return f"{_SCOPE}; pool padding must be at most half the pool kernel, got {cfg.pool!r}"
    if cfg.residual:
        return f"{_SCOPE}; it has no residual epilogue"
    return None


# --------------------------------------------------------------------------------------------
# folded + packed weight cache (c3dzoo.ops._weight_cache)
# --------------------------------------------------------------------------------------------


_weight_cache = FoldedWeightCache()


def pack_stem_weight(weight: Tensor, bias: Optional[Tensor], cpt: int = _CHANNELS_PER_THREAD) -> Tuple[Tensor, Tensor, int]:
    """fp32 (C_out, C_in, kd, kh, kw) weight → [kd·kh·kw·C_in, w_stride] with C_out innermost,
    zero-padded to ``w_stride`` = C_out rounded up to ``cpt``; bias → fp32 [w_stride]. The layout
    csrc/stem_math.h reads (also used by the host module's tests)."""
    c_out = weight.shape[0]
    w_stride = -(-c_out // cpt) * cpt
    w = weight.float().permute(2, 3, 4, 1, 0).reshape(-1, c_out)
    packed = torch.zeros(w.shape[0], w_stride, dtype=torch.float32, device=weight.device)
    packed[:, :c_out] = w
    b = torch.zeros(w_stride, dtype=torch.float32, device=weight.device)
    if bias is not None:
        b[:c_out] = bias.float()
    return packed.contiguous(), b, w_stride


def _folded_packed(weight, bias, bn_weight, bn_bias, running_mean, running_var, *, norm, eps, use_cache=True):
    return cached_folded(
        _weight_cache, pack_stem_weight,
        weight, bias, bn_weight, bn_bias, running_mean, running_var, norm=norm, eps=eps, use_cache=use_cache,
    )


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
    """Fused stem forward. Returns (out channels_last_3d, mean, var, conv output, pool argmax): fp32
    batch statistics (C_out,) for norm "batch" and "stats" (whose out is the raw conv output), empty
    otherwise; the conv output as ``reference.forward``'s ``keep_conv_output`` says; never an argmax
    (``keeps_pool_argmax``)."""
    norm = params.norm
    if norm not in ("running", "none", "batch", "stats") or input_norm is not None or residual is not None:
        raise NotImplementedError(f"cuda backend: norm={norm!r} / an input prologue / a residual is not implemented "
                                  f"(see supports())")
    if x.dim() != 5 or x.shape[1] > MAX_STEM_CIN or x.dtype not in _DTYPE_CODES or x.device.type != DEVICE_TYPE:
        raise NotImplementedError(f"cuda backend: {_SCOPE}, fp16/bf16/fp32 CUDA tensors (see supports())")
    if norm in ("batch", "stats"):
        out, mean, var, y = _forward_batch_norm(x, weight, bias, bn_weight, bn_bias, params)
        return (out, mean, var, _reference.kept_conv_output(y, params, keep_conv_output),
                _reference.no_pool_argmax(x))
    lib = extension()
    stride, padding, dilation, pool = params.stride, params.padding, params.dilation, params.pool
    if pool:
        pool_kernel, pool_stride, pool_padding = _reference.pool_geometry(pool)
    else:
        pool_kernel, pool_stride, pool_padding = [1, 1, 1], [1, 1, 1], [0, 0, 0]
    with torch.no_grad(), device_scope(x):
        w_packed, b_packed, w_stride = _folded_packed(
            weight, bias, bn_weight, bn_bias, running_mean, running_var, norm=norm, eps=params.eps
        )
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        n, c_in, d, h, w = x.shape
        c_out = weight.shape[0]
        size = output_shape(x.shape, weight.shape, stride, padding, dilation, pool)[2:]
        out = torch.empty((n, c_out, *size), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
        if out.numel():
            lib.stem_forward(
                xc.data_ptr(), w_packed.data_ptr(), b_packed.data_ptr(), out.data_ptr(), _DTYPE_CODES[x.dtype],
                n, d, h, w, c_in, c_out, list(weight.shape[2:]), list(stride), list(padding), list(dilation),
                pool_kernel, pool_stride, pool_padding, _ACTIVATIONS[params.activation], params.negative_slope,
                w_stride, stream_handle(x),
            )
    mean = x.new_empty(0, dtype=torch.float32)
    var = x.new_empty(0, dtype=torch.float32)  # distinct tensors: custom op outputs must not alias
    return out, mean, var, x.new_empty(0), _reference.no_pool_argmax(x)


def _stem_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], params: LayerParams
               ) -> Tuple[Tensor, Tensor, Tensor, int, int]:
    """The training stem's conv, one ``stem_conv_stats`` launch: (the raw conv output y, NDHWC in
    x's dtype; its per-block (mean, M2) partials; positions; positions per block)."""
    stride, padding, dilation = params.stride, params.padding, params.dilation
    lib = extension()
    with torch.no_grad(), device_scope(x):
        w_packed, b_packed, w_stride = _folded_packed(weight, bias, None, None, None, None, norm="none",
                                                      eps=params.eps, use_cache=False)  # training
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        n, c_in, d, h, w = x.shape
        c_out = weight.shape[0]
        size = output_shape(x.shape, weight.shape, stride, padding, dilation, ())[2:]
        y = torch.empty((n, c_out, *size), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
        positions = n * size[0] * size[1] * size[2]
        per_block = lib.stem_stats_positions_per_block(c_out)
        blocks = -(-positions // per_block)
        part_mean = torch.empty((blocks, c_out), dtype=torch.float32, device=x.device)
        part_m2 = torch.empty((blocks, c_out), dtype=torch.float32, device=x.device)
        lib.stem_conv_stats(
            xc.data_ptr(), w_packed.data_ptr(), b_packed.data_ptr(), y.data_ptr(), part_mean.data_ptr(),
            part_m2.data_ptr(), _DTYPE_CODES[x.dtype], n, d, h, w, c_in, c_out, list(weight.shape[2:]),
            list(stride), list(padding), list(dilation), w_stride, stream_handle(x),
        )
    return y, part_mean, part_m2, positions, per_block


def _forward_batch_norm(x, weight, bias, bn_weight, bn_bias, params: LayerParams
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward: the stem conv with its statistics partials, their Chan combination, then
    (norm "batch", not "stats") normalise/act/pool (the statistics are of the stored, rounded conv
    output). Returns (out, mean, var, the raw conv output y); for "stats" out is y itself."""
    eps = params.eps
    with torch.no_grad(), device_scope(x):
        y, part_mean, part_m2, positions, per_block = _stem_conv(x, weight, bias, params)
        mean, var = batch_statistics.finalize(part_mean, part_m2, positions, per_block)
        if params.norm == "stats":
            return y, mean, var, y
        out = normalize_act_pool(y, mean, var, bn_weight, bn_bias, eps=eps, activation=params.activation,
                                 negative_slope=params.negative_slope, pool=params.pool, use_kernel=True)
    return out.contiguous(memory_format=torch.channels_last_3d), mean, var, y


# --------------------------------------------------------------------------------------------
# BatchNorm statistics kernels, used by every training backend (``batch_statistics`` chooses)
# --------------------------------------------------------------------------------------------

STATISTICS_ENV_VAR = "C3DZOO_CUDA_STATISTICS"


def runs_statistics(t: Tensor) -> bool:
    """Whether ``c3dzoo._C``'s statistics kernels run on ``t``'s device (not with
    ``C3DZOO_CUDA_STATISTICS=0``)."""
    if t.device.type != DEVICE_TYPE or os.environ.get(STATISTICS_ENV_VAR, "1").strip() == "0":
        return False
    if extension is _DEFAULT_EXTENSION:
        return _extension_loads()
    return True  # a test's stand-in (tests/host_lib.py)


def finalize_statistics(part_mean: Tensor, part_m2: Tensor, positions: int, block_m: int) -> Tuple[Tensor, Tensor]:
    """``kernels._statistics.finalize_statistics`` on the device: Chan's combination of fp32
    [tiles, C] (mean, M2) partials in double, two launches."""
    if part_mean.dtype != torch.float32 or part_m2.dtype != torch.float32 or part_mean.shape != part_m2.shape \
            or part_mean.dim() != 2:
        raise ValueError(f"partials must be two float32 [tiles, C] tensors, got {part_mean.dtype} "
                         f"{tuple(part_mean.shape)} and {part_m2.dtype} {tuple(part_m2.shape)}")
    lib = extension()
    tiles, c = part_mean.shape
    part_mean, part_m2 = part_mean.contiguous(), part_m2.contiguous()
    workspace = torch.empty(lib.bn_chan_workspace_bytes(tiles, c), dtype=torch.uint8, device=part_mean.device)
    mean = torch.empty(c, dtype=torch.float32, device=part_mean.device)
    var = torch.empty(c, dtype=torch.float32, device=part_mean.device)
    with device_scope(part_mean):
        lib.bn_chan_finalize(part_mean.data_ptr(), part_m2.data_ptr(), tiles, c, int(positions), int(block_m),
                             workspace.data_ptr(), mean.data_ptr(), var.data_ptr(), stream_handle(part_mean))
    return mean, var


def update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                         mean: Tensor, var: Tensor, count: int, momentum: Optional[float]) -> bool:
    """``reference.update_running_stats`` in one launch (plus num_batches_tracked's increment);
    False, having changed nothing, for tensors it does not take (not contiguous fp32 vectors of one
    length, or a num_batches_tracked that is not an int64 scalar)."""
    if not batch_statistics.kernels_take(running_mean, running_var, num_batches_tracked, mean, var):
        return False
    c = running_mean.numel()
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    with device_scope(running_mean):
        extension().bn_update_running(
            mean.data_ptr(), var.data_ptr(), c, int(count), 0.0 if momentum is None else float(momentum),
            int(momentum is None), 0 if num_batches_tracked is None else num_batches_tracked.data_ptr(),
            running_mean.data_ptr(), running_var.data_ptr(), stream_handle(running_mean),
        )
    mark_changed(running_mean, running_var)  # written through pointers: cached folds must see it
    return True


def keeps_pool_argmax(params: LayerParams, keep_conv_output: bool) -> bool:
    """Never (see ``reference.keeps_pool_argmax``): the backward recomputes the pool's decisions
    from the conv output (Triton's fused kernels on the device)."""
    return False


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
             bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
             mean: Tensor, var: Tensor, params: LayerParams, needs_grad, conv_output: Optional[Tensor] = None,
             pool_argmax: Optional[Tensor] = None):
    """The Triton backward where Triton runs on the device (less memory, fused), else the reference's
    (``reference.backward``'s signature). A training-mode stem that did not keep its conv output
    (the default: see ``keeps_conv_output``) recomputes it here with the forward's own kernel: the
    same values bit for bit, so the backward's max-pool and activation decisions are the forward's
    (Triton's or cuDNN's conv would round a few values differently)."""
    if conv_output is None and params.norm == "batch":
        conv_output = _stem_conv(x, weight, bias, params)[0]
    if kernel_available(x):
        from . import triton_impl

        impl = triton_impl.backward
    else:
        impl = _reference.backward
    return impl(grad_out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, mean, var, params,
                needs_grad, conv_output)
