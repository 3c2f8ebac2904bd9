"""Opt-in measurement of the shipped tile configurations of the implicit-GEMM conv launchers.

By default each launcher picks its tile configuration with a per-shape rule (``select_config``), the
same on every GPU. With autotuning on (``C3DZOO_TRITON_AUTOTUNE=1`` in the environment, or
``set_enabled(True)``), the first launch of each shape on a GPU instead times every candidate the
launcher offers (configurations from its shipped list, each compiled for sm_90 in the CPU tests),
keeps the fastest for that shape for the life of the process, and launches it from then on. Like
``torch.backends.cudnn.benchmark``: the first call per shape is slower (it compiles and times every
candidate and synchronises once), later calls cost nothing extra.

Tuning never happens under the Triton interpreter, on CPU tensors, or while a CUDA graph is being
captured (the capture gets the rule's choice unless the shape was tuned before). Under
``torch.use_deterministic_algorithms(True)`` or ``torch.backends.cudnn.deterministic`` every launch
takes the rule's choice, tuned or not: a timing differs between runs, and so would the configuration
and with it the order of the fp32 sums, so results would not repeat bit for bit.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Hashable, Sequence, Tuple, TypeVar

import torch

Config = TypeVar("Config")

ENV_VAR = "C3DZOO_TRITON_AUTOTUNE"
_TARGET_MS = 20.0  # timed launches per candidate: about this long, within the bounds below
_MIN_REPS, _MAX_REPS = 3, 50

_enabled = os.environ.get(ENV_VAR, "").strip() not in ("", "0")
_choices: Dict[Tuple[str, Hashable], object] = {}
_timings: Dict[str, Dict[str, float]] = {}  # "<kernel> <shape key>" -> {config name: ms}


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    """Switch autotuning on or off for this process; configurations tuned so far are kept."""
    global _enabled
    _enabled = bool(flag)


def clear() -> None:
    """Forget every tuned choice (the next launch of each shape tunes again)."""
    _choices.clear()
    _timings.clear()


def timings() -> Dict[str, Dict[str, float]]:
    """What each tuned shape measured: {"<kernel> <shape>": {config name: ms per launch}}."""
    return {key: dict(times) for key, times in _timings.items()}


def deterministic_requested() -> bool:
    """Whether the user asked torch for reproducible results: then no choice of kernel or tile
    configuration may depend on a timing."""
    return torch.are_deterministic_algorithms_enabled() or bool(torch.backends.cudnn.deterministic)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def applies(device: torch.device) -> bool:
    """Whether a launch on ``device`` may be tuned now."""
    return (
        _enabled and device.type == "cuda" and not _interpreted()
        and not torch.cuda.is_current_stream_capturing()
    )


def time_ms(launch: Callable[[], None]) -> float:
    """Milliseconds per launch, with CUDA events on the current stream, after one untimed launch
    (compilation, first-touch)."""
    launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch()
    end.record()
    end.synchronize()
    first = max(start.elapsed_time(end), 1e-3)
    reps = max(_MIN_REPS, min(_MAX_REPS, math.ceil(_TARGET_MS / first)))
    start.record()
    for _ in range(reps):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def pick(kernel: str, key: Hashable, default: Config, candidates: Sequence[Config],
         launch: Callable[[Config], None], device: torch.device, name: Callable[[Config], str] = str) -> Config:
    """``default`` unless tuning applies to ``device`` and there is a choice; then the fastest of
    ``candidates`` for ``(kernel, key)``, measured on its first launch (``launch(config)`` runs the
    kernel with ``config`` on the real arguments; it must not change them) and remembered. A
    candidate that fails to compile or launch (out of resources) is out of the running. Always
    ``default`` while the user asks for deterministic algorithms."""
    if deterministic_requested():
        return default
    tuned = _choices.get((kernel, key))
    if tuned is not None:
        return tuned  # type: ignore[return-value]
    if len(candidates) < 2 or not applies(device):
        return default
    times: Dict[Config, float] = {}
    for config in candidates:
        try:
            times[config] = time_ms(lambda: launch(config))
        except Exception as error:  # compile failures and out-of-resources only lose the candidate
            if isinstance(error, (KeyboardInterrupt, torch.cuda.OutOfMemoryError)):
                raise
            times[config] = math.inf
    best = min(times, key=lambda c: (times[c], c is not default))  # ties: keep the rule's choice
    if math.isinf(times[best]):
        best = default
    _choices[(kernel, key)] = best
    _timings[f"{kernel} {key}"] = {name(c): t for c, t in times.items()}
    return best
