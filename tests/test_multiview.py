"""Multi-view testing: clips spread over a video (``ClipSampler.spread``), crops spread along the
frame (``ClipTransform.views``), stacked per video (``VideoClipDataset(clips=, crops=)``,
``read_views``) and scored by the mean probability over the views (``evaluation.average_views``);
``c3dzoo train --val-clips/--val-crops``, ``c3dzoo predict --clips/--crops`` and ``c3dzoo evaluate``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import cli, evaluation
from c3dzoo.data import (ClipSampler, ClipTransform, SkippedVideoWarning, VideoClipDataset, count_frames,
                         read_frames, read_views, scan_class_folders)

from test_data_folders import make_class_folders, make_video

# --------------------------------------------------------------------------------------------
# where the views are
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [5, 12, 20, 40, 41])
def test_one_spread_clip_is_the_centred_clip(num_frames):
    sampler = ClipSampler(8, stride=2, min_frames=4)
    assert np.array_equal(sampler.spread(num_frames, 1)[0], sampler.indices(num_frames))


def test_spread_clips_divide_the_video_evenly():
    sampler = ClipSampler(8, stride=2)
    clips = sampler.spread(40, 4)  # span 15: starts 0..25, the centres of 4 equal parts
    assert clips.shape == (4, 8)
    assert clips[:, 0].tolist() == [3, 9, 15, 21]
    assert (np.diff(clips, axis=1) == 2).all() and clips.min() >= 0 and clips.max() <= 39
    # an odd count holds the centred clip in the middle
    assert np.array_equal(sampler.spread(40, 3)[1], sampler.indices(40))


def test_spread_keeps_the_lowered_stride_and_loops_short_videos():
    sampler = ClipSampler(8, stride=4, min_frames=4)
    clips = sampler.spread(20, 2)  # stride 4 does not fit 20 frames: 2, as the centred clip
    assert (np.diff(clips, axis=1) == 2).all() and clips.max() <= 19 and clips[0, 0] < clips[1, 0]
    looped = sampler.spread(6, 3)  # fewer frames than the clip: starts spread over the loop
    assert looped.tolist() == [[(s + t) % 6 for t in range(8)] for s in (0, 2, 4)]
    with pytest.raises(ValueError, match="too short"):
        sampler.spread(3, 2)
    with pytest.raises(ValueError, match="clips must be at least 1"):
        sampler.spread(20, 0)


def _column_frames(height: int, width: int, frames: int = 2) -> np.ndarray:
    """Frames whose pixel values are their column (red), row (green) and frame (blue) index."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([cols, rows, np.zeros_like(cols)], axis=-1)
    return np.stack([image + np.array([0, 0, t]) for t in range(frames)]).astype(np.uint8)


def _pixels(transform: ClipTransform, clip: torch.Tensor) -> torch.Tensor:
    """Undo the standardisation: pixel values 0..255 of a 3 × T × H × W clip."""
    mean = torch.tensor(transform.mean).view(3, 1, 1, 1) * 255
    std = torch.tensor(transform.std).view(3, 1, 1, 1) * 255
    return (clip * std + mean).round()


@pytest.mark.parametrize("landscape", [True, False])
def test_three_crops_cover_the_longer_side(landscape):
    height, width = (32, 48) if landscape else (48, 32)
    transform = ClipTransform((32, 32), short_side=32)  # no resize: the crops are plain slices
    frames = _column_frames(height, width)
    views = transform.views(frames, 3)
    assert views.shape == (3, 3, 2, 32, 32)
    for view, offset in zip(views, (0, 8, 16)):
        pixels = _pixels(transform, view)
        col0, row0 = pixels[0, 0, 0, 0].item(), pixels[1, 0, 0, 0].item()
        assert (col0, row0) == ((offset, 0) if landscape else (0, offset))
        assert pixels[2, 1].eq(1).all()  # frame order kept
    assert torch.equal(views[1], transform(frames))  # the middle crop is the centre crop
    assert torch.equal(transform.views(frames, 1), transform(frames)[None])
    with pytest.raises(ValueError, match="crops must be at least 1"):
        transform.views(frames, 0)


# --------------------------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = make_class_folders(tmp_path_factory.mktemp("mv") / "data", videos_per_class=2, frames=40)
    return scan_class_folders(str(root), ClipSampler(8))


def _data(videos, **kw):
    return VideoClipDataset(videos.videos, videos.class_names, frames=8, size=24, stride=2, **kw)


def test_dataset_stacks_every_view_of_a_video(videos):
    data = _data(videos, clips=2, crops=3)
    assert data.views == 6 and len(data) == len(videos.videos)
    sample, label = data[2]
    assert sample.shape == (6, 3, 8, 24, 24) and label == videos.videos[2].label
    video = videos.videos[2]
    spread = data.sampler.spread(video.num_frames, 2)
    for k in range(6):  # clip by clip, crops of the first clip first
        frames = read_frames(video.path, spread[k // 3].tolist())
        assert torch.equal(sample[k], data.transform.views(frames, 3)[k % 3])
    assert torch.equal(read_views(video.path, video.num_frames, data.sampler, data.transform, 2, 3), sample)
    # the middle view of odd counts is what single-view validation takes
    single = _data(videos)[2][0]
    assert single.shape == (3, 8, 24, 24)
    assert torch.equal(_data(videos, clips=3)[2][0][1], single)
    assert torch.equal(_data(videos, crops=3)[2][0][1], single)
    assert "clips=2, crops=3" in repr(data)


def test_dataset_multiview_is_for_evaluation(videos):
    with pytest.raises(ValueError, match="for evaluation"):
        _data(videos, train=True, clips=2)
    with pytest.raises(ValueError, match="at least 1"):
        _data(videos, crops=0)


def test_a_video_that_fails_later_is_replaced_as_a_whole(tmp_path):
    root = make_class_folders(tmp_path / "data", videos_per_class=2, frames=30)
    found = scan_class_folders(str(root), ClipSampler(8))
    data = VideoClipDataset(found.videos, found.class_names, frames=8, size=24, clips=2, crops=2)
    with open(found.videos[0].path, "wb") as f:
        f.write(b"damaged since the scan")
    with pytest.warns(SkippedVideoWarning, match="v0.mp4"):
        sample, label = data[0]
    assert torch.equal(sample, data.clip(found.videos[1])) and label == found.videos[1].label


def test_average_views_is_the_mean_probability():
    torch.manual_seed(0)
    logits = torch.randn(6, 4) * 3
    probs = evaluation.average_views(logits, 3)
    assert probs.shape == (2, 4)
    torch.testing.assert_close(probs[1], logits[3:].softmax(1).mean(0))
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(evaluation.average_views(logits, 1), logits.softmax(1))
    with pytest.raises(ValueError, match="videos x 4 views"):
        evaluation.average_views(logits, 4)


def test_per_class_line_names_the_lowest_five_of_many_classes():
    names = [f"c{i}" for i in range(30)]
    accuracy = np.linspace(1.0, 0.0, 30)
    accuracy[29] = np.nan  # a class without samples
    assert evaluation.per_class_line(names[:3], accuracy[:3]) == "c0 100 %, c1 97 %, c2 93 %"
    assert evaluation.per_class_line(names, accuracy, 20) == \
        "lowest 5 of 30: c28 3 %, c27 7 %, c26 10 %, c25 14 %, c24 17 %"
    assert evaluation.per_class_line(names, accuracy, 30).endswith("c29 n/a")


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

KWARGS = dict(num_classes=2, width_mult=0.0625, input_size=(16, 32, 32))


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    """A c3d_bn checkpoint for the test videos' classes whose class probabilities change from view
    to view (BatchNorm statistics of the clips, head scaled up), so a test can tell one view from
    the mean of several."""
    folder = tmp_path_factory.mktemp("evaluate")
    root = folder / "data"
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for i in range(3):  # 48x32 landscape videos: three crops differ
            make_video(root / name / f"v{i}.mp4", frames=40 + 3 * i + c, size=48)
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(**KWARGS)
    # BatchNorm statistics of these clips (a random network's own collapse to one output otherwise)
    found = scan_class_folders(str(root), ClipSampler(16, 2))
    clips = torch.cat([read_views(v.path, v.num_frames, ClipSampler(16, 2), ClipTransform((32, 32), short_side=37),
                                  2, 3) for v in found.videos])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None
    with torch.no_grad():
        model(clips)
        model.fc8.weight.mul_(10)
    model.eval()
    path = folder / "model.pt"
    ckpt.save_atomic({"model": ckpt.plain_state_dict(model.state_dict()), "model_name": "c3d_bn",
                      "model_kwargs": KWARGS, "class_names": ["left", "right"],
                      "args": {"num_classes": 2, "frames": 16, "size": [32, 32], "seed": 0, "data": str(root)},
                      "data": {"kind": "videos", "frames": 16, "stride": 2, "min_frames": None, "size": (32, 32),
                               "short_side": 37}}, path)
    return path, root, model


def _reference(model, root, clips, crops):
    """{video path: (true class, mean probability over its views)} computed view by view."""
    found = scan_class_folders(str(root), ClipSampler(16, 2))
    sampler, transform = ClipSampler(16, 2), ClipTransform((32, 32), short_side=37)
    result = {}
    for video in found.videos:
        views = read_views(video.path, count_frames(video.path), sampler, transform, clips, crops)
        with torch.no_grad():
            probs = torch.stack([model(v[None]).softmax(1)[0] for v in views]).mean(0)
        result[video.path] = (video.label, probs)
    return result


def _predictions(path):
    with open(path, newline="") as f:
        return {row["video"]: row for row in csv.DictReader(f)}


def test_evaluate_scores_each_video_by_the_mean_over_its_views(sharp_checkpoint, tmp_path, capsys):
    path, root, model = sharp_checkpoint
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(root), "--checkpoint", str(path), "--clips", "2", "--crops", "3",
                     "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    reference = _reference(model, root, 2, 3)
    rows = _predictions(out / "predictions.csv")
    assert set(rows) == set(reference)
    names = ["left", "right"]
    for video, (label, probs) in reference.items():
        row = rows[video]
        assert row["true"] == names[label] and row["predicted"] == names[int(probs.argmax())]
        assert float(row["probability"]) == pytest.approx(float(probs.max()), abs=2e-6)
    top1 = np.mean([int(p.argmax()) == label for label, p in reference.values()])
    report = json.loads((out / "report.json").read_text())
    assert report["top1"] == pytest.approx(top1) and report["views"] == 6 and report["samples"] == 6
    assert f"top-1 {100 * top1:.1f} %" in printed and "2 clip(s) x 3 crop(s) a video" in printed
    # the views matter: the centre view alone gives other probabilities
    single = _reference(model, root, 1, 1)
    assert any(abs(float(single[v][1].max()) - float(p.max())) > 1e-3 for v, (_, p) in reference.items())


def test_evaluate_with_loader_workers_gives_the_same_predictions(sharp_checkpoint, tmp_path):
    path, root, _ = sharp_checkpoint
    for workers in ("0", "2"):
        assert cli.main(["evaluate", str(root), "--checkpoint", str(path), "--clips", "2", "--crops", "3",
                         "--workers", workers, "--batch-size", "6", "--out", str(tmp_path / workers),
                         "--device", "cpu"]) == 0
    assert _predictions(tmp_path / "0" / "predictions.csv") == _predictions(tmp_path / "2" / "predictions.csv")


def test_evaluate_one_view_is_the_centred_clip(sharp_checkpoint, tmp_path, capsys):
    path, root, model = sharp_checkpoint
    assert cli.main(["evaluate", str(root), "--checkpoint", str(path), str(path), "--no-fused",
                     "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "an ensemble of 2" in capsys.readouterr().out
    rows = _predictions(tmp_path / "predictions.csv")
    for video, (_, probs) in _reference(model, root, 1, 1).items():
        assert float(rows[video]["probability"]) == pytest.approx(float(probs.max()), abs=2e-6)


def test_predict_averages_the_views(sharp_checkpoint, capsys):
    path, root, model = sharp_checkpoint
    video = str(root / "right" / "v1.mp4")
    assert cli.main(["predict", video, "--checkpoint", str(path), "--clips", "3", "--crops", "3",
                     "--top-k", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip()
    _, probs = _reference(model, root, 3, 3)[video]
    names = ["left", "right"]
    assert printed == f"{video} [9 views]: {names[int(probs.argmax())]} {float(probs.max()):.1%}"


def test_inputs_after_checkpoint_are_taken_as_inputs(sharp_checkpoint, tmp_path, capsys):
    """--checkpoint takes every path after it: a folder or video there is the data, as README writes it."""
    path, root, _ = sharp_checkpoint
    video = str(root / "left" / "v0.mp4")
    assert cli.main(["predict", "--checkpoint", str(path), video, "--top-k", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"{video}: ")
    assert cli.main(["evaluate", "--checkpoint", str(path), str(path), str(root), "--device", "cpu"]) == 0
    assert "an ensemble of 2 on 6 videos from" in capsys.readouterr().out
    assert cli.main(["evaluate", "--checkpoint", str(root), "--device", "cpu"]) == 2
    assert "a folder or video, not a c3dzoo checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--checkpoint", "CKPT"], "give a labelled data folder or --synthetic N"),
    (["evaluate", "DATA", "--checkpoint", "CKPT", "--clips", "0"], "--clips must be at least 1"),
    (["evaluate", "--checkpoint", "CKPT", "--synthetic", "4", "--crops", "3"], "a synthetic clip is one view"),
    (["evaluate", "--checkpoint", "CKPT", "--labels", "x.csv", "--synthetic", "2"],
     "--labels names videos of a data folder"),
    (["predict", "DATA", "--checkpoint", "CKPT", "--crops", "0"], "--crops must be at least 1"),
    (["train", "--val-clips", "3"], "--val-clips is for real data"),
    (["train", "--data", "DATA", "--val-crops", "0"], "--val-crops must be at least 1"),
])
def test_view_options_errors(argv, message, sharp_checkpoint, capsys):
    path, root, _ = sharp_checkpoint
    argv = [str(path) if a == "CKPT" else str(root) if a == "DATA" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("c3dzoo: error: ") and message in err and "\n" not in err, err


def test_train_validates_videos_on_their_views(sharp_checkpoint, tmp_path, capsys):
    """--val-clips/--val-crops: the figures train prints are the ones c3dzoo evaluate gives its
    checkpoint on the same videos."""
    path, root, _ = sharp_checkpoint
    out = tmp_path / "run"
    # fine-tuned briefly from the view-sensitive weights, so that one view is not the mean of several
    assert cli.main(["train", "--data", str(root), "--val-data", str(root), "--val-clips", "2", "--val-crops", "3",
                     "--pretrained", str(path), "--lr", "1e-4",
                     "--epochs", "1", "--frames", "16", "--size", "32", "--width-mult", "0.0625", "--batch-size", "4",
                     "--frame-stride", "2", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "val 6 (given; 2 clip(s) x 3 crop(s) a video)" in printed and "over 6 views (one view: top-1" in printed
    with open(out / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))[-1]
    assert cli.main(["evaluate", str(root), "--checkpoint", str(out / "last.pt"), "--clips", "2", "--crops", "3",
                     "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert 100 * report["top1"] == pytest.approx(float(metrics["val_top1"]), abs=0.01)
    assert report["loss"] == pytest.approx(float(metrics["val_loss"]), abs=1e-4)
    one_view = printed.split("over 6 views (one view: top-1 ")[1].split(" %")[0]
    assert f"{100 * report['one_view_top1']:.1f}" == one_view


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed")
def test_two_ranks_validate_their_share_of_videos_on_every_view(sharp_checkpoint, tmp_path, capsys):
    """Under torchrun each rank validates every other video, all of its views; the sums make the
    figures of the whole set: those c3dzoo evaluate gives the checkpoint in one process."""
    from test_cli_distributed import run_ranks

    path, root, _ = sharp_checkpoint
    argv = ["train", "--data", str(root), "--val-data", str(root), "--val-clips", "2", "--val-crops", "2",
            "--pretrained", str(path), "--lr", "1e-4", "--epochs", "1", "--frames", "16", "--size", "32",
            "--width-mult", "0.0625", "--batch-size", "2", "--frame-stride", "2", "--device", "cpu",
            "--workers", "0", "--no-progress"]
    ranks = run_ranks(argv, tmp_path / "run", tmp_path / "logs")
    assert [status for status, *_ in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))[-1]
    assert cli.main(["evaluate", str(root), "--checkpoint", str(tmp_path / "run" / "last.pt"), "--clips", "2",
                     "--crops", "2", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert 100 * report["top1"] == pytest.approx(float(metrics["val_top1"]), abs=0.01)
    assert report["loss"] == pytest.approx(float(metrics["val_loss"]), abs=1e-4)


def test_evaluate_leaves_out_a_video_that_fails_to_decode(sharp_checkpoint, tmp_path, capsys, monkeypatch):
    """A video that passed the scan but fails when its clips are read is left out and named, not
    replaced by the next one (whose views would be scored under its name)."""
    from c3dzoo.data import UnreadableVideo, folders

    path, root, model = sharp_checkpoint
    broken = str(root / "left" / "v1.mp4")
    real_read = folders.read_frames

    def read_frames(source, indices):
        if source == broken:
            raise UnreadableVideo("invalid data found when processing input")
        return real_read(source, indices)

    monkeypatch.setattr(folders, "read_frames", read_frames)
    assert cli.main(["evaluate", str(root), "--checkpoint", str(path), "--clips", "2", "--out", str(tmp_path),
                     "--device", "cpu", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert f"left out {broken}, which no longer decodes: invalid data" in captured.err
    assert "on 6 videos from" in captured.out and "1 left out (no longer decode)" in captured.out
    rows = _predictions(tmp_path / "predictions.csv")
    monkeypatch.undo()
    reference = _reference(model, root, 2, 1)
    assert set(rows) == set(reference) - {broken}
    for video in rows:
        assert float(rows[video]["probability"]) == pytest.approx(float(reference[video][1].max()), abs=2e-6)
    assert json.loads((tmp_path / "report.json").read_text())["samples"] == 5


def test_features_of_a_video_are_the_mean_over_its_views(sharp_checkpoint, tmp_path, capsys):
    """extract_features and c3dzoo features: a multi-view sample gives one row, the mean of its
    views' fc6 features (the C3D paper's video descriptor; --l2-normalize scales it to unit length)."""
    from c3dzoo import transfer

    path, root, model = sharp_checkpoint
    found = scan_class_folders(str(root), ClipSampler(16, 2))
    data = VideoClipDataset(found.videos, found.class_names, 16, 32, stride=2, short_side=37, clips=2, crops=3)
    per_view = transfer.extract_features(model, torch.cat([data[i][0] for i in range(len(data))]), "fc6")
    expected = per_view.view(len(data), 6, -1).mean(1)
    assert not torch.allclose(per_view[0], expected[0])  # the views differ
    features, labels = transfer.extract_features(model, data, "fc6", batch_size=7, return_labels=True)
    torch.testing.assert_close(features, expected)
    assert labels.tolist() == [v.label for v in found.videos]
    unit = transfer.extract_features(model, data, "fc6", normalize="l2")
    torch.testing.assert_close(unit, torch.nn.functional.normalize(expected, dim=1))
    with pytest.raises(ValueError, match="normalize must be None or 'l2'"):
        transfer.extract_features(model, data, "fc6", normalize="l1")

    out = tmp_path / "feats.pt"
    assert cli.main(["features", "--checkpoint", str(path), str(root), "--clips", "2", "--crops", "3",
                     "--l2-normalize", "--out", str(out), "--device", "cpu", "--no-fused"]) == 0
    assert "each the mean over 6 views, L2-normalised" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    torch.testing.assert_close(saved["features"], torch.nn.functional.normalize(expected, dim=1))
    assert (saved["clips"], saved["crops"], saved["normalize"]) == (2, 3, "l2")
    assert cli.main(["features", "--checkpoint", str(path), "--synthetic", "4", "--clips", "2",
                     "--out", str(out), "--device", "cpu"]) == 2
    assert "are one view each" in capsys.readouterr().err


def test_timeline_slides_one_clip_along_each_video(sharp_checkpoint, tmp_path, capsys):
    """predict --timeline: a clip every --hop frames while whole clips fit (frames 16 at stride 2:
    a 31-frame span), each scored as the clip of those frames alone, with its time span; a video
    shorter than a clip gives the one clip validation takes of it."""
    from test_data_folders import make_frame_folder

    path, root, model = sharp_checkpoint
    video = str(root / "right" / "v1.mp4")  # 44 frames at 10 frames/s: clips at frames 0 and 8
    short = make_frame_folder(tmp_path / "short", frames=12)  # looped to 16 frames
    table = tmp_path / "timeline.csv"
    assert cli.main(["predict", video, short, "--checkpoint", str(path), "--timeline", "--hop", "8", "--top-k", "1",
                     "--device", "cpu", "--csv", str(table)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    transform, sampler = ClipTransform((32, 32), short_side=37), ClipSampler(16, 2)
    expected, expected_rows = [], []
    for source, start, first, last, indices in [(video, 0, 0.0, 3.0, range(0, 31, 2)),
                                                 (video, 8, 0.8, 3.8, range(8, 39, 2)),
                                                 (short, 0, 0.0, 11 / 25, sampler.indices(12))]:
        with torch.no_grad():
            probs = model(transform(read_frames(source, list(indices)))[None]).softmax(1)[0]
        name = ["left", "right"][int(probs.argmax())]
        expected.append(f"{source} [{first:.2f}-{last:.2f} s, frame {start}]: {name} {float(probs.max()):.1%}")
        expected_rows.append((source, f"{first:.3f}", f"{last:.3f}", name, float(probs.max())))
    assert lines == expected
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["input"], r["start_s"], r["end_s"], r["class1"]) for r in rows] == [e[:4] for e in expected_rows]
    assert [float(r["prob1"]) for r in rows] == pytest.approx([e[4] for e in expected_rows], abs=2e-6)


@pytest.mark.parametrize("extra, message", [(["--timeline", "--clips", "3"], "not --synthetic or --clips/--crops"),
                                            (["--hop", "4"], "give --timeline too"),
                                            (["--timeline", "--hop", "0"], "--hop must be at least 1")])
def test_timeline_option_errors(sharp_checkpoint, extra, message, capsys):
    path, root, _ = sharp_checkpoint
    assert cli.main(["predict", str(root / "left" / "v0.mp4"), "--checkpoint", str(path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_validation_forwards_at_most_a_batch_of_views(sharp_checkpoint, tmp_path):
    """9 views a video with --batch-size 4: each video's views go through the model in passes of
    at most 4 clips, all of them (6 videos x 9 views)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    _, root, _ = sharp_checkpoint
    sizes = []

    def record(module, args):
        if type(module).__name__ == "C3D" and not torch.is_grad_enabled():
            sizes.append(args[0].shape[0])

    handle = register_module_forward_pre_hook(record)
    try:
        assert cli.main(["train", "--data", str(root), "--val-data", str(root), "--val-clips", "3", "--val-crops", "3",
                         "--epochs", "1", "--frames", "16", "--size", "32", "--width-mult", "0.0625", "--batch-size",
                         "4", "--frame-stride", "2", "--device", "cpu", "--no-progress"]) == 0
    finally:
        handle.remove()
    probe, validation = sizes[0], sizes[1:]  # train first runs one clip through the new model
    assert probe == 1 and max(validation) <= 4 and sum(validation) == 6 * 9, sizes
