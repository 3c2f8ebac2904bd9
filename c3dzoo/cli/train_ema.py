"""``c3dzoo train --ema DECAY``: an exponential moving average of the weights, validated and
saved beside them.

After every optimizer step, each floating-point parameter and buffer of the average moves
towards the model's, ``ema = decay · ema + (1 − decay) · model`` (torch's ``AveragedModel``;
BatchNorm running statistics are averaged too, as timm's ModelEma does); counters
(``num_batches_tracked``) are copied. Validation, ``best.pt`` and every command that reads a
checkpoint (predict, evaluate, export, features, ``--pretrained``) take the average's weights;
``--resume`` restores both. A ``--grow`` step changes the architecture, so it restarts the
average from the grown model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from c3dzoo import checkpoint as ckpt


def _ema_update(decay: float):
    @torch.no_grad()
    def update(averages, currents, _count) -> None:
        for average, current in zip(averages, currents):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - decay)
            else:  # counters: an average of step counts means nothing
                average.copy_(current)
    return update


def make_ema(model: nn.Module, decay: Optional[float]) -> Optional[AveragedModel]:
    """The average of ``model`` (a copy of it now), or None without ``decay``."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=True)


def payload(ema: Optional[AveragedModel]) -> dict:
    """The checkpoint entries of the average: ``ema`` (a plain state_dict of the model's keys)
    and ``ema_updates``."""
    if ema is None:
        return {}
    return {"ema": ckpt.plain_state_dict(ema.module.state_dict()), "ema_updates": int(ema.n_averaged)}


def restore(ema: Optional[AveragedModel], checkpoint: dict, path: str) -> None:
    """The average a checkpoint saved, into ``ema`` (built from the model as the checkpoint's run
    had it). A checkpoint without one (trained without --ema) leaves the fresh copy."""
    if ema is None or "ema" not in checkpoint:
        return
    try:
        ema.module.load_state_dict(checkpoint["ema"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: its EMA weights do not fit the model: "
                                   f"{str(exc).strip().splitlines()[0]}") from None
    ema.n_averaged.fill_(int(checkpoint.get("ema_updates", 1)))
