"""Clip sampling and the frame transforms of real video data: which frames make a clip, and how
they become the model's ``C × T × H × W`` float input.

Sampling (``ClipSampler``): ``frames`` frames ``stride`` apart, from a random start (training) or
centred in the video (validation, prediction); ``spread`` takes several clips whose starts divide
the video evenly (multi-view testing: the video's score is the mean over its clips). A video too
short for that span is sampled with the largest stride that fits; one with fewer frames than the
clip has is looped (played again from its first frame) if it has at least ``min_frames`` frames,
and is skipped otherwise (the data sets count it as too short).

Transform (``ClipTransform``): resize so that the short side is ``short_side`` (C3D's 128 for a
112 crop: 8/7 of the crop by default; for training, optionally drawn from ``short_side_range``:
scale jitter), mirror left-right with probability 1/2 when ``flip`` (training only: never for
classes that name a direction), crop ``size`` (random for training, centred otherwise;
``views`` takes several crops spread along the longer side: 3 gives the usual left, centre and right),
scale pixels to [0, 1] and standardise per channel with ``mean``/``std``. That is the convention of
the synthetic data set as well (pixels in [0, 1] mapped to about zero mean and unit standard
deviation), so a model sees the same scale from either; the default statistics are Kinetics-400's,
which torchvision's video models were trained with.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["KINETICS_MEAN", "KINETICS_STD", "ClipSampler", "ClipTransform", "default_short_side"]

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def default_short_side(size: Sequence[int]) -> int:
    """Resize target for a ``size`` crop: 8/7 of its larger side (128 for 112, as C3D)."""
    return int(round(max(size) * 8 / 7))


@dataclasses.dataclass(frozen=True)
class ClipSampler:
    """Frame indices of one clip: ``frames`` frames ``stride`` apart (see the module doc)."""

    frames: int
    stride: int = 1
    min_frames: Optional[int] = None  # default: half the clip, at least 2

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames must be at least 1, got {self.frames}")
        if self.stride < 1:
            raise ValueError(f"the frame stride must be at least 1, got {self.stride}")
        if self.min_frames is not None and self.min_frames < 1:
            raise ValueError(f"min_frames must be at least 1, got {self.min_frames}")

    @property
    def shortest(self) -> int:
        """The fewest frames a video may have (fewer: too short, skipped)."""
        return self.min_frames if self.min_frames is not None else max(2, self.frames // 2)

    def fits(self, num_frames: int) -> bool:
        return num_frames >= self.shortest

    def indices(self, num_frames: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """``frames`` indices into a video of ``num_frames`` frames; random start with ``rng``,
        centred without. Raises ValueError for a video that is too short."""
        if not self.fits(num_frames):
            raise ValueError(f"{num_frames} frames is too short (at least {self.shortest})")
        if num_frames < self.frames:  # loop the whole video
            start = int(rng.integers(num_frames)) if rng is not None else 0
            return (start + np.arange(self.frames)) % num_frames
        # the largest stride (up to the requested one) whose span fits in the video
        stride = min(self.stride, (num_frames - 1) // max(1, self.frames - 1))
        span = (self.frames - 1) * stride + 1
        room = num_frames - span
        start = int(rng.integers(room + 1)) if rng is not None else room // 2
        return start + stride * np.arange(self.frames)

    def spread(self, num_frames: int, clips: int) -> np.ndarray:
        """``clips × frames`` indices: ``clips`` clips whose starts are the centres of ``clips``
        equal parts of the video's possible starts (one clip: the centred one, as ``indices``).
        Raises ValueError for a video that is too short."""
        if clips < 1:
            raise ValueError(f"clips must be at least 1, got {clips}")
        centred = self.indices(num_frames)
        if num_frames < self.frames:  # looped: starts spread over the loop
            starts = (np.arange(clips) * num_frames) // clips
            return (starts[:, None] + np.arange(self.frames)) % num_frames
        room = num_frames - 1 - int(centred[-1] - centred[0])  # the same stride as the centred clip
        starts = ((2 * np.arange(clips) + 1) * room) // (2 * clips)
        return starts[:, None] + (centred - centred[0])[None, :]


@dataclasses.dataclass(frozen=True)
class ClipTransform:
    """``T × H × W × 3`` uint8 frames → ``3 × T × size`` float32, resized, cropped and standardised."""

    size: Tuple[int, int]
    short_side: Optional[int] = None  # default: default_short_side(size)
    mean: Tuple[float, float, float] = KINETICS_MEAN
    std: Tuple[float, float, float] = KINETICS_STD
    flip: bool = False  # training clips mirrored left-right half the time
    short_side_range: Optional[Tuple[int, int]] = None  # training clips' short side, drawn per clip

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width), got {self.size}")
        if self.short_side_range is not None:
            low, high = (int(v) for v in self.short_side_range)
            if not max(self.size) <= low <= high:
                raise ValueError(f"the short-side range must be low <= high with low at least the crop's "
                                 f"{max(self.size)} pixels, got {low}-{high}")
            object.__setattr__(self, "short_side_range", (low, high))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 channels and std > 0, got {self.mean}, {self.std}")

    @property
    def resize_to(self) -> int:
        return self.short_side if self.short_side is not None else default_short_side(self.size)

    def __call__(self, frames: np.ndarray, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """Random crop (and scale, and mirror, where asked) with ``rng``, centre crop without."""
        short_side = None
        if rng is not None and self.short_side_range is not None:
            short_side = int(rng.integers(self.short_side_range[0], self.short_side_range[1] + 1))
        clip = self._resized(frames, short_side)
        room_h, room_w = clip.shape[-2] - self.size[0], clip.shape[-1] - self.size[1]
        if rng is not None:
            top, left = int(rng.integers(room_h + 1)), int(rng.integers(room_w + 1))
        else:
            top, left = room_h // 2, room_w // 2
        clip = self._cropped(clip, top, left)
        if rng is not None and self.flip and rng.random() < 0.5:
            clip = clip.flip(-1)
        return clip

    def views(self, frames: np.ndarray, crops: int) -> torch.Tensor:
        """``crops × 3 × T × size``: crops spread evenly along the resized frames' longer side
        (ends included; 3: left, centre, right of a landscape video) and centred across it; one
        crop is the centre crop. The frames are resized once."""
        if crops < 1:
            raise ValueError(f"crops must be at least 1, got {crops}")
        if crops == 1:
            return self(frames)[None]
        clip = self._resized(frames)
        room_h, room_w = clip.shape[-2] - self.size[0], clip.shape[-1] - self.size[1]
        along = np.arange(crops) * max(room_h, room_w) // (crops - 1)
        corners = [(int(a), room_w // 2) if room_h > room_w else (room_h // 2, int(a)) for a in along]
        return torch.stack([self._cropped(clip, top, left) for top, left in corners])

    def _resized(self, frames: np.ndarray, short_side: Optional[int] = None) -> torch.Tensor:
        """``T × 3 × H' × W'`` float frames whose short side is ``short_side`` (default
        ``resize_to``), never smaller than the crop in either direction."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected T x H x W x 3 frames, got shape {frames.shape}")
        clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # T×3×H×W
        height, width = clip.shape[-2:]
        crop_h, crop_w = self.size
        scale = max((short_side or self.resize_to) / min(height, width), crop_h / height, crop_w / width)
        new_h, new_w = max(crop_h, round(height * scale)), max(crop_w, round(width * scale))
        if (new_h, new_w) != (height, width):
            clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                 antialias=scale < 1)
        return clip

    def _cropped(self, clip: torch.Tensor, top: int, left: int) -> torch.Tensor:
        """The standardised ``3 × T × size`` crop at (top, left) of resized frames."""
        crop_h, crop_w = self.size
        clip = clip[:, :, top:top + crop_h, left:left + crop_w]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std).view(1, 3, 1, 1) * 255.0
        clip = (clip - mean) / std
        return clip.permute(1, 0, 2, 3).contiguous()  # 3×T×H×W
