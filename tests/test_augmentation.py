"""Training augmentation of real videos: left-right mirroring (``--flip``), scale jitter of the
short side before the random crop (``--scale-jitter``), and ``--label-smoothing``; evaluation clips
stay deterministic and an augmentation left off changes nothing."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch

import c3dzoo
from c3dzoo import cli
from c3dzoo.data import ClipSampler, ClipTransform, VideoClipDataset, scan_class_folders

from test_data_folders import make_class_folders, make_video


def _ramp_frames(size: int = 64, frames: int = 2) -> np.ndarray:
    """Frames whose red channel is twice the column index: a crop's red values tell where it came
    from and at what scale."""
    cols = np.broadcast_to(2 * np.arange(size), (size, size))
    image = np.stack([cols, np.zeros_like(cols), np.zeros_like(cols)], axis=-1)
    return np.stack([image] * frames).astype(np.uint8)


def _red_row(transform: ClipTransform, clip: torch.Tensor) -> np.ndarray:
    return (clip[0, 0, 0].numpy() * transform.std[0] * 255 + transform.mean[0] * 255)


def test_flip_mirrors_half_the_training_clips_and_never_an_evaluation_clip():
    frames = _ramp_frames()
    plain, flipping = ClipTransform((32, 32)), ClipTransform((32, 32), flip=True)
    mirrored = 0
    for seed in range(40):
        a = plain(frames, np.random.default_rng(seed))
        b = flipping(frames, np.random.default_rng(seed))  # the same crop, mirrored or not
        if torch.equal(b, a.flip(-1)):
            mirrored += 1
            assert np.all(np.diff(_red_row(flipping, b)) < 0)  # columns run right to left
        else:
            assert torch.equal(b, a)
    assert 10 <= mirrored <= 30
    assert torch.equal(flipping(frames), plain(frames))  # no rng: the centre crop, unmirrored


def test_scale_jitter_draws_the_short_side_per_training_clip():
    frames = _ramp_frames()
    jitter = ClipTransform((32, 32), short_side_range=(40, 64))
    sides = []
    for seed in range(30):
        row = _red_row(jitter, jitter(frames, np.random.default_rng(seed)))
        slope = (row[-1] - row[0]) / 31  # 2 * 64 / short side, for a bilinear resize
        sides.append(128 / slope)
    assert 39 <= min(sides) and max(sides) <= 65 and max(sides) - min(sides) > 12
    assert torch.equal(jitter(frames), ClipTransform((32, 32))(frames))  # evaluation: 8/7 of the crop
    for bad in ((20, 40), (50, 40)):
        with pytest.raises(ValueError, match="short-side range"):
            ClipTransform((32, 32), short_side_range=bad)


def test_without_augmentation_the_random_draws_are_unchanged():
    """Off, the options draw nothing: a seed gives the crop it gave before they existed."""
    frames = _ramp_frames(48)
    transform = ClipTransform((32, 32), short_side=40)
    clip = transform(frames, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    top, left = int(rng.integers(40 - 32 + 1)), int(rng.integers(40 - 32 + 1))
    resized = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(40, 40),
                                              mode="bilinear", align_corners=False, antialias=True)
    expected = transform._cropped(resized, top, left)
    assert torch.equal(clip, expected)


def test_augmented_samples_stay_a_function_of_seed_epoch_and_index(tmp_path):
    root = make_class_folders(tmp_path / "data", videos_per_class=2, frames=20)
    found = scan_class_folders(str(root), ClipSampler(8))
    data = VideoClipDataset(found.videos, found.class_names, 8, 24, train=True, seed=2, flip=True,
                            short_side_range=(28, 36))
    assert torch.equal(data[(1, 3)][0], data[(1, 3)][0])
    assert any(not torch.equal(data[(1, e)][0], data[(1, 3)][0]) for e in range(4, 8))


def _train(root, tmp_path, name, *extra):
    out = tmp_path / name
    assert cli.main(["train", "--data", str(root), "--val-split", "0.5", "--epochs", "1", "--frames", "16",
                     "--size", "32", "--width-mult", "0.0625", "--batch-size", "2", "--lr", "1e-12", "--device", "cpu",
                     "--no-progress", "--out", str(out), *extra]) == 0
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_train_with_augmentation_and_label_smoothing(tmp_path, capsys):
    root = make_class_folders(tmp_path / "data", videos_per_class=4, frames=20)
    plain = _train(root, tmp_path, "plain")
    smoothed = _train(root, tmp_path, "smoothed", "--label-smoothing", "0.2")
    # lr ~0: the same weights and clips, so only the training loss's targets differ
    assert smoothed["train_loss"] != plain["train_loss"] and smoothed["val_loss"] == plain["val_loss"]
    augmented = _train(root, tmp_path, "augmented", "--flip", "--scale-jitter", "36,44")
    assert augmented["train_loss"] != plain["train_loss"]  # other clips (BatchNorm statistics too)


@pytest.mark.parametrize("argv, message", [
    (["train", "--flip"], "--flip is for real data"),
    (["train", "--scale-jitter", "128,160"], "--scale-jitter is for real data"),
    (["train", "--data", "DATA", "--scale-jitter", "20,40", "--size", "32"], "--scale-jitter: the short-side range"),
    (["train", "--data", "DATA", "--scale-jitter", "big"], "expected MIN,MAX in pixels"),
    (["train", "--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
])
def test_augmentation_errors(argv, message, tmp_path, capsys):
    root = make_class_folders(tmp_path / "data", videos_per_class=2, frames=20)
    argv = [str(root) if a == "DATA" else a for a in argv] + ["--device", "cpu", "--frames", "16"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_clip_grad_norm_bounds_every_step(monkeypatch, capsys):
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = real(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters
                                                      if p.grad is not None]))
        seen.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert cli.main(["train", "--epochs", "1", "--train-samples", "16", "--val-samples", "4", "--batch-size", "4",
                     "--num-classes", "4", "--width-mult", "0.0625", "--frames", "16", "--size", "32", "--device",
                     "cpu", "--no-progress", "--clip-grad-norm", "0.001"]) == 0
    assert len(seen) == 4  # once a step
    assert all(max_norm == 0.001 and before > 0.001 and after <= 0.001 * (1 + 1e-5) for max_norm, before, after in seen)
    assert cli.main(["train", "--clip-grad-norm", "0", "--device", "cpu"]) == 2
    assert "--clip-grad-norm must be positive" in capsys.readouterr().err


def test_micro_batches_give_the_whole_batch_gradients():
    """_forward_backward in chunks: without BatchNorm the gradients, loss and logits of the whole
    batch (to rounding); with it, each chunk updates the running statistics, as accumulation does."""
    from c3dzoo.cli.train import _forward_backward, _StepOptions

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 2 * 4 * 4, 5))
    clips, labels = torch.randn(6, 3, 4, 6, 6), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, logits = _forward_backward(model, clips, labels, False, _StepOptions(label_smoothing=0.1))
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss4, logits4 = _forward_backward(model, clips, labels, False, _StepOptions(label_smoothing=0.1, micro_batch=4))
    torch.testing.assert_close(loss4, loss)
    torch.testing.assert_close(logits4, logits)
    for grad, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, grad)

    # class weights: the chunks' weighted sums over the whole batch's weight, as one weighted mean
    weights = _StepOptions(class_weights=torch.tensor([0.5, 1.0, 2.0, 1.5, 0.8]), label_smoothing=0.1)
    model.zero_grad()
    loss, logits = _forward_backward(model, clips, labels, False, weights)
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss4, _ = _forward_backward(model, clips, labels, False, dataclasses.replace(weights, micro_batch=4))
    torch.testing.assert_close(loss4, loss)
    for grad, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, grad)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels, weight=weights.class_weights,
                                                                      label_smoothing=0.1))

    fused = c3dzoo.c3d_bn(num_classes=5, width_mult=0.0625, input_size=(16, 32, 32), fused=True).train()
    _forward_backward(fused, torch.randn(6, 3, 16, 32, 32), labels, False, _StepOptions(micro_batch=2))
    assert int(fused.conv1_bn.num_batches_tracked) == 3  # three chunks of two


def test_train_with_micro_batches(monkeypatch, capsys):
    sizes, real = [], torch.nn.functional.cross_entropy

    def cross_entropy(logits, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not validation
            sizes.append(logits.shape[0])
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(cli.train.F, "cross_entropy", cross_entropy)
    assert cli.main(["train", "--epochs", "1", "--train-samples", "8", "--val-samples", "4", "--batch-size", "4",
                     "--micro-batch", "3", "--num-classes", "4", "--width-mult", "0.0625", "--frames", "16", "--size",
                     "32", "--device", "cpu", "--no-progress"]) == 0
    assert sizes == [3, 1, 3, 1]  # two steps of 4 clips, each in chunks of 3 and 1
    assert cli.main(["train", "--micro-batch", "0", "--device", "cpu"]) == 2
    assert "--micro-batch must be at least 1" in capsys.readouterr().err


def test_balanced_class_weights(tmp_path, monkeypatch, capsys):
    """--class-weights balanced: class c weighs N / (C n_c) in the training loss; validation is
    unweighted."""
    root = tmp_path / "data"
    for name, count in (("common", 6), ("rare", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            make_video(root / name / f"v{i}.mp4", frames=20)
    seen, real = [], torch.nn.functional.cross_entropy

    def cross_entropy(logits, target, *args, weight=None, **kwargs):
        if torch.is_grad_enabled():
            seen.append(weight)
        return real(logits, target, *args, weight=weight, **kwargs)

    monkeypatch.setattr(cli.train.F, "cross_entropy", cross_entropy)
    assert cli.main(["train", "--data", str(root), "--val-data", str(root), "--class-weights", "balanced", "--epochs",
                     "1", "--frames", "16", "--size", "32", "--width-mult", "0.0625", "--batch-size", "4", "--device",
                     "cpu", "--no-progress"]) == 0
    assert seen and all(torch.allclose(w, torch.tensor([8 / (2 * 6), 8 / (2 * 2)])) for w in seen)


def test_data_sets_give_their_labels_without_loading_clips(tmp_path):
    """What --class-weights counts: each data set's labels, equal to the labels its samples carry."""
    from c3dzoo.data import SyntheticVideoDataset

    synthetic = SyntheticVideoDataset(num_classes=3, num_samples=7, frames=4, size=(8, 8))
    assert synthetic.labels == [synthetic[i][1] for i in range(7)]
    root = make_class_folders(tmp_path / "data", videos_per_class=2, frames=20)
    found = scan_class_folders(str(root), ClipSampler(8))
    videos = VideoClipDataset(found.videos, found.class_names, 8, 24)
    assert videos.labels == [videos[i][1] for i in range(len(videos))] == [0, 0, 1, 1]
