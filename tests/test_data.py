"""SyntheticVideoDataset: determinism, shapes, balance, and that the class lives in the motion."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from c3dzoo.data import MOTIONS, SyntheticVideoDataset
from c3dzoo.data.synthetic import _SLOW_SPEED, DIRECTIONS


def test_same_index_same_clip():
    a = SyntheticVideoDataset(num_samples=20)
    b = SyntheticVideoDataset(num_samples=20)
    for i in (0, 7, 19):
        clip, label = a[i]
        assert torch.equal(clip, a[i][0])  # read twice
        assert torch.equal(clip, b[i][0]) and label == b[i][1]  # another instance
    assert torch.equal(a[-1][0], a[19][0])


def test_independent_of_access_order_and_workers():
    ds = SyntheticVideoDataset(num_samples=8, size=16, frames=4)
    forward = [ds[i][0] for i in range(8)]
    backward = [ds[i][0] for i in reversed(range(8))][::-1]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batched = torch.cat([clips for clips, _ in loader])
    for i in range(8):
        assert torch.equal(forward[i], backward[i])
        assert torch.equal(forward[i], batched[i])


def test_cached_clips_are_the_rendered_ones(monkeypatch):
    """A set that keeps its clips serves each as rendered, renders it once, keeps no more than its
    byte budget, and hands out copies: changing one changes nothing kept."""
    plain = SyntheticVideoDataset(num_samples=6, size=16, frames=4)
    clip_bytes = plain[0][0].nbytes
    cached = SyntheticVideoDataset(num_samples=6, size=16, frames=4, cache_bytes=4 * clip_bytes)
    rendered = []
    render = cached._render
    monkeypatch.setattr(cached, "_render", lambda *a: rendered.append(1) or render(*a))
    for _ in range(3):  # epochs
        for i in range(6):
            clip, label = cached[i]
            assert torch.equal(clip, plain[i][0]) and label == plain[i][1]
            clip.add_(1.0)  # a consumer's in-place change
    assert len(rendered) == 4 + 2 * 3  # 4 kept after the first read, 2 rendered in every epoch
    assert cached._cached_bytes == 4 * clip_bytes
    assert torch.equal(cached[-6][0], plain[0][0])


def test_seeds_and_splits_differ():
    base = SyntheticVideoDataset(num_samples=4)[1][0]
    assert not torch.equal(base, SyntheticVideoDataset(num_samples=4, seed=1)[1][0])
    assert not torch.equal(base, SyntheticVideoDataset(num_samples=4, split="val")[1][0])
    assert not torch.equal(base, SyntheticVideoDataset(num_samples=4)[2][0])


@pytest.mark.parametrize("size, hw", [((56, 56), (56, 56)), (32, (32, 32)), ((24, 40), (24, 40))])
def test_shape_dtype_label(size, hw):
    ds = SyntheticVideoDataset(num_classes=7, num_samples=10, frames=8, size=size)
    clip, label = ds[3]
    assert clip.shape == (3, 8, *hw) and clip.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 7
    assert len(ds) == 10


def test_roughly_standardised():
    ds = SyntheticVideoDataset(num_samples=64, size=32)
    clips = torch.stack([ds[i][0] for i in range(64)])
    assert torch.isfinite(clips).all()
    assert abs(clips.mean().item()) < 0.2
    assert 0.7 < clips.std().item() < 1.3


def test_classes_balanced_and_named():
    for num_classes in (2, 10, len(MOTIONS)):
        ds = SyntheticVideoDataset(num_classes=num_classes, num_samples=103)
        counts = Counter(ds[i][1] for i in range(len(ds)))
        assert set(counts) == set(range(num_classes))
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(ds.class_names) == num_classes == len(set(ds.class_names))
    assert SyntheticVideoDataset().class_names[:3] == ["move_E", "move_NE", "move_N"]


def _mean_shift(clip: torch.Tensor) -> np.ndarray:
    """Mean frame-to-frame displacement (dx, dy) in pixels (y down) of the shape's centroid.

    Foreground: pixels much further from the clip's median colour (the background: the shape
    covers well under half of each frame) than the noise takes them. Shapes move on a torus, so
    the centroid is a circular mean."""
    x = clip.numpy().astype(np.float64)
    background = np.median(x, axis=(1, 2, 3), keepdims=True)
    distance = np.sqrt(((x - background) ** 2).sum(axis=0))  # T × H × W
    foreground = distance > 0.5 * np.percentile(distance, 99.5)  # shapes cover > 2 % of a frame
    _, h, w = foreground.shape
    phase_x = np.exp(2j * np.pi * np.arange(w) / w)[None, None, :]
    phase_y = np.exp(2j * np.pi * np.arange(h) / h)[None, :, None]
    cx = np.angle((foreground * phase_x).sum(axis=(1, 2))) * w / (2 * np.pi)
    cy = np.angle((foreground * phase_y).sum(axis=(1, 2))) * h / (2 * np.pi)

    def wrapped_steps(c, period):
        return (np.diff(c) + period / 2) % period - period / 2

    return np.array([wrapped_steps(cx, w).mean(), wrapped_steps(cy, h).mean()])


def _direction_of(shift: np.ndarray) -> int:
    angle = math.degrees(math.atan2(-shift[1], shift[0]))  # y up, as DIRECTIONS
    return int(round(angle / 45.0)) % 8


def test_class_is_the_motion_not_the_frames():
    """A motion estimate recovers the direction class; reversing the frames (the same set of
    frames!) gives the opposite direction; shapes that only rotate do not travel."""
    ds = SyntheticVideoDataset(num_classes=18, num_samples=72, size=48, frames=12)
    correct = reversed_opposite = translations = 0
    for i in range(len(ds)):
        clip, label = ds[i]
        motion = ds.motions[label]
        shift = _mean_shift(clip)
        if motion.direction is None:
            # stays in place: travels less than half as far as the slowest moving shape
            assert np.hypot(*shift) < 0.5 * _SLOW_SPEED[0] * 48, (ds.class_names[label], shift)
            continue
        translations += 1
        correct += _direction_of(shift) == motion.direction
        reversed_opposite += _direction_of(_mean_shift(clip.flip(1))) == (motion.direction + 4) % 8
    assert translations == 64
    assert correct >= 0.9 * translations
    assert reversed_opposite >= 0.9 * translations


def test_fast_classes_move_faster():
    ds = SyntheticVideoDataset(num_classes=18, num_samples=36, size=48, frames=8)
    speed = {False: [], True: []}
    for i in range(len(ds)):
        clip, label = ds[i]
        if ds.motions[label].direction is not None:
            speed[ds.motions[label].fast].append(np.hypot(*_mean_shift(clip)))
    assert min(speed[True]) > max(speed[False])
    assert DIRECTIONS[ds.motions[10].direction] == "E" and ds.motions[10].fast


@pytest.mark.parametrize("kwargs", [
    dict(num_classes=0), dict(num_classes=len(MOTIONS) + 1), dict(frames=1), dict(size=4),
    dict(split="test"), dict(num_samples=-1), dict(seed=-1), dict(cache_bytes=-1),
])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticVideoDataset(**kwargs)


def test_index_out_of_range():
    ds = SyntheticVideoDataset(num_samples=3)
    with pytest.raises(IndexError):
        ds[3]
