"""``c3dzoo predict`` (top-k classes from a training checkpoint) and ``c3dzoo export`` (its
weights as a plain state_dict)."""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from c3dzoo import checkpoint as ckpt
from c3dzoo.data import SyntheticVideoDataset

from ._common import CommandError, UsageError, resolve_device


def _load_input(path: str) -> torch.Tensor:
    """A clip ``3 × T × H × W`` from a ``.pt`` tensor file; video files need PyAV (not yet read)."""
    if not path.endswith(".pt"):
        if importlib.util.find_spec("av") is None:
            raise UsageError(f"{path}: reading video files needs PyAV (pip install av), which is "
                             f"not installed; give .pt clip tensors or --synthetic N")
        raise UsageError(f"{path}: reading video files is not supported yet; give .pt clip tensors")
    if not os.path.isfile(path):
        raise UsageError(f"input not found: {path}")
    try:
        clip = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[0] != 3:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise UsageError(f"{path}: expected a clip tensor 3 x T x H x W, got {shape}")
    return clip.float()


def _cmd_predict(args: argparse.Namespace) -> int:
    checkpoint = ckpt.load(args.checkpoint)
    if args.synthetic is None and not args.inputs:
        raise UsageError("give clip files (.pt) or --synthetic N")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    device = resolve_device(args.device)
    model = ckpt.stock_model(checkpoint, args.checkpoint).to(device).eval()
    num_classes = checkpoint["model_kwargs"].get("num_classes")
    names = checkpoint.get("class_names") or [f"class {i}" for i in range(num_classes or 0)]
    items = []  # (label to print, clip, true class or None)
    if args.synthetic is not None:
        saved = checkpoint.get("args", {})
        try:  # the validation split the checkpoint was trained beside
            val_set = SyntheticVideoDataset(num_classes=saved["num_classes"], frames=saved["frames"],
                                            size=tuple(saved["size"]), seed=saved.get("seed", 0),
                                            num_samples=args.synthetic, split="val")
        except (KeyError, ValueError) as exc:
            raise UsageError(f"--synthetic: cannot rebuild the checkpoint's synthetic data ({exc})") from None
        items += [(f"synthetic val[{i}]", *val_set[i]) for i in range(len(val_set))]
    items += [(path, _load_input(path), None) for path in args.inputs]
    k = min(args.top_k, len(names) or args.top_k)
    with torch.no_grad():
        for label, clip, truth in items:
            try:
                probs = model(clip[None].to(device)).float().softmax(1)[0]
            except (ValueError, RuntimeError) as exc:
                raise UsageError(f"{label}: clip of shape {tuple(clip.shape)} does not fit the model: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
            top = probs.topk(k)
            ranked = ", ".join(f"{names[i] if i < len(names) else i} {p:.1%}"
                               for p, i in zip(top.values.tolist(), top.indices.tolist()))
            true = f"  (true: {names[truth]})" if truth is not None else ""
            print(f"{label}: {ranked}{true}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    checkpoint = ckpt.load(args.checkpoint)
    model = ckpt.stock_model(checkpoint, args.checkpoint)  # proves it loads strictly before writing
    state = ckpt.plain_state_dict(model.state_dict())
    try:
        ckpt.save_atomic(state, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    kwargs = ", ".join(f"{k}={v!r}" for k, v in checkpoint["model_kwargs"].items())
    print(f"wrote {args.out}: {len(state)} tensors; load with c3dzoo.get_model("
          f"{checkpoint['model_name']!r}, {kwargs}).load_state_dict(torch.load(path))")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    predict = sub.add_parser("predict", help="top-k classes of clips from a training checkpoint")
    predict.add_argument("--checkpoint", required=True, metavar="CKPT", help="from c3dzoo train")
    predict.add_argument("inputs", nargs="*", metavar="CLIP",
                         help=".pt files holding a clip tensor 3 x T x H x W")
    predict.add_argument("--synthetic", type=int, metavar="N",
                         help="the first N clips of the checkpoint's synthetic validation split")
    predict.add_argument("--top-k", type=int, default=5, help="(default %(default)s)")
    predict.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    predict.set_defaults(func=_cmd_predict)

    return predict


def add_export_parser(sub) -> argparse.ArgumentParser:
    export = sub.add_parser("export", help="a training checkpoint's weights as a plain state_dict")
    export.add_argument("--checkpoint", required=True, metavar="CKPT", help="from c3dzoo train")
    export.add_argument("--out", required=True, metavar="FILE", help="the state_dict file to write")
    export.set_defaults(func=_cmd_export)
    return export
