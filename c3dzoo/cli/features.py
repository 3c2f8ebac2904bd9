"""``c3dzoo features`` (a layer's activations of clips, through the fused inference path, to a .pt
file) and ``c3dzoo linear-probe`` (a linear classifier on such a file: top-1/top-5, per-class
accuracy, a confusion-matrix PNG)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import warnings
from typing import List, Optional, Tuple

import torch

import c3dzoo
from c3dzoo import checkpoint as ckpt
from c3dzoo import evaluation, transfer
from c3dzoo.data import SyntheticVideoDataset

from ._common import (PROG, CommandError, UsageError, add_view_options, backend_arg, backend_choices,
                      builder_accepts, check_views, resolve_device, size_arg)

FEATURES_KIND = "c3dzoo features"  # marks the files `features` writes and `linear-probe` reads
# the layer a family's features come from by default: C3D's fc6 (the C3D paper's recipe), the
# Jester column's fc6, the video ResNets' pooled 512-d vector, S3D's average pool (averaged over
# its positions, as S3D's head does: 1024-d at any clip size), a ResNet3D's head pool (likewise:
# 2048-d), SlowFast's pooled and concatenated pathways (2304-d), X3D's head pool (its ProjectedPool:
# post_conv's output after its ReLU, averaged over positions: 2048-d)
def _head_pool(model) -> str:
    return f"blocks.{len(model.blocks) - 1}.pool"


DEFAULT_LAYER = {"C3D": "fc6", "ConvColumn": "fc6", "VideoResNet": "avgpool", "S3D": "avgpool",
                 "ResNet3D": _head_pool, "SlowFast": lambda model: f"blocks.{len(model.blocks) - 2}",
                 "X3D": _head_pool}
FALLBACK_INPUT = (16, 112, 112)  # frames, height, width for models without a fixed input size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# c3dzoo features
# --------------------------------------------------------------------------------------------


def _build_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, str, dict, dict]:
    """(model, model name, builder kwargs, {"args": ..., "data": ...} of the checkpoint or {})."""
    if args.checkpoint:
        if args.pretrained:
            raise UsageError("--pretrained goes with --model (a --checkpoint already holds its weights)")
        for option in ("num_classes", "width_mult"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} goes with --model; a --checkpoint "
                                 f"fixes its model")
        checkpoint = ckpt.load(args.checkpoint)
        model = ckpt.stock_model(checkpoint, args.checkpoint)
        saved = {"args": checkpoint.get("args") or {}, "data": checkpoint.get("data") or {}}
        return model, checkpoint["model_name"], dict(checkpoint["model_kwargs"]), saved
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.width_mult is not None:
        if not builder_accepts(args.model, "width_mult"):
            raise UsageError(f"--width-mult: model {args.model} has no width multiplier")
        kwargs["width_mult"] = args.width_mult
    if (args.frames or args.size) and builder_accepts(args.model, "input_size"):
        # the builder's own default fills what is not given
        frames0, *hw0 = inspect.signature(getattr(c3dzoo.models, args.model)).parameters["input_size"].default
        kwargs["input_size"] = (args.frames or frames0, *(args.size or hw0))
    try:
        model = c3dzoo.get_model(args.model, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot build {args.model}: {_first_line(exc)}") from None
    if args.pretrained:
        # the head is not needed for features before it, so a file with another class count is fine
        head = "load" if args.layer == transfer.head_name(model) else "skip"
        report = transfer.load_pretrained(model, args.pretrained, head=head)
        print(report)
    return model, args.model, kwargs, {}


def _input_size(model: torch.nn.Module, args: argparse.Namespace, saved: dict) -> Tuple[int, int, int]:
    """Frames, height, width of the clips: the options, else the checkpoint's training data, else
    the model's fixed input size."""
    fixed = getattr(model, "input_size", None)
    if fixed is None and type(model).__name__ == "ConvColumn":
        from c3dzoo.models.jester import INPUT_SIZE as fixed
    frames, hw = (fixed[0], tuple(fixed[1:])) if fixed else (FALLBACK_INPUT[0], FALLBACK_INPUT[1:])
    for trained in (saved.get("data") or {}, saved.get("args") or {}):
        if trained.get("frames") and trained.get("size"):
            frames, hw = trained["frames"], tuple(trained["size"])
            break
    return args.frames or frames, *(args.size or hw)


def _folder_dataset(root: str, model: torch.nn.Module, args: argparse.Namespace, saved: dict):
    """Centred clips (or ``--clips`` x ``--crops`` views) of the videos under ``root/<class>/``
    (c3dzoo.data's class-folder layout), sampled and normalised as the checkpoint's training videos
    were, where it had any."""
    from c3dzoo.data import ClipSampler, DataError, SkippedVideoWarning, VideoClipDataset, scan_class_folders

    config = saved.get("data") or {}
    config = config if config.get("kind") == "videos" else {}
    frames, height, width = _input_size(model, args, saved)
    clip_options = dict(stride=config.get("stride", 1), min_frames=config.get("min_frames"),
                        short_side=config.get("short_side"),
                        **{k: tuple(config[k]) for k in ("mean", "std") if k in config})
    try:
        sampler = ClipSampler(frames, clip_options["stride"], clip_options["min_frames"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedVideoWarning)
            scan = scan_class_folders(root, sampler, workers=min(8, os.cpu_count() or 1))
        data = VideoClipDataset(scan.videos, scan.class_names, frames, (height, width), clips=args.clips,
                                crops=args.crops, **clip_options)
    except (DataError, ValueError) as exc:
        raise UsageError(_first_line(exc)) from None
    skipped = [w for w in caught if issubclass(w.category, SkippedVideoWarning)]
    if skipped:
        print(f"{PROG}: warning: skipped {len(skipped)} unreadable or too-short video(s), e.g. "
              f"{skipped[0].message}", file=sys.stderr)
    if not len(data):
        raise UsageError(f"{root}: no readable videos")
    return data


def _load_clips(paths: List[str]) -> torch.Tensor:
    """Clips from .pt files, each a tensor 3 × T × H × W or a batch N × 3 × T × H × W."""
    clips = []
    for path in paths:
        if os.path.isdir(path):
            raise UsageError(f"{path}: give one data folder (root/<class>/<video>) on its own, or .pt clips")
        if not path.endswith(".pt"):
            raise UsageError(f"{path}: expected a .pt clip tensor (video files are not read yet)")
        if not os.path.isfile(path):
            raise UsageError(f"input not found: {path}")
        try:
            clip = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"cannot read {path}: {_first_line(exc)}") from None
        if isinstance(clip, torch.Tensor) and clip.dim() == 4:
            clip = clip[None]
        if not isinstance(clip, torch.Tensor) or clip.dim() != 5 or clip.shape[1] != 3:
            shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
            raise UsageError(f"{path}: expected a clip tensor 3 x T x H x W (or N x 3 x T x H x W), got {shape}")
        if clips and clip.shape[1:] != clips[0].shape[1:]:
            raise UsageError(f"{path}: clips of shape {tuple(clip.shape[1:])}, but {paths[0]} has "
                             f"{tuple(clips[0].shape[1:])}; all clips must have one size")
        clips.append(clip.float())
    return torch.cat(clips)


def _cmd_features(args: argparse.Namespace) -> int:
    if args.synthetic is None and not args.inputs:
        raise UsageError("give a data folder, clip files (.pt) or --synthetic N")
    if args.synthetic is not None and args.inputs:
        raise UsageError("give either a data folder, clip files or --synthetic N, not several")
    if args.synthetic is not None and args.synthetic < 1:
        raise UsageError(f"--synthetic must be at least 1, got {args.synthetic}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_views(args)
    if args.clips * args.crops > 1 and not (len(args.inputs) == 1 and os.path.isdir(args.inputs[0])):
        raise UsageError("--clips/--crops take several views of the videos of a data folder; synthetic "
                         "clips and .pt clip files are one view each")
    device = resolve_device(args.device)
    model, model_name, model_kwargs, saved = _build_model(args)
    default = DEFAULT_LAYER.get(type(model).__name__, "fc6")
    layer = args.layer or (default(model) if callable(default) else default)
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        tops = [n for n, _ in model.named_children()]
        raise UsageError(f"--layer {layer}: {model_name} has no layer {layer!r}; top-level layers: "
                         f"{', '.join(tops)}")
    model.fused = args.fused
    model.backend = backend_arg(args.backend)
    model.to(device)

    folder = len(args.inputs) == 1 and os.path.isdir(args.inputs[0])
    if args.synthetic is not None:
        frames, height, width = _input_size(model, args, saved)
        classes = args.classes or saved.get("args", {}).get("num_classes") or 10
        try:
            data = SyntheticVideoDataset(num_classes=classes, num_samples=args.synthetic, frames=frames,
                                         size=(height, width), seed=args.seed, split=args.split)
        except ValueError as exc:
            raise UsageError(f"--synthetic: {_first_line(exc)}") from None
        class_names = list(data.class_names)
        source = repr(data)
    elif folder:
        data = _folder_dataset(args.inputs[0], model, args, saved)
        class_names, source = list(data.class_names), f"{args.inputs[0]} ({data!r})"
    else:
        data = _load_clips(args.inputs)
        class_names, source = None, f"{len(args.inputs)} clip file(s)"

    start = time.perf_counter()
    try:
        result = transfer.extract_features(model, data, layer, activation=args.activation,
                                           batch_size=args.batch_size, return_labels=class_names is not None,
                                           normalize="l2" if args.l2_normalize else None)
    except (ValueError, RuntimeError) as exc:
        # a clip size the model rejects, a layer a fused forward does not call as a module, ...
        raise UsageError(f"cannot extract {layer} features: {_first_line(exc)}") from None
    seconds = time.perf_counter() - start
    features, labels = result if class_names is not None else (result, None)
    payload = {
        "kind": FEATURES_KIND, "features": features, "labels": labels, "class_names": class_names,
        "layer": layer, "activation": args.activation, "model_name": model_name, "model_kwargs": model_kwargs,
        "clips": args.clips, "crops": args.crops, "normalize": "l2" if args.l2_normalize else None,
        "weights": args.checkpoint or args.pretrained or "random initialisation", "data": source,
    }
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
        ckpt.save_atomic(payload, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    how = f"fused, backend {args.backend}" if args.fused else "stock"
    labelled = f", labels of {len(class_names)} classes" if class_names else ", no labels"
    views = args.clips * args.crops
    per_video = f", each the mean over {views} views" if views > 1 else ""
    normalized = ", L2-normalised" if args.l2_normalize else ""
    print(f"wrote {args.out}: {features.shape[0]} x {features.shape[1]} {layer} features of {model_name} "
          f"({how}, {device}){per_video}{normalized}{labelled}; "
          f"{features.shape[0] * views / max(seconds, 1e-9):.1f} clips/s")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("features", help="a layer's activations (fc6 by default) of clips, to a .pt file",
                       description="Extract features with the fused inference path and write "
                                   "features, labels and class names to a .pt file for linear-probe.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="CKPT", help="a c3dzoo train checkpoint")
    which.add_argument("--model", choices=c3dzoo.list_models(), help="a zoo model (with --pretrained weights)")
    p.add_argument("--pretrained", metavar="PATH",
                   help="weights for --model: a c3dzoo checkpoint or a plain state_dict (C3D port's "
                        "Sports-1M file, C3D_BN, torchvision video ResNets)")
    p.add_argument("--num-classes", type=int, help="--model's head size (default: the builder's)")
    p.add_argument("--width-mult", type=float, help="--model's channel multiplier")
    p.add_argument("--layer", help="module name (default: fc6 for C3D and Jester, avgpool for video ResNets and "
                                   "S3D, the head's pool for PyTorchVideo's ResNets (slow_r50 … csn_r101) and the X3Ds, "
                                   "the pooled pathways for the SlowFasts)")
    p.add_argument("--activation", choices=("auto", "none"), default="auto",
                   help="auto: after the ReLU the model applies to fc6/fc7 (C3D convention) (default)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .pt file to write")
    p.add_argument("inputs", nargs="*", metavar="DATA",
                   help="a folder DIR/<class>/<video> (labelled, centred clips), or .pt clip files "
                        "3 x T x H x W or N x 3 x T x H x W (unlabelled)")
    p.add_argument("--synthetic", type=int, metavar="N", help="N clips of the built-in synthetic set")
    p.add_argument("--classes", type=int, help="synthetic classes (default: the checkpoint's, else 10)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="synthetic split (default train)")
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's input size)")
    p.add_argument("--size", type=size_arg, help="frame size, N or HxW (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    add_view_options(p)
    p.add_argument("--l2-normalize", action="store_true",
                   help="scale each video's feature to unit length (with --clips: the C3D paper's video "
                        "descriptor, fc6 averaged over the video's clips, for a linear SVM)")
    p.add_argument("--batch-size", type=int, default=16, help="clips a forward pass (default %(default)s)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="run the conv chains fused (default)")
    p.add_argument("--backend", choices=backend_choices(), default="auto")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.set_defaults(func=_cmd_features)
    return p


# --------------------------------------------------------------------------------------------
# c3dzoo linear-probe
# --------------------------------------------------------------------------------------------


def _load_features(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"features file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {_first_line(exc)}") from None
    if not isinstance(data, dict) or data.get("kind") != FEATURES_KIND:
        raise UsageError(f"{path} is not a features file (write one with c3dzoo features)")
    features, labels = data.get("features"), data.get("labels")
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] == 0:
        raise UsageError(f"{path}: its features are not an N x D tensor")
    if labels is None:
        raise UsageError(f"{path} has no labels (features of unlabelled clips); a probe needs labelled ones")
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],) or labels.is_floating_point():
        raise UsageError(f"{path}: its labels are not {features.shape[0]} integer class indices, one per feature row")
    return data


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): ``fraction`` of each class (at least one clip of every class
    with two or more) to validation, chosen by a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    data = _load_features(args.features)
    class_names: Optional[List[str]] = data.get("class_names")
    x, y = data["features"], data["labels"]
    num_classes = len(class_names) if class_names else int(y.max()) + 1
    class_names = class_names or [str(i) for i in range(num_classes)]
    if args.val:
        val_data = _load_features(args.val)
        if val_data["features"].shape[1] != x.shape[1] or val_data.get("layer") != data.get("layer"):
            raise UsageError(f"{args.val} holds {val_data['features'].shape[1]}-d {val_data.get('layer')} "
                             f"features, {args.features} {x.shape[1]}-d {data.get('layer')} ones")
        if (val_data.get("class_names") or None) != (data.get("class_names") or None):
            raise UsageError(f"{args.val} and {args.features} have different class names")
        x_train, y_train, x_val, y_val = x, y, val_data["features"], val_data["labels"]
    else:
        fraction = 0.25 if args.val_split is None else args.val_split
        if not 0 < fraction < 1:
            raise UsageError(f"--val-split must be between 0 and 1 (exclusive), got {fraction}")
        train_idx, val_idx = _stratified_split(y, fraction, args.seed)
        if len(val_idx) == 0:
            raise UsageError(f"{args.features}: too few clips per class to hold some out; give --val FILE")
        x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    if int(max(y_train.max(), y_val.max())) >= num_classes:
        raise UsageError(f"labels go up to {int(max(y_train.max(), y_val.max()))} but there are "
                         f"{num_classes} class names")
    if args.l2 is not None and not args.l2 > 0:
        raise UsageError(f"--l2 must be positive, got {args.l2}")

    try:
        probe = transfer.linear_probe(x_train, y_train, num_classes=num_classes, classifier=args.classifier,
                                      backend=args.backend, **({"l2": args.l2} if args.l2 else {}))
    except ValueError as exc:  # e.g. --classifier svm without scikit-learn
        raise UsageError(_first_line(exc)) from None
    train_report = evaluation.evaluate(probe.scores(x_train), y_train, class_names)
    val_report = evaluation.evaluate(probe.scores(x_val), y_val, class_names)
    print(f"linear probe ({probe.classifier}, {probe.backend}) on {data.get('layer')} features: "
          f"{len(y_train)} train / {len(y_val)} val clips, {x.shape[1]} dims, {num_classes} classes")
    print(f"train {train_report.summary()}")
    print(f"val   {val_report.summary()}")
    print(f"val per class: {val_report.per_class_line(20)}")

    out = args.out or os.path.splitext(args.features)[0] + "_probe"
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump({"classifier": probe.classifier, "backend": probe.backend, "layer": data.get("layer"),
                       "train": train_report.as_dict(), "val": val_report.as_dict()}, f, indent=1)
    except OSError as exc:
        raise CommandError(f"cannot write to {out}: {exc}") from None
    written = [os.path.join(out, "report.json")]
    png = os.path.join(out, "confusion_matrix.png")
    try:
        evaluation.save_confusion_matrix_png(val_report.confusion, png, class_names,
                                             title=f"linear probe on {data.get('layer')}: validation")
        written.append(png)
    except evaluation.PlotUnavailable as exc:
        print(f"no confusion matrix PNG: {exc}")
    print(f"wrote {', '.join(written)}")
    return 0


def add_probe_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("linear-probe", help="a linear classifier on a features file: top-1/top-5, confusion matrix",
                       description="Train a linear classifier (logistic regression or linear SVM) on "
                                   "features from c3dzoo features and report validation accuracy.")
    p.add_argument("features", metavar="FILE", help="from c3dzoo features")
    held_out = p.add_mutually_exclusive_group()
    held_out.add_argument("--val", metavar="FILE", help="validation features (another c3dzoo features file)")
    held_out.add_argument("--val-split", type=float, metavar="F",
                          help="hold out this fraction of each class of FILE (default 0.25)")
    p.add_argument("--classifier", choices=("logreg", "svm"), default="logreg",
                   help="logreg: multinomial logistic regression (default); svm: scikit-learn's LinearSVC")
    p.add_argument("--backend", choices=("auto", "torch", "sklearn"), default="auto",
                   help="auto: torch for logreg, scikit-learn for svm (pip install 'c3dzoo[probe]')")
    p.add_argument("--l2", type=float, help="L2 strength λ (mean loss + λ/2 ||W||^2; default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --val-split choice (default 0)")
    p.add_argument("--out", metavar="DIR", help="report.json and confusion_matrix.png (default: FILE_probe/)")
    p.set_defaults(func=_cmd_linear_probe)
    return p
