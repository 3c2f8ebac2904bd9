"""The 3D CNN of the public 20BN-Jester tutorial (``ConvColumn6``), with its module names."""


from typing import Optional

import torch
import torch.fx
from torch import nn

from ._common import ChainSequential, FusableModel, call_chained

Tensor = torch.Tensor

INPUT_SIZE = (18, 84, 84)  # frames, height, width: the four blocks leave 256 × 1 × 3 × 3
_BLOCK_CHANNELS = (32, 64, 124, 256)


def _conv_block(in_channels: int, out_channels: int) -> ChainSequential:
    """Conv3d (2×3×3, no padding) → BN → LeakyReLU → Conv3d (2×3×3, padding 1) → BN → LeakyReLU
    → MaxPool3d(2): indices 0…6, as in the tutorial's checkpoints."""
    return ChainSequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=(2, 3, 3), padding=0),
        nn.BatchNorm3d(out_channels),
        nn.LeakyReLU(),
        nn.Conv3d(out_channels, out_channels, kernel_size=(2, 3, 3), padding=1),
        nn.BatchNorm3d(out_channels),
        nn.LeakyReLU(),
        nn.MaxPool3d((2, 2, 2)),
    )


class ConvColumn(FusableModel):
    """Four conv blocks (``conv_layer1``…``conv_layer4``), a 1×3×3 ``conv_layer5`` to 512 × 1 × 1 × 1,
    then ``fc5`` → LeakyReLU → ``batch0`` → dropout → ``fc6`` → LeakyReLU → ``batch1`` → dropout →
    ``fc7``. Input N × 3 × 18 × 84 × 84."""

    def __init__(self, num_classes: int = 27, *, fused: bool = False, backend: Optional[str] = None):
        super().__init__(fused, backend)
        channels = (3,) + _BLOCK_CHANNELS
        self.conv_layer1 = _conv_block(channels[0], channels[1])
        self.conv_layer2 = _conv_block(channels[1], channels[2])
        self.conv_layer3 = _conv_block(channels[2], channels[3])
        self.conv_layer4 = _conv_block(channels[3], channels[4])
        self.conv_layer5 = nn.Conv3d(channels[4], 512, kernel_size=(1, 3, 3), padding=0)
        self.fc5 = nn.Linear(512, 512)
        self.relu = nn.LeakyReLU()
        self.batch0 = nn.BatchNorm1d(512)
        self.drop = nn.Dropout(p=0.15)
        self.fc6 = nn.Linear(512, 256)
        self.batch1 = nn.BatchNorm1d(256)
        self.fc7 = nn.Linear(256, num_classes)

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        return call_chained(block, x, self.chain if self.fused else None)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        for block in (self.conv_layer1, self.conv_layer2, self.conv_layer3, self.conv_layer4):
            x = self._block(block, x)
        x = self.conv_layer5(x).flatten(1)
        x = self.drop(self.batch0(self.relu(self.fc5(x))))
        x = self.drop(self.batch1(self.relu(self.fc6(x))))
        return self.fc7(x)


def _check_input(x: Tensor) -> None:
    # the flattened conv_layer5 output must be exactly 512 wide for fc5, so only one size fits
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (c3dzoo.fuse): no shapes to check
        return
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != (3, *INPUT_SIZE):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"jester_convcolumn expects input of shape (N, 3, {', '.join(map(str, INPUT_SIZE))}) "
            f"(N × C × frames × height × width), got {got}"
        )


def jester_convcolumn(num_classes: int = 27, *, fused: bool = False, backend: Optional[str] = None) -> ConvColumn:
    """The 20BN-Jester tutorial's ConvColumn6 (27 gesture classes; input N × 3 × 18 × 84 × 84)."""
    return ConvColumn(num_classes, fused=fused, backend=backend)
