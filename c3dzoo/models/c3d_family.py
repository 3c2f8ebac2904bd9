"""C3D (Tran et al., 2015) with and without BatchNorm."""


from typing import Optional, Sequence

import torch
from torch import nn

from ._common import FusableModel, check_input, scaled

# (name, output channels, pool after it: None or (kernel, stride, padding))
_C3D_LAYERS = (
    ("conv1", 64, ((1, 2, 2), (1, 2, 2), 0)),
    ("conv2", 128, ((2, 2, 2), (2, 2, 2), 0)),
    ("conv3a", 256, None),
    ("conv3b", 256, ((2, 2, 2), (2, 2, 2), 0)),
    ("conv4a", 512, None),
    ("conv4b", 512, ((2, 2, 2), (2, 2, 2), 0)),
    ("conv5a", 512, None),
    ("conv5b", 512, ((2, 2, 2), (2, 2, 2), (0, 1, 1))),
)
_POOL_NAMES = {"conv1": "pool1", "conv2": "pool2", "conv3b": "pool3", "conv4b": "pool4", "conv5b": "pool5"}


class C3D(FusableModel):
    """C3D: eight 3×3×3 convs with max-pools, then fc6, fc7, fc8.

    ``batch_norm=True`` gives C3D-BN (``conv1_bn`` … after every conv, as in the "C3D with Batch
    Normalization" design); ``batch_norm=False`` the original C3D with the key names of the widely
    used PyTorch port. ``width_mult`` scales every channel count and the fc6/fc7 widths;
    ``input_size`` = (frames, height, width) sets fc6's input size.
    """

    def __init__(
        self,
        num_classes: int = 101,
        *,
        batch_norm: bool = True,
        dropout: float = 0.0,
        width_mult: float = 1.0,
        input_size: Sequence[int] = (16, 112, 112),
        in_channels: int = 3,
        fused: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__(fused, backend)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.input_size = tuple(int(s) for s in input_size)
        if len(self.input_size) != 3:
            raise ValueError(f"input_size must be (frames, height, width), got {input_size!r}")
        self.batch_norm = batch_norm
        self.layer_names = tuple(name for name, _, _ in _C3D_LAYERS)
        # per instance (not the module table), so Net2Net's deeper can insert layers and move pools
        self.pool_names = dict(_POOL_NAMES)
        self.fc_names = ("fc6", "fc7")
        channels = in_channels
        for name, out, pool in _C3D_LAYERS:
            out = scaled(out, width_mult)
            setattr(self, name, nn.Conv3d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                setattr(self, name + "_bn", nn.BatchNorm3d(out))
            if pool is not None:
                setattr(self, _POOL_NAMES[name], nn.MaxPool3d(*pool))
            channels = out
        self.features_shape = self._features_shape(channels)
        hidden = scaled(4096, width_mult)
        flat = channels * self.features_shape[0] * self.features_shape[1] * self.features_shape[2]
        self.fc6 = nn.Linear(flat, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(p=dropout)
        self.relu = nn.ReLU()

    def _features_shape(self, channels):
        size = list(self.input_size)
        for name, _, _ in _C3D_LAYERS:
            if name in _POOL_NAMES:
                pool = getattr(self, _POOL_NAMES[name])
                size = [
                    (s + 2 * p - k) // st + 1
                    for s, k, st, p in zip(size, _t(pool.kernel_size), _t(pool.stride), _t(pool.padding))
                ]
        if any(s < 1 for s in size):
            raise ValueError(f"input_size {self.input_size} is too small for C3D's five pools")
        return tuple(size)

    @property
    def in_channels(self) -> int:
        """The clip's channel count: the first conv's (which may have been replaced, e.g. by a
        2-channel one for optical flow)."""
        return getattr(self, self.layer_names[0]).in_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of pool5 (N × C × D × H × W)."""
        check_input(x, self.in_channels, self.input_size, type(self).__name__)
        for i, name in enumerate(self.layer_names):
            bn = getattr(self, name + "_bn") if self.batch_norm else None
            pool = getattr(self, self.pool_names[name]) if name in self.pool_names else None
            # all but the last layer feed the next conv: a fused training-mode BN without a pool
            # is then normalised in that conv's input prologue
            x = self.chain(x, getattr(self, name), bn, "relu", 0.0, pool, defer=i + 1 < len(self.layer_names))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        for name in self.fc_names:
            x = self.dropout(self.relu(getattr(self, name)(x)))
        return self.fc8(x)


def _t(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def c3d_bn(num_classes: int = 101, *, fused: bool = False, width_mult: float = 1.0,
           input_size: Sequence[int] = (16, 112, 112), dropout: float = 0.0,
           backend: Optional[str] = None, in_channels: int = 3) -> C3D:
    """C3D with BatchNorm3d after every conv (input N×3×16×112×112 by default; ``in_channels=2``
    for an optical-flow stream)."""
    return C3D(num_classes, batch_norm=True, dropout=dropout, width_mult=width_mult,
               input_size=input_size, in_channels=in_channels, fused=fused, backend=backend)


def c3d(num_classes: int = 487, *, fused: bool = False, width_mult: float = 1.0,
        input_size: Sequence[int] = (16, 112, 112), dropout: float = 0.5,
        backend: Optional[str] = None, in_channels: int = 3) -> C3D:
    """The original C3D (no BatchNorm; dropout 0.5 after fc6 and fc7; Sports-1M has 487 classes).
    Returns logits (the popular port applies softmax in forward; apply it yourself if needed)."""
    return C3D(num_classes, batch_norm=False, dropout=dropout, width_mult=width_mult,
               input_size=input_size, in_channels=in_channels, fused=fused, backend=backend)
