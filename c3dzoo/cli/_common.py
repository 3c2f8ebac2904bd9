"""What every ``c3dzoo`` command shares: its errors, argument parser and device/backend options."""

from __future__ import annotations

import argparse
import inspect
import os
from typing import List, Optional, Tuple

import torch
from torch import nn

import c3dzoo

PROG = "c3dzoo"


class UsageError(Exception):
    """Bad arguments, or a request this machine cannot serve (exit status 2)."""


class CommandError(Exception):
    """A command that cannot go on, e.g. a diverging training run (exit status 1, one line)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; report one line through main() instead
    def error(self, message: str):
        raise UsageError(message)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def resolve_device(name: Optional[str]) -> torch.device:
    """``None`` → cuda if available, else cpu. Refuses devices this machine does not have."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"invalid --device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def backend_arg(name: Optional[str]) -> Optional[str]:
    """``--backend`` value as the models take it (None means auto)."""
    return None if name in (None, "auto") else name


def backend_choices() -> List[str]:
    return ["auto", *c3dzoo.backends()]


def set_mode(model: nn.Module, mode: str) -> None:
    """``train``, ``eval`` or ``frozen_bn`` (training, with every BatchNorm on running statistics,
    as when fine-tuning)."""
    model.train(mode != "eval")
    if mode == "frozen_bn":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def builder_accepts(model_name: str, parameter: str) -> bool:
    return parameter in inspect.signature(getattr(c3dzoo.models, model_name)).parameters


def size_arg(text: str) -> Tuple[int, int]:
    """``56`` or ``64x48`` (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, got {text!r}")
    return tuple(parts)


def add_view_options(parser: argparse.ArgumentParser) -> None:
    """``--clips N --crops K``: multi-view testing of each video (``c3dzoo.data.read_views``)."""
    parser.add_argument("--clips", type=int, default=1, metavar="N",
                        help="clips spread evenly over each video; its score is the mean probability "
                             "over its views (default 1: the centred clip; 10 is the usual test)")
    parser.add_argument("--crops", type=int, default=1, metavar="K",
                        help="crops of each clip spread along the frame's longer side (3: left, centre, "
                             "right; default 1: the centre crop)")


def check_views(args: argparse.Namespace) -> None:
    for option in ("clips", "crops"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option} must be at least 1, got {getattr(args, option)}")


def inputs_after_checkpoints(args: argparse.Namespace, inputs: str) -> None:
    """``--checkpoint A B`` takes every path after it, so ``--checkpoint CKPT clip.mp4`` hands it the
    input too: values that cannot be checkpoints (folders, video files) move to ``args.<inputs>``."""
    from c3dzoo.data.video_io import VIDEO_EXTENSIONS

    misplaced = [p for p in args.checkpoint if os.path.isdir(p) or p.lower().endswith(VIDEO_EXTENSIONS)]
    if not misplaced:
        return
    args.checkpoint = [p for p in args.checkpoint if p not in misplaced]
    if not args.checkpoint:
        raise UsageError(f"--checkpoint {misplaced[0]}: a folder or video, not a c3dzoo checkpoint")
    current = getattr(args, inputs)
    if isinstance(current, list):
        setattr(args, inputs, misplaced + current)
    elif current is None and len(misplaced) == 1:
        setattr(args, inputs, misplaced[0])
    else:
        raise UsageError(f"one data folder, please: got {', '.join(([current] if current else []) + misplaced)}")
