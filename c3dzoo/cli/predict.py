"""``c3dzoo predict`` (top-k classes of videos from a training checkpoint) and ``c3dzoo export`` (its
weights as a plain state_dict, or the model as an ONNX file)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
from typing import Optional, Tuple

import torch

from c3dzoo import checkpoint as ckpt
from c3dzoo import transfer
from c3dzoo.data import (ClipSampler, ClipTransform, SyntheticVideoDataset, UnreadableVideo,
                         count_frames, read_views, sliding_windows)
from c3dzoo.data.video_io import VIDEO_EXTENSIONS

from ._common import (PROG, CommandError, UsageError, add_view_options, check_views, inputs_after_checkpoints,
                      resolve_device)


def _load_tensor(path: str) -> torch.Tensor:
    """A clip ``3 × T × H × W`` from a ``.pt`` tensor file. Raises UnreadableVideo."""
    try:
        clip = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnreadableVideo(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[0] != 3:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise UnreadableVideo(f"expected a clip tensor 3 x T x H x W, got {shape}")
    return clip.float()


def _clip_maker(checkpoint: dict):
    """(sampler, transform) of the checkpoint's validation clips: centred, as ``c3dzoo train``
    validates. A checkpoint trained on the synthetic set gets the defaults at its clip size."""
    saved, config = checkpoint.get("args", {}), checkpoint.get("data") or {}
    input_size = checkpoint["model_kwargs"].get("input_size")
    frames = config.get("frames", saved.get("frames") or (input_size[0] if input_size else 16))
    size = tuple(config.get("size", saved.get("size") or (input_size[1:] if input_size else (112, 112))))
    sampler = ClipSampler(frames, config.get("stride", 1), config.get("min_frames"))
    extra = {k: tuple(config[k]) for k in ("mean", "std") if k in config}
    return sampler, ClipTransform(size, config.get("short_side"), **extra)


def _load_input(path: str, sampler: ClipSampler, transform: ClipTransform, clips: int = 1,
                crops: int = 1) -> torch.Tensor:
    """The views ``V × 3 × T × H × W`` of one input: a ``.pt`` tensor (one view), a video file or a
    folder of frames (``clips`` clips spread over it times ``crops`` crops; one of each: the centred
    clip, as validation takes it). Raises UnreadableVideo."""
    if not os.path.exists(path):
        raise UnreadableVideo("not found")
    if path.endswith(".pt") and os.path.isfile(path):
        return _load_tensor(path)[None]
    if os.path.isfile(path) and not path.lower().endswith(VIDEO_EXTENSIONS):
        raise UnreadableVideo(f"not a clip tensor (.pt), a video file ({', '.join(VIDEO_EXTENSIONS[:4])}, "
                              f"...) or a folder of frames")
    num_frames = count_frames(path)
    if not sampler.fits(num_frames):
        raise UnreadableVideo(f"too short: {num_frames} frames, fewer than {sampler.shortest}")
    return read_views(path, num_frames, sampler, transform, clips, crops)


def _clip_signature(checkpoint: dict) -> tuple:
    """How the checkpoint's model takes its clips: frames, stride, crop, resize and normalisation."""
    sampler, transform = _clip_maker(checkpoint)
    return (sampler.frames, sampler.stride, tuple(transform.size), transform.resize_to,
            tuple(transform.mean), tuple(transform.std))


def _describe_clips(signature: tuple) -> str:
    frames, stride, size, short_side, mean, std = signature
    return (f"{frames}x{size[0]}x{size[1]} clips, stride {stride}, short side {short_side}, "
            f"mean {', '.join(f'{m:g}' for m in mean)}, std {', '.join(f'{v:g}' for v in std)}")


def _load_models(paths, device):
    """The checkpoints, their stock models on ``device`` and their shared class names. Several
    checkpoints (an ensemble) must agree on the class names and on how clips are made."""
    checkpoints, models, names = [], [], None
    for path in paths:
        checkpoint = ckpt.load(path)
        classes = checkpoint["model_kwargs"].get("num_classes") or 0
        these = list(checkpoint.get("class_names") or [f"class {i}" for i in range(classes)])
        if checkpoints:
            if these != names:
                raise ckpt.CheckpointError(
                    f"checkpoints disagree on the classes: {paths[0]} has {len(names)} ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''}), {path} has {len(these)} ({', '.join(these[:3])}"
                    f"{', ...' if len(these) > 3 else ''})")
            first, this = _clip_signature(checkpoints[0]), _clip_signature(checkpoint)
            if this != first:
                raise ckpt.CheckpointError(f"checkpoints disagree on the input: {paths[0]} takes "
                                           f"{_describe_clips(first)}; {path} takes {_describe_clips(this)}")
        names = these
        checkpoints.append(checkpoint)
        models.append(ckpt.stock_model(checkpoint, path).to(device).eval())
    return checkpoints, models, names


def synthetic_validation(checkpoint: dict, samples: int) -> SyntheticVideoDataset:
    """The first ``samples`` clips of the synthetic validation split the checkpoint trained beside."""
    saved = checkpoint.get("args", {})
    try:
        if saved.get("data"):
            raise ValueError("it was trained on real data")
        return SyntheticVideoDataset(num_classes=saved["num_classes"], frames=saved["frames"],
                                     size=tuple(saved["size"]), seed=saved.get("seed", 0),
                                     num_samples=samples, split="val")
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--synthetic: cannot rebuild the checkpoint's synthetic data ({exc})") from None


def _ranked(probs: torch.Tensor, names, k: int) -> str:
    top = probs.topk(k)
    return ", ".join(f"{names[i] if i < len(names) else i} {p:.1%}"
                     for p, i in zip(top.values.tolist(), top.indices.tolist()))


class _PredictionsCSV:
    """``--csv FILE``: a row per input (per clip position with --timeline): the input, the clip's
    time span (--timeline), the true class where known, then the top-k classes and probabilities
    (of the ensemble's mean with several checkpoints). Rows are written as they come."""

    def __init__(self, path: Optional[str], names, k: int):
        self.names, self.k, self.file, self.writer = names, k, None, None
        if path:
            try:
                self.file = open(path, "w", newline="")
            except OSError as exc:
                raise CommandError(f"cannot write {path}: {exc}") from None
            self.writer = csv.writer(self.file)
            self.writer.writerow(["input", "start_s", "end_s", "true"]
                                 + [f"{what}{r}" for r in range(1, k + 1) for what in ("class", "prob")])

    def row(self, label: str, probs: torch.Tensor, truth=None, span=None) -> None:
        if self.writer is None:
            return
        top = probs.topk(self.k)
        ranked = [value for i, p in zip(top.indices.tolist(), top.values.tolist())
                  for value in (self.names[i] if i < len(self.names) else i, f"{p:.6f}")]
        times = [f"{span[0]:.3f}", f"{span[1]:.3f}"] if span else ["", ""]
        self.writer.writerow([label, *times, self.names[truth] if truth is not None else "", *ranked])
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _cmd_predict(args: argparse.Namespace) -> int:
    inputs_after_checkpoints(args, "inputs")
    if args.synthetic is None and not args.inputs:
        raise UsageError("give videos, frame folders or clip files (.pt), or --synthetic N")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    check_views(args)
    if args.timeline:
        if args.synthetic is not None or args.clips * args.crops > 1:
            raise UsageError("--timeline slides one clip along each video: it takes videos or frame folders, "
                             "not --synthetic or --clips/--crops")
        if args.hop is not None and args.hop < 1:
            raise UsageError(f"--hop must be at least 1 frame, got {args.hop}")
    elif args.hop is not None:
        raise UsageError("--hop is the step of --timeline's clips: give --timeline too")
    videos = [p for p in args.inputs if p.lower().endswith(VIDEO_EXTENSIONS)]
    if videos and importlib.util.find_spec("av") is None:
        raise UsageError(f"{videos[0]}: reading video files needs PyAV, which is not installed: "
                         f"pip install av (or give frame folders, .pt clip tensors or --synthetic N)")
    device = resolve_device(args.device)
    checkpoints, models, names = _load_models(args.checkpoint, device)
    checkpoint = checkpoints[0]  # they agree on classes and clips: the first one describes the data
    items = []  # (label to print, clip or None when a file is read in turn, true class or None)
    if args.synthetic is not None:
        val_set = synthetic_validation(checkpoint, args.synthetic)
        for i in range(len(val_set)):
            clip, truth = val_set[i]
            items.append((f"synthetic val[{i}]", clip[None], truth))
    items += [(path, None, None) for path in args.inputs]
    sampler, transform = _clip_maker(checkpoint)
    k = min(args.top_k, len(names) or args.top_k)
    table = _PredictionsCSV(args.csv, names, k)
    try:
        if args.timeline:
            return _timelines(args, models, names, sampler, transform, device, k, table)
        return _predict_each(args, models, names, items, sampler, transform, device, k, table)
    finally:
        table.close()


def _predict_each(args, models, names, items, sampler, transform, device, k: int, table: _PredictionsCSV) -> int:
    """Each input's top-k (per checkpoint and their mean with several): the mean over its views."""
    unreadable = 0
    for label, clip, truth in items:
        if clip is None:  # inputs are read one at a time: a long list never sits in memory
            try:
                clip = _load_input(label, sampler, transform, args.clips, args.crops)
            except UnreadableVideo as exc:
                print(f"{PROG}: cannot read {label}: {exc}", file=sys.stderr)
                unreadable += 1
                continue
        try:  # a video's probabilities: the mean over its views
            probs = transfer.ensemble_probabilities(models, clip.to(device))
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"{label}: clip of shape {tuple(clip.shape[1:])} does not fit the model: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        true = f"  (true: {names[truth]})" if truth is not None else ""
        views = f" [{clip.shape[0]} views]" if clip.shape[0] > 1 else ""
        video_probs = probs.combined.mean(0)  # the mean over its views
        table.row(label, video_probs, truth)
        if len(models) == 1:
            print(f"{label}{views}: {_ranked(video_probs, names, k)}{true}")
            continue
        for path, model_probs in zip(args.checkpoint, probs.per_model):
            print(f"{label}{views} [{path}]: {_ranked(model_probs.mean(0), names, k)}")
        print(f"{label}{views} [ensemble of {len(models)}]: {_ranked(video_probs, names, k)}{true}")
    if unreadable:
        print(f"{PROG}: {unreadable} of {len(args.inputs)} input(s) could not be read", file=sys.stderr)
        return 1
    return 0


TIMELINE_BATCH = 8  # clips a forward pass


def _timelines(args, models, names, sampler: ClipSampler, transform: ClipTransform, device, k: int,
               table: _PredictionsCSV) -> int:
    """``--timeline``: each input's top-k per clip as the clip slides along it, every ``--hop``
    frames (default: half a clip's span), with the clip's time span."""
    span = (sampler.frames - 1) * sampler.stride + 1
    hop = args.hop or max(1, span // 2)
    unreadable = 0

    def flush(label, pending):
        clips = torch.stack([clip for *_, clip in pending])
        try:
            probs = transfer.ensemble_probabilities(models, clips.to(device)).combined
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"{label}: clip of shape {tuple(clips.shape[1:])} does not fit the model: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        for (start, first, last, _), row in zip(pending, probs):
            print(f"{label} [{first:.2f}-{last:.2f} s, frame {start}]: {_ranked(row, names, k)}")
            table.row(label, row, span=(first, last))

    for label in args.inputs:
        pending = []
        try:
            if os.path.isfile(label) and label.endswith(".pt"):
                raise UnreadableVideo("--timeline reads videos and frame folders, not clip tensors")
            for start, first, last, frames in sliding_windows(label, sampler, hop):
                pending.append((start, first, last, transform(frames)))
                if len(pending) == TIMELINE_BATCH:
                    flush(label, pending)
                    pending = []
        except (UnreadableVideo, ValueError) as exc:  # ValueError: too short even looped
            print(f"{PROG}: cannot read {label}: {exc}", file=sys.stderr)
            unreadable += 1
        if pending:
            flush(label, pending)
    if unreadable:
        print(f"{PROG}: {unreadable} of {len(args.inputs)} input(s) could not be read", file=sys.stderr)
        return 1
    return 0


def _other_size(clips: torch.Tensor) -> torch.Tensor:
    """One clip of another size than ``clips``' (twice the frames, 16 pixels more each way)."""
    n, c, t, h, w = clips.shape
    return torch.randn(1, c, 2 * t, h + 16, w + 16, generator=torch.Generator().manual_seed(1))


def _clip_dims(model: torch.nn.Module, clips: torch.Tensor) -> dict:
    """torch.export's dynamic dimensions of a clip batch: the batch; frames, height and width too
    when the model runs a clip of another size (the video ResNets; not C3D or ConvColumn, whose
    flatten fixes the size: declared dynamic, their files would fail on other sizes at run time)."""
    dims = {0: torch.export.Dim("batch", min=1)}
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is None:
        return dims
    try:
        with torch.no_grad():
            model(_other_size(clips))
    except Exception:  # whatever stops it (a shape check, a mismatched Linear): one size only
        return dims
    dims.update({2: auto, 3: auto, 4: auto})
    return dims


def _onnx_input_shape(model_proto) -> str:
    """The first graph input's shape, "N x 3 x 16 x 112 x 112", a letter for each dynamic dimension."""
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    return " x ".join(str(d.dim_value) if d.HasField("dim_value") else letter for d, letter in zip(dims, "NCTHW"))


def _write_onnx(model: torch.nn.Module, clips: torch.Tensor, out: str) -> Tuple[str, str]:
    """``model`` (eval mode) as an ONNX file taking batches like ``clips``: any batch size, and any
    clip size where the model takes one (the video ResNets; C3D's flatten fixes its size), checked
    with onnx.checker; with onnxruntime installed, also run against torch on ``clips`` (and a clip
    of another size where the file takes one). Returns (the input's shape, what was checked)."""
    import logging
    import warnings

    import onnx

    model.eval()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms", ...
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter
            program = torch.onnx.export(model, (clips,), dynamo=True, verbose=False, input_names=["clips"],
                                        output_names=["logits"],
                                        dynamic_shapes=(_clip_dims(model, clips),))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"torch.onnx.export failed: {first}") from None
    finally:
        registry_log.setLevel(level)
    try:
        program.save(out)
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc}") from None
    onnx.checker.check_model(out)
    shape = _onnx_input_shape(onnx.load(out, load_external_data=False))
    if importlib.util.find_spec("onnxruntime") is None:
        return shape, "onnx.checker passed (install onnxruntime to also compare its outputs with torch)"
    import onnxruntime

    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    inputs = [clips] + ([_other_size(clips)] if "T" in shape else [])
    error = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"clips": x.numpy()})[0])
        error = max(error, float((got - expected).abs().max()))
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
            raise CommandError(f"{out}: ONNX Runtime's logits differ from torch's by up to {error:.3g} "
                               f"on clips of shape {tuple(x.shape)}")
    sizes = " and a clip of another size" if len(inputs) > 1 else ""
    return shape, (f"onnx.checker passed; ONNX Runtime matches torch (max |difference| {error:.2g} on 2 clips"
                   f"{sizes})")


def _cmd_export(args: argparse.Namespace) -> int:
    as_onnx = args.out.lower().endswith(".onnx")
    missing = [name for name in ("onnx", "onnxscript") if as_onnx and importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"writing ONNX needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: pip install 'c3dzoo[onnx]'")
    checkpoint = ckpt.load(args.checkpoint)
    model = ckpt.stock_model(checkpoint, args.checkpoint)  # proves it loads strictly before writing
    if as_onnx:
        sampler, transform = _clip_maker(checkpoint)  # the clips it validated on
        clips = torch.randn(2, 3, sampler.frames, *transform.size, generator=torch.Generator().manual_seed(0))
        shape, checked = _write_onnx(model, clips, args.out)
        print(f"wrote {args.out}: input 'clips' {shape} (letters: any size; trained on {sampler.frames} x "
              f"{transform.size[0]} x {transform.size[1]} clips, normalised as c3dzoo train validates), "
              f"output 'logits'; {checked}")
        return 0
    state = ckpt.plain_state_dict(model.state_dict())
    try:
        ckpt.save_atomic(state, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    kwargs = ", ".join(f"{k}={v!r}" for k, v in checkpoint["model_kwargs"].items())
    growth = checkpoint.get("growth") or []
    grown = (f", after replaying its {len(growth)} --grow step(s) with c3dzoo.net2net "
             f"(c3dzoo.checkpoint.stock_model does both)") if growth else ""
    print(f"wrote {args.out}: {len(state)} tensors; load with c3dzoo.get_model("
          f"{checkpoint['model_name']!r}, {kwargs}).load_state_dict(torch.load(path)){grown}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    predict = sub.add_parser(
        "predict", help="top-k classes of videos from a training checkpoint (or an ensemble)",
        description="Top-k classes of video files, folders of frame images or .pt clip tensors, "
                    "read as c3dzoo train validates (the centred clip, resized and centre-cropped). "
                    "Inputs that cannot be read are reported one line each; the exit status is then 1.")
    predict.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                         help="from c3dzoo train, or published weights by name (r3d_18:kinetics400); "
                              "several: an ensemble (the mean of their class probabilities), printed with "
                              "each model's own top-k")
    predict.add_argument("inputs", nargs="*", metavar="VIDEO",
                         help="video files, folders of frame images, or .pt files holding a clip "
                              "tensor 3 x T x H x W")
    predict.add_argument("--synthetic", type=int, metavar="N",
                         help="the first N clips of the checkpoint's synthetic validation split")
    predict.add_argument("--top-k", type=int, default=5, help="(default %(default)s)")
    add_view_options(predict)
    predict.add_argument("--timeline", action="store_true",
                         help="slide the clip along each video (decoded once, as it plays) and print the top-k "
                              "of every position with its time span: what happens when, in a long video")
    predict.add_argument("--hop", type=int, metavar="N",
                         help="with --timeline: frames between clip starts (default: half a clip's span)")
    predict.add_argument("--csv", metavar="FILE",
                         help="also write the predictions as CSV rows: input, time span (--timeline), true "
                              "class (--synthetic), then class and probability of each of the top-k")
    predict.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    predict.set_defaults(func=_cmd_predict)

    return predict


def add_export_parser(sub) -> argparse.ArgumentParser:
    export = sub.add_parser(
        "export", help="a training checkpoint's weights as a plain state_dict, or the model as ONNX",
        description="Writes the checkpoint's weights as a plain state_dict (loads strictly into the stock "
                    "and the fused model), or, for an --out ending in .onnx, the eval-mode model as an ONNX "
                    "file (needs pip install 'c3dzoo[onnx]') that takes any batch size (and, for the video "
                    "ResNets, any clip size).")
    export.add_argument("--checkpoint", required=True, metavar="CKPT", help="from c3dzoo train")
    export.add_argument("--out", required=True, metavar="FILE",
                        help="the state_dict file to write, or FILE.onnx for an ONNX model")
    export.set_defaults(func=_cmd_export)
    return export
