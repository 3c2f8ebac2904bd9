"""MixUp and CutMix of a batch of clips, for training with soft targets.

MixUp (Zhang et al., 2018) blends each clip with a partner from the same batch, λ·a + (1 − λ)·b,
λ ~ Beta(α, α). CutMix (Yun et al., 2019) pastes a box of the partner's frames into each clip:
for video, one spatial box through all frames (as PySlowFast's video recipes do), of area
(1 − λ) of the frame, clipped at the frame's edges, with λ then set to the share of the clip that
stayed its own. Either way the targets are λ·onehot(own label) + (1 − λ)·onehot(partner's).

One λ and one partner permutation per batch. All randomness comes from torch's global CPU
generator (which training checkpoints save and restore), and none is drawn when mixing is off.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["BatchMixing", "mix_batch"]


@dataclasses.dataclass(frozen=True)
class BatchMixing:
    """α of MixUp and of CutMix (0: off). With both on, each batch takes one of them, CutMix
    with probability ``cutmix_share``."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_share: float = 0.5

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.cutmix_share <= 1:
            raise ValueError(f"cutmix_share must be in [0, 1], got {self.cutmix_share!r}")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _beta(alpha: float) -> float:
    return float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())


def _cut_box(height: int, width: int, lam: float) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of area about (1 − lam)·height·width, centred at a
    uniformly drawn pixel and clipped at the frame's edges."""
    cut = (1.0 - lam) ** 0.5
    box_h, box_w = int(round(height * cut)), int(round(width * cut))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
    return top, bottom, left, right


def mix_batch(clips: Tensor, labels: Tensor, num_classes: int, mixing: BatchMixing) -> Tuple[Tensor, Tensor]:
    """(mixed clips, soft targets N × num_classes in float32) for a batch of clips N × C × T × H × W
    and integer labels N. Without mixing on, the clips themselves and one-hot targets."""
    if clips.dim() != 5 or labels.dim() != 1 or labels.shape[0] != clips.shape[0]:
        raise ValueError(f"mix_batch takes clips N × C × T × H × W and N labels, got {tuple(clips.shape)} and "
                         f"{tuple(labels.shape)}")
    own = F.one_hot(labels, num_classes).float()
    if not mixing.enabled or clips.shape[0] < 2:
        return clips, own
    use_cutmix = mixing.cutmix_alpha > 0 and (
        mixing.mixup_alpha == 0 or float(torch.rand(())) < mixing.cutmix_share)
    lam = _beta(mixing.cutmix_alpha if use_cutmix else mixing.mixup_alpha)
    partner = torch.randperm(clips.shape[0]).to(clips.device)
    if use_cutmix:
        height, width = clips.shape[-2:]
        top, bottom, left, right = _cut_box(height, width, lam)
        mixed = clips.clone()
        mixed[..., top:bottom, left:right] = clips[partner][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        mixed = clips * lam + clips[partner] * (1.0 - lam)
    return mixed, own * lam + own[partner] * (1.0 - lam)
