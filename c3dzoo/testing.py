"""The parity budget shared by the tests, `c3dzoo check` and the benchmarks.

As flash-attention does: the fused result's error against a float64 reference computed with stock
PyTorch ops must be at most 2× stock PyTorch's own error in the same dtype, plus a small absolute
floor (relative to the reference's magnitude) so that exact or near-exact results are not judged
on rounding noise alone.

ReLU and max-pool make gradients discontinuous: where a pre-activation is within rounding of zero
(or two pool candidates within rounding of each other) either implementation may take either side
by luck of rounding. Tests put a zero upstream gradient on such positions (``ambiguous_positions``)
so a gradient comparison never hinges on a coin toss; everything else is compared in full.
"""

from __future__ import annotations

from typing import Optional

import torch

# fused error ≤ PARITY_FACTOR × stock error + floor, floor = FLOOR[dtype] × max(1, max|reference|)
PARITY_FACTOR = 2.0
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.detach().double() - reference.detach().double()).abs().max().item() if value.numel() else 0.0


def assert_parity(
    fused: Optional[torch.Tensor],
    stock: Optional[torch.Tensor],
    reference: Optional[torch.Tensor],
    dtype: torch.dtype,
    what: str,
    factor: float = PARITY_FACTOR,
) -> None:
    """fused error vs reference ≤ factor × stock error vs reference + floor (max abs errors)."""
    if reference is None:
        assert fused is None and stock is None, f"{what}: expected no value, got fused={fused is not None}"
        return
    assert fused is not None, f"{what}: fused result missing"
    assert stock is not None, f"{what}: stock result missing"
    assert fused.shape == reference.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(fused.detach().double()).all(), f"{what}: fused result has non-finite values"
    scale = max(1.0, reference.detach().double().abs().max().item()) if reference.numel() else 1.0
    floor = FLOOR[dtype] * scale
    fused_err = max_error(fused, reference)
    stock_err = max_error(stock, reference)
    budget = factor * stock_err + floor
    assert fused_err <= budget, (
        f"{what}: fused error {fused_err:.3e} exceeds budget {budget:.3e} "
        f"(stock error {stock_err:.3e}, floor {floor:.3e}, dtype {dtype})"
    )


def ambiguous_positions(z: torch.Tensor, z_reference: torch.Tensor, activation: str, pool,
                        negative_slope: float = 0.0) -> torch.Tensor:
    """Output positions whose forward decision is within rounding of a tie.

    ``z``: the pre-activation (after BN) computed in the low-precision dtype; ``z_reference``: the
    same in float64. δ = 4 × their largest difference. Without pool: |z_ref| < δ (the ReLU kink).
    With pool (kernel, stride, padding): per window, the two largest z_ref within δ of each other,
    or the largest within δ of the kink. Returns a bool tensor shaped like the op's output.
    A leaky_relu with a negative ``negative_slope``, and silu, are not monotone: the pool compares
    activations then (with δ scaled by |slope| where larger than 1), not z.
    """
    import torch.nn.functional as F

    z_ref = z_reference.detach().double()
    delta = 4 * (z.detach().double() - z_ref).abs().max().item() + 1e-12
    kink = activation in ("relu", "leaky_relu")
    if pool and activation == "leaky_relu" and negative_slope < 0:
        z_ref = F.leaky_relu(z_ref, negative_slope)
        delta *= max(1.0, abs(negative_slope))
    if pool and activation == "silu":  # |silu'| ≤ 1.1
        z_ref = F.silu(z_ref)
        delta *= 1.1
    if not pool:
        return (z_ref.abs() < delta) if kink else torch.zeros_like(z_ref, dtype=torch.bool)
    kernel, stride, padding = pool
    padded = F.pad(z_ref, [p for p in reversed(padding) for _ in range(2)], value=float("-inf"))
    windows = padded.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).unfold(4, kernel[2], stride[2])
    windows = windows.flatten(5)
    if windows.shape[-1] < 2:
        top1 = windows[..., 0]
        tie = torch.zeros_like(top1, dtype=torch.bool)
    else:
        top2 = windows.topk(2, dim=-1).values
        top1 = top2[..., 0]
        tie = (top2[..., 0] - top2[..., 1]) < delta
    return tie | ((top1.abs() < delta) if kink else torch.zeros_like(tie))
