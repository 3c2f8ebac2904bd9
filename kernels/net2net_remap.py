"""Net2Net's tensor remap in one Triton kernel: replicate units along one dimension, optionally
dividing each by its replica count (to a power).

A tensor is viewed as ``[outer, old_units·group, inner]`` around the remapped dimension; the output
is ``[outer, new_units·group, inner]`` with

    out[o, j·group + q, i] = src[o, g[j]·group + q, i] / counts[g[j]] ** power      (power ≥ 1)
    out[o, j·group + q, i] = src[o, g[j]·group + q, i]                              (power = 0)

which covers every rewrite of ``c3dzoo.ops.net2net_remap``: a producer's output units (power 0),
a consumer's input units (power 1; ``group`` > 1 for a Linear fed by a flattened C×D×H×W map,
whose D·H·W columns per channel move together), and Adam's second moment of a consumer (power 2).
The index arithmetic is csrc/stem_math.h's ``net2net_source_index``, so the CUDA extension and this
kernel agree element for element. The division runs in fp32 (fp64 for fp64 tensors) and rounds
once, as PyTorch's elementwise division does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import cdiv, is_interpreted


@triton.jit
def net2net_remap_kernel(
    src_ptr, dst_ptr, g_ptr, counts_ptr,
    total, inner, old_size, new_size, group,
    POWER: tl.constexpr, COMPUTE_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    i = offs % inner
    rest = offs // inner
    k = rest % new_size
    outer = rest // new_size
    j = k // group
    q = k - j * group
    unit = tl.load(g_ptr + j, mask=mask, other=0)
    value = tl.load(src_ptr + (outer * old_size + unit * group + q) * inner + i, mask=mask, other=0)
    if POWER > 0:
        compute = tl.float64 if COMPUTE_FP64 else tl.float32
        count = tl.load(counts_ptr + unit, mask=mask, other=1).to(compute)
        divisor = count
        for _ in tl.static_range(POWER - 1):
            divisor = divisor * count
        if COMPUTE_FP64:
            value = value.to(compute) / divisor  # div.rn.f64: correctly rounded
        else:  # correctly rounded, as torch divides; triton's fp32 "/" is div.full.f32 (up to 2 ulp off)
            value = tl.math.div_rn(value.to(compute), divisor)
        value = value.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + offs, value, mask=mask)


def runs_interpreted() -> bool:
    """Whether the remap kernel was built for the Triton interpreter (``_grid.is_interpreted``)."""
    return is_interpreted(net2net_remap_kernel)


def net2net_remap(src: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, *, dim: int, group: int,
                  power: int) -> torch.Tensor:
    """The remap of the module docstring along ``dim`` of ``src`` (any layout; read contiguous).
    ``g``: int64 mapping (length new_units) and ``counts``: int64 replica counts (length old_units),
    on src's device. Returns a new contiguous tensor of src's dtype."""
    dim = dim % src.dim()
    src = src.contiguous()
    size = src.shape[dim]
    if size % group:
        raise ValueError(f"dimension {dim} of size {size} is not a whole number of groups of {group}")
    if power < 0 or power > 4:
        raise ValueError(f"power must be 0..4, got {power}")
    inner = 1
    for s in src.shape[dim + 1:]:
        inner *= s
    new_units = g.numel()
    out_shape = (*src.shape[:dim], new_units * group, *src.shape[dim + 1:])
    out = torch.empty(out_shape, dtype=src.dtype, device=src.device)
    total = out.numel()
    if total == 0:
        return out
    g = g.to(device=src.device, dtype=torch.int64).contiguous()
    counts = counts.to(device=src.device, dtype=torch.int64).contiguous()
    block = 1024
    net2net_remap_kernel[(cdiv(total, block),)](
        src, out, g, counts, total, inner, size, new_units * group, group,
        POWER=power, COMPUTE_FP64=src.dtype == torch.float64, BLOCK=block,
    )
    return out
