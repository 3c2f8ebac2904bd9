"""Published weights the zoo's models load by name: torchvision's Kinetics-400 video ResNets and S3D,
the IG-65M R(2+1)D-34 (pretrained on 65 M Instagram videos; fine-tuned on Kinetics-400) and
PyTorchVideo's Kinetics-400 Slow, I3D, C2D, CSN and SlowFast ResNets and X3D-XS, -S, -M and -L.

    model = c3dzoo.r3d_18(weights="kinetics400", fused=True)       # 400 classes, fused
    c3dzoo.weights.available()                                       # [("r3d_18", "kinetics400"), ...]
    c3dzoo predict clip.mp4 --checkpoint r3d_18:kinetics400 --clips 10   # Kinetics class names

The files are downloaded once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) and checked
against the SHA-256 prefix in their names; PyTorchVideo's names carry none, so theirs are only
checked by the strict load (every key and shape). Each entry says how its clips were made (the
video ResNets: 16 frames, short side 128, centre crop 112; S3D: 128 frames, short side 256, centre
crop 224; PyTorchVideo's: 8 frames, one in 8 (SlowFast: 32, one in 2), short side 256, centre crop
256, its own mean/std; its X3Ds their own frames, strides and crops), so ``predict``/``evaluate`` feed it what it was trained on, and holds the
class names. ``as_checkpoint`` presents an entry as a c3dzoo training checkpoint, which is how
every command that takes ``--checkpoint`` accepts ``MODEL:WEIGHTS``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, List, Optional, Tuple

import torch

from .data.transforms import KINETICS_MEAN, KINETICS_STD

__all__ = ["WeightsEntry", "WeightsError", "available", "entry", "load_state_dict", "as_checkpoint", "parse",
           "kinetics400_classes"]


class WeightsError(ValueError):
    """Unknown weights, or weights that cannot be downloaded (one line, saying what to do)."""


@functools.lru_cache(maxsize=None)
def kinetics400_classes() -> Tuple[str, ...]:
    """Kinetics-400's class names in label order (as torchvision's video models index them)."""
    with open(os.path.join(os.path.dirname(__file__), "data", "kinetics400_classes.txt"), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    model: str
    name: str
    url: str  # the file name ends in -<first 8 hex digits of its SHA-256>.pth (torch.hub checks it), if it can
    source: str
    num_classes: int = 400
    frames: int = 16
    frame_stride: int = 1  # the clip takes every frame_stride-th frame
    size: Tuple[int, int] = (112, 112)
    short_side: int = 128
    mean: Tuple[float, float, float] = KINETICS_MEAN
    std: Tuple[float, float, float] = KINETICS_STD
    # Kinetics-400's names in torchvision's order; False where the publisher gave no label order
    # (the classes are then numbered, rather than named by a guess)
    kinetics_names: bool = True
    # the file's key holding the state_dict (PyTorchVideo's "model_state"); None: the file is one
    state_key: Optional[str] = None

    @property
    def class_names(self) -> Tuple[str, ...]:
        if self.kinetics_names:
            return kinetics400_classes()
        return tuple(f"class {i}" for i in range(self.num_classes))


_TORCHVISION = "torchvision (Kinetics-400, 16x112x112 clips)"
_PYTORCHVIDEO = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics"
PYTORCHVIDEO_MEAN = (0.45, 0.45, 0.45)
PYTORCHVIDEO_STD = (0.225, 0.225, 0.225)
_IG65M = "https://github.com/moabitcoin/ig65m-pytorch/releases/download/v1.0.0"
_REGISTRY: Dict[Tuple[str, str], WeightsEntry] = {
    (e.model, e.name): e for e in (
        WeightsEntry("r3d_18", "kinetics400", "https://download.pytorch.org/models/r3d_18-b3b3357e.pth",
                     _TORCHVISION),
        WeightsEntry("mc3_18", "kinetics400", "https://download.pytorch.org/models/mc3_18-a90a0ba3.pth",
                     _TORCHVISION),
        WeightsEntry("r2plus1d_18", "kinetics400", "https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth",
                     _TORCHVISION),
        # torchvision measured its accuracy on 128-frame clips (it trained on 64)
        WeightsEntry("s3d", "kinetics400", "https://download.pytorch.org/models/s3d-d76dad2f.pth",
                     "torchvision (Kinetics-400, 128x224x224 clips)", frames=128, size=(224, 224), short_side=256),
        # VMZ's Caffe2 weights as moabitcoin/ig65m-pytorch converted them (its release v1.0.0); its
        # pretraining heads (359 and 487 hashtag classes) and its Kinetics head come without a label
        # order, so their classes are numbered
        *(WeightsEntry("r2plus1d_34", name, f"{_IG65M}/r2plus1d_34_clip{frames}_{file}.pth",
                       f"IG-65M{' + Kinetics-400' if classes == 400 else ''} (VMZ, converted by "
                       f"moabitcoin/ig65m-pytorch; {frames}x112x112 clips)", num_classes=classes, frames=frames,
                       kinetics_names=False)
          for name, frames, classes, file in (
              ("ig65m_kinetics", 8, 400, "ft_kinetics_from_ig65m-0aa0550b"),
              ("ig65m_kinetics32", 32, 400, "ft_kinetics_from_ig65m-ade133f1"),
              ("ig65m", 8, 359, "ig65m_from_scratch-9bae36ae"),
              ("ig65m32", 32, 487, "ig65m_from_scratch-449a7af9"))),
        # PyTorchVideo's model zoo (8x8: 8 frames, one in 8; SlowFast's fast pathway and CSN 32, one
        # in 2; R(2+1)D 16, one in 4; SlowFast 16x8's fast pathway 64, one in 2; its hub's
        # evaluation transform: short side 256, centre crop 256); top-1 on Kinetics-400 as it
        # reports: 74.58, 73.27, 71.46, 77.0, 76.4, 77.9, 76.01, 78.7
        *(WeightsEntry(model, "kinetics400", f"{_PYTORCHVIDEO}/{file}.pyth",
                       f"PyTorchVideo (Kinetics-400, {file.split('_')[1]} clips)", frames=frames, frame_stride=stride,
                       size=(256, 256), short_side=256, mean=PYTORCHVIDEO_MEAN, std=PYTORCHVIDEO_STD,
                       state_key="model_state")
          for model, file, frames, stride in (("slow_r50", "SLOW_8x8_R50", 8, 8), ("i3d_r50", "I3D_8x8_R50", 8, 8),
                                              ("c2d_r50", "C2D_8x8_R50", 8, 8),
                                              ("csn_r101", "CSN_32x2_R101", 32, 2),
                                              ("slowfast_r50", "SLOWFAST_8x8_R50", 32, 2),
                                              ("slowfast_r101", "SLOWFAST_8x8_R101", 32, 2),
                                              ("r2plus1d_r50", "R2PLUS1D_16x4_R50", 16, 4),
                                              ("slowfast_16x8_r101_50_50", "SLOWFAST_16x8_R101_50_50", 64, 2))),
        # PyTorchVideo's X3Ds (its hub's checkpoint_paths, pytorchvideo/models/hub/x3d.py). Clips:
        # 4 frames one in 12 (XS), 13 one in 6 (S), 16 one in 5 (M, L), as its model zoo lists them
        # (docs/source/model_zoo.md, "4x12" ...) and the configs that trained them set them
        # (PySlowFast's configs/Kinetics/pytorchvideo/X3D_*.yaml, NUM_FRAMES and SAMPLING_RATE).
        # Short side = centre crop = 182, 182, 256, 356: those configs' TEST_CROP_SIZE (their
        # 3-crop test; the torch.hub page's transform has side_size = crop_size = 182, 182, 256 for
        # XS, S, M), not the 160, 160, 224, 312 training crops (TRAIN_CROP_SIZE, the hub builders'
        # input_crop_size) the head's pool is sized for; the pool then slides. Top-1 69.12, 73.33,
        # 75.94, 77.44 as the hub builders' docstrings and the model zoo report.
        *(WeightsEntry(model, "kinetics400", f"{_PYTORCHVIDEO}/{file}.pyth",
                       f"PyTorchVideo (Kinetics-400, {frames}x{stride} clips)", frames=frames, frame_stride=stride,
                       size=(crop, crop), short_side=crop, mean=PYTORCHVIDEO_MEAN, std=PYTORCHVIDEO_STD,
                       state_key="model_state")
          for model, file, frames, stride, crop in (("x3d_xs", "X3D_XS", 4, 12, 182), ("x3d_s", "X3D_S", 13, 6, 182),
                                                    ("x3d_m", "X3D_M", 16, 5, 256), ("x3d_l", "X3D_L", 16, 5, 356))),
    )
}


def available(model: Optional[str] = None) -> List[Tuple[str, str]]:
    """(model, weights name) pairs, for one model or all."""
    return [key for key in _REGISTRY if model is None or key[0] == model]


def entry(model: str, name: str) -> WeightsEntry:
    try:
        return _REGISTRY[(model, name.lower())]
    except KeyError:
        known = ", ".join(f"{m}:{n}" for m, n in available()) or "none"
        raise WeightsError(f"no weights {name!r} for {model}; known: {known}") from None


def load_state_dict(model: str, name: str, progress: bool = False) -> Dict[str, torch.Tensor]:
    """The entry's state_dict, downloaded once into torch.hub's cache and hash-checked."""
    found = entry(model, name)
    try:
        loaded = torch.hub.load_state_dict_from_url(found.url, map_location="cpu", progress=progress,
                                                    check_hash=True, weights_only=True)
    except Exception as exc:  # no network, a proxy, a truncated or tampered file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(f"cannot get {model}:{name} from {found.url}: {reason} (without a network, put "
                           f"that file into {cache}, where it is looked for first)") from None
    if found.state_key is None:
        return loaded
    if not isinstance(loaded, dict) or not isinstance(loaded.get(found.state_key), dict):
        keys = ", ".join(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise WeightsError(f"{model}:{name} from {found.url} holds no {found.state_key!r} state_dict (it holds "
                           f"{keys}): not the file published there")
    return loaded[found.state_key]


def as_checkpoint(model: str, name: str) -> dict:
    """The entry as a c3dzoo training checkpoint: weights, model, class names and clip making."""
    found = entry(model, name)
    return {
        "model": load_state_dict(model, name),
        "model_name": model,
        "model_kwargs": {"num_classes": found.num_classes},
        "class_names": list(found.class_names),
        "data": {"kind": "videos", "frames": found.frames, "stride": found.frame_stride, "min_frames": None,
                 "size": found.size, "short_side": found.short_side, "mean": found.mean, "std": found.std},
        "args": {},
        "weights": f"{model}:{name} ({found.source})",
    }


def parse(spec: str) -> Optional[Tuple[str, str]]:
    """``("r3d_18", "kinetics400")`` for ``"r3d_18:kinetics400"`` when that is a known entry, else None."""
    model, sep, name = spec.partition(":")
    return (model, name.lower()) if sep and (model, name.lower()) in _REGISTRY else None
