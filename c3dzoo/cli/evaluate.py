"""``c3dzoo evaluate``: the accuracy of a training checkpoint (or an ensemble of them) on a labelled
video set, tested the way video models are reported: several clips spread over each video times
several crops of each (``--clips 10 --crops 3``), the video scored by the mean probability over
its views. Prints video-level top-1/top-5 beside what one view alone scores and per-class
accuracy; ``--out DIR`` writes report.json, predictions.csv and confusion.png."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
import warnings

import torch
from tqdm import tqdm

from c3dzoo import evaluation, transfer
from c3dzoo.data import (DataError, SkippedVideoWarning, UnreadableVideo, VideoClipDataset, read_video_list,
                         select_listed)

from ._common import (PROG, CommandError, UsageError, add_view_options, backend_arg, backend_choices, check_views,
                      inputs_after_checkpoints, resolve_device)
from .predict import _clip_maker, _load_models, synthetic_validation
from .train_data import _report_skips, _scan

REPORT_JSON, PREDICTIONS_CSV, CONFUSION_PNG = "report.json", "predictions.csv", "confusion.png"
MAX_PER_CLASS_PRINTED = 20  # more classes: the lowest few are printed, all are in report.json
MAX_FAILURES_PRINTED = 10


def _dataset(args: argparse.Namespace, checkpoint: dict, names):
    """The labelled videos to test on, with the checkpoint's clip making, and what to call them."""
    if args.synthetic is not None:
        if args.clips * args.crops > 1:
            raise UsageError("--clips/--crops take several views of real videos; a synthetic clip is one view")
        data = synthetic_validation(checkpoint, args.synthetic)
        return data, [f"synthetic val[{i}]" for i in range(len(data))], f"{len(data)} synthetic validation clips"
    sampler, transform = _clip_maker(checkpoint)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedVideoWarning)
            scan = _scan(args.data, args.labels, sampler, names, min(8, os.cpu_count() or 1))
        videos = scan.videos
        if args.list:  # an official split's test list
            videos = select_listed(scan, read_video_list(args.list, args.data), args.list)
        data = VideoClipDataset(videos, names, sampler.frames, transform.size, stride=sampler.stride,
                                min_frames=sampler.min_frames, short_side=transform.resize_to,
                                mean=transform.mean, std=transform.std, clips=args.clips, crops=args.crops)
    except (DataError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    _report_skips(caught)
    if not len(data):
        raise UsageError(f"{args.data}: no readable videos")
    skipped = len(scan.unreadable) + len(scan.too_short)
    where = args.data + "".join(f" ({os.path.basename(f)})" for f in (args.labels, args.list) if f)
    return (data, [v.path for v in data.videos],
            f"{len(data)} videos from {where}" + (f" ({skipped} skipped)" if skipped else ""))


class _EachVideo(torch.utils.data.Dataset):
    """``(index, views, label)`` of every video, or ``(index, reason, label)`` for one that fails to
    decode now (it passed the scan): a test scores each video itself or leaves it out, where
    ``VideoClipDataset`` would put the next video in its place to keep a training run going."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if not isinstance(self.data, VideoClipDataset):
            return (index, *self.data[index])
        video = self.data.videos[index]
        try:
            return index, self.data.clip(video), video.label
        except UnreadableVideo as exc:
            return index, str(exc), video.label


def _collate(items):
    """(indices, clips, labels) of the videos that decoded, or None, and [(index, reason)] of the others."""
    decoded = [item for item in items if isinstance(item[1], torch.Tensor)]
    failed = [(index, reason) for index, reason, _ in items if not isinstance(reason, torch.Tensor)]
    if not decoded:
        return None, failed
    return (torch.tensor([i for i, _, _ in decoded]), torch.stack([c for _, c, _ in decoded]),
            torch.tensor([label for _, _, label in decoded])), failed


def _cmd_evaluate(args: argparse.Namespace) -> int:
    inputs_after_checkpoints(args, "data")
    check_views(args)
    if (args.data is None) == (args.synthetic is None):
        raise UsageError("give a labelled data folder or --synthetic N (one of them)")
    if (args.labels or args.list) and args.data is None:
        raise UsageError(f"{'--labels' if args.labels else '--list'} names videos of a data folder: give DATA as well")
    if args.labels and args.list:
        raise UsageError("--list picks videos of class folders; videos named by id are picked by their --labels")
    for option in ("batch_size", "synthetic"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be non-negative, got {args.workers}")
    device = resolve_device(args.device)
    workers = args.workers
    if workers is None:  # decoding has to keep up with a GPU
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    amp = device.type == "cuda" if args.amp is None else args.amp
    checkpoints, models, names = _load_models(args.checkpoint, device)
    for model in models:  # the stock models the checkpoints build, computing through the fused op
        model.fused, model.backend = args.fused, backend_arg(args.backend)
    data, video_names, description = _dataset(args, checkpoints[0], names)
    views = getattr(data, "views", 1)
    loader = torch.utils.data.DataLoader(_EachVideo(data), batch_size=max(1, args.batch_size // views),
                                         num_workers=workers, collate_fn=_collate)
    probs, labels, tested, failures, view_hits = [], [], [], [], 0
    start = time.perf_counter()
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with tqdm(total=len(data), desc="evaluate", unit="video", disable=not progress) as bar:
        for batch, failed in loader:
            failures += failed
            bar.update(len(failed))
            if batch is None:
                continue
            indices, clips, truth = batch
            flat = clips.flatten(0, 1) if views > 1 else clips
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    view_probs = transfer.ensemble_probabilities(models, flat.to(device), batch_size=args.batch_size)
            except (ValueError, RuntimeError) as exc:
                raise UsageError(f"clips of shape {tuple(flat.shape[1:])} do not fit the model: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
            combined = view_probs.combined.view(len(truth), views, -1)
            view_hits += int((combined.argmax(2) == truth[:, None]).sum())
            probs.append(combined.mean(1))  # the mean over a video's views
            labels.append(truth)
            tested += indices.tolist()
            bar.update(len(truth))
    seconds = time.perf_counter() - start
    for index, reason in failures[:MAX_FAILURES_PRINTED]:
        print(f"{PROG}: warning: left out {video_names[index]}, which no longer decodes: {reason}", file=sys.stderr)
    if len(failures) > MAX_FAILURES_PRINTED:
        print(f"{PROG}: warning: ... and {len(failures) - MAX_FAILURES_PRINTED} more", file=sys.stderr)
    if not tested:
        raise CommandError(f"none of the {len(data)} videos decoded")
    if failures:
        description += f", {len(failures)} left out (no longer decode)"
    probs, labels, video_names = torch.cat(probs), torch.cat(labels), [video_names[i] for i in tested]
    report = evaluation.evaluate(probs, labels, names)
    one_view = view_hits / (len(labels) * views)
    ensemble = f"an ensemble of {len(models)}" if len(models) > 1 else args.checkpoint[0]
    per_video = (f"{args.clips} clip(s) x {args.crops} crop(s) a video" if views > 1 else "one centred clip a video")
    print(f"{ensemble} on {description}, {per_video}: top-1 {100 * report.top1:.1f} %  "
          f"top-{report.top5_k} {100 * report.top5:.1f} %"
          + (f"  (one view: top-1 {100 * one_view:.1f} %)" if views > 1 else "")
          + f"; {len(labels) * views / max(seconds, 1e-9):.1f} clips/s on {device}")
    print(f"per class: {report.per_class_line(MAX_PER_CLASS_PRINTED)}")
    if args.out:
        _write(args, report, probs, labels, video_names, dict(
            checkpoints=list(args.checkpoint), data=description, clips=args.clips, crops=args.crops,
            # the mean negative log of the true class's probability (train's val_loss)
            loss=float(-probs.gather(1, labels[:, None]).clamp_min(torch.finfo(torch.float32).tiny).log().mean()),
            views=views, one_view_top1=one_view, fused=args.fused, device=str(device), amp=amp))
    return 0


def _write(args, report: evaluation.Report, probs, labels, video_names, settings: dict) -> None:
    """report.json, predictions.csv and (with matplotlib) confusion.png in ``args.out``."""
    written = [REPORT_JSON, PREDICTIONS_CSV]
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, REPORT_JSON), "w") as f:
            json.dump({**settings, **report.as_dict()}, f, indent=1)
        k = min(5, probs.shape[1])
        top = probs.topk(k, dim=1)
        with open(os.path.join(args.out, PREDICTIONS_CSV), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "true", "predicted", "probability", f"top{k}"])
            for name, truth, values, indices in zip(video_names, labels.tolist(), top.values.tolist(),
                                                    top.indices.tolist()):
                writer.writerow([name, report.class_names[truth], report.class_names[indices[0]],
                                 f"{values[0]:.6f}", " ".join(report.class_names[i] for i in indices)])
        if importlib.util.find_spec("matplotlib") is not None:
            evaluation.save_confusion_matrix_png(report.confusion, os.path.join(args.out, CONFUSION_PNG),
                                                 report.class_names, title="evaluation")
            written.append(CONFUSION_PNG)
    except OSError as exc:
        raise CommandError(f"cannot write to {args.out}: {exc}") from None
    print(f"wrote {', '.join(written)} to {args.out}")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="accuracy of a training checkpoint (or an ensemble) on labelled videos, multi-view",
        description="Top-1/top-5 and per-class accuracy of c3dzoo train checkpoints on a labelled video set "
                    "(class folders, or videos named by id with --labels), clips made as the checkpoint's training "
                    "validated them. With --clips/--crops each video is tested on several views and scored by "
                    "their mean probability, as video models are reported; what one view alone scores is "
                    "printed beside it.")
    p.add_argument("data", nargs="?", metavar="DATA",
                   help="a folder with one subfolder per class of videos (files or frame folders), or with "
                        "--labels a folder of videos named by id; the classes must be the checkpoint's")
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                   help="from c3dzoo train, or published weights by name (r3d_18:kinetics400); several: an "
                        "ensemble (the mean of their class probabilities)")
    p.add_argument("--labels", metavar="CSV",
                   help="labels of the videos named by id under DATA ('video id;label' rows, or JSON as train takes)")
    p.add_argument("--list", metavar="FILE",
                   help="only the videos of DATA this list names, one 'Class/video.avi' a line (an official "
                        "split's test list: UCF101's testlist01.txt)")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="instead of DATA: the first N clips of the checkpoint's synthetic validation split")
    add_view_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="clips a forward pass (default %(default)s)")
    p.add_argument("--workers", type=int, help="data loader workers decoding videos (default: 0 on the CPU, up to "
                                                "8 on CUDA, so that decoding keeps up with the GPU)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="compute through the fused op (default) or stock PyTorch")
    p.add_argument("--backend", choices=backend_choices(), default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--out", metavar="DIR", help="write report.json, predictions.csv and confusion.png here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a tqdm progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=_cmd_evaluate)
    return p
