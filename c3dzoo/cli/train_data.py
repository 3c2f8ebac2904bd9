"""``c3dzoo train``'s data: the built-in synthetic set, or real videos (class folders, or frame
folders with a CSV of labels) with a validation split; skipped videos warned about and counted."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from typing import Optional

import torch

from c3dzoo.data import (ClipSampler, ClipTransform, DataError, SkippedVideoWarning, SyntheticVideoDataset,
                         VideoClipDataset, read_class_names, read_video_list, scan_class_folders, scan_frame_folders,
                         select_listed, split_videos, ucf101_groups)

from ._common import PROG, UsageError

DEFAULT_VAL_SPLIT = 0.1  # of a real training set, when no --val-data/--val-labels is given


# options that only mean something with --data
REAL_DATA_OPTIONS = ("labels", "val_data", "val_labels", "val_split", "classes", "frame_stride", "min_frames",
                     "val_clips", "val_crops", "train_list", "val_list", "flip", "scale_jitter")
MAX_SKIP_LINES = 10  # warnings printed for skipped videos; the rest are counted
SYNTHETIC_CACHE_BYTES = 1 << 30  # rendered clips kept per synthetic set, loaded without workers


@dataclasses.dataclass
class TrainingData:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    description: str  # what the header line says the training set is
    config: dict  # how clips are made, for the checkpoint (predict reads it)
    unreadable: int = 0  # videos left out by the scans
    too_short: int = 0

    @property
    def skipped_note(self) -> str:
        if not self.unreadable + self.too_short:
            return ""
        return f"skipped {self.unreadable} unreadable and {self.too_short} too-short video(s)"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scan(root: str, labels: Optional[str], sampler, class_names, workers: int):
    if labels:
        return scan_frame_folders(root, labels, sampler, class_names, workers=workers)
    return scan_class_folders(root, sampler, class_names, workers=workers)


def _report_skips(caught) -> None:
    lines = [str(w.message) for w in caught if issubclass(w.category, SkippedVideoWarning)]
    for line in lines[:MAX_SKIP_LINES]:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    if len(lines) > MAX_SKIP_LINES:
        print(f"{PROG}: warning: ... and {len(lines) - MAX_SKIP_LINES} more skipped videos", file=sys.stderr)
    for w in caught:  # anything else goes on as a normal warning
        if not issubclass(w.category, SkippedVideoWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def make_data(args: argparse.Namespace) -> TrainingData:
    """The training and validation sets the options describe. Bad paths and layouts are usage
    errors; unreadable and too-short videos are left out with a warning each and counted."""
    if args.data is None:
        extra = [_option(k) for k in REAL_DATA_OPTIONS if getattr(args, k) is not None]
        if extra:
            raise UsageError(f"{extra[0]} is for real data: give --data PATH as well")
        data = dict(num_classes=args.num_classes, frames=args.frames, size=args.size, seed=args.seed,
                    # loaded in this process (no workers): each clip is rendered once, then served
                    # from memory (the CPU defaults: ~250 MB; rendering was ~15 % of their run)
                    cache_bytes=SYNTHETIC_CACHE_BYTES if args.workers == 0 else 0)
        try:
            train_set = SyntheticVideoDataset(num_samples=args.train_samples, split="train", **data)
            val_set = SyntheticVideoDataset(num_samples=args.val_samples, split="val", **data)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return TrainingData(train_set, val_set, f"{len(train_set)} synthetic clips", {"kind": "synthetic"})

    for key in ("train_samples", "val_samples"):
        if key in args.given:
            raise UsageError(f"{_option(key)} is for the synthetic set; with --data an epoch is one "
                             f"clip from each video")
    if sum(bool(x) for x in (args.val_split is not None, args.val_data or args.val_labels, args.val_list)) > 1:
        raise UsageError("give one of --val-data/--val-labels, --val-split and --val-list")
    if args.labels and (args.train_list or args.val_list):
        raise UsageError("--train-list/--val-list pick videos of class folders; videos named by id with --labels "
                         "are split by their labels files (--val-labels)")
    if args.labels and args.val_data and not args.val_labels:
        raise UsageError("--val-data with videos named by id needs --val-labels")
    val_split = args.val_split
    if val_split is None and not (args.val_data or args.val_labels or args.val_list):
        val_split = DEFAULT_VAL_SPLIT
    for key in ("val_clips", "val_crops"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UsageError(f"{_option(key)} must be at least 1, got {getattr(args, key)}")
    try:
        stride = 1 if args.frame_stride is None else args.frame_stride
        sampler = ClipSampler(args.frames, stride, args.min_frames)
        transform = ClipTransform(args.size)
        workers = min(8, os.cpu_count() or 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedVideoWarning)
            class_names = read_class_names(args.classes) if args.classes else None
            train_scan = _scan(args.data, args.labels, sampler, class_names, workers)
            val_scan = None
            if args.val_data or args.val_labels:
                val_scan = _scan(args.val_data or args.data, args.val_labels, sampler,
                                 train_scan.class_names, workers)
        _report_skips(caught)
        class_names = train_scan.class_names
        train_videos = train_scan.videos
        if args.train_list:  # an official split's training list
            train_videos = select_listed(train_scan, read_video_list(args.train_list, args.data), args.train_list)
        groups = None
        if args.val_list:
            val_videos = select_listed(train_scan, read_video_list(args.val_list, args.data), args.val_list)
            both = {v.path for v in val_videos} & {v.path for v in train_videos}
            if args.train_list and both:
                raise DataError(f"{len(both)} videos are in both --train-list and --val-list (e.g. {min(both)})")
            train_videos = [v for v in train_videos if v.path not in both]
        elif val_scan is not None:
            val_videos = val_scan.videos
        else:  # UCF101-named clips of one source video stay on one side of the split
            groups = ucf101_groups(train_videos)
            train_videos, val_videos = split_videos(train_videos, val_split, args.seed, groups)
    except (DataError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    unreadable = len(train_scan.unreadable) + (len(val_scan.unreadable) if val_scan else 0)
    too_short = len(train_scan.too_short) + (len(val_scan.too_short) if val_scan else 0)
    skipped = f" ({unreadable + too_short} skipped)" if unreadable + too_short else ""
    if len(class_names) < 2:
        raise UsageError(f"{args.data}: found {len(class_names)} class; classification needs at least 2")
    if "num_classes" in args.given and args.num_classes != len(class_names):
        raise UsageError(f"--num-classes {args.num_classes}, but {args.data} has {len(class_names)} classes")
    if not train_videos:
        raise UsageError(f"{args.data}: no readable training videos{skipped}")
    if not val_videos:
        raise UsageError(f"no validation videos{skipped}: give --val-data, or a --val-split that leaves "
                         f"some (classes need two videos or more to split)")
    args.num_classes = len(class_names)
    clips = dict(class_names=class_names, frames=args.frames, size=args.size, stride=stride,
                 seed=args.seed, min_frames=args.min_frames)
    config = dict(kind="videos", frames=args.frames, stride=stride, min_frames=args.min_frames,
                  size=tuple(args.size), short_side=transform.resize_to, mean=tuple(transform.mean),
                  std=tuple(transform.std))
    where = f"{args.data}" + (f" ({os.path.basename(args.labels)})" if args.labels else "")
    views = (args.val_clips or 1) * (args.val_crops or 1)
    how = ("listed" if args.val_list else "given" if val_scan is not None
           else f"split {val_split:g}" + (" by UCF101 source-video group" if groups else ""))
    split = (f", val {len(val_videos)} ({how}"
             + (f"; {args.val_clips or 1} clip(s) x {args.val_crops or 1} crop(s) a video" if views > 1 else "") + ")")
    try:  # augmentation for training clips only
        train_set = VideoClipDataset(train_videos, train=True, flip=bool(args.flip),
                                     short_side_range=args.scale_jitter, **clips)
    except ValueError as exc:  # a --scale-jitter below the crop
        raise UsageError(f"--scale-jitter: {exc}") from None
    val_set = VideoClipDataset(val_videos, train=False, clips=args.val_clips or 1, crops=args.val_crops or 1, **clips)
    return TrainingData(train_set, val_set,
                        f"{len(train_videos)} videos from {where} in {len(class_names)} classes{split}",
                        config, unreadable, too_short)
