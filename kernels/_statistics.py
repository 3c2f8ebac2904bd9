"""Batch statistics from per-tile partials, in torch ops (no Triton: the CUDA extension's stem
uses it too). Shared by every training-forward kernel that emits (mean, M2) partials per tile."""

from __future__ import annotations

from typing import Tuple

import torch


def finalize_statistics(
    part_mean: torch.Tensor, part_m2: torch.Tensor, positions: int, block_m: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chan's parallel combination of per-tile (count, mean, M2) into the batch mean and biased var:

        mean = Σ n_i·mean_i / n,   M2 = Σ M2_i + Σ n_i·(mean_i − mean)²,   var = M2 / n

    (the k-way form of the pairwise update, exact in exact arithmetic). Tile counts are known on the
    host (every tile is full but the last), so nothing is read back from the device."""
    tiles = part_mean.shape[0]
    counts = torch.full((tiles, 1), float(block_m), dtype=torch.float32, device=part_mean.device)
    counts[-1] = float(positions - (tiles - 1) * block_m)
    weights = counts / float(positions)
    # shifted by the first tile's mean: the weighted sum adds small differences, not |mean|-sized values
    shift = part_mean[0]
    mean = shift + (weights * (part_mean - shift)).sum(dim=0)
    m2 = part_m2.sum(dim=0) + (counts * (part_mean - mean).square()).sum(dim=0)
    return mean, m2 / float(positions)
