"""The device scope every kernel launch runs in."""

from __future__ import annotations

import contextlib

import torch


def device_scope(t: torch.Tensor):
    """Make ``t``'s GPU the current device (and so its current stream the launch stream) for the
    duration: Triton and the extension launch on the CURRENT device, which need not be the
    tensors' (a model on cuda:1 while device 0 is current would hand device-1 pointers to a
    device-0 kernel). No-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
