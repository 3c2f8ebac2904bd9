"""Training checkpoints: atomic writes, loading with one-line errors, RNG state capture.

A checkpoint is a dict saved with ``torch.save`` and readable with ``torch.load(weights_only=True)``:
``model`` (the stock state_dict; fused and stock models share it), ``model_name``, ``model_kwargs``
(builder arguments), ``class_names``, and for resuming ``optimizer``, ``scheduler``, ``epoch``
(completed epochs), ``batch_in_epoch`` (batches done in the next epoch, for a mid-epoch save),
``global_step``, ``rng`` and ``args``; ``ema`` (and ``ema_updates``) where the run kept an
exponential moving average of the weights (``c3dzoo train --ema``).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections import OrderedDict
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

import c3dzoo

REQUIRED_KEYS = ("model", "model_name", "model_kwargs")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not for the requested model (one-line message)."""


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    so that ``path`` is always either the previous complete file or the new complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` on the CPU. Raises CheckpointError if it is missing, unreadable or
    not a c3dzoo checkpoint. ``"MODEL:WEIGHTS"`` (``"r3d_18:kinetics400"``) gives published weights
    as a checkpoint (``c3dzoo.weights.as_checkpoint``: downloaded once, with class names and clip
    making)."""
    if not os.path.isfile(path):
        from . import weights

        published = weights.parse(path)
        if published is not None:
            try:
                return weights.as_checkpoint(*published)
            except weights.WeightsError as exc:
                raise CheckpointError(str(exc)) from None
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, disallowed globals, permissions...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a c3dzoo checkpoint (it lacks "
                              f"{', '.join(REQUIRED_KEYS)})")
    return checkpoint


def describe(model_name: str, model_kwargs: Dict[str, Any]) -> str:
    """``c3d_bn(num_classes=4, ...)``: how messages name a model."""
    return f"{model_name}({', '.join(f'{k}={v}' for k, v in model_kwargs.items())})"


def check_matches(checkpoint: Dict[str, Any], path: str, model_name: str,
                  model_kwargs: Dict[str, Any]) -> None:
    """Raises CheckpointError unless ``checkpoint`` is for ``model_name`` built with ``model_kwargs``."""
    saved_kwargs = {k: tuple(v) if isinstance(v, list) else v
                    for k, v in checkpoint["model_kwargs"].items()}
    if checkpoint["model_name"] != model_name or saved_kwargs != model_kwargs:
        raise CheckpointError(
            f"checkpoint {path} is for {describe(checkpoint['model_name'], saved_kwargs)}, not "
            f"{describe(model_name, model_kwargs)}; give the options it was trained with (or drop them)")


def inference_weights(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights to predict with: the moving average's where the run kept one (``--ema``: the
    weights it validated), else the model's."""
    return checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"]


def stock_model(checkpoint: Dict[str, Any], path: str = "checkpoint") -> nn.Module:
    """The stock (unfused) model the checkpoint describes, with the Net2Net growth it recorded
    (``c3dzoo train --grow``: a ``growth`` list of {"op": "wider"|"deeper", "layer", "width"|"name"})
    replayed, then its weights (``inference_weights``) loaded strictly."""
    name, kwargs = checkpoint.get("model_name"), checkpoint.get("model_kwargs", {})
    growth = checkpoint.get("growth") or []
    try:
        model = c3dzoo.get_model(name, fused=False, **kwargs)
        replay_growth(model, growth)
        model.load_state_dict(inference_weights(checkpoint), strict=True)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0]
        grown = f" grown by {len(growth)} step(s)" if growth else ""
        raise CheckpointError(f"checkpoint {path} does not build {describe(name, kwargs)}{grown}: {reason}") from None
    return model


def replay_growth(model: nn.Module, growth) -> nn.Module:
    """Redo recorded Net2Net growth steps on ``model`` in place, for their architecture: the
    weights a checkpoint holds are loaded afterwards, so the replica mapping does not matter
    (a fixed generator keeps the global RNG untouched)."""
    from . import net2net

    for step in growth:
        if step["op"] == "wider":
            net2net.wider(model, step["layer"], step["width"], generator=torch.Generator().manual_seed(0))
        elif step["op"] == "deeper":
            net2net.deeper(model, step["layer"], name=step.get("name"))
        else:
            raise ValueError(f"unknown growth step {step['op']!r}")
    return model


def plain_state_dict(model_state: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The weights as plain PyTorch expects them: an OrderedDict of contiguous CPU tensors."""
    return OrderedDict((k, v.detach().to("cpu", memory_format=torch.contiguous_format))
                       for k, v in model_state.items())


def rng_state() -> Dict[str, Any]:
    """Every random stream training may draw from, in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what ``rng_state`` captured (the CUDA streams only where this machine has as many
    devices as the saving one had)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
