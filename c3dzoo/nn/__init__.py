"""Drop-in fused modules."""

from .conv_bn_act import (
    BATCH_NORMS,
    Conv3dBNAct,
    Conv3dBNReLU,
    activation_spec,
    conv_bn_act,
    runs_hooks,
    stock_conv_bn_act,
    unsupported_reason,
)
from .fuse import FusedChain, fuse

__all__ = [
    "BATCH_NORMS", "Conv3dBNAct", "Conv3dBNReLU", "FusedChain", "fuse", "conv_bn_act", "stock_conv_bn_act",
    "activation_spec", "runs_hooks", "unsupported_reason",
]
