"""``read_frames`` seeks to the keyframe before a late clip instead of decoding the video from its
first frame: the frames it returns are those a decode from the start gives, for the codecs and
containers data sets come in (H.264 with B-frames, MPEG-4 Part 2 in .mp4 and .avi, VP9 .webm)."""

from __future__ import annotations

import numpy as np
import pytest

from c3dzoo.data import read_frames, video_io

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
