"""Decoding video files: ``read_frames`` seeks to the keyframe before a late clip instead of
decoding the video from its first frame, and the frames it returns are those a decode from the
start gives, for the codecs and containers data sets come in (H.264 with B-frames, MPEG-4 Part 2
in .mp4 and .avi, VP9 .webm); every reader turns frames upright by the stream's display rotation."""

from __future__ import annotations

import numpy as np
import pytest

from c3dzoo.data import iter_frames, read_frames, video_io

av = pytest.importorskip("av")

FRAMES = 90


def _noise_video(path, codec: str, gop: int) -> str:
    """Frames of moving noise with the frame number written into a corner, keyframes every ``gop``."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        for t in range(FRAMES):
            image = np.roll(base, 2 * t, axis=1)
            image[:8, :8] = (11 * t) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.mark.parametrize("codec, name", [("libx264", "h264.mp4"), ("mpeg4", "mpeg4.mp4"), ("mpeg4", "xvid.avi"),
                                         ("libvpx-vp9", "vp9.webm")])
def test_seeking_gives_the_frames_of_a_decode_from_the_start(tmp_path, codec, name):
    path = _noise_video(tmp_path / name, codec, gop=10)
    for first in range(0, FRAMES - 16, 5):
        indices = list(range(first, first + 16, 1)) + [first + 3]  # any order, repeats allowed
        plain = video_io._decode(av, path, indices, seek=False)
        assert np.array_equal(read_frames(path, indices), plain), first
        if first >= video_io.SEEK_MIN_FRAME:  # the seek path itself, not a fallback, gave them
            assert np.array_equal(video_io._decode(av, path, indices, seek=True), plain), first
    # strided and past the end (the last frame repeats), as clips of short videos are taken
    indices = [70, 75, 80, 85, 90, 95]
    assert np.array_equal(read_frames(path, indices), video_io._decode(av, path, indices, seek=False))


def test_a_seek_that_cannot_number_its_frames_decodes_from_the_start(tmp_path, monkeypatch):
    path = _noise_video(tmp_path / "v.mp4", "libx264", gop=10)
    indices = list(range(40, 56))
    expected = video_io._decode(av, path, indices, seek=False)
    calls = []
    real = video_io._decode

    def decode(av_module, source, wanted, seek):
        calls.append(seek)
        if seek:
            raise video_io._SeekMissed
        return real(av_module, source, wanted, seek)

    monkeypatch.setattr(video_io, "_decode", decode)
    assert np.array_equal(read_frames(path, indices), expected) and calls == [True, False]


def _marked_video(path, rotation: int, frames: int = 12) -> str:
    """48 x 32 frames (landscape as stored) with a white mark in the top-left corner, and a display
    matrix turning them ``rotation`` degrees counter-clockwise (as a phone stores a portrait video)."""
    image = np.zeros((32, 48, 3), np.uint8)
    image[:4, :8] = 255
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.mark.parametrize("rotation, shape, corner", [(0, (32, 48), (0, 0)), (90, (48, 32), (47, 0)),
                                                     (-90, (48, 32), (0, 31)), (180, (32, 48), (31, 47))])
def test_frames_come_upright_as_players_show_them(tmp_path, rotation, shape, corner):
    """A display rotation turns the frames (counter-clockwise by the matrix's angle), in every
    reader: clips from the start, clips sought late in the video, and the frame-by-frame stream."""
    if not hasattr(av.VideoFrame, "rotation"):
        pytest.skip("this PyAV has no VideoFrame.rotation (before PyAV 13): frames come as stored")
    path = _marked_video(tmp_path / "phone.mp4", rotation)
    for frame in (read_frames(path, [0])[0], read_frames(path, [10])[0], next(iter_frames(path))[2]):
        assert frame.shape[:2] == shape
        mark = frame[..., 0] > 200
        assert mark[corner] and mark.sum() < 60, (rotation, np.argwhere(mark)[[0, -1]])
