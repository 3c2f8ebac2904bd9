"""The model zoo. Every builder takes ``fused`` and ``num_classes``; ``fused`` never changes the state_dict."""


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
    "r2plus1d_34": "c3dzoo.models.video_resnet:r2plus1d_34",
    "s3d": "c3dzoo.models.separable_inception:s3d",
    "slow_r50": "c3dzoo.models.resnet3d:slow_r50",
    "i3d_r50": "c3dzoo.models.resnet3d:i3d_r50",
    "c2d_r50": "c3dzoo.models.resnet3d:c2d_r50",
    "r2plus1d_r50": "c3dzoo.models.resnet3d:r2plus1d_r50",
    "csn_r101": "c3dzoo.models.resnet3d:csn_r101",
    "slowfast_r50": "c3dzoo.models.resnet3d:slowfast_r50",
    "slowfast_r101": "c3dzoo.models.resnet3d:slowfast_r101",
    "slowfast_16x8_r101_50_50": "c3dzoo.models.resnet3d:slowfast_16x8_r101_50_50",
    "x3d_xs": "c3dzoo.models.x3d:x3d_xs",
    "x3d_s": "c3dzoo.models.x3d:x3d_s",
    "x3d_m": "c3dzoo.models.x3d:x3d_m",
    "x3d_l": "c3dzoo.models.x3d:x3d_l",
}


def list_models() -> List[str]:
    """Names accepted by ``get_model``."""
    return list(_MODELS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    module, func = _MODELS[name].split(":")
    return getattr(importlib.import_module(module), func)


def get_model(name: str, *, sync_bn: bool = False, process_group=None, **kwargs) -> nn.Module:
    """Build zoo model ``name`` (see ``list_models()``) with builder keyword arguments.

    ``sync_bn=True`` (needs ``fused=True``) sets the model's ``sync_bn``/``process_group``: its
    fused forward synchronises training-mode BatchNorm statistics over ``process_group`` (default
    WORLD) when torch.distributed is initialised with more than one rank."""
    if sync_bn and not kwargs.get("fused", False):
        raise ValueError("sync_bn=True needs fused=True (the synchronisation lives in the fused op)")
    if process_group is not None and not sync_bn:
        raise ValueError("process_group is given but sync_bn=False: pass sync_bn=True to synchronise "
                         "BatchNorm statistics over it")
    model = _builder(name)(**kwargs)
    if sync_bn:
        model.sync_bn, model.process_group = True, process_group
    return model


def __getattr__(name: str):
    if name in _MODELS:
        return _builder(name)
    raise AttributeError(f"module 'c3dzoo.models' has no attribute {name!r}")


__all__ = ["list_models", "get_model", *_MODELS]
