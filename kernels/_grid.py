"""Host-side helpers for grids, tile sizes and launch plans, kept cheap because they run on every
launch: ``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions in recent Triton (~5 µs
a call from Python), and a plan (geometry, tile choice, int32 checks, arguments) costs tens of µs
to build while a training step of C3D needs dozens of them, always the same ones."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

Plan = TypeVar("Plan")

_PLANNERS: list = []  # every memoised planner, so that clear_plan_caches() reaches them all


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def conv_allows_tf32() -> bool:
    """Whether stock fp32 convolutions may use TF32 on CUDA: cuDNN's conv precision, with torch's
    inheritance (conv, then cuDNN's, then the global ``fp32_precision``) resolved. Read through the
    ``fp32_precision`` API where torch has it (2.9+): the legacy ``torch.backends.cudnn.allow_tf32``
    raises once conv's precision was set with that newer API and RNN's was not, which the PyTorch
    docs now recommend (``torch.backends.cudnn.conv.fp32_precision = "ieee"``)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None:
        return conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value  # planners take flat sequences


def cached_plan(planner: Callable[..., Plan]) -> Callable[..., Plan]:
    """Memoise a launch planner. Planners are functions of shapes and settings, never tensors; the
    one global setting a plan reads (``conv_allows_tf32()``) is part of the key.
    Lists are keyed (and passed) as tuples; keyword order is part of the key (callers are few). Plans are shared: callers must not mutate them."""

    @functools.lru_cache(maxsize=4096)
    def cached(args, kwargs, _tf32):
        return planner(*args, **dict(kwargs))

    @functools.wraps(planner)
    def plan(*args, **kwargs):
        tf32 = conv_allows_tf32()
        try:  # the arguments as they are: converting each one cost more than the lookup itself
            return cached(args, tuple(kwargs.items()), tf32)
        except TypeError:  # a list among them (unhashable); the same key as the tuple gives
            return cached(tuple(map(_hashable, args)), tuple((k, _hashable(v)) for k, v in kwargs.items()), tf32)

    _PLANNERS.append(cached)
    return plan


def clear_plan_caches() -> None:
    """Forget every memoised plan: needed only when something a plan checks against changes, which
    in normal use never happens (tests that lower ``INT32_LIMIT`` call it)."""
    for cached in _PLANNERS:
        cached.cache_clear()


def is_interpreted(kernel) -> bool:
    """Whether a ``@triton.jit`` kernel was built for the Triton interpreter: triton decides when the
    decorator runs, i.e. by TRITON_INTERPRET at the time the kernel's module was first imported."""
    return type(kernel).__name__ == "InterpretedFunction"
