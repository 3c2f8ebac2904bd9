"""Fused ops. The only layer of c3dzoo that chooses a backend (see ``backends``)."""

from . import backends
from ._registry import register_builtin_backends
from ._weight_cache import clear_weight_caches
from .conv3d_bn_act import (ACTIVATIONS, PendingBatchNorm, conv3d_bn_act, in_layout, keeps_conv_output,
                            normalize_pool, stock_memory_format, unsupported_pool_reason)

register_builtin_backends()

__all__ = ["conv3d_bn_act", "PendingBatchNorm", "keeps_conv_output", "backends", "normalize_pool",
           "unsupported_pool_reason", "ACTIVATIONS", "clear_weight_caches", "stock_memory_format", "in_layout"]
