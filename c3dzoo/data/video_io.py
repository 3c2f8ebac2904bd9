"""Reading frames from video files (PyAV) and from folders of extracted frames (PIL).

Two kinds of *video source* share one interface: a video file, decoded with PyAV, and a folder
holding one image per frame (the 20BN-Jester / UCF101 frame-dump layout: ``00001.jpg``,
``00002.jpg``, …, ordered by the number in the name). ``count_frames`` probes a source (and proves
it decodes); ``read_frames`` returns the requested frames as ``T × H × W × 3`` uint8 RGB.

PyAV and PIL are imported on first use, so a folder of frames needs no PyAV and the synthetic data
set needs neither; a missing one is a ``DataError`` that says what to install. (torchvision's
``read_video`` decodes through PyAV as well, so PyAV is the one requirement for video files.)
"""

from __future__ import annotations

import os
import re
from typing import Iterator, List, Sequence, Tuple

import numpy as np

__all__ = ["DataError", "UnreadableVideo", "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS", "is_video_file",
           "frame_files", "count_frames", "read_frames", "iter_frames", "require_pyav"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp",
                    ".ogv", ".wmv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class DataError(ValueError):
    """A data set that cannot be used as given (missing path, wrong layout, bad label file, missing
    decoder); the message is one line that names what is wrong."""


class UnreadableVideo(Exception):
    """One video source that cannot be decoded; the message says why (one line)."""


def require_pyav():
    """The ``av`` module, or a DataError saying how to install it."""
    try:
        import av
    except ImportError:
        raise DataError("reading video files needs PyAV, which is not installed: pip install av "
                        "(folders of extracted frames need only Pillow)") from None
    return av


def _pil_image():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading frame images needs Pillow, which is not installed: pip install pillow") from None
    return Image


def _reason(exc: BaseException) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc).strip())  # FFmpeg's error numbers say nothing
    return text.splitlines()[0] if text else type(exc).__name__


def is_video_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)


def _frame_number(name: str):
    # natural order: frame 10 after frame 9, whatever the zero padding
    numbers = re.findall(r"\d+", name)
    return (int(numbers[-1]) if numbers else -1, name)


def frame_files(folder: str) -> List[str]:
    """The image files of a frame folder in frame order (by the last number in each name)."""
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=_frame_number)]


def count_frames(source: str) -> int:
    """The number of frames of a video file or frame folder. For a video file it also decodes the
    first frame, so a file that opens but does not decode is caught here. Raises UnreadableVideo."""
    if os.path.isdir(source):
        try:
            return len(frame_files(source))
        except OSError as exc:
            raise UnreadableVideo(_reason(exc)) from None
    av = require_pyav()
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise UnreadableVideo("no video stream")
            stream = container.streams.video[0]
            frames = stream.frames  # from the container's index; 0 where the format has none
            decoded = 0
            for _ in container.decode(stream):
                decoded += 1
                if frames > 0:  # the first frame decodes: trust the index for the rest
                    break
            if decoded == 0:
                raise UnreadableVideo("no frame decodes")
            return frames if frames > 0 else decoded
    except UnreadableVideo:
        raise
    except Exception as exc:  # av.error.FFmpegError and friends: corrupt or truncated files
        raise UnreadableVideo(_reason(exc)) from None


def _rgb24(frame) -> np.ndarray:
    """A decoded frame as H × W × 3 uint8 RGB, converted by one swscale thread. PyAV 18.1.1 keeps
    one swscale context per thread for every frame it converts, with slice threads of its own by
    default: a DataLoader worker forked after the main thread converted a frame inherits that
    context without its threads and waits on them forever (training on videos with ``--workers``
    hung). A single-threaded context has no threads to lose; the workers are the parallelism."""
    try:
        return frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:  # a PyAV without the threads argument converts with a scaler per frame
        return frame.to_ndarray(format="rgb24")


def _upright(frame) -> np.ndarray:
    """A decoded frame as RGB pixels the way players show it: turned by the stream's display
    rotation (a phone's portrait video is stored landscape, with a display matrix saying so;
    ``VideoFrame.rotation`` is its counter-clockwise angle)."""
    pixels = _rgb24(frame)
    rotation = getattr(frame, "rotation", 0) or 0  # PyAV before 13 has no rotation: shown as stored
    quarter_turns = int(round(rotation / 90)) % 4 if rotation == rotation else 0  # NaN: a singular matrix
    return np.ascontiguousarray(np.rot90(pixels, quarter_turns)) if quarter_turns else pixels


def iter_frames(source: str, folder_fps: float = 25.0) -> Iterator[Tuple[int, float, np.ndarray]]:
    """``(index, time in seconds, H × W × 3 uint8 RGB frame)`` of every frame of ``source`` in order,
    decoded as it goes (a long video never sits in memory). Frame folders have no clock: their
    frames are ``1 / folder_fps`` apart. Raises UnreadableVideo (possibly after some frames)."""
    if os.path.isdir(source):
        for index, path in enumerate(_frame_folder_files(source)):
            yield index, index / folder_fps, _load_image(path)
        return
    av = require_pyav()
    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate) if stream.average_rate else folder_fps
            for index, frame in enumerate(container.decode(stream)):
                time = float(frame.time) if frame.time is not None else index / rate
                yield index, time, _upright(frame)
    except UnreadableVideo:
        raise
    except Exception as exc:
        raise UnreadableVideo(_reason(exc)) from None


SEEK_MIN_FRAME = 2  # clips starting later seek to the keyframe before them instead of decoding from frame 0


class _SeekMissed(Exception):
    """A seek that cannot be trusted to give frame numbers: decode from the start instead."""


def read_frames(source: str, indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of ``source`` as ``T × H × W × 3`` uint8 RGB.

    A video file is decoded from the keyframe before its first wanted frame, found by seeking to
    that frame's time (frame i at ``i / average_rate``), and the first decoded frame's number is
    read from its timestamp: a training clip late in a long video does not decode everything before
    it (2-3× fewer frames decoded with keyframes every second). A stream without a frame rate or
    timestamps, or a seek that lands after the wanted frame, is decoded from its first frame.

    A video that ends before an index (its container's frame count was too high) gives its last
    decoded frame there. Raises UnreadableVideo."""
    if len(indices) == 0:
        raise ValueError("no frame indices")
    if os.path.isdir(source):
        return _read_frame_folder(source, indices)
    av = require_pyav()
    try:
        if min(indices) >= SEEK_MIN_FRAME:
            try:
                return _decode(av, source, indices, seek=True)
            except _SeekMissed:
                pass
        return _decode(av, source, indices, seek=False)
    except UnreadableVideo:
        raise
    except Exception as exc:
        raise UnreadableVideo(_reason(exc)) from None


def _decode(av, source: str, indices: Sequence[int], seek: bool) -> np.ndarray:
    """``read_frames`` for a video file, from the start or (``seek``) from the keyframe before the
    first wanted frame; raises _SeekMissed where a seek cannot number the frames it gives."""
    wanted, first, last = set(indices), min(indices), max(indices)
    frames, final, final_frame = {}, None, None
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate, base, start = stream.average_rate, stream.time_base, stream.start_time or 0
        i = 0
        if seek:
            if not rate or not base:
                raise _SeekMissed
            container.seek(start + int(first / rate / base), stream=stream, backward=True, any_frame=False)
            i = None
        for frame in container.decode(stream):
            if i is None:  # the frame number of the first frame after the seek, from its timestamp
                if frame.pts is None:
                    raise _SeekMissed
                i = round((frame.pts - start) * base * rate)
                if not 0 <= i <= first:
                    raise _SeekMissed
            if i in wanted:
                frames[i] = _upright(frame)
            final, final_frame = i, frame  # converted below only if the video ends early
            if i >= last:
                break
            i += 1
        if final is None:
            if seek:  # nothing after the seek point: let the plain decode tell where the video ends
                raise _SeekMissed
            raise UnreadableVideo("no frame decodes")
        if final < last and final not in frames:
            if seek and final < first:
                raise _SeekMissed
            frames[final] = _upright(final_frame)
    return np.stack([frames[min(i, final)] for i in indices])


def _frame_folder_files(folder: str) -> List[str]:
    try:
        files = frame_files(folder)
    except OSError as exc:
        raise UnreadableVideo(_reason(exc)) from None
    if not files:
        raise UnreadableVideo("no frame images")
    return files


def _load_image(path: str) -> np.ndarray:
    Image = _pil_image()
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, permissions
        raise UnreadableVideo(f"{os.path.basename(path)}: {_reason(exc)}") from None


def _read_frame_folder(folder: str, indices: Sequence[int]) -> np.ndarray:
    files = _frame_folder_files(folder)
    images = {i: _load_image(files[min(i, len(files) - 1)]) for i in set(indices)}
    shapes = {a.shape for a in images.values()}
    if len(shapes) > 1:
        raise UnreadableVideo(f"frames of different sizes {sorted(s[:2] for s in shapes)}")
    return np.stack([images[i] for i in indices])
