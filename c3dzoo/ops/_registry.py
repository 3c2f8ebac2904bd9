"""The built-in backends: reference (always), triton and cuda (when their kernels and a device exist)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

from . import backends as _backends
from . import reference as _reference


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def register_builtin_backends() -> None:
    _backends.register(
        _backends.Backend("reference", _probe_reference, lambda cfg: None, lambda: _reference)
    )
    _backends.register(
        _backends.Backend(
            "triton", _probe_triton, _supports_triton,
            lambda: importlib.import_module("c3dzoo.ops.triton_impl"),
            auto_devices=("cuda",),
        )
    )
    _backends.register(
        _backends.Backend(
            "cuda", _probe_cuda, _supports_cuda,
            lambda: importlib.import_module("c3dzoo.ops.cuda_impl"),
            auto_devices=("cuda",),
        )
    )
