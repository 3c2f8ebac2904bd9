"""Where BatchNorm's batch statistics are finalized and its running statistics updated, for every
backend that trains with batch statistics (but the reference backend, which stays stock PyTorch).

Each training-forward kernel (the Triton conv's statistics epilogue, the CUDA stem) emits per-tile
(mean, M2) partials; ``finalize`` combines them into the batch mean and biased variance, and
``update_running_stats`` blends those into running_mean / running_var as ``nn.BatchNorm3d`` does.
On a device where ``c3dzoo._C`` runs, both are its CUDA kernels (two launches for the finalize —
Chan's combination in double over a grid of channel chunks × tile splits — and one for the update);
elsewhere, or with ``C3DZOO_CUDA_STATISTICS=0``, torch ops (``kernels._statistics`` and
``reference.update_running_stats``, about twenty small launches per layer between them). Both give
the same values within fp32 rounding; neither synchronises with the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from c3dzoo.kernels._statistics import finalize_statistics

from . import reference as _reference

Tensor = torch.Tensor


def implementation(t: Tensor) -> str:
    """"cuda" when the CUDA statistics kernels run for tensors like ``t``, else "torch"."""
    from . import cuda_impl  # noqa: PLC0415 - cuda_impl imports the op module, which imports this one

    return "cuda" if cuda_impl.runs_statistics(t) else "torch"


def finalize(part_mean: Tensor, part_m2: Tensor, positions: int, block_m: int) -> Tuple[Tensor, Tensor]:
    """Batch (mean, biased var), fp32 (C,), from fp32 [tiles, C] per-tile partials of ``block_m``
    positions each (the last tile holds the rest of ``positions``)."""
    if implementation(part_mean) == "cuda":
        from . import cuda_impl  # noqa: PLC0415

        return cuda_impl.finalize_statistics(part_mean, part_m2, positions, block_m)
    return finalize_statistics(part_mean, part_m2, positions, block_m)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
    *,
    backend: str,
) -> None:
    """In place, exactly as ``nn.BatchNorm3d`` in training mode (see ``reference.update_running_stats``),
    for a layer that ran on ``backend`` (the reference backend stays stock PyTorch throughout: it is
    what the others are checked against)."""
    if backend != "reference" and implementation(running_mean) == "cuda":
        from . import cuda_impl  # noqa: PLC0415

        if cuda_impl.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
            return
    _reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
