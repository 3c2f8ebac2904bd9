"""``c3dzoo train --grow``: Net2Net steps at the start of given epochs, parsed, resolved (widths and
new layer names fixed, checked on a CPU copy of the model before training starts) and applied."""

from __future__ import annotations

import argparse
import re
from typing import List, Optional

import torch
from torch import nn

import c3dzoo
from c3dzoo import net2net

from ._common import UsageError

GROW_SYNTAX = ("EPOCH:wider=LAYER*FACTOR, EPOCH:wider=LAYER:UNITS or EPOCH:deeper=LAYER, comma "
               "separated (e.g. 3:wider=conv5b*2,5:deeper=conv5b)")


_GROW_ITEM = re.compile(r"(?P<epoch>\d+):(?P<op>wider|deeper)=(?P<layer>[A-Za-z_][\w.]*)"
                        r"(?:\*(?P<factor>\d+(?:\.\d*)?)|:(?P<units>\d+))?")


def parse_grow(text: str) -> List[dict]:
    """``--grow`` as steps ``{"epoch", "op", "layer", "factor" | "units"}`` in epoch order (steps
    of one epoch in the order given)."""
    steps = []
    for item in (part.strip() for part in text.split(",")):
        match = _GROW_ITEM.fullmatch(item)
        if not match:
            raise UsageError(f"--grow: cannot read {item!r}; expected {GROW_SYNTAX}")
        step = dict(epoch=int(match["epoch"]), op=match["op"], layer=match["layer"])
        if match["op"] == "wider":
            if match["factor"] is None and match["units"] is None:
                raise UsageError(f"--grow: {item!r} needs *FACTOR or :UNITS (e.g. {item}*2)")
            if match["factor"] is not None:
                step["factor"] = float(match["factor"])
            else:
                step["units"] = int(match["units"])
        elif match["factor"] is not None or match["units"] is not None:
            raise UsageError(f"--grow: deeper takes a layer only, got {item!r}")
        steps.append(step)
    return sorted(steps, key=lambda step: step["epoch"])


def _units(model: nn.Module, layer: str) -> int:
    """Output units of ``layer``, or of a video ResNet's residual stream (``layer1``…``layer4``)."""
    streams = net2net.residual_streams(model)
    module = model.get_submodule(streams[layer][0] if layer in streams else layer)
    return module.out_channels if isinstance(module, nn.Conv3d) else module.out_features


def _grow_names(model: nn.Module) -> set:
    return set(getattr(model, "layer_names", ())) | set(getattr(model, "fc_names", ()))


def apply_growth(model: nn.Module, record: dict, optimizer=None, data: Optional[torch.Tensor] = None,
                 noise: float = 0.0, generator: Optional[torch.Generator] = None) -> str:
    """Applies one resolved growth record (see ``resolve_growth``) to ``model`` (and
    ``optimizer``) in place; returns what grew, in words. Raises ValueError from net2net."""
    if record["op"] == "wider":
        before = _units(model, record["layer"])
        # a seeded generator even without noise: replaying a checkpoint's growth must not draw
        # from the global RNG, which the checkpoint restores afterwards anyway
        net2net.wider(model, record["layer"], record["width"], noise=noise, optimizer=optimizer,
                      generator=generator or torch.Generator().manual_seed(0))
        return f"wider {record['layer']} {before} -> {record['width']} units"
    net2net.deeper(model, record["layer"], optimizer=optimizer, data=data, name=record.get("name"))
    return f"deeper: new {'layer ' + record['name'] if record.get('name') else 'block'} after {record['layer']}"


def resolve_growth(args: argparse.Namespace, model_kwargs: dict) -> List[dict]:
    """The ``--grow`` steps with their widths and new layer names fixed, checked by growing a CPU
    copy of the model: a bad layer or width is a usage error now, not after hours of training."""
    if not args.grow:
        return []
    steps = parse_grow(args.grow)
    for step in steps:
        if not 1 <= step["epoch"] <= args.epochs:
            raise UsageError(f"--grow: epoch {step['epoch']} is outside 1..{args.epochs} (--epochs)")
    trial = c3dzoo.get_model(args.model, fused=False, **model_kwargs)
    resolved = []
    for step in steps:
        label = f"--grow {step['epoch']}:{step['op']}={step['layer']}"
        record = dict(epoch=step["epoch"], op=step["op"], layer=step["layer"])
        try:
            if step["op"] == "wider":
                try:
                    current = _units(trial, step["layer"])
                except AttributeError:
                    raise ValueError(f"unknown layer {step['layer']!r}; widenable: "
                                     f"{', '.join(net2net.widenable_layers(trial))}") from None
                record["width"] = step.get("units") or int(round(current * step["factor"]))
            else:
                names = _grow_names(trial)
                net2net.deeper(trial, step["layer"])
                # C3D names its new layer (conv5c); a ResNet block or ConvColumn layer goes to a fixed
                # position that deeper derives again on replay (None)
                added = _grow_names(trial) - names
                record["name"] = added.pop() if added else None
                resolved.append(record)
                continue
            net2net.wider(trial, step["layer"], record["width"], generator=torch.Generator().manual_seed(0))
        except ValueError as exc:
            raise UsageError(f"{label}: {str(exc).strip().splitlines()[0]}") from None
        resolved.append(record)
    return resolved
