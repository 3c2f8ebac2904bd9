"""Checks shared by the tests of the BatchNorm statistics finalize implementations (the CUDA
extension's host build, the Triton kernels): partials as the training kernels emit them, and what a
finalize of them must give."""

from __future__ import annotations

import torch


def column_data(positions: int, channels: int, big_mean: bool) -> torch.Tensor:
    """[positions, channels] fp32 values (as float64) of growing scale per channel; with
    ``big_mean`` |mean|/std = 1e5, where a Σy² formula would lose every digit of the variance."""
    g = torch.Generator().manual_seed(positions + channels)
    y = torch.randn(positions, channels, generator=g, dtype=torch.float64) * (1 + torch.arange(channels))
    if big_mean:
        y = y * 0.01 + 1000.0
    return y.float().double()  # the stored fp32 values are the data


def tile_partials(y: torch.Tensor, block_m: int):
    """fp32 per-tile (mean, M2) of y [positions, C], as the training kernels emit them."""
    y = y.double()
    full = y.shape[0] // block_m * block_m  # the full tiles at once, then the short last one
    tiles = [y[:full].unflatten(0, (-1, block_m))] + ([y[full:].unsqueeze(0)] if full < y.shape[0] else [])
    means = [t.mean(dim=1) for t in tiles]
    m2s = [(t - m.unsqueeze(1)).square().sum(dim=1) for t, m in zip(tiles, means)]
    return torch.cat(means).float().contiguous(), torch.cat(m2s).float().contiguous()


def assert_finalized(mean, var, y, part_mean, part_m2, positions: int, block_m: int, big_mean: bool) -> None:
    """(mean, var) of a float64 Chan combination of the fp32 partials of y: against the exact
    combination of the same partials, against the data, and against the torch-ops finalize."""
    from c3dzoo.kernels._statistics import finalize_statistics

    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (y.shape[1],)
    mean, var = mean.cpu(), var.cpu()
    tiles = part_mean.shape[0]
    # the combination's own error: against the exact (float64) combination of the same fp32 partials
    counts = torch.full((tiles, 1), float(block_m), dtype=torch.float64)
    counts[-1] = positions - (tiles - 1) * block_m
    exact_mean = (counts * part_mean.double()).sum(dim=0) / positions
    exact_var = (part_m2.double().sum(dim=0) + (counts * (part_mean.double() - exact_mean) ** 2).sum(dim=0)) / positions
    torch.testing.assert_close(mean, exact_mean.float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(var, exact_var.float(), rtol=1e-6, atol=0)
    # and against the data: what is left is the rounding of the tile means to fp32 (an ulp of |mean|
    # per tile: ~1e-4 of the variance when |mean|/std = 1e5), never the cancellation Σy² − n·mean² has
    var64, mean64 = torch.var_mean(y, dim=0, correction=0)
    torch.testing.assert_close(mean, mean64.float(), rtol=2e-7, atol=1e-7 * float(mean64.abs().max()))
    torch.testing.assert_close(var, var64.float(), rtol=1e-3 if big_mean else 5e-6, atol=0)
    torch_mean, torch_var = finalize_statistics(part_mean, part_m2, positions, block_m)
    # the torch ops sum in fp32: an error of ~eps32 of the data's magnitude, not of the mean's
    torch.testing.assert_close(mean, torch_mean, rtol=1e-6, atol=1e-6 * float(y.abs().max()))
    torch.testing.assert_close(var, torch_var, rtol=1e-4 if big_mean else 2e-5, atol=0)
