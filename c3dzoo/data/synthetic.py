"""A built-in synthetic video classification set whose classes are defined by motion alone.

Each clip shows one shape (ellipse, rectangle, triangle or cross; random size, aspect, colour and
starting pose) over a darker background of random colour, with fresh pixel noise in every frame.
The class is the shape's *motion*: its direction of travel among 8 compass directions, its speed,
and its sense of rotation. Shapes move on a torus (they leave one edge and re-enter at the
opposite one), so the position in any single frame is uniform whatever the class: no frame on its
own tells the class, only the change between frames does.

Clips are rendered on the fly (no download), vectorised over frames and pixels with numpy, and
sample ``i`` is a pure function of ``(seed, split, i)``: data-loader workers, resumed runs and
repeated reads all see the same clip. Being pure, a rendered clip can be kept and served again
(``cache_bytes``): a small set trained for several epochs renders each clip once.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["Motion", "MOTIONS", "SyntheticVideoDataset"]

DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")  # direction k points at k·45° (y up)
SHAPES = ("ellipse", "rectangle", "triangle", "cross")  # none is rotation-invariant


class Motion(NamedTuple):
    """What defines one class: direction index (None: no travel), speed and rotation sense."""

    direction: Optional[int]  # index into DIRECTIONS, or None for a shape that stays in place
    fast: bool  # travel at about 2.3× the normal speed
    spin: int  # +1 counter-clockwise, -1 clockwise, 0 no rotation

    @property
    def name(self) -> str:
        parts = ["move_" + DIRECTIONS[self.direction]] if self.direction is not None else []
        if self.fast:
            parts.append("fast")
        if self.spin:
            parts.append("rotate_" + ("ccw" if self.spin > 0 else "cw"))
        return "_".join(parts) or "static"


def _all_motions() -> Tuple[Motion, ...]:
    # Ordered so that the first classes are the easiest to tell apart: with the default 10 classes
    # the set is the 8 directions plus rotation in place either way.
    dirs = range(len(DIRECTIONS))
    return (
        *(Motion(d, False, 0) for d in dirs),
        Motion(None, False, -1), Motion(None, False, +1),
        *(Motion(d, True, 0) for d in dirs),
        *(Motion(d, False, spin) for spin in (-1, +1) for d in dirs),
        *(Motion(d, True, spin) for spin in (-1, +1) for d in dirs),
        Motion(None, False, 0),
    )


MOTIONS: Tuple[Motion, ...] = _all_motions()  # class c of an n-class set is MOTIONS[c]

# Per-frame speeds as fractions of the shorter image side, and rotation speeds in degrees/frame.
_SLOW_SPEED = (0.03, 0.045)
_FAST_SPEED = (0.075, 0.1)
_SPIN_DEG = (8.0, 14.0)  # below 30°/frame, so even the 3-fold triangle's rotation is unambiguous
_DIRECTION_JITTER_DEG = 10.0  # directions are 45° apart; the jitter keeps them separable
_NOISE_STD = 0.08
# Shapes are brighter than the background (in at least one channel): with both contrast
# polarities a small network spends its first few hundred steps at chance level.
_MAX_BACKGROUND = 0.45
_MIN_CONTRAST = 0.45
# Pixel values are rendered in [0, 1] (plus noise); these map them to about zero mean, unit std.
_MEAN, _STD = 0.25, 0.18
_SPLITS = {"train": 0, "val": 1}


class SyntheticVideoDataset(Dataset):
    """Clips of moving, rotating shapes; the class is the motion (see ``MOTIONS``).

    ``dataset[i]`` is ``(clip, label)``: ``clip`` a float32 tensor ``3 × frames × H × W`` normalised
    to about zero mean and unit standard deviation, ``label`` an int. Labels cycle through the
    classes (``i % num_classes``), so every class has the same number of samples (±1).

    Args:
        num_classes: 1 to ``len(MOTIONS)`` classes, taken from the start of ``MOTIONS``.
        num_samples: length of the data set.
        frames: frames per clip (at least 2).
        size: ``(height, width)`` or one int for square frames.
        seed: base seed; with ``split`` and the index it fixes every sample.
        split: ``"train"`` or ``"val"`` (independent random streams for the same seed).
        cache_bytes: keep rendered clips, up to this many bytes, and serve a kept clip again (a
            copy) instead of rendering it anew; 0 (default) keeps none. Per process: each
            data-loader worker would fill its own.
    """

    def __init__(
        self,
        num_classes: int = 10,
        num_samples: int = 512,
        frames: int = 16,
        size: Union[int, Sequence[int]] = (56, 56),
        seed: int = 0,
        split: str = "train",
        cache_bytes: int = 0,
    ):
        if not 1 <= num_classes <= len(MOTIONS):
            raise ValueError(f"num_classes must be between 1 and {len(MOTIONS)}, got {num_classes}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be non-negative, got {num_samples}")
        if frames < 2:
            raise ValueError(f"frames must be at least 2 (motion needs two frames), got {frames}")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if min(height, width) < 8:
            raise ValueError(f"size must be at least 8×8 pixels, got {height}×{width}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be non-negative, got {cache_bytes}")
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.frames = frames
        self.size = (height, width)
        self.seed = seed
        self.split = split
        self.motions = MOTIONS[:num_classes]
        self.class_names = [m.name for m in self.motions]
        self.cache_bytes = cache_bytes
        self._cache: Dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        # pixel-centre coordinates, shared by every clip; kept 1-D (columns 1 × W, rows H × 1) so
        # the per-frame offsets below cost T·(H + W), not T·H·W
        self._xs = np.arange(width, dtype=np.float32)[None, :]
        self._ys = np.arange(height, dtype=np.float32)[:, None]

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> List[int]:
        """The class of every sample, without rendering it."""
        return [index % self.num_classes for index in range(self.num_samples)]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        kept = self._cache.get(index)
        if kept is not None:
            return kept.clone(), label  # a copy: whoever gets it may change it in place
        # one generator per (seed, split, index): the sample does not depend on access order
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        clip = torch.from_numpy(self._render(rng, self.motions[label]))
        if self._cached_bytes + clip.nbytes <= self.cache_bytes:
            self._cache[index] = clip.clone()
            self._cached_bytes += clip.nbytes
        return clip, label

    def _render(self, rng: np.random.Generator, motion: Motion) -> np.ndarray:
        t_steps = np.arange(self.frames, dtype=np.float32)[:, None, None]  # T × 1 × 1
        height, width = self.size
        side = min(height, width)

        # trajectory: start anywhere; travel wraps around the edges (torus)
        start = rng.uniform(0.0, 1.0, size=2) * (width, height)
        if motion.direction is not None:
            angle = math.radians(motion.direction * 45.0 + rng.uniform(-1, 1) * _DIRECTION_JITTER_DEG)
            speed = rng.uniform(*(_FAST_SPEED if motion.fast else _SLOW_SPEED)) * side
            velocity = speed * np.array([math.cos(angle), -math.sin(angle)])  # image y points down
        else:
            velocity = np.zeros(2)
        theta0 = rng.uniform(0.0, 2 * math.pi)
        omega = motion.spin * math.radians(rng.uniform(*_SPIN_DEG))
        # counter-clockwise on screen is a negative angle in image coordinates (y down)
        theta = (theta0 - omega * t_steps).astype(np.float32)

        # each pixel's offset from the shape centre, the shortest way round the torus
        # (dx: T × 1 × W, dy: T × H × 1; they broadcast to T × H × W below)
        dx = _wrap(self._xs - (start[0] + velocity[0] * t_steps), width)
        dy = _wrap(self._ys - (start[1] + velocity[1] * t_steps), height)
        cos, sin = np.cos(theta), np.sin(theta)
        u = cos * dx + sin * dy  # pixel offset in the shape's own (rotated) frame
        v = -sin * dx + cos * dy

        radius = rng.uniform(0.12, 0.2) * side
        shape = SHAPES[rng.integers(len(SHAPES))]
        distance = _signed_distance(shape, u, v, radius, aspect=rng.uniform(0.4, 0.6))
        alpha = np.clip(0.5 - distance, 0.0, 1.0)  # one-pixel anti-aliased edge

        background = rng.uniform(0.0, _MAX_BACKGROUND, size=3).astype(np.float32)
        colour = _brighter_colour(rng, background)
        clip = background[:, None, None, None] + (colour - background)[:, None, None, None] * alpha
        clip += rng.standard_normal(clip.shape, dtype=np.float32) * _NOISE_STD
        return ((clip - _MEAN) / _STD).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, num_samples={self.num_samples}, "
                f"frames={self.frames}, size={self.size}, seed={self.seed}, split={self.split!r})")


def _wrap(delta: np.ndarray, period: float) -> np.ndarray:
    """``delta`` folded into [-period/2, period/2): the shortest offset on a circle."""
    return (delta + period / 2) % period - period / 2


def _brighter_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least ``_MIN_CONTRAST`` brighter than ``background`` in some channel, so
    every shape stands out from the noise with the same polarity."""
    while True:
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        if (colour - background).max() >= _MIN_CONTRAST:
            return colour


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray, radius: float, aspect: float) -> np.ndarray:
    """Approximate signed distance in pixels from the shape's edge (negative inside)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "ellipse":  # radii radius × aspect·radius; distance scaled at the major radius
        return (np.sqrt(u * u + (v / aspect) ** 2) - radius)
    if shape == "rectangle":
        return np.maximum(au - radius, av - aspect * radius)
    if shape == "triangle":  # equilateral, inradius radius/2, a vertex along +u
        edges = [np.cos(a) * u + np.sin(a) * v for a in (math.pi, math.pi / 3, -math.pi / 3)]
        return np.maximum(np.maximum(edges[0], edges[1]), edges[2]) - radius / 2
    if shape == "cross":  # two bars of half-width radius/3
        arm = radius / 3
        return np.minimum(np.maximum(au - radius, av - arm), np.maximum(au - arm, av - radius))
    raise ValueError(f"unknown shape {shape!r}")
