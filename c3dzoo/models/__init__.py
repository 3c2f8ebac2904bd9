"""The model zoo. Every builder takes ``fused`` and ``num_classes``; ``fused`` never changes the state_dict."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List

from torch import nn

# name → "module:function"; imported on first use so a missing optional piece never breaks the rest
_MODELS: Dict[str, str] = {
    "c3d_bn": "c3dzoo.models.c3d_family:c3d_bn",
    "c3d": "c3dzoo.models.c3d_family:c3d",
    "jester_convcolumn": "c3dzoo.models.jester:jester_convcolumn",
    "r3d_18": "c3dzoo.models.video_resnet:r3d_18",
    "mc3_18": "c3dzoo.models.video_resnet:mc3_18",
    "r2plus1d_18": "c3dzoo.models.video_resnet:r2plus1d_18",
}


def list_models() -> List[str]:
    """Names accepted by ``get_model``."""
    return list(_MODELS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    module, func = _MODELS[name].split(":")
    return getattr(importlib.import_module(module), func)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build zoo model ``name`` (see ``list_models()``) with builder keyword arguments."""
    return _builder(name)(**kwargs)


def __getattr__(name: str):
    if name in _MODELS:
        return _builder(name)
    raise AttributeError(f"module 'c3dzoo.models' has no attribute {name!r}")


__all__ = ["list_models", "get_model", *_MODELS]
