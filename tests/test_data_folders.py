"""Real video data: decoding (PyAV, frame folders), clip sampling, resize/crop/normalise, folder
and CSV layouts, skipping unreadable and too-short videos, and the errors for bad layouts."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from c3dzoo.data import (KINETICS_MEAN, KINETICS_STD, ClipSampler, ClipTransform, DataError,
                         SkippedVideoWarning, VideoClipDataset, count_frames, read_class_names,
                         read_frames, scan_class_folders, scan_frame_folders, split_videos)

SIZE = 32


def brightness(t: int) -> int:
    """Grey level of frame ``t`` in the test videos: the first 17 frames can be told apart after
    lossy coding."""
    return 20 + (12 * t) % 204


def frame_image(t: int, size: int = SIZE, square: bool = True) -> np.ndarray:
    """A grey frame of brightness(t) with a white square that moves right one pixel a frame."""
    image = np.full((size, size, 3), brightness(t), np.uint8)
    if square:
        x = (2 + t) % (size - 6)
        image[size // 2 - 3:size // 2 + 3, x:x + 6] = 255
    return image


def make_video(path, frames: int = 12, size: int = SIZE, square: bool = True, codec: str = "mpeg4") -> str:
    """A tiny mpeg4 .mp4 (every FFmpeg build has the mpeg4 encoder; ``codec="libvpx-vp9"`` for .webm)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(t, size, square), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def make_frame_folder(path, frames: int = 12, size: int = SIZE, names: str = "{:05d}.jpg") -> str:
    """A folder of numbered frame images (the Jester / UCF101 frame-dump layout)."""
    from PIL import Image

    path.mkdir(parents=True)
    for t in range(frames):
        Image.fromarray(frame_image(t, size)).save(path / names.format(t + 1))
    return str(path)


def make_class_folders(root, videos_per_class: int = 3, classes=("left", "right"), frames: int = 18):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(videos_per_class):
            make_video(root / name / f"v{i}.mp4", frames=frames + i + c)
    return root


def _mean_level(frames: np.ndarray) -> np.ndarray:
    """Per-frame median grey level (the moving square covers a small part of each frame)."""
    return np.median(frames.reshape(len(frames), -1), axis=1)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def test_decode_video_file(tmp_path):
    path = make_video(tmp_path / "a.mp4", frames=12)
    assert count_frames(path) == 12
    frames = read_frames(path, [0, 5, 11, 5])
    assert frames.shape == (4, SIZE, SIZE, 3) and frames.dtype == np.uint8
    expected = [brightness(t) for t in (0, 5, 11, 5)]
    assert np.abs(_mean_level(frames) - expected).max() <= 4  # lossy, but each frame recognisable


def test_video_that_ends_early_repeats_its_last_frame(tmp_path):
    path = make_video(tmp_path / "a.mp4", frames=6)
    frames = read_frames(path, [2, 9])  # index 9 is past the end
    assert abs(_mean_level(frames)[1] - brightness(5)) <= 4


def test_frame_folder_in_natural_order(tmp_path):
    # unpadded numbers: a plain sort would put 10.png before 2.png
    folder = make_frame_folder(tmp_path / "vid", frames=12, names="{}.png")
    assert count_frames(folder) == 12
    frames = read_frames(folder, [0, 1, 9, 11])
    np.testing.assert_array_equal(_mean_level(frames), [brightness(t) for t in (0, 1, 9, 11)])  # png: exact


def test_unreadable_sources_raise(tmp_path):
    from c3dzoo.data import UnreadableVideo

    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 20)
    with pytest.raises(UnreadableVideo):
        count_frames(str(tmp_path / "bad.mp4"))
    pytest.importorskip("PIL")
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableVideo, match="00001.jpg"):
        read_frames(str(folder), [0])


def test_missing_pyav_says_pip_install_av(tmp_path, monkeypatch):
    path = make_video(tmp_path / "a.mp4")
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(DataError, match="pip install av"):
        count_frames(path)


# --------------------------------------------------------------------------------------------
# clip sampling and transforms
# --------------------------------------------------------------------------------------------


def test_clip_sampler_centred_and_strided():
    sampler = ClipSampler(frames=4, stride=2)
    np.testing.assert_array_equal(sampler.indices(7), [0, 2, 4, 6])  # span 7 fills the video
    np.testing.assert_array_equal(sampler.indices(11), [2, 4, 6, 8])  # centred: 2 spare each side
    np.testing.assert_array_equal(ClipSampler(4, 1).indices(10), [3, 4, 5, 6])


def test_clip_sampler_random_start_covers_the_range():
    sampler = ClipSampler(frames=4, stride=3)  # span 10
    starts = {int(sampler.indices(20, np.random.default_rng(i))[0]) for i in range(200)}
    assert starts == set(range(11))  # every start 0..20-10, nothing beyond
    clip = sampler.indices(20, np.random.default_rng(0))
    np.testing.assert_array_equal(np.diff(clip), [3, 3, 3])


def test_clip_sampler_short_videos_lower_stride_then_loop_then_skip():
    sampler = ClipSampler(frames=8, stride=4)  # span 29; shortest allowed: 4 frames
    np.testing.assert_array_equal(sampler.indices(16), [0, 2, 4, 6, 8, 10, 12, 14])  # stride 2 fits
    np.testing.assert_array_equal(sampler.indices(5), [0, 1, 2, 3, 4, 0, 1, 2])  # looped
    assert sampler.shortest == 4 and sampler.fits(4) and not sampler.fits(3)
    with pytest.raises(ValueError, match="too short"):
        sampler.indices(3)
    assert ClipSampler(8, min_frames=8).fits(8) and not ClipSampler(8, min_frames=8).fits(7)


def test_transform_shapes_and_crops():
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    transform = ClipTransform((24, 32))  # short side to 37 (8/7 of 32): 40x60 -> 37x56
    clip = transform(frames)
    assert clip.shape == (3, 5, 24, 32) and clip.dtype == torch.float32
    assert torch.equal(clip, transform(frames))  # centre crop: deterministic
    crops = [transform(frames, np.random.default_rng(i)) for i in range(4)]
    assert all(c.shape == (3, 5, 24, 32) for c in crops)
    assert not all(torch.equal(crops[0], c) for c in crops[1:])  # random crops differ
    # small frames are enlarged until the crop fits
    assert ClipTransform((32, 32))(frames[:, :10, :20]).shape == (3, 5, 32, 32)


def test_transform_centre_crop_takes_the_middle():
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    frames[:, 16:48, 16:48] = 255  # the middle 32x32 is white
    transform = ClipTransform((32, 32), short_side=64)  # no resize
    clip = transform(frames)
    white = (255 / 255 - torch.tensor(KINETICS_MEAN)) / torch.tensor(KINETICS_STD)
    torch.testing.assert_close(clip[:, 0].mean(dim=(1, 2)), white)


def test_transform_normalises_per_channel():
    mean, std = torch.tensor(KINETICS_MEAN), torch.tensor(KINETICS_STD)
    for target in (0.0, 1.0):  # pixels at mean → 0, at mean + std → 1, per channel
        pixel = ((mean + target * std) * 255).round()
        frames = np.broadcast_to(pixel.numpy().astype(np.uint8), (2, 16, 16, 3))
        clip = ClipTransform((8, 8))(frames)
        expected = (pixel / 255 - mean) / std
        torch.testing.assert_close(clip.mean(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)
        assert torch.allclose(expected, torch.full((3,), target), atol=0.03)


# --------------------------------------------------------------------------------------------
# layouts: class folders, frame folders with a CSV
# --------------------------------------------------------------------------------------------


def test_class_folders_skip_corrupt_and_short_with_warnings(tmp_path):
    root = make_class_folders(tmp_path / "data", videos_per_class=2)
    (root / "left" / "corrupt.mp4").write_bytes(b"\x00garbage" * 100)
    make_video(root / "right" / "short.mp4", frames=3)
    (root / "right" / "notes.txt").write_text("not a video")  # ignored: not a video
    make_frame_folder(root / "right" / "dumped", frames=16)  # a class may hold frame folders too
    with pytest.warns(SkippedVideoWarning) as caught:
        found = scan_class_folders(str(root), ClipSampler(16))
    assert found.class_names == ["left", "right"]
    assert [(v.path.split("/")[-1], v.label) for v in found.videos] == [
        ("v0.mp4", 0), ("v1.mp4", 0), ("dumped", 1), ("v0.mp4", 1), ("v1.mp4", 1)]
    assert [p.split("/")[-1] for p, _ in found.unreadable] == ["corrupt.mp4"]
    assert [p.split("/")[-1] for p, _ in found.too_short] == ["short.mp4"]
    assert found.skipped == 2 and len(caught) == 2
    assert {v.num_frames for v in found.videos} == {16, 18, 19, 20}


@pytest.mark.parametrize("layout, message", [
    ("missing", "not found"),
    ("file_root", "is not a folder"),
    ("files_in_root", "one subfolder per class"),
    ("empty_class", "holds no videos"),
    ("empty_root", "no class subfolders"),
])
def test_class_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file_root":
        root.write_text("x")
    elif layout == "files_in_root":
        root.mkdir()
        make_video(root / "a.mp4")
    elif layout == "empty_class":
        make_class_folders(root, videos_per_class=1)
        (root / "nothing").mkdir()
    elif layout == "empty_root":
        root.mkdir()
    with pytest.raises(DataError, match=message) as info:
        scan_class_folders(str(root), ClipSampler(8))
    assert "\n" not in str(info.value)


def _frames_root(tmp_path, ids=("101", "102", "103", "104"), frames=10):
    root = tmp_path / "frames"
    for vid in ids:
        make_frame_folder(root / vid, frames=frames)
    return root


@pytest.mark.parametrize("text", [
    "101;Swiping Left\n102;Swiping Right\n103;Swiping Left\n104;Swiping Right\n",  # Jester
    "id,label\n101,Swiping Left\n102,Swiping Right\n\n103,Swiping Left\n104,Swiping Right\n",  # header
])
def test_frame_folders_with_csv_labels(tmp_path, text):
    root = _frames_root(tmp_path)
    (tmp_path / "labels.csv").write_text(text)
    found = scan_frame_folders(str(root), str(tmp_path / "labels.csv"), ClipSampler(8))
    assert found.class_names == ["Swiping Left", "Swiping Right"]
    assert [(v.path.split("/")[-1], v.label, v.num_frames) for v in found.videos] == [
        ("101", 0, 10), ("102", 1, 10), ("103", 0, 10), ("104", 1, 10)]


def test_class_list_file_sets_the_label_order(tmp_path):
    root = _frames_root(tmp_path, ids=("1", "2"))
    (tmp_path / "labels.csv").write_text("1;b\n2;a\n")
    (tmp_path / "classes.txt").write_text("1 b\n2 a\n3 c\n")  # UCF101 classInd.txt style
    names = read_class_names(str(tmp_path / "classes.txt"))
    assert names == ["b", "a", "c"]
    found = scan_frame_folders(str(root), str(tmp_path / "labels.csv"), ClipSampler(8), names)
    assert [v.label for v in found.videos] == [0, 1] and found.class_names == names


@pytest.mark.parametrize("csv_text, message", [
    ("101;a\n999;b\n", "name no frame folder or video file"),
    ("101;a\n102\n", "is not 'video id;label'"),
    ("", "has no rows"),
    ("101;a\n102;zebra\n", "not a known class"),
])
def test_frame_folder_csv_errors(tmp_path, csv_text, message):
    root = _frames_root(tmp_path, ids=("101", "102"))
    (tmp_path / "labels.csv").write_text(csv_text)
    classes = ["a", "b"] if "zebra" in csv_text else None
    with pytest.raises(DataError, match=message) as info:
        scan_frame_folders(str(root), str(tmp_path / "labels.csv"), ClipSampler(8), classes)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="labels CSV not found"):
        scan_frame_folders(str(root), str(tmp_path / "nope.csv"), ClipSampler(8))


def test_empty_frame_folder_is_skipped_as_too_short(tmp_path):
    root = _frames_root(tmp_path, ids=("1", "2"))
    (root / "3").mkdir()
    (tmp_path / "labels.csv").write_text("1;a\n2;b\n3;a\n")
    with pytest.warns(SkippedVideoWarning, match="3: 0 frames"):
        found = scan_frame_folders(str(root), str(tmp_path / "labels.csv"), ClipSampler(8))
    assert len(found.videos) == 2 and len(found.too_short) == 1


# --------------------------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------------------------


def _dataset(tmp_path, train: bool):
    root = make_class_folders(tmp_path / "data", videos_per_class=2, frames=30)
    found = scan_class_folders(str(root), ClipSampler(8))
    return VideoClipDataset(found.videos, found.class_names, frames=8, size=24, stride=2, train=train, seed=3)


def test_dataset_clips_train_and_val(tmp_path):
    train = _dataset(tmp_path, train=True)
    val = VideoClipDataset(train.videos, train.class_names, frames=8, size=24, stride=2, train=False, seed=3)
    clip, label = train[(1, 4)]
    assert clip.shape == (3, 8, 24, 24) and clip.dtype == torch.float32 and label == 0
    assert torch.equal(clip, train[(1, 4)][0])  # a pure function of (seed, epoch, index)
    assert not torch.equal(clip, train[(1, 5)][0])  # another epoch, another start and crop
    assert torch.equal(val[1][0], val[(1, 7)][0])  # validation: centred, whatever the epoch
    assert [val[i][1] for i in range(len(val))] == [0, 0, 1, 1]


class _Frames(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> np.ndarray:
        return read_frames(self.path, [0, 5])


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_worker_forked_after_the_main_process_decoded_does_not_hang(tmp_path):
    """PyAV 18.1.1 converts every frame a thread decodes with one shared swscale context, which by
    default has slice threads: a DataLoader worker forked after the main thread converted a frame
    inherited the context without its threads and waited on them forever (CI hung in the test
    below and in test_cli's training on videos with workers). The main process decodes first here,
    then a forked worker decodes the same frames; the loader's timeout turns a hang into a failure."""
    path = make_video(tmp_path / "v.mp4", frames=12, size=64)
    want = read_frames(path, [0, 5])
    loader = torch.utils.data.DataLoader(_Frames(path), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", timeout=60)
    for got in loader:
        assert np.array_equal(np.asarray(got), want)


def test_dataset_pickles_and_loads_in_workers(tmp_path):
    dataset = _dataset(tmp_path, train=True)
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[(2, 1)][0], dataset[(2, 1)][0])
    keys = [[(i, 1) for i in range(len(dataset))]]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=2)
    clips, labels = next(iter(loader))
    assert torch.equal(clips, torch.stack([dataset[k][0] for k in keys[0]]))
    assert labels.tolist() == [0, 0, 1, 1]


def test_dataset_skips_a_video_that_fails_after_the_scan(tmp_path):
    dataset = _dataset(tmp_path, train=False)
    with open(dataset.videos[0].path, "wb") as f:
        f.write(b"damaged since the scan")
    with pytest.warns(SkippedVideoWarning, match="v0.mp4"):
        clip, label = dataset[0]
    assert torch.equal(clip, dataset.clip(dataset.videos[1])) and label == dataset.videos[1].label
    assert dataset.decode_failures == 1


def test_split_is_deterministic_and_per_class(tmp_path):
    from c3dzoo.data import VideoItem

    videos = [VideoItem(f"v{i}", i % 3, 20) for i in range(30)]
    train, val = split_videos(videos, 0.2, seed=0)
    assert (train, val) == split_videos(videos, 0.2, seed=0)
    assert val != split_videos(videos, 0.2, seed=1)[1]
    assert sorted(v.label for v in val) == [0, 0, 1, 1, 2, 2]
    assert not {v.path for v in train} & {v.path for v in val} and len(train) + len(val) == 30
    with pytest.raises(ValueError):
        split_videos(videos, 1.5, seed=0)


def test_video_probes_are_cached_across_scans(tmp_path, monkeypatch):
    """A second scan of the same root opens no unchanged video file (frame counts and unreadable
    verdicts come from the index cache); an edited file is probed again; the cache is keyed by
    file size and modification time and lives under $C3DZOO_CACHE_DIR."""
    import c3dzoo.data.folders as folders

    monkeypatch.setenv("C3DZOO_CACHE_DIR", str(tmp_path / "cache"))
    root = make_class_folders(tmp_path / "data", videos_per_class=2)
    (root / "left" / "corrupt.mp4").write_bytes(b"\x00garbage" * 100)
    make_frame_folder(root / "right" / "dumped", frames=16)
    probed = []
    real = folders.count_frames
    monkeypatch.setattr(folders, "count_frames", lambda path: probed.append(path) or real(path))

    def scan():
        probed.clear()
        with pytest.warns(SkippedVideoWarning):
            return scan_class_folders(str(root), ClipSampler(16))

    first = scan()
    assert len(probed) == 6 and list((tmp_path / "cache" / "video-index").glob("*.json"))
    second = scan()
    assert [p.split("/")[-1] for p in probed] == ["dumped"], "only the frame folder is listed again"
    assert second.videos == first.videos and second.unreadable == first.unreadable

    make_video(root / "left" / "v0.mp4", frames=30)  # replaced: another size (and time)
    third = scan()
    assert [p.split("/")[-2:] for p in probed] == [["left", "v0.mp4"], ["right", "dumped"]]
    assert {v.path.split("/")[-1]: v.num_frames for v in third.videos if v.label == 0}["v0.mp4"] == 30

    probed.clear()
    with pytest.warns(SkippedVideoWarning):
        scan_class_folders(str(root), ClipSampler(16), index_cache=False)
    assert len(probed) == 6


def test_unusable_index_cache_is_ignored(tmp_path, monkeypatch):
    """A corrupt cache file, or a cache directory that cannot be written, only costs the probes."""
    from c3dzoo.data.index_cache import FrameCountCache

    root = make_class_folders(tmp_path / "data", videos_per_class=1)
    monkeypatch.setenv("C3DZOO_CACHE_DIR", str(tmp_path / "cache"))
    cache_file = FrameCountCache(str(root)).path
    os.makedirs(os.path.dirname(cache_file))
    with open(cache_file, "w") as f:
        f.write("{not json")
    assert len(scan_class_folders(str(root), ClipSampler(16)).videos) == 2
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("C3DZOO_CACHE_DIR", str(blocker))
    assert len(scan_class_folders(str(root), ClipSampler(16)).videos) == 2
