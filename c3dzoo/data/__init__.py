"""Video data sets: a built-in synthetic one and loaders for real layouts (folders of videos with
one subfolder per class, frame folders with a CSV of labels), and batch mixing (MixUp, CutMix)."""

from .folders import (SkippedVideoWarning, VideoClipDataset, VideoItem, VideoSet, read_class_names,
                      read_video_list, read_views, scan_class_folders, scan_frame_folders, select_listed,
                      sliding_windows, split_videos, ucf101_groups)
from .mixing import BatchMixing, mix_batch
from .synthetic import MOTIONS, Motion, SyntheticVideoDataset
from .transforms import KINETICS_MEAN, KINETICS_STD, ClipSampler, ClipTransform
from .video_io import DataError, UnreadableVideo, count_frames, iter_frames, read_frames

__all__ = ["SyntheticVideoDataset", "Motion", "MOTIONS",
           "VideoClipDataset", "VideoItem", "VideoSet", "SkippedVideoWarning", "scan_class_folders",
           "scan_frame_folders", "read_class_names", "read_video_list", "read_views", "select_listed",
           "sliding_windows",
           "split_videos", "ucf101_groups",
           "ClipSampler", "ClipTransform", "KINETICS_MEAN", "KINETICS_STD", "BatchMixing", "mix_batch",
           "DataError", "UnreadableVideo", "count_frames", "read_frames", "iter_frames"]
