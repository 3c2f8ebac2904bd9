"""Input gradient of Conv3d, run by the forward's implicit-GEMM kernel.

For stride 1, the gradient of y = conv3d(x, W, padding p, dilation δ) with respect to x is itself a
convolution: dx = conv3d(dy, W', padding δ·(k−1) − p, dilation δ), with W' the kernel flipped in
every spatial dimension and its channel axes swapped (W'[ci, co] = W[co, ci] flipped). So the
inference kernel (``conv3d_bias_act_pool`` with no bias, activation or pool) computes it, with all of
its tiling and main loops (and their sm_90 checks). Strided convolutions (whose input gradient is a
transposed convolution with holes) and paddings larger than δ·(k−1) are not covered: ``supports``
says so and the caller uses another path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .conv3d_bias_act_pool import TileConfig, _triple, conv3d_bias_act_pool, pack_weight


def dgrad_unsupported_reason(kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int]) -> Optional[str]:
    """None if ``conv3d_dgrad`` covers this geometry, else why not."""
    if any(s != 1 for s in stride):
        return f"stride {tuple(stride)}: the Triton input gradient covers stride 1 only"
    if any(p > d * (k - 1) for k, p, d in zip(kernel_size, padding, dilation)):
        return f"padding {tuple(padding)} exceeds dilation·(kernel − 1) for kernel {tuple(kernel_size)}"
    return None


def pack_dgrad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The packed W' of the module docstring, in weight's dtype: [kD·kH·kW·C_out, C_in]."""
    return pack_weight(weight.flip(2, 3, 4).transpose(0, 1))


def conv3d_dgrad(
    dy: torch.Tensor,
    w_dgrad_packed: torch.Tensor,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """dx for dy = ∂L/∂conv3d(x, W) (N, C_out, D', H', W'): (N, C_in, D, H, W) in dy's dtype,
    channels_last_3d. ``w_dgrad_packed``: ``pack_dgrad_weight(W)`` in dy's dtype."""
    kernel_size, padding, dilation = _triple(kernel_size), _triple(padding), _triple(dilation)
    reason = dgrad_unsupported_reason(kernel_size, _triple(stride), padding, dilation)
    if reason is not None:
        raise ValueError(f"conv3d_dgrad: {reason}")
    flipped_padding = [d * (k - 1) - p for k, p, d in zip(kernel_size, padding, dilation)]
    return conv3d_bias_act_pool(
        dy, w_dgrad_packed, None, kernel_size=kernel_size, stride=(1, 1, 1), padding=flipped_padding,
        dilation=dilation, activation="none", negative_slope=0.0, pool=(), out_dtype=dy.dtype, config=config,
    )
