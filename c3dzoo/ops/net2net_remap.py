"""Tensor-level remap primitives of Net2Net (Chen, Goodfellow, Shlens, ICLR 2016).

Every tensor rewrite done by ``c3dzoo.net2net`` (weights, biases, BatchNorm parameters and
statistics, optimizer moments) goes through the functions below, so they are the one place a
Triton/CUDA implementation has to replace. They are pure PyTorch, work on any device and dtype,
never loop in Python over units, and never modify their inputs.

Notation: a layer grows from ``old`` to ``new = len(g)`` units; ``g`` is the replica mapping
(``g[j]`` is the old unit that new unit ``j`` copies) and ``counts[i]`` is how many new units
copy old unit ``i`` (the original included).
"""

from __future__ import annotations

from typing import Optional

import torch

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


def gather_units(t: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """Replicate units along ``dim``: new unit ``j`` is a copy of old unit ``g[j]`` (output
    channels of a conv weight, rows of a Linear weight, a bias, BN parameters and statistics)."""
    return t.index_select(dim, g.to(t.device))


def divide_incoming(t: Tensor, g: Tensor, counts: Tensor, dim: int = 1, group: int = 1, *,
                    power: int = 1) -> Tensor:
    """The consumer side of Net2Net-wider: along input dimension ``dim`` of ``t``, new input
    ``j`` becomes old input ``g[j]`` divided by ``counts[g[j]] ** power``.

    ``group`` > 1 treats ``dim`` as C × group, with ``group`` consecutive entries per channel:
    the columns of a Linear fed by a flattened C × D × H × W feature map (D·H·W per channel),
    which are replicated and divided per channel group. ``power=2`` scales quantities that are
    quadratic in the weight (e.g. Adam's ``exp_avg_sq``) consistently with the weight.
    """
    dim = dim % t.dim()
    size = t.shape[dim]
    if size % group:
        raise ValueError(f"dimension {dim} of size {size} is not a whole number of groups of {group}")
    channels = size // group
    g = g.to(t.device)
    grouped = t.reshape(*t.shape[:dim], channels, group, *t.shape[dim + 1:])
    out = grouped.index_select(dim, g)
    scale = counts.to(device=t.device)[g].to(t.dtype) ** power
    out = out / scale.view(-1, *([1] * (out.dim() - dim - 1)))
    return out.reshape(*t.shape[:dim], g.numel() * group, *t.shape[dim + 1:])


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
