"""Net2Net (Chen, Goodfellow, Shlens, ICLR 2016): grow a zoo model without changing its function.

* ``wider(model, layer, width)`` gives a Conv3d (or Linear) more output units: new units copy
  random old ones (mapping ``g``), the BatchNorm after the layer copies γ, β and the running
  statistics of the same units, and the next layer's incoming weights are divided by the number of
  copies, so the output is unchanged (eval and train mode; replicas have identical batch stats).
* ``deeper(model, after)`` inserts an identity layer (Dirac Conv3d → identity BatchNorm3d → ReLU,
  or identity Linear → ReLU) after a layer of the C3D family.

Both rewrite the optimizer too (momentum and Adam moments follow their parameters), validate
everything before touching the model, and replace modules by new ``nn.Conv3d``/``nn.BatchNorm*``/
``nn.Linear`` of the grown size at the same names, so the state_dict keys stay those of the stock
architecture at the grown size, and the fused path (which reads the same modules) keeps working.
Models wrapped by ``c3dzoo.fuse`` hold references to the old modules: grow first, then fuse.

Tensor rewrites all go through ``c3dzoo.ops.net2net_remap`` (the place for faster backends).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ops import net2net_remap as remap

Tensor = torch.Tensor
# (state tensor, power) → remapped tensor; power is 2 for moments quadratic in the parameter
Remap = Callable[[Tensor, int], Tensor]

__all__ = ["wider", "deeper", "widenable_layers"]

# optimizer state entries that are quadratic in the gradient (and so in the parameter's scale)
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
_UNIT_LAYERS = (nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm3d)


# --------------------------------------------------------------------------------------------
# the layer graph of each zoo family: chains of (layer, BatchNorm on its output) stages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    layer: str  # path of an nn.Conv3d or nn.Linear
    norm: Optional[str] = None  # path of the BatchNorm applied (maybe after an activation) to its output


@dataclass(frozen=True)
class _Segment:
    """Stages where each one's output feeds only the next one's input, through per-channel ops
    (activations, pools, dropout, BatchNorm, flatten). The last stage's output leaves the
    segment: it is the model's output, or, when ``tied`` is set, a residual stream whose channels
    are shared with the layers in ``tied``."""

    stages: Tuple[_Stage, ...]
    tied: Tuple[str, ...] = ()


def _segments(model: nn.Module) -> List[_Segment]:
    from .models.c3d_family import C3D
    from .models.jester import ConvColumn
    from .models.video_resnet import VideoResNet

    if isinstance(model, C3D):
        convs = [_Stage(n, n + "_bn" if model.batch_norm else None) for n in model.layer_names]
        fcs = [_Stage(n) for n in _c3d_fc_names(model) + ("fc8",)]
        return [_Segment(tuple(convs + fcs))]
    if isinstance(model, ConvColumn):
        paths = [p for i in range(1, 5) for p in _leaf_paths(model, f"conv_layer{i}")]
        paths += ["conv_layer5", "fc5", "batch0", "fc6", "batch1", "fc7"]  # forward order
        return [_Segment(_stages(model, paths))]
    if isinstance(model, VideoResNet):
        return _resnet_segments(model)
    raise ValueError(
        f"net2net does not know the layer graph of {type(model).__name__}; it supports the zoo's "
        f"C3D, ConvColumn (jester_convcolumn) and VideoResNet models (not fx-fused copies: grow, then fuse)"
    )


def _leaf_paths(model: nn.Module, prefix: str) -> List[str]:
    """Paths of the leaf modules under ``prefix``, in registration (= Sequential forward) order."""
    return [n for n, m in model.get_submodule(prefix).named_modules(prefix=prefix) if not any(m.children())]


def _stages(model: nn.Module, paths: Sequence[str]) -> Tuple[_Stage, ...]:
    """Group a forward-ordered list of leaf paths into stages; modules other than Conv3d, Linear
    and BatchNorm (activations, pools, dropout) act per channel and need no rewriting."""
    stages: List[_Stage] = []
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, _UNIT_LAYERS):
            stages.append(_Stage(path))
        elif isinstance(module, _BatchNorm) and stages and stages[-1].norm is None:
            stages[-1] = _Stage(stages[-1].layer, path)
    return tuple(stages)


def _resnet_segments(model: nn.Module) -> List[_Segment]:
    # Each block's conv1 → conv2 is a chain whose last conv writes into the residual stream; so
    # do the stem and the downsample shortcuts. A stream is re-started by each downsample.
    chains: List[Tuple[Tuple[_Stage, ...], List[str]]] = []
    stream: List[str] = []
    chains.append((_stages(model, _leaf_paths(model, "stem")), stream))
    for li in range(1, 5):
        for bi, block in enumerate(model.get_submodule(f"layer{li}")):
            prefix = f"layer{li}.{bi}"
            if block.downsample is not None:
                stream = []
                chains.append((_stages(model, _leaf_paths(model, prefix + ".downsample")), stream))
            body = _leaf_paths(model, prefix + ".conv1") + _leaf_paths(model, prefix + ".conv2")
            chains.append((_stages(model, body), stream))
    for stages, writers in chains:
        writers.append(stages[-1].layer)
    segments = [_Segment(stages, tuple(writers)) for stages, writers in chains]
    return segments + [_Segment((_Stage("fc"),))]


def widenable_layers(model: nn.Module) -> List[str]:
    """The layers ``wider`` accepts for ``model``, in forward order."""
    return [s.layer for seg in _segments(model) for s in seg.stages[:-1]]


def _link(model: nn.Module, layer: str) -> Tuple[_Stage, _Stage]:
    """(the stage of ``layer``, the stage that consumes its output), or ValueError."""
    for seg in _segments(model):
        for i, stage in enumerate(seg.stages):
            if stage.layer != layer:
                continue
            if i + 1 < len(seg.stages):
                return stage, seg.stages[i + 1]
            if seg.tied:
                others = [t for t in seg.tied if t != layer]
                raise ValueError(
                    f"{layer!r} feeds a residual addition: its output channels are tied to "
                    f"{', '.join(others) or 'the residual stream'} (and to the layers reading that "
                    f"stream); growing tied layers together is not supported"
                )
            raise ValueError(
                f"{layer!r} is the output layer of {type(model).__name__}: no following layer "
                f"whose inputs net2net can rewrite"
            )
    try:
        what = f"is a {type(model.get_submodule(layer)).__name__}, not a Conv3d or Linear net2net knows"
    except AttributeError:
        what = "is unknown"
    raise ValueError(
        f"layer {layer!r} {what} in {type(model).__name__}; layers that can be widened: "
        f"{', '.join(widenable_layers(model))}"
    )


# --------------------------------------------------------------------------------------------
# module rebuilding and optimizer rewriting (shared by wider and deeper)
# --------------------------------------------------------------------------------------------


def _factory(module: nn.Module) -> dict:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return {} if t is None else dict(device=t.device, dtype=t.dtype)


def _resized(module: nn.Module, in_units: Optional[int] = None, out_units: Optional[int] = None) -> nn.Module:
    """A fresh module of ``module``'s exact type and hyper-parameters with new unit counts."""
    f = _factory(module)
    if type(module) is nn.Conv3d:
        return nn.Conv3d(in_units or module.in_channels, out_units or module.out_channels, module.kernel_size,
                         module.stride, module.padding, module.dilation, module.groups,
                         module.bias is not None, module.padding_mode, **f)
    if type(module) is nn.Linear:
        return nn.Linear(in_units or module.in_features, out_units or module.out_features,
                         module.bias is not None, **f)
    if type(module) in _NORMS:
        return type(module)(out_units or module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, **f)
    raise ValueError(f"net2net cannot rebuild a {type(module).__name__}")


@torch.no_grad()
def _rebuilt(module: nn.Module, new: nn.Module, remaps: Dict[str, Remap]) -> nn.Module:
    """``new`` filled with ``module``'s tensors passed through ``remaps`` (name → remap; a name
    not listed is copied), with the same requires_grad flags and train/eval mode."""
    old = dict(module.named_parameters(recurse=False))
    old.update(module.named_buffers(recurse=False))
    for name, target in list(new.named_parameters(recurse=False)) + list(new.named_buffers(recurse=False)):
        value = old[name]
        target.copy_(remaps[name](value, 1) if name in remaps else value)
        if isinstance(target, nn.Parameter):
            target.requires_grad_(value.requires_grad)
    return new.train(module.training)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _keep(t: Tensor, power: int = 1) -> Tensor:
    return t.clone()


def _optimizer_commit(optimizer: Optional[torch.optim.Optimizer],
                      swaps: Sequence[Tuple[str, nn.Parameter, nn.Parameter, Remap]]) -> Callable[[], None]:
    """Validate and compute the optimizer rewrite for parameters replaced by ``swaps``
    ((name, old, new, remap) each); return the function that applies it. A parameter the
    optimizer does not hold is skipped (it was not being trained, nor is its replacement).

    A state tensor shaped like its parameter is remapped like it; for divided weights, first
    moments (momentum, exp_avg) are divided like the weight and second moments by count², which
    keeps each state proportional to its parameter's scale. Scalars (Adam's step) are copied.
    """
    if optimizer is None:
        return lambda: None
    where = {id(p): (gi, pi) for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])}
    updates = []
    for name, old, new, fn in swaps:
        if id(old) not in where:
            continue
        state = {}
        for key, value in optimizer.state.get(old, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == old.shape:
                value = fn(value, 2 if key in _SECOND_MOMENTS else 1)
            elif torch.is_tensor(value) and value.numel() == 1:
                value = value.clone()
            elif torch.is_tensor(value):
                raise ValueError(
                    f"cannot remap optimizer state {key!r} of {name} (shape {tuple(value.shape)}, "
                    f"parameter shape {tuple(old.shape)})"
                )
            state[key] = value
        updates.append((where[id(old)], old, new, state))

    def commit() -> None:
        for (gi, pi), old, new, state in updates:
            optimizer.param_groups[gi]["params"][pi] = new
            optimizer.state.pop(old, None)
            if state:
                optimizer.state[new] = state

    return commit


def _param_swaps(path: str, old: nn.Module, new: nn.Module, remaps: Dict[str, Remap]):
    return [(f"{path}.{n}", p, getattr(new, n), remaps.get(n, _keep)) for n, p in old.named_parameters(recurse=False)]


# --------------------------------------------------------------------------------------------
# wider
# --------------------------------------------------------------------------------------------


def _units(module: nn.Module, incoming: bool = False) -> int:
    if isinstance(module, nn.Conv3d):
        return module.in_channels if incoming else module.out_channels
    return module.in_features if incoming else module.out_features


def wider(model: nn.Module, layer: str, width: int, *, noise: float = 0.0,
          generator: Optional[torch.Generator] = None,
          optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
    """Grow the output units of ``layer`` (a Conv3d, or a Linear such as ``"fc6"``) of ``model``
    to ``width``, in place, without changing what the model computes; returns ``model``.

    New unit ``j`` copies old unit ``g(j)`` (random, from ``generator``) with its bias and its
    BatchNorm's γ, β, running mean and variance; the next layer's weights from unit ``j`` are its
    old weights from ``g(j)`` divided by the number of copies of ``g(j)`` (per channel group of
    ``D·H·W`` columns when a flatten sits in between). ``noise`` > 0 adds Gaussian noise of
    ``noise`` × std(weight) to the replicas' weights only (breaking symmetry; the function then
    changes slightly); the default is exact. ``optimizer``'s parameters and state are rewritten
    to match (see ``_optimizer_commit``); gradients are not carried over.

    Raises ValueError, leaving model and optimizer untouched, for an unknown layer, a width not
    larger than the current one, a layer with no following layer to rewrite (the output layer),
    or one whose output feeds a residual addition.
    """
    stage, next_stage = _link(model, layer)
    producer = model.get_submodule(stage.layer)
    consumer = model.get_submodule(next_stage.layer)
    norm = model.get_submodule(stage.norm) if stage.norm else None
    old = _units(producer)
    if isinstance(width, bool) or not isinstance(width, int) or width <= old:
        raise ValueError(f"width must be an int larger than {layer!r}'s current {old} units, got {width!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    for path, module in ((stage.layer, producer), (next_stage.layer, consumer)):
        if type(module) not in _UNIT_LAYERS or getattr(module, "groups", 1) != 1:
            raise ValueError(f"net2net grows plain nn.Conv3d (groups=1) and nn.Linear layers; {path} is {module}")
    if norm is not None and (type(norm) not in _NORMS or norm.num_features != old):
        raise ValueError(f"{stage.norm} ({norm}) does not normalise {layer!r}'s {old} outputs")
    fan_in = _units(consumer, incoming=True)
    if fan_in % old or (isinstance(consumer, nn.Conv3d) and fan_in != old):
        raise ValueError(f"{next_stage.layer} takes {fan_in} inputs, not a multiple of {layer!r}'s {old} outputs")
    group = fan_in // old  # D·H·W columns per channel when a flatten feeds a Linear

    g = remap.replica_mapping(old, width, generator, device=producer.weight.device)
    counts = remap.replica_counts(g, old)

    def replicate(t: Tensor, power: int = 1) -> Tensor:
        return remap.gather_units(t, g, 0)

    def divide(t: Tensor, power: int = 1) -> Tensor:
        return remap.divide_incoming(t, g, counts, 1, group, power=power)

    producer_remaps: Dict[str, Remap] = {"weight": replicate, "bias": replicate}
    # running stats and affine parameters are per channel; num_batches_tracked (0-d) is copied
    norm_remaps: Dict[str, Remap] = {"weight": replicate, "bias": replicate,
                                     "running_mean": replicate, "running_var": replicate}
    consumer_remaps: Dict[str, Remap] = {"weight": divide}

    rewrites = [(stage.layer, producer, _resized(producer, out_units=width), producer_remaps),
                (next_stage.layer, consumer, _resized(consumer, in_units=width * group), consumer_remaps)]
    if norm is not None:
        rewrites.append((stage.norm, norm, _resized(norm, out_units=width), norm_remaps))
    swaps = [s for path, module, new, remaps in rewrites for s in _param_swaps(path, module, new, remaps)]
    commit_optimizer = _optimizer_commit(optimizer, swaps)

    # nothing above touched model or optimizer; from here on nothing can fail on bad input
    built = [(path, _rebuilt(module, new, remaps)) for path, module, new, remaps in rewrites]
    if noise > 0:
        _perturb_replicas_(built[0][1].weight, old, noise * producer.weight.float().std(correction=0).item(),
                           generator)
    for path, new in built:
        _set_module(model, path, new)
    commit_optimizer()
    return model


@torch.no_grad()
def _perturb_replicas_(weight: Tensor, old: int, std: float, generator: Optional[torch.Generator]) -> None:
    # only the replicas (units >= old) move; their optimizer state stays the original's
    extra = weight[old:]
    device = generator.device if generator is not None else extra.device
    extra.add_(torch.randn(extra.shape, generator=generator, device=device, dtype=extra.dtype).to(extra.device),
               alpha=std)


# --------------------------------------------------------------------------------------------
# deeper (C3D family)
# --------------------------------------------------------------------------------------------


def _c3d_fc_names(model: nn.Module) -> Tuple[str, ...]:
    # the hidden Linears, each followed by ReLU and dropout in the forward; fc8 is the output
    return tuple(model.fc_names)


def _c3d_pool_names(model: nn.Module) -> Dict[str, str]:
    # conv name → name of the MaxPool3d the forward applies after it (per instance)
    return dict(model.pool_names)


def _new_layer_name(model: nn.Module, after: str, taken: Sequence[str]) -> str:
    """``conv3b`` → ``conv3c``, ``conv1`` → ``conv1a``, ``fc6`` → ``fc6a``: the stage's first free letter."""
    match = re.fullmatch(r"(.*\d)[a-z]", after)
    base = match.group(1) if match else after
    for letter in string.ascii_lowercase:
        name = base + letter
        if name not in taken and not hasattr(model, name) and not hasattr(model, name + "_bn"):
            return name
    raise ValueError(f"no free layer name after {after!r}; pass name=...")


@torch.no_grad()
def _c3d_activation(model: nn.Module, after: str, data: Tensor) -> Tensor:
    """The output of conv ``after``'s chain (after ReLU, before its pool) on ``data`` in train
    mode, leaving every buffer and train/eval flag of the model as it was."""
    from .models._common import check_input

    check_input(data, model.in_channels, model.input_size, type(model).__name__)
    pools = _c3d_pool_names(model)
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        model.train()
        x = data
        for name in model.layer_names:
            bn = getattr(model, name + "_bn") if model.batch_norm else None
            pool = getattr(model, pools[name]) if name in pools and name != after else None
            x = model.chain(x, getattr(model, name), bn, "relu", 0.0, pool)
            if name == after:
                return x
    finally:
        for b, saved in buffers:
            b.copy_(saved)
        for m, mode in modes:
            m.training = mode
    raise AssertionError("unreachable: after is in layer_names")


def deeper(model: nn.Module, after: str, *, optimizer: Optional[torch.optim.Optimizer] = None,
           data: Optional[Tensor] = None, name: Optional[str] = None) -> nn.Module:
    """Insert an identity layer after layer ``after`` of a C3D/C3D-BN ``model``, in place, without
    changing what it computes; returns ``model``.

    After a conv: a 3×3×3 Conv3d (padding 1, same channels) with a Dirac kernel and zero bias,
    then (C3D-BN) a BatchNorm3d, then ReLU (idempotent on the ReLU output it receives). The
    pool that followed ``after`` moves after the new layer (the model's ``pool_names``). Without ``data`` the BatchNorm has
    running mean 0, variance 1, γ = sqrt(1 + eps), β = 0: identity in eval mode. With ``data``
    (an input batch) the model is run to ``after`` in train mode (buffers restored) and the
    BatchNorm gets the batch's mean μ and biased variance σ² as running statistics, γ =
    sqrt(σ² + eps) and β = μ: identity in eval mode, and in train mode on that batch. (C3D
    without BatchNorm needs no ``data``.)

    After a hidden Linear: an identity Linear with zero bias; the forward's ReLU follows it
    (dropout too, so train-mode outputs with dropout > 0 differ in distribution). That needs the
    model to list its hidden Linears in ``fc_names`` (each run as Linear → ReLU → dropout before
    ``fc8``); the stock C3D's forward runs a fixed fc6 → fc7 → fc8 and has none.

    The new layer is named ``name`` or the next free letter (``conv3b`` → ``conv3c``, its BN
    ``conv3c_bn``; ``fc6`` → ``fc6a``) and registered in ``layer_names`` (or ``fc_names``). Its
    parameters join ``optimizer``'s param group of ``after`` with empty state.

    Raises ValueError, leaving model and optimizer untouched, for models outside the C3D family,
    unknown or unsupported layers, taken names, or bad ``data``.
    """
    from .models.c3d_family import C3D

    if not isinstance(model, C3D):
        raise ValueError(f"deeper supports the C3D family (C3D, C3D-BN), not {type(model).__name__}")
    convs, fcs = tuple(model.layer_names), _c3d_fc_names(model)
    if after not in convs + fcs:
        raise ValueError(f"unknown layer {after!r} for deeper: choose one of {', '.join(convs + fcs)}")
    taken = convs + fcs + ("fc8",)
    if name is None:
        name = _new_layer_name(model, after, taken)
    elif (not isinstance(name, str) or not name.isidentifier() or name in taken or hasattr(model, name)
          or (after in convs and hasattr(model, name + "_bn"))):
        raise ValueError(f"layer name {name!r} is not a free identifier on {type(model).__name__}")
    old = getattr(model, after)
    if type(old) not in _UNIT_LAYERS:
        raise ValueError(f"{after!r} is a {type(old).__name__}, not a plain nn.Conv3d or nn.Linear")
    group = None
    if optimizer is not None:
        group = next((g for g in optimizer.param_groups if any(p is old.weight for p in g["params"])), None)
        if group is None:
            raise ValueError(f"the optimizer does not hold {after}.weight, so the new layer has no group to join")
    f = _factory(old)

    if after in fcs:
        layer = nn.Linear(old.out_features, old.out_features, **f)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(old.out_features, **f))
            layer.bias.zero_()
        modules = {name: layer}
        update = dict(fc_names=_insert(fcs, after, name))
    else:
        pools = _c3d_pool_names(model)
        channels = old.out_channels
        conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1, **f)
        remap.dirac_(conv.weight.data)
        with torch.no_grad():
            conv.bias.zero_()
        modules = {name: conv}
        if model.batch_norm:
            ref = getattr(model, after + "_bn")
            bn = nn.BatchNorm3d(channels, eps=ref.eps, momentum=ref.momentum, **f)
            mean = torch.zeros(channels, **f)
            var = torch.ones(channels, **f)
            if data is not None:
                y = _c3d_activation(model, after, data).to(**f)
                mean, var = y.mean(dim=(0, 2, 3, 4)), y.var(dim=(0, 2, 3, 4), correction=0)
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.weight.copy_(torch.sqrt(var + bn.eps))
                bn.bias.copy_(mean)
            modules[name + "_bn"] = bn
        update = dict(layer_names=_insert(convs, after, name))
        if after in pools:
            moved = {k: v for k, v in pools.items() if k != after}
            moved[name] = pools[after]
            update["pool_names"] = moved
    for module in modules.values():
        module.train(old.training)

    for key, module in modules.items():
        setattr(model, key, module)
    for key, value in update.items():
        setattr(model, key, value)
    if group is not None:
        group["params"].extend(p for m in modules.values() for p in m.parameters())
    return model


def _insert(names: Tuple[str, ...], after: str, name: str) -> Tuple[str, ...]:
    i = names.index(after) + 1
    return names[:i] + (name,) + names[i:]
