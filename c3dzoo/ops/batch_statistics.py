"""Where BatchNorm's batch statistics are finalized and its running statistics updated, for every
backend that trains with batch statistics (but the reference backend, which stays stock PyTorch).

Each training-forward kernel (the Triton conv's statistics epilogue, the CUDA stem) emits per-tile
(mean, M2) partials; ``finalize`` combines them into the batch mean and biased variance, and
``update_running_stats`` blends those into running_mean / running_var as ``nn.BatchNorm3d`` does.
Three implementations, the first that runs for the tensors at hand (``implementation(t)`` says which):

* "cuda": ``c3dzoo._C``'s kernels (two launches for the finalize — Chan's combination in double
  over a grid of channel chunks × tile splits — and one for the update; ``C3DZOO_CUDA_STATISTICS=0``
  switches them off);
* "triton": the same algorithm as Triton kernels (``kernels.batch_norm_statistics``; three launches),
  for installs without the extension, and under the Triton interpreter for CPU tensors
  (``C3DZOO_TRITON_STATISTICS=0`` switches them off);
* "torch": torch ops (``kernels._statistics`` and ``reference.update_running_stats``, about twenty
  small launches per layer between them).

All give the same values within fp32 rounding; none synchronises with the host.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch

from c3dzoo.kernels._statistics import finalize_statistics

from . import reference as _reference
from ._weight_cache import mark_changed

Tensor = torch.Tensor


TRITON_ENV_VAR = "C3DZOO_TRITON_STATISTICS"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs(t: Tensor) -> bool:
    if os.environ.get(TRITON_ENV_VAR, "1").strip() == "0" or t.device.type not in ("cuda", "cpu"):
        return False
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False  # (without the interpreter the module would compile for a GPU: not imported for CPU)
    if not _triton_installed():
        return False
    from c3dzoo.kernels import batch_norm_statistics  # noqa: PLC0415 - imports triton

    return batch_norm_statistics.runs_on(t.device)


def implementation(t: Tensor) -> str:
    """"cuda", "triton" or "torch": which implementation runs for tensors like ``t``."""
    from . import cuda_impl  # noqa: PLC0415 - cuda_impl imports the op module, which imports this one

    if cuda_impl.runs_statistics(t):
        return "cuda"
    return "triton" if _triton_runs(t) else "torch"


def kernels_take(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor], mean: Tensor,
                 var: Tensor) -> bool:
    """Whether the update kernels take these tensors: contiguous fp32 vectors of one length, and a
    num_batches_tracked (if any) that is an int64 scalar (float64 statistics: the torch ops)."""
    c = running_mean.numel()
    return (all(t.dtype == torch.float32 and t.dim() == 1 and t.is_contiguous() and t.numel() == c
                for t in (running_mean, running_var, mean, var))
            and (num_batches_tracked is None
                 or (num_batches_tracked.dtype == torch.int64 and num_batches_tracked.numel() == 1)))


def finalize(part_mean: Tensor, part_m2: Tensor, positions: int, block_m: int) -> Tuple[Tensor, Tensor]:
    """Batch (mean, biased var), fp32 (C,), from fp32 [tiles, C] per-tile partials of ``block_m``
    positions each (the last tile holds the rest of ``positions``)."""
    chosen = implementation(part_mean)
    if chosen == "cuda":
        from . import cuda_impl  # noqa: PLC0415

        return cuda_impl.finalize_statistics(part_mean, part_m2, positions, block_m)
    if chosen == "triton":
        from c3dzoo.kernels import batch_norm_statistics  # noqa: PLC0415

        return batch_norm_statistics.finalize_statistics(part_mean, part_m2, positions, block_m)
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
    chosen = implementation(running_mean) if backend != "reference" else "torch"
    if chosen == "cuda":
        from . import cuda_impl  # noqa: PLC0415

        if cuda_impl.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
            return
    elif chosen == "triton" and kernels_take(running_mean, running_var, num_batches_tracked, mean, var):
        from c3dzoo.kernels import batch_norm_statistics  # noqa: PLC0415

        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        # (momentum=None without a counter: refused there, before the launch)
        batch_norm_statistics.update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var,
                                                    count, momentum)
        mark_changed(running_mean, running_var)  # written by a kernel: cached folds must see it
        return
    _reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
