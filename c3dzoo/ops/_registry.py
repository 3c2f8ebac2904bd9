"""The built-in backends: reference (always), triton and cuda (when their kernels and a device exist)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

from . import backends as _backends
from . import reference as _reference


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_cpu_unsupported_reason(kernels_interpreted: Callable[[], bool]) -> Optional[str]:
    """Why the triton backend cannot take a CPU tensor now, or None: CPU tensors run under the
    interpreter only, switched on before the kernels were imported (``kernels_interpreted()``). On a
    GPU machine the backend is available but its kernels are compiled for the GPU."""
    if not triton_interpreter_enabled():
        return "a CPU tensor needs TRITON_INTERPRET=1 (the Triton interpreter) for the Triton backend"
    if not kernels_interpreted():
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported (compiled for "
                "a GPU); set it before the first use of the triton backend")
    return None


def _probe_reference() -> Optional[str]:
    return None


def _probe_triton() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if importlib.util.find_spec("c3dzoo.ops.triton_impl") is None:
        return "no Triton implementation of conv3d_bn_act is shipped in this version"
    if not (torch.cuda.is_available() or triton_interpreter_enabled()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU, slowly)"
    return None


def _triton_device_reason(device_type: str) -> Optional[str]:
    return importlib.import_module("c3dzoo.ops.triton_impl").device_reason(device_type)


def _cuda_device_reason(device_type: str) -> Optional[str]:
    return None if device_type == "cuda" else f"the cuda backend takes CUDA tensors only, got {device_type!r} tensors"


def _supports_triton(cfg: _backends.ConvBNActConfig) -> Optional[str]:
    impl = importlib.import_module("c3dzoo.ops.triton_impl")
    return impl.supports(cfg)


def _probe_cuda() -> Optional[str]:
    try:
        importlib.import_module("c3dzoo._C")
    except ImportError as exc:
        return (
            "the c3dzoo._C CUDA extension is not built (reinstall with nvcc present, or "
            f"C3DZOO_BUILD_CUDA=1): {exc}"
        )
    if importlib.util.find_spec("c3dzoo.ops.cuda_impl") is None:
        return "no CUDA C++ implementation of conv3d_bn_act is shipped in this version"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _supports_cuda(cfg: _backends.ConvBNActConfig) -> Optional[str]:
    impl = importlib.import_module("c3dzoo.ops.cuda_impl")
    return impl.supports(cfg)


# the input "auto" times contenders on: C3D's clip size (the configurations several backends can run
# are the stems, C_in ≤ 4, whose input is the clip), a batch big enough to fill the GPU
_TIMING_INPUT = (8, 16, 112, 112)  # N, D, H, W


def time_forward_ms(name: str, cfg: _backends.ConvBNActConfig, repeats: int = 10) -> float:
    """Milliseconds of one forward of backend ``name`` on ``cfg`` (CUDA events, after warm-up that
    also compiles), on random data of ``_TIMING_INPUT``'s size; inf if it cannot run."""
    if cfg.device != "cuda" or not torch.cuda.is_available():
        return float("inf")
    impl = _backends.get(name)
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, cfg.dtype.rsplit(".", 1)[-1])
    n, d, h, w = _TIMING_INPUT
    fp32 = dict(device=device, dtype=torch.float32)
    x = torch.randn(n, cfg.in_channels, d, h, w, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(cfg.out_channels, cfg.in_channels, *cfg.kernel_size, device=device, dtype=dtype) * 0.1
    c = cfg.out_channels
    running = cfg.norm == "running"
    args = (x, weight, torch.zeros(c, device=device, dtype=dtype), torch.ones(c, **fp32), torch.zeros(c, **fp32),
            torch.zeros(c, **fp32) if running else None, torch.ones(c, **fp32) if running else None)
    params = _backends.LayerParams.of(cfg.norm, 1e-5, cfg.stride, cfg.padding, cfg.dilation, cfg.activation,
                                      0.01, cfg.pool)
    try:
        with torch.no_grad():
            for _ in range(3):
                impl.forward(*args, params)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                impl.forward(*args, params)
            end.record()
            end.synchronize()
    except Exception:  # a contender that fails here is simply not chosen
        return float("inf")
    return start.elapsed_time(end) / repeats


def _can_time_now() -> bool:
    # measuring synchronises: not while a CUDA graph is being captured
    return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()


def register_builtin_backends() -> None:
    _backends.register(
        _backends.Backend("reference", _probe_reference, lambda cfg: None, lambda: _reference)
    )
    _backends.register(
        _backends.Backend(
            "triton", _probe_triton, _supports_triton,
            lambda: importlib.import_module("c3dzoo.ops.triton_impl"),
            auto_devices=("cuda",), device_reason=_triton_device_reason,
        )
    )
    _backends.register(
        _backends.Backend(
            "cuda", _probe_cuda, _supports_cuda,
            lambda: importlib.import_module("c3dzoo.ops.cuda_impl"),
            auto_devices=("cuda",), device_reason=_cuda_device_reason,
        )
    )
    _backends.set_timer(time_forward_ms, _can_time_now)
