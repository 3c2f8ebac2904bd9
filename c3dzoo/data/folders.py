"""Real video data sets: a folder with one subfolder per class, or a folder of videos named by id
with their labels in a CSV or JSON file.

Layouts (a *video* is a video file or a folder of frame images, see ``video_io``):

* ``scan_class_folders(root)``: ``root/<class>/<video>``; class names are the subfolder names in
  sorted order. Files directly in ``root``, or a class folder without videos, are layout errors.
* ``scan_frame_folders(root, labels_csv)``: videos named by id directly under ``root``, frame
  folders ``root/<video id>/00001.jpg …`` (20BN-Jester, UCF101 frame dumps) or video files
  ``root/<video id>.webm`` (Something-Something v2), and a CSV of ``id;label`` or ``id,label``
  rows (an optional header row whose second column is ``label`` or ``class``), Kinetics'
  annotation CSV (``label,youtube_id,time_start,time_end,...``: files ``<youtube_id>_<start:06d>_
  <end:06d>.mp4``; clips never downloaded are skipped and counted), or a JSON list of
  ``{"id", "label"}`` / ``{"id", "template"}`` objects. Class names come from ``classes`` (e.g. a
  labels file, one name a line, or SSv2's labels.json) or are the labels in sorted order.
* Official splits: ``read_video_list`` + ``select_listed`` (UCF101's trainlist/testlist);
  ``split_videos(groups=ucf101_groups(videos))`` splits by source video.

Scanning probes every video (frame count; a video file must decode its first frame): unreadable
and too-short videos are left out with a ``SkippedVideoWarning`` each and counted in the returned
``VideoSet``. Video files' probes are cached across runs (``index_cache``), so a large set is probed
once. Layout problems raise ``DataError`` (one line).

``VideoClipDataset`` turns the scanned videos into ``(clip, label)`` samples: ``clip`` is
``3 × frames × H × W`` float32 (``transforms``), one clip per video; for multi-view testing
(``clips``/``crops`` above 1) it is ``views × 3 × frames × H × W``, every view of one video.
Training samples draw their start frame and crop from ``(seed, epoch, index)``: key a sample as
``dataset[(index, epoch)]`` (a plain int means epoch 0), so that data-loader workers and resumed
runs see the same clips. It holds only paths and numbers, so it pickles to loader workers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import json
import os
import re
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .index_cache import FrameCountCache
from .transforms import KINETICS_MEAN, KINETICS_STD, ClipSampler, ClipTransform
from .video_io import (IMAGE_EXTENSIONS, DataError, UnreadableVideo, count_frames, is_video_file,
                       iter_frames, read_frames, require_pyav)

__all__ = ["SkippedVideoWarning", "VideoItem", "VideoSet", "scan_class_folders", "scan_frame_folders",
           "read_class_names", "read_video_list", "read_views", "select_listed", "sliding_windows",
           "split_videos", "ucf101_groups", "VideoClipDataset"]


class SkippedVideoWarning(UserWarning):
    """A video left out of a data set (unreadable or too short)."""


@dataclasses.dataclass(frozen=True)
class VideoItem:
    path: str  # a video file or a folder of frames
    label: int
    num_frames: int


@dataclasses.dataclass
class VideoSet:
    """What a scan found: usable videos, class names, and the videos it left out (path, reason)."""

    videos: List[VideoItem]
    class_names: List[str]
    unreadable: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    too_short: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.unreadable) + len(self.too_short)


def _is_frame_folder(path: str) -> bool:
    try:
        return os.path.isdir(path) and any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(path))
    except OSError:
        return False


def _visible(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def _some(names: Sequence[str]) -> str:
    """``3: a, b, c`` / ``40: a, b, c, d, e, ...``: class names for a one-line message."""
    names = list(names)
    return f"{len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"


def _check_root(root: str, what: str) -> None:
    if not os.path.exists(root):
        raise DataError(f"{what} not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"{what} {root} is not a folder")


def _folder_spelling(name: str) -> str:
    """A class name as folder names spell it in any case, with underscores or spaces."""
    return name.replace("_", " ").casefold()


def scan_class_folders(root: str, sampler: ClipSampler, class_names: Optional[Sequence[str]] = None,
                       workers: int = 8, index_cache: bool = True) -> VideoSet:
    """Videos under ``root/<class>/``. With ``class_names`` (e.g. the training set's, for a
    validation folder) every subfolder must be one of them, and labels follow their order; a folder
    matches a name that differs only in case and in underscores for spaces (Kinetics downloaders
    write ``air_drumming/`` for the class "air drumming"). ``index_cache``: reuse and update the
    frame counts cached for this root (``index_cache`` module)."""
    _check_root(root, "data folder")
    entries = _visible(root)
    stray = [n for n in entries if not os.path.isdir(os.path.join(root, n))]
    if stray:
        raise DataError(f"{root} must hold one subfolder per class, but holds files such as {stray[0]!r} "
                        f"(for a folder of frame folders give --labels CSV)")
    if not entries:
        raise DataError(f"{root} holds no class subfolders")
    if class_names is None:
        class_names = entries
    index = {name: i for i, name in enumerate(class_names)}
    spelled = {_folder_spelling(name): i for i, name in enumerate(class_names)}
    for name in entries:
        if name not in index and _folder_spelling(name) in spelled:
            index[name] = spelled[_folder_spelling(name)]
    unknown = [n for n in entries if n not in index]
    if unknown:
        raise DataError(f"{root}: class folder {unknown[0]!r} is not one of the training classes "
                        f"({_some(class_names)})")
    candidates = []
    for name in entries:
        folder = os.path.join(root, name)
        videos = [os.path.join(folder, n) for n in _visible(folder)]
        videos = [p for p in videos if is_video_file(p) or _is_frame_folder(p)]
        if not videos:
            raise DataError(f"class folder {folder} holds no videos (video files or folders of frame images)")
        candidates += [(p, index[name]) for p in videos]
    return _probe(candidates, list(class_names), sampler, workers, FrameCountCache(root) if index_cache else None)


def _csv_rows(path: str) -> List[List[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = ";" if ";" in first else ","  # Jester writes id;label, others id,label
    return [[field.strip() for field in row] for row in csv.reader(text.splitlines(), delimiter=delimiter)
            if row and any(field.strip() for field in row)]


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None


def read_class_names(path: str) -> List[str]:
    """Class names in order from a labels file: one name a line (20BN-Jester's labels CSV),
    ``INDEX NAME`` lines (UCF101's classInd.txt), or JSON: a list of names, or a mapping of name to
    index (Something-Something v2's labels.json)."""
    if path.lower().endswith(".json"):
        loaded = _load_json(path, "class list")
        if isinstance(loaded, dict):
            try:
                names = [name for name, _ in sorted(loaded.items(), key=lambda item: int(item[1]))]
            except (TypeError, ValueError):
                raise DataError(f"class list {path}: a JSON mapping must map names to indices") from None
        elif isinstance(loaded, list) and all(isinstance(name, str) for name in loaded):
            names = loaded
        else:
            raise DataError(f"class list {path}: expected a JSON list of names or a mapping of name to index")
        lines = names
    else:
        if not os.path.isfile(path):
            raise DataError(f"class list not found: {path}")
        try:
            with open(path, encoding="utf-8-sig") as f:
                lines = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read class list {path}: {exc}") from None
        numbered = [re.fullmatch(r"\d+[\s,;]+(.+)", line) for line in lines]
        names = [m.group(1).strip() for m in numbered] if lines and all(numbered) else lines
    if not names:
        raise DataError(f"class list {path} is empty")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataError(f"class list {path} names {duplicate!r} twice")
    return names


def _json_labels(path: str) -> List[Tuple[str, str]]:
    """(video id, label) of a JSON list of ``{"id": ..., "label": ...}`` objects; where an object has
    a ``template`` (Something-Something v2) the class is the template without its brackets
    ("Putting [something] on [something]" is class "Putting something on something")."""
    entries = _load_json(path, "labels JSON")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"labels JSON {path}: expected a non-empty list of {{\"id\": ..., \"label\": ...}} objects")
    rows = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise DataError(f"labels JSON {path}: entry {i} is not an object with an \"id\"")
        if "template" in entry:
            label = str(entry["template"]).replace("[", "").replace("]", "")
        elif "label" in entry:
            label = str(entry["label"])
        else:
            raise DataError(f"labels JSON {path}: entry {i} (id {entry['id']}) has no \"label\" or \"template\" "
                            f"(a test split without labels?)")
        rows.append((str(entry["id"]), label))
    return rows


def _video_sources(root: str) -> Dict[str, str]:
    """Video id → path under ``root``: a folder of frames ``root/<id>/`` or a video file
    ``root/<id>.<ext>`` (Something-Something v2's ``<id>.webm``), also by its full name."""
    sources = {}
    for name in _visible(root):
        path = os.path.join(root, name)
        if is_video_file(path) and os.path.isfile(path):
            sources.setdefault(os.path.splitext(name)[0], path)
            sources[name] = path
        elif os.path.isdir(path):
            sources[name] = path
    return sources


KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def _kinetics_labels(path: str, rows: List[List[str]]) -> List[Tuple[str, str]]:
    """(video id, label) of a Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split``):
    the id is the name the downloaders give the clip, ``<youtube_id>_<start:06d>_<end:06d>``."""
    header = [column.lower() for column in rows[0]]
    at = {column: header.index(column) for column in KINETICS_COLUMNS}
    labelled = []
    for line, row in enumerate(rows[1:], 2):
        try:
            fields = {column: row[i] for column, i in at.items()}
            start, end = int(float(fields["time_start"])), int(float(fields["time_end"]))
        except (IndexError, ValueError):
            raise DataError(f"Kinetics annotations {path}: line {line} {','.join(row)!r} lacks a label, "
                            f"youtube_id or integer times") from None
        labelled.append((f"{fields['youtube_id']}_{start:06d}_{end:06d}", fields["label"]))
    if not labelled:
        raise DataError(f"Kinetics annotations {path} have no rows")
    return labelled


def _read_labels(path: str, sources: Dict[str, str]) -> Tuple[List[Tuple[str, str]], bool]:
    """(video id, label) rows of a labels CSV or JSON, and whether they are Kinetics annotations."""
    if path.lower().endswith(".json"):
        return _json_labels(path), False
    if not os.path.isfile(path):
        raise DataError(f"labels CSV not found: {path}")
    try:
        rows = _csv_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read labels CSV {path}: {exc}") from None
    if rows and all(column in [c.lower() for c in rows[0]] for column in KINETICS_COLUMNS):
        return _kinetics_labels(path, rows), True
    if rows and len(rows[0]) >= 2 and rows[0][1].lower() in ("label", "class", "class_name", "category") \
            and rows[0][0] not in sources:
        rows = rows[1:]  # a header row
    if not rows:
        raise DataError(f"labels CSV {path} has no rows")
    for line, row in enumerate(rows, 1):
        if len(row) != 2 or not row[0] or not row[1]:
            raise DataError(f"labels CSV {path}: row {line} {';'.join(row)!r} is not 'video id;label' "
                            f"or 'video id,label'")
    return [(row[0], row[1]) for row in rows], False


def scan_frame_folders(root: str, labels_csv: str, sampler: ClipSampler,
                       class_names: Optional[Sequence[str]] = None, workers: int = 8,
                       index_cache: bool = True) -> VideoSet:
    """Videos named by id directly under ``root`` — frame folders ``root/<video id>/`` (20BN-Jester)
    or video files ``root/<video id>.<ext>`` (Something-Something v2) — labelled by ``labels_csv``
    (CSV rows ``id;label``/``id,label``, or a JSON list of objects, see ``_json_labels``). Class
    names: ``class_names`` if given (every label must be one of them), else the labels in sorted
    order."""
    _check_root(root, "frames folder")
    sources = _video_sources(root)
    rows, kinetics = _read_labels(labels_csv, sources)
    if class_names is None:
        class_names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise DataError(f"labels CSV {labels_csv}: label {unknown[0]!r} is not a known class "
                        f"({_some(class_names)})")
    missing = [vid for vid, _ in rows if vid not in sources]
    # Kinetics: part of any copy was never downloaded (videos taken off YouTube), so those are
    # skipped and counted; elsewhere a missing video is a mistake (a typo, another root)
    if missing and (not kinetics or len(missing) == len(rows)):
        raise DataError(f"labels CSV {labels_csv}: {len(missing)} of {len(rows)} video ids name no "
                        f"frame folder or video file under {root} (first: {missing[0]!r})")
    candidates = [(sources[vid], index[label]) for vid, label in rows if vid in sources]
    # video files' probes are cached (frame folders: listing one is what counting it costs)
    found = _probe(candidates, list(class_names), sampler, workers, FrameCountCache(root) if index_cache else None)
    for vid in missing:
        found.unreadable.append((os.path.join(root, vid), "not downloaded (no such file)"))
    if missing:
        warnings.warn(f"skipped {len(missing)} of {len(rows)} annotated Kinetics clips that are not under {root} "
                      f"(first: {missing[0]}): not downloaded", SkippedVideoWarning, stacklevel=2)
    return found


def _probe_one(path: str) -> Union[int, str]:
    try:
        return count_frames(path)
    except UnreadableVideo as exc:
        return str(exc)


def _probe(candidates: Sequence[Tuple[str, int]], class_names: List[str], sampler: ClipSampler,
           workers: int, cache: Optional[FrameCountCache]) -> VideoSet:
    """Frame counts of ``candidates`` (in threads: decoding and file I/O release the GIL; video
    files found unchanged in ``cache`` are not opened); the unreadable and too-short ones are left
    out, with a warning each."""
    paths = [p for p, _ in candidates]
    counts: List[Optional[Union[int, str]]] = [None] * len(paths)
    if cache is not None:
        counts = [cache.get(p) if is_video_file(p) else None for p in paths]
    todo = [i for i, count in enumerate(counts) if count is None]
    if any(is_video_file(paths[i]) for i in todo):
        require_pyav()  # one clear error before any thread starts, not one per video
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for i, count in zip(todo, pool.map(_probe_one, [paths[i] for i in todo])):
            counts[i] = count
            if cache is not None and is_video_file(paths[i]):
                cache.put(paths[i], count)
    if cache is not None:
        cache.save()
    found = VideoSet([], class_names)
    for (path, label), count in zip(candidates, counts):
        if isinstance(count, str):
            found.unreadable.append((path, count))
            warnings.warn(f"skipped unreadable video {path}: {count}", SkippedVideoWarning, stacklevel=2)
        elif not sampler.fits(count):
            reason = f"{count} frames, fewer than {sampler.shortest}"
            found.too_short.append((path, reason))
            warnings.warn(f"skipped too-short video {path}: {reason}", SkippedVideoWarning, stacklevel=2)
        else:
            found.videos.append(VideoItem(path, label, count))
    return found


_UCF101_GROUP = re.compile(r"_g(\d+)_c\d+$")  # v_<Class>_g08_c01: clip 1 of group (source video) 8


def ucf101_groups(videos: Sequence[VideoItem]) -> Optional[List[str]]:
    """The source-video group of each video when every name follows UCF101's ``v_<Class>_gNN_cNN``
    (clips cut from one long video share a group, and look alike), else None."""
    groups = []
    for video in videos:
        match = _UCF101_GROUP.search(os.path.splitext(os.path.basename(video.path))[0])
        if match is None:
            return None
        groups.append(match.group(1))
    return groups


def split_videos(videos: Sequence[VideoItem], fraction: float, seed: int,
                 groups: Optional[Sequence[str]] = None) -> Tuple[List[VideoItem], List[VideoItem]]:
    """(train, val): ``fraction`` of each class's videos (rounded, at least one where a class has
    two or more) chosen by ``seed``, the same every run. With ``groups`` (a key per video, e.g.
    ``ucf101_groups``) whole groups of a class go one way, so that no clip of a source video is
    validated on while others are trained on (``fraction`` of each class's groups)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
    if groups is not None and len(groups) != len(videos):
        raise ValueError(f"{len(groups)} groups for {len(videos)} videos")
    by_class: Dict[int, Dict[str, List[int]]] = {}
    for i, video in enumerate(videos):  # a video of its own is a group of one
        key = groups[i] if groups is not None else str(i)
        by_class.setdefault(video.label, {}).setdefault(key, []).append(i)
    val = set()
    for label, by_group in sorted(by_class.items()):
        members = list(by_group.values())  # in the order of first appearance
        rng = np.random.default_rng([seed, label])
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        for j in rng.permutation(len(members))[:take]:
            val.update(members[j])
    return ([v for i, v in enumerate(videos) if i not in val],
            [v for i, v in enumerate(videos) if i in val])


def read_video_list(path: str, root: str) -> List[str]:
    """The videos a split list names (UCF101's ``trainlist01.txt``/``testlist01.txt``): one a line,
    a path relative to ``root`` first (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi``), anything
    after it (UCF101's class index) ignored, blank lines and ``#`` comments skipped. Returns the
    normalised paths under ``root``."""
    if not os.path.isfile(path):
        raise DataError(f"video list not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read video list {path}: {exc}") from None
    entries = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DataError(f"video list {path} names no videos")
    return [os.path.normpath(os.path.join(root, entry.replace("\\", "/"))) for entry in entries]


def select_listed(found: VideoSet, listed: Sequence[str], list_path: str) -> List[VideoItem]:
    """The videos of ``found`` that ``listed`` (``read_video_list``) names, in the scan's order.
    Listed videos the scan left out (unreadable, too short) are left out here too; one the scan
    never saw (a typo, another root, a class it lacks) is a DataError."""
    wanted: set = set()
    for path in listed:
        if path in wanted:
            raise DataError(f"video list {list_path} names {path} twice")
        wanted.add(path)
    seen = {os.path.normpath(v.path) for v in found.videos}
    seen |= {os.path.normpath(p) for p, _ in found.unreadable + found.too_short}
    missing = [p for p in listed if p not in seen]
    if missing:
        raise DataError(f"video list {list_path}: {len(missing)} of {len(listed)} listed videos are not in "
                        f"the data folder's class folders (first: {missing[0]})")
    return [v for v in found.videos if os.path.normpath(v.path) in wanted]


def sliding_windows(source: str, sampler: ClipSampler, hop: int, folder_fps: float = 25.0
                    ) -> Iterator[Tuple[int, float, float, np.ndarray]]:
    """Clips along a whole video, decoded once as it plays: ``(first frame, its time, the last
    frame's time, T × H × W × 3 frames)`` of a clip of ``sampler.frames`` frames ``sampler.stride``
    apart starting every ``hop`` frames, for as long as whole clips fit; a video shorter than one
    clip gives the clip ``sampler`` takes of it (looped or at a lower stride). Holds one clip's
    span of frames at a time. Raises UnreadableVideo, or ValueError for a video too short even so."""
    if hop < 1:
        raise ValueError(f"hop must be at least 1 frame, got {hop}")
    span = (sampler.frames - 1) * sampler.stride + 1
    buffer: collections.deque = collections.deque()  # (index, time, frame) from the next clip's start on
    start, emitted = 0, False
    for index, time, frame in iter_frames(source, folder_fps):
        if index < start:
            continue
        buffer.append((index, time, frame))
        if index == start + span - 1:
            clip = list(buffer)[::sampler.stride]
            yield start, clip[0][1], time, np.stack([f for _, _, f in clip])
            emitted, start = True, start + hop
            while buffer and buffer[0][0] < start:
                buffer.popleft()
    if not emitted:
        if not buffer:
            raise UnreadableVideo("no frame decodes")
        indices = sampler.indices(len(buffer))
        yield 0, buffer[0][1], buffer[-1][1], np.stack([buffer[i][2] for i in indices])


def read_views(source: str, num_frames: int, sampler: ClipSampler, transform: ClipTransform, clips: int = 1,
               crops: int = 1) -> torch.Tensor:
    """``clips·crops × 3 × T × H × W``: ``clips`` clips spread over a video of ``num_frames``
    frames (``ClipSampler.spread``), ``crops`` crops of each (``ClipTransform.views``), crops of
    the first clip first; decoded in one pass. Odd counts include the centred clip and centre crop.
    Raises UnreadableVideo, or ValueError for a video too short for ``sampler``."""
    indices = sampler.spread(num_frames, clips)  # clips × frames
    frames = read_frames(source, indices.reshape(-1).tolist())
    frames = frames.reshape(clips, sampler.frames, *frames.shape[1:])
    return torch.cat([transform.views(f, crops) for f in frames])


class VideoClipDataset(Dataset):
    """One ``(clip, label)`` per video: ``clip`` ``3 × frames × H × W`` float32 (see the module doc).

    Args:
        videos: from a scan (``VideoSet.videos``) or ``split_videos``.
        class_names: names of the labels.
        frames, stride, min_frames: clip sampling (``ClipSampler``).
        size: ``(height, width)`` of the crop; ``short_side`` the resize before it.
        train: random start and crop (from ``seed``, the epoch and the index) or centred ones.
        mean, std: per-channel statistics of pixels in [0, 1].
        flip, short_side_range: training augmentation (``ClipTransform``): mirrored clips, scale jitter.
        clips, crops: evaluation only: ``clips`` clips spread over each video (``ClipSampler.spread``)
            times ``crops`` crops of each (``ClipTransform.views``), a sample's ``views`` stacked
            clip by clip (crops of the first clip first). The video's score is their mean.
    """

    def __init__(self, videos: Sequence[VideoItem], class_names: Sequence[str], frames: int,
                 size: Union[int, Sequence[int]], stride: int = 1, train: bool = False, seed: int = 0,
                 min_frames: Optional[int] = None, short_side: Optional[int] = None,
                 mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD,
                 clips: int = 1, crops: int = 1, flip: bool = False,
                 short_side_range: Optional[Tuple[int, int]] = None):
        if clips < 1 or crops < 1:
            raise ValueError(f"clips and crops must be at least 1, got clips={clips}, crops={crops}")
        if train and clips * crops > 1:
            raise ValueError("several clips or crops per video are for evaluation (train=False): a "
                             "training sample is one random clip")
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.clips, self.crops = clips, crops
        self.videos = list(videos)
        self.class_names = list(class_names)
        self.sampler = ClipSampler(frames, stride, min_frames)
        self.transform = ClipTransform(size, short_side, tuple(mean), tuple(std), flip, short_side_range)
        self.train = train
        self.seed = seed
        self.decode_failures = 0  # videos that failed after the scan (this process only)

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def labels(self) -> List[int]:
        """The class of every sample, without decoding it."""
        return [video.label for video in self.videos]

    @property
    def views(self) -> int:
        """Clips a sample holds: 1 (a ``3 × T × H × W`` clip) or ``clips × crops`` (stacked)."""
        return self.clips * self.crops

    def _rng(self, index: int, epoch: int) -> Optional[np.random.Generator]:
        return np.random.default_rng([self.seed, epoch, index]) if self.train else None

    def clip(self, video: VideoItem, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """The clip of one video (random with ``rng``, centred without), or its stacked views.
        Raises UnreadableVideo."""
        if self.views == 1:
            frames = read_frames(video.path, self.sampler.indices(video.num_frames, rng).tolist())
            return self.transform(frames, rng)
        return read_views(video.path, video.num_frames, self.sampler, self.transform, self.clips, self.crops)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        # a video that decoded at scan time but fails now (damaged further in): warn and take the
        # next one, so one bad file does not end a long run
        for attempt in range(min(len(self), 10)):
            video = self.videos[(index + attempt) % len(self)]
            try:
                return self.clip(video, self._rng(index, epoch)), video.label
            except UnreadableVideo as exc:
                self.decode_failures += 1
                warnings.warn(f"skipped unreadable video {video.path}: {exc}", SkippedVideoWarning)
        raise UnreadableVideo(f"{min(len(self), 10)} videos in a row failed to decode, from "
                              f"{self.videos[index].path}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} videos, {len(self.class_names)} classes, "
                f"frames={self.sampler.frames}, stride={self.sampler.stride}, size={self.transform.size}, "
                f"train={self.train}" + (f", clips={self.clips}, crops={self.crops}" if self.views > 1 else "")
                + ")")

