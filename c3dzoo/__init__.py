"""c3dzoo: 3D-CNN video models whose Conv3d → BatchNorm3d → ReLU (→ MaxPool3d) chains run fused kernels."""

from __future__ import annotations

__version__ = "0.1.0"

from . import distributed, models, nn, ops
from .models import get_model, list_models
from .nn import fuse
from .ops import clear_weight_caches
from .ops.backends import backends, fallbacks, set_triton_autotune


# transfer learning: c3dzoo.load_pretrained, c3dzoo.replace_head (and the modules c3dzoo.transfer,
# c3dzoo.evaluation, c3dzoo.weights), imported on first use like the builders
_LAZY = {"load_pretrained": "transfer", "replace_head": "transfer", "transfer": None, "evaluation": None,
         "weights": None}


def __getattr__(name: str):
    # c3dzoo.c3d_bn, c3dzoo.r3d_18, ...: the zoo's builders, imported on first use
    if name in models._MODELS:
        return getattr(models, name)
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
        return module if _LAZY[name] is None else getattr(module, name)
    raise AttributeError(f"module 'c3dzoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(models._MODELS) | set(_LAZY))


__all__ = ["distributed", "models", "nn", "ops", "get_model", "list_models", "fuse", "backends", "fallbacks",
           "set_triton_autotune", "clear_weight_caches",
           "load_pretrained", "replace_head", "transfer", "evaluation", "weights", *models._MODELS]
