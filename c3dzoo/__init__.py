"""c3dzoo: 3D-CNN video models whose Conv3d → BatchNorm3d → ReLU (→ MaxPool3d) chains run fused kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from . import models, nn, ops
from .models import get_model, list_models
from .nn import fuse
from .ops.backends import backends, fallbacks


def __getattr__(name: str):
    # c3dzoo.c3d_bn, c3dzoo.r3d_18, ...: the zoo's builders, imported on first use
    if name in models._MODELS:
        return getattr(models, name)
    raise AttributeError(f"module 'c3dzoo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(models._MODELS))


__all__ = ["models", "nn", "ops", "get_model", "list_models", "fuse", "backends", "fallbacks",
           *models._MODELS]
