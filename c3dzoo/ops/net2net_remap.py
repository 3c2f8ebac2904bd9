"""Tensor-level remap primitives of Net2Net (Chen, Goodfellow, Shlens, ICLR 2016).

Every tensor rewrite done by ``c3dzoo.net2net`` (weights, biases, BatchNorm parameters and
statistics, optimizer moments) goes through the functions below. They work on any device and dtype,
never loop in Python over units, and never modify their inputs.

The replicate/divide rewrites (``gather_units``, ``divide_incoming``) run on one of three backends,
chosen like the fused conv op's (argument, then ``$C3DZOO_BACKEND``, then "auto"): "reference"
(PyTorch indexing), "triton" (``c3dzoo.kernels.net2net_remap``; on CPU only under
``TRITON_INTERPRET=1``) or "cuda" (the ``c3dzoo._C`` extension's gather/divide kernels). "auto" picks
cuda, then triton, for CUDA tensors and the reference for CPU tensors. All three give the same
values bit for bit (same index map; one rounding of the division). A backend that cannot run a call
leaves it to the reference and records why (``c3dzoo.fallbacks()``).

Notation: a layer grows from ``old`` to ``new = len(g)`` units; ``g`` is the replica mapping
(``g[j]`` is the old unit that new unit ``j`` copies) and ``counts[i]`` is how many new units
copy old unit ``i`` (the original included).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends as _backends
from ._device import device_scope
from ._registry import triton_cpu_unsupported_reason

Tensor = torch.Tensor

__all__ = ["replica_mapping", "replica_counts", "gather_units", "divide_incoming", "dirac_"]


def replica_mapping(old: int, new: int, generator: Optional[torch.Generator] = None, *,
                    device: Optional[torch.device] = None) -> Tensor:
    """The Net2Net mapping ``g`` (int64, length ``new``): ``g[j] = j`` for ``j < old`` and a
    uniform random old unit for ``j >= old``. Random draws use ``generator`` (on its device);
    the result is moved to ``device`` (default: the generator's device, else CPU)."""
    if old < 1 or new < old:
        raise ValueError(f"replica_mapping needs 1 <= old <= new, got old={old}, new={new}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    extra = torch.randint(0, old, (new - old,), generator=generator, device=draw_device)
    g = torch.cat([torch.arange(old, device=draw_device), extra])
    return g.to(device) if device is not None else g


def replica_counts(g: Tensor, old: int) -> Tensor:
    """``counts[i]`` = number of new units that copy old unit ``i`` (length ``old``, int64)."""
    return torch.bincount(g, minlength=old)


def gather_units(t: Tensor, g: Tensor, dim: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """Replicate units along ``dim``: new unit ``j`` is a copy of old unit ``g[j]`` (output
    channels of a conv weight, rows of a Linear weight, a bias, BN parameters and statistics)."""
    return _remap(t, g, None, dim, 1, 0, backend)


def divide_incoming(t: Tensor, g: Tensor, counts: Tensor, dim: int = 1, group: int = 1, *,
                    power: int = 1, backend: Optional[str] = None) -> Tensor:
    """The consumer side of Net2Net-wider: along input dimension ``dim`` of ``t``, new input
    ``j`` becomes old input ``g[j]`` divided by ``counts[g[j]] ** power``.

    ``group`` > 1 treats ``dim`` as C × group, with ``group`` consecutive entries per channel:
    the columns of a Linear fed by a flattened C × D × H × W feature map (D·H·W per channel),
    which are replicated and divided per channel group. ``power=2`` scales quantities that are
    quadratic in the weight (e.g. Adam's ``exp_avg_sq``) consistently with the weight.
    """
    if power < 1:
        raise ValueError(f"divide_incoming needs power >= 1, got {power}")
    return _remap(t, g, counts, dim, group, power, backend)


def _remap(t: Tensor, g: Tensor, counts: Optional[Tensor], dim: int, group: int, power: int,
           backend: Optional[str]) -> Tensor:
    dim = dim % t.dim()
    size = t.shape[dim]
    if size % group:
        raise ValueError(f"dimension {dim} of size {size} is not a whole number of groups of {group}")
    old_units = size // group
    g = g.to(device=t.device, dtype=torch.int64)
    if counts is None:
        counts = torch.ones(old_units, dtype=torch.int64, device=t.device)
    counts = counts.to(device=t.device, dtype=torch.int64)
    name = _remap_backend(t, power, backend)
    if name == "triton":
        from c3dzoo.kernels.net2net_remap import net2net_remap

        with device_scope(t):
            return net2net_remap(t, g, counts, dim=dim, group=group, power=power)
    if name == "cuda":
        return _remap_cuda(t, g, counts, dim, group, power)
    return _remap_reference(t, g, counts, dim, group, power)


def _remap_reference(t: Tensor, g: Tensor, counts: Tensor, dim: int, group: int, power: int) -> Tensor:
    channels = t.shape[dim] // group
    grouped = t.reshape(*t.shape[:dim], channels, group, *t.shape[dim + 1:])
    out = grouped.index_select(dim, g)
    if power:
        scale = counts[g].to(t.dtype) ** power
        out = out / scale.view(-1, *([1] * (out.dim() - dim - 1)))
    return out.reshape(*t.shape[:dim], g.numel() * group, *t.shape[dim + 1:])


# dtype codes of c3dzoo._C.net2net_divide
_CUDA_DIVIDE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _remap_cuda(t: Tensor, g: Tensor, counts: Tensor, dim: int, group: int, power: int) -> Tensor:
    from . import cuda_impl

    lib = cuda_impl.extension()
    src = t.contiguous()
    inner = 1
    for s in src.shape[dim + 1:]:
        inner *= s
    outer = src.numel() // (src.shape[dim] * inner) if src.numel() else 0
    out = torch.empty((*src.shape[:dim], g.numel() * group, *src.shape[dim + 1:]), dtype=src.dtype,
                      device=src.device)
    if out.numel() == 0:
        return out
    g, counts = g.contiguous(), counts.contiguous()
    stream = cuda_impl.stream_handle(src)
    with device_scope(src):
        if power:
            lib.net2net_divide(src.data_ptr(), out.data_ptr(), _CUDA_DIVIDE_DTYPES[src.dtype], g.data_ptr(),
                               counts.data_ptr(), power, outer, src.shape[dim], inner, g.numel(), group, stream)
        else:
            lib.net2net_gather(src.data_ptr(), out.data_ptr(), src.element_size(), g.data_ptr(), outer,
                               src.shape[dim], inner, g.numel(), group, stream)
    return out


def _unsupported_reason(name: str, t: Tensor, power: int) -> Optional[str]:
    """None if backend ``name`` can remap ``t``, else why not."""
    unavailable = _backends._unavailable_reason(name)
    if unavailable is not None:
        return unavailable
    if name == "cuda":
        if t.device.type != "cuda":
            return "the CUDA extension remaps CUDA tensors only"
        if power and t.dtype not in _CUDA_DIVIDE_DTYPES:
            return f"the CUDA divide kernel takes fp32/fp16/bf16/fp64, not {t.dtype}"
        if t.element_size() not in (1, 2, 4, 8):
            return f"element size {t.element_size()} is not supported"
    if name == "triton" and t.device.type == "cpu":
        from c3dzoo.kernels.net2net_remap import runs_interpreted

        reason = triton_cpu_unsupported_reason(runs_interpreted)
        if reason is not None:
            return reason
        if power and t.dtype == torch.bfloat16:
            return "bfloat16 arithmetic under the Triton interpreter gives wrong results"
    if name == "triton" and t.device.type not in ("cpu", "cuda"):
        return f"device {t.device.type!r} is not supported by the Triton backend"
    return None


def _remap_backend(t: Tensor, power: int, backend: Optional[str]) -> str:
    requested = _backends.requested_backend(backend)
    if requested == "reference":
        return requested
    if requested != "auto":
        reason = _unsupported_reason(requested, t, power)
        if reason is None:
            return requested
        _backends._record_fallback(requested, f"net2net remap of a {t.dtype} tensor on {t.device.type}",
                                   reason, warn=True)
        return "reference"
    if t.device.type != "cuda":  # the interpreter is for tests, never chosen automatically
        return "reference"
    for name in ("cuda", "triton"):
        if name in _backends.names() and _unsupported_reason(name, t, power) is None:
            return name
    return "reference"


@torch.no_grad()
def dirac_(weight: Tensor) -> Tensor:
    """Make ``weight`` (out × in × k… with out == in) an identity convolution in place: 1 at the
    centre tap (``kernel_size // 2`` in every spatial dimension) of ``weight[c, c]``, 0 elsewhere.
    With padding ``kernel_size // 2`` and stride 1 the conv then returns its input."""
    if weight.dim() < 3 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"dirac_ needs an out × in × kernel weight with out == in, got {tuple(weight.shape)}")
    weight.zero_()
    channels = torch.arange(weight.shape[0], device=weight.device)
    centre = tuple(k // 2 for k in weight.shape[2:])
    weight[(channels, channels) + centre] = 1
    return weight
