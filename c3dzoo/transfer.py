"""Transfer learning and ensembles: pretrained weights, head replacement, freezing, discriminative
learning rates, feature extraction with a linear probe, and probability-averaging ensembles.

Everything works on the zoo models with ``fused`` either way and on ``c3dzoo.fuse``d models (whose
modules sit at the same names). Errors about the weights themselves are ``PretrainedError`` (a
``CheckpointError``, so the command line reports them as bad arguments, exit status 2).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import weights as _published
from .checkpoint import CheckpointError, inference_weights

Tensor = torch.Tensor
StateSource = Union[str, "os.PathLike[str]", Mapping]

__all__ = [
    "PretrainedError", "LoadReport", "read_state_dict", "load_pretrained", "head_name", "replace_head",
    "model_layers", "head_classes", "freeze", "frozen_layers", "param_groups", "extract_features", "LinearProbe",
    "linear_probe", "EnsembleProbabilities", "ensemble_probabilities", "models_from_checkpoints",
]


class PretrainedError(CheckpointError, ValueError):
    """Weights that cannot be read or do not fit the model (one-line message)."""


# --------------------------------------------------------------------------------------------
# which zoo model this is, and where its classifier head sits
# --------------------------------------------------------------------------------------------

def _last_block(model: nn.Module, before: int = 0) -> str:
    """The last of a ResNet3D's, SlowFast's or X3D's ``blocks`` (its head; also in a traced copy, whose
    ``blocks`` is no ModuleList), or the one ``before`` blocks before it."""
    return f"blocks.{max(int(n) for n, _ in model.get_submodule('blocks').named_children()) - before}"


def _head_proj(model: nn.Module) -> str:
    return _last_block(model) + ".proj"


def _head_pool(model: nn.Module) -> Tuple[str, ...]:
    return (_last_block(model) + ".pool",)


# the classifier head of each zoo family (a Linear; S3D's is a 1×1×1 Conv3d; a ResNet3D's sits in
# its last block), and the hidden fully connected layers whose features are conventionally taken
# after the activation the model applies
_HEADS = {"C3D": "fc8", "ConvColumn": "fc7", "VideoResNet": "fc", "S3D": "classifier.1",
          "ResNet3D": _head_proj, "SlowFast": _head_proj, "X3D": _head_proj}
_HIDDEN_FCS = {"C3D": ("fc6", "fc7"), "ConvColumn": ("fc5", "fc6")}
# layers whose output positions the head treats alike and averages (S3D's classifier and the
# ResNet-50s' proj run per position of the average pool, then the mean is taken): their features
# are that mean (SlowFast's pool is the block before its head, pooling and concatenating both
# pathways; X3D's head pool is its ProjectedPool, whose output, post_conv's after its ReLU, the head's
# proj takes at each position)
_POSITION_MEANS = {"S3D": lambda model: ("avgpool",), "ResNet3D": _head_pool,
                   "SlowFast": lambda model: (_last_block(model, 1),), "X3D": _head_pool}
# families whose layers are the parts of one container (then the modules after it)
_LAYER_CONTAINERS = {"S3D": "features", "ResNet3D": "blocks", "SlowFast": "blocks", "X3D": "blocks"}


def _family(model: nn.Module) -> Optional[str]:
    """"C3D", "ConvColumn", "VideoResNet", "S3D", "ResNet3D", "SlowFast" or "X3D" for a zoo model or a
    ``c3dzoo.fuse``d one, else None."""
    from .models.c3d_family import C3D
    from .models.jester import ConvColumn
    from .models.resnet3d import ResNet3D, SlowFast
    from .models.separable_inception import S3D
    from .models.video_resnet import VideoResNet
    from .models.x3d import X3D

    for cls in (C3D, ConvColumn, VideoResNet, S3D, ResNet3D, SlowFast, X3D):
        if isinstance(model, cls):
            return cls.__name__
    # torch.fx.symbolic_trace names a GraphModule's class after the traced model's class
    if isinstance(model, torch.fx.GraphModule) and type(model).__name__ in _HEADS:
        return type(model).__name__
    return None


def head_name(model: nn.Module) -> str:
    """Name of the model's classifier head (C3D ``fc8``, Jester ``fc7``, video ResNets ``fc``, S3D's
    1×1×1 conv ``classifier.1``, a ResNet3D's, SlowFast's or X3D's ``blocks.N.proj``); for a traced GraphModule of
    another model, the Linear whose output is the model's output."""
    family = _family(model)
    if family is not None:
        head = _HEADS[family]
        return head(model) if callable(head) else head
    if isinstance(model, torch.fx.GraphModule):
        output = next(n for n in model.graph.nodes if n.op == "output")
        last = output.args[0]
        if isinstance(last, torch.fx.Node) and last.op == "call_module" and isinstance(
                model.get_submodule(last.target), nn.Linear):
            return last.target
    raise ValueError(f"cannot tell which Linear is the classifier head of {type(model).__name__}; "
                     f"pass head=NAME")


def _is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv3d) and tuple(module.kernel_size) == (1, 1, 1) and module.groups == 1


def _head_layer(model: nn.Module, name: str) -> nn.Module:
    """Module ``name`` of ``model``, checked to be a classifier head: an nn.Linear or a 1×1×1 nn.Conv3d."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module {name!r}") from None
    if not isinstance(module, nn.Linear) and not _is_pointwise_conv(module):
        raise ValueError(f"{type(model).__name__}.{name} is a {type(module).__name__}, not an nn.Linear "
                         f"(or a 1×1×1 nn.Conv3d)")
    return module


def head_classes(model: nn.Module) -> int:
    """The number of classes of ``model``'s head (``head_name``)."""
    return _head_layer(model, head_name(model)).weight.shape[0]


def replace_head(model: nn.Module, num_classes: int, *, head: Optional[str] = None) -> nn.Module:
    """Replace the classifier head (a Linear, or S3D's 1×1×1 Conv3d) by a new, freshly initialised
    one of the same kind with ``num_classes`` outputs, on the old one's device and dtype, and
    return ``model``.

    A new module, not a changed ``out_features`` attribute (which would change nothing). Video
    ResNets and PyTorchVideo's models (ResNet3D, SlowFast, X3D) get their builders' head
    initialisation (normal(0, 0.01), zero bias); the others PyTorch's default initialisation, as
    their builders give. An optimizer made before this call
    still holds the old head's parameters: make it (or ``param_groups``) afterwards.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    name = head or head_name(model)
    old = _head_layer(model, name)
    like = {"bias": old.bias is not None, "device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, **like)
    else:
        new = nn.Conv3d(old.in_channels, num_classes, 1, **like)
    if _family(model) in ("VideoResNet", "ResNet3D", "SlowFast", "X3D"):  # torchvision's and PyTorchVideo's
        nn.init.normal_(new.weight, 0, 0.01)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)  # GraphModules call it by attribute name, so they pick it up too
    return model


# --------------------------------------------------------------------------------------------
# pretrained weights
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadReport:
    """What ``load_pretrained`` loaded. ``str()`` gives one line for logs."""

    source: str
    format: str  # "c3dzoo checkpoint of c3d_bn(...)", "state_dict", "{'state_dict': ...}", ...
    loaded: int  # tensors copied into the model
    stripped_prefix: str = ""  # e.g. "module." (DDP) removed from every key
    head: Optional[str] = None  # the head's name when it was left as it was (head="skip")
    file_classes: Optional[int] = None  # classes of the file's head, where it has one
    class_names: Optional[List[str]] = None  # from a c3dzoo checkpoint

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source} ({self.format}"
        if self.stripped_prefix:
            text += f", prefix {self.stripped_prefix!r} removed"
        text += ")"
        if self.head is not None:
            theirs = f"; the file's has {self.file_classes} classes" if self.file_classes else ""
            text += f"; head {self.head} not loaded: the model keeps its own{theirs}"
        return text


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _shape(t: Tensor) -> str:
    return "×".join(map(str, t.shape)) or "scalar"


def read_state_dict(source: StateSource, *, name: Optional[str] = None
                    ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state_dict, info)`` from a file path or an in-memory object: a c3dzoo training checkpoint,
    a plain state_dict, or one wrapped as {"state_dict": ...} / {"model": ...} (nested up to three
    deep), with a "module." (DDP) or "_orig_mod." (torch.compile) prefix on every key removed.
    ``info`` holds ``source``, ``format``, ``stripped_prefix`` and, for our checkpoints,
    ``checkpoint`` (the dict without its weights). Files are read with ``weights_only=True``.
    ``"MODEL:WEIGHTS"`` names published weights (``c3dzoo.weights``: ``"r3d_18:kinetics400"``),
    downloaded once."""
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source) \
            and _published.parse(os.fspath(source)) is not None:
        try:
            source, name = _published.load_state_dict(*_published.parse(os.fspath(source))), name or os.fspath(source)
        except _published.WeightsError as exc:
            raise PretrainedError(str(exc)) from None
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        if not os.path.isfile(source):
            raise PretrainedError(f"pretrained weights not found: {label}")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated file, a pickled whole model, permissions...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PretrainedError(f"cannot read pretrained weights {label}: {reason}") from None
    elif isinstance(source, Mapping):
        label, obj = name or "the given state_dict", source
    else:
        raise TypeError(f"expected a path or a state_dict, got {type(source).__name__}")

    info: Dict[str, Any] = {"source": label, "format": "state_dict", "stripped_prefix": ""}
    wrappers = []
    for _ in range(3):
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        if "model" in obj and "model_name" in obj and "model_kwargs" in obj:  # ours
            info["checkpoint"] = {k: v for k, v in obj.items() if k not in ("model", "ema", "optimizer", "scheduler")}
            kwargs = ", ".join(f"{k}={v}" for k, v in obj["model_kwargs"].items())
            wrappers.append(f"c3dzoo checkpoint of {obj['model_name']}({kwargs}"
                            f"{', its EMA weights' if 'ema' in obj else ''})")
            obj = inference_weights(obj)
            continue
        key = next((k for k in ("state_dict", "model_state_dict", "model", "net") if
                    isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        wrappers.append(f"{{{key!r}: ...}}")
        obj = obj[key]
    if not _is_state_dict(obj):
        what = (f"a dict with keys {', '.join(map(repr, list(obj)[:5]))}" if isinstance(obj, Mapping) and obj
                else "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}")
        raise PretrainedError(f"{label} holds no state_dict (a dict of tensors) but {what}")
    if wrappers:
        info["format"] = " in ".join(reversed(wrappers)) if len(wrappers) > 1 else wrappers[0]
    state = dict(obj)
    stripped = ""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    info["stripped_prefix"] = stripped
    return state, info


def _first(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … (+{len(items) - n})" if len(items) > n else "")


def load_pretrained(model: nn.Module, source: StateSource, *, head: str = "load",
                    name: Optional[str] = None) -> LoadReport:
    """Load weights into ``model`` strictly, or raise ``PretrainedError`` saying what does not fit.

    ``source``: a path or an in-memory object (see ``read_state_dict``): our training checkpoints;
    the published C3D_BN layout (= ``c3d_bn``); the widely used C3D port's Sports-1M file
    (= ``c3d``, 487 classes); torchvision video ResNet weights (= ``r3d_18``, ``mc3_18``,
    ``r2plus1d_18``); wrapped or "module."-prefixed versions of these.

    ``head="load"`` loads everything, the head included: a class count that differs is an error
    that says what to do. ``head="skip"`` loads everything but the final Linear (the fine-tuning
    flow: the model keeps its own, new head) — the returned report says so. Nothing is ever loaded
    partially otherwise: a missing, unexpected or misshapen tensor is an error and leaves the model
    untouched. (BatchNorm ``num_batches_tracked`` counters, absent from files of old PyTorch
    versions, keep the model's values, as ``load_state_dict`` does.)
    """
    if head not in ("load", "skip"):
        raise ValueError(f"head must be 'load' or 'skip', got {head!r}")
    state, info = read_state_dict(source, name=name)
    label = info["source"]
    expected = model.state_dict()
    try:
        head_module = head_name(model)
    except ValueError:
        if head == "skip":
            raise
        head_module = None
    head_keys = {f"{head_module}.{p}" for p in ("weight", "bias")} & set(expected) if head_module else set()
    weight_key = f"{head_module}.weight"
    file_classes = state[weight_key].shape[0] if weight_key in state and state[weight_key].dim() in (2, 5) else None

    skipped = head_keys if head == "skip" else set()
    missing = [k for k in expected if k not in state and k not in skipped
               and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and k not in skipped and state[k].shape != expected[k].shape]
    described = f"{label} ({info['format']})" if info["format"] != "state_dict" else label

    if head == "load" and mismatched and not missing and not unexpected and set(mismatched) <= head_keys \
            and all(state[k].shape[1:] == expected[k].shape[1:] for k in mismatched):
        model_classes = expected[weight_key].shape[0]
        raise PretrainedError(
            f"{described} has {file_classes} classes ({weight_key} {_shape(state[weight_key])}) but the model "
            f"has {model_classes}: to keep the file's head build the model with num_classes={file_classes} "
            f"(--num-classes {file_classes}) or call replace_head(model, {file_classes}) first; to keep "
            f"the model's new head load with head='skip'")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
        if mismatched:
            shapes = [f"{k} file {_shape(state[k])} vs model {_shape(expected[k])}" for k in mismatched]
            parts.append(f"{len(mismatched)} of another shape ({_first(shapes, 2)})")
        if head_keys and not unexpected and not mismatched and set(missing) <= head_keys:
            parts.append("it has no head: load with head='skip' to keep the model's own")
        raise PretrainedError(f"{described} does not fit {type(model).__name__}: {'; '.join(parts)}")

    # the model's own tensors for the skipped head and absent counters, so the load stays strict
    full = dict(expected)
    full.update({k: v for k, v in state.items() if k not in skipped})
    model.load_state_dict(full, strict=True)
    checkpoint = info.get("checkpoint") or {}
    return LoadReport(
        source=label, format=info["format"], loaded=len(state) - len(skipped & set(state)),
        stripped_prefix=info["stripped_prefix"], head=head_module if head == "skip" else None,
        file_classes=file_classes,
        class_names=list(checkpoint["class_names"]) if checkpoint.get("class_names") else None)


# --------------------------------------------------------------------------------------------
# freezing and discriminative learning rates
# --------------------------------------------------------------------------------------------


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _layer_groups(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """[(layer, [top-level module names])] in forward order: the layers ``freeze`` counts in."""
    head = None
    try:
        head = head_name(model)
    except ValueError:
        pass
    if hasattr(model, "layer_names") and hasattr(model, "fc_names"):
        # C3D: its own layer list (Net2Net's deeper inserts layers there, registered out of order)
        names = [n for n in (*model.layer_names, *model.fc_names, head) if n]
    elif isinstance(getattr(model, _LAYER_CONTAINERS.get(_family(model), ""), None), nn.Module):
        # S3D's layers are the parts of its features (stem convs, Inception blocks), then the
        # head; a ResNet3D's its blocks (stem, stages, head); a traced copy's alike
        container = _LAYER_CONTAINERS[_family(model)]
        names = [f"{container}.{n}" for n, m in model.get_submodule(container).named_children() if _holds_state(m)]
        names += [n for n, m in model.named_children() if n != container and _holds_state(m)]
    else:
        # registration order is forward order for the zoo models and for traced GraphModules
        names = [n for n, m in model.named_children() if _holds_state(m)]
    children = dict(model.named_modules())
    groups, taken = [], set()
    for n in names:
        if n in taken or n not in children:
            continue
        # a BatchNorm named after its conv (C3D's conv1_bn) belongs to that conv's layer
        members = [n] + ([n + "_bn"] if n + "_bn" in children else [])
        taken.update(members)
        groups.append((n, members))
    return groups


def model_layers(model: nn.Module) -> List[str]:
    """The layer names ``freeze(model, "up-to=LAYER")`` accepts, in forward order."""
    return [name for name, _ in _layer_groups(model)]


class _StayInEval:
    """Stands in for a frozen BatchNorm's ``train`` method, so ``model.train()`` leaves it in eval
    mode. An instance attribute shadows ``nn.Module.train`` for that one module only; unlike a
    subclass swap it keeps the module's type (``c3dzoo.fuse`` matches ``nn.BatchNorm3d`` exactly)
    and its state_dict, and unlike a closure it survives pickling and ``copy.deepcopy``."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def _pin_eval(module: nn.Module) -> None:
    module.__dict__["train"] = _StayInEval(module)
    module.training = False


def _unpin(module: nn.Module, training: bool) -> None:
    if isinstance(module.__dict__.get("train"), _StayInEval):
        del module.__dict__["train"]
        module.training = training


def freeze(model: nn.Module, spec: str) -> List[str]:
    """Freeze part of ``model`` for fine-tuning; returns the frozen layers' names.

    ``spec``: ``"none"`` (everything trains), ``"features"`` (every layer before the first fully
    connected one: C3D's convs, the Jester conv blocks, a video ResNet's stem and layer1–4, S3D's
    features, a PyTorchVideo model's stem and stages: X3D's head block, its ProjectedPool convs
    with it, trains), or
    ``"up-to=LAYER"`` (LAYER and every layer before it; see ``model_layers``; for C3D
    ``up-to=fc7`` trains only the head). Each call sets the whole state (it first unfreezes).

    Frozen parameters get ``requires_grad=False`` and lose any gradient they hold (so an optimizer
    built over all parameters, with momentum and weight decay, leaves them as they are). Frozen
    BatchNorms go to eval mode and stay there through later ``model.train()`` calls, so they use
    and keep their running statistics, and the fused op takes its folded-BN path there.
    """
    groups = _layer_groups(model)
    names = [n for n, _ in groups]
    if not isinstance(spec, str):
        raise ValueError(f"freeze spec must be a string, got {type(spec).__name__}")
    if spec == "none":
        count = 0
    elif spec == "features":
        # up to the first fully connected layer, or the head where it is a conv (S3D)
        try:
            head = model.get_submodule(head_name(model))
        except ValueError:
            head = None
        count = next((i for i, (_, members) in enumerate(groups)
                      if any(isinstance(m, nn.Linear) or m is head for member in members
                             for m in model.get_submodule(member).modules())), len(groups))
    elif spec.startswith("up-to="):
        layer = spec[len("up-to="):]
        if layer not in names:
            raise ValueError(f"--freeze up-to={layer}: {type(model).__name__} has no layer {layer!r}; "
                             f"layers: {', '.join(names)}")
        count = names.index(layer) + 1
    else:
        raise ValueError(f"freeze spec must be 'none', 'features' or 'up-to=LAYER', got {spec!r}")

    for module in model.modules():
        _unpin(module, model.training)
    for p in model.parameters():
        p.requires_grad_(True)
    frozen = groups[:count]
    for _, members in frozen:
        for member in members:
            sub = model.get_submodule(member)
            for p in sub.parameters():
                p.requires_grad_(False)
                p.grad = None  # SGD/Adam skip parameters without a gradient, decay and momentum included
            for m in sub.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    _pin_eval(m)
    return [n for n, _ in frozen]


def frozen_layers(model: nn.Module) -> List[str]:
    """The layers none of whose parameters train (what ``freeze`` froze)."""
    return [name for name, members in _layer_groups(model)
            if not any(p.requires_grad for m in members for p in model.get_submodule(m).parameters())]


def param_groups(model: nn.Module, lr: float, *, head_lr_mult: float = 1.0,
                 weight_decay: Optional[float] = None, head: Optional[str] = None) -> List[Dict[str, Any]]:
    """Optimizer parameter groups for discriminative learning rates: the body at ``lr``, the head
    (final Linear) at ``lr * head_lr_mult``; trainable parameters only, empty groups left out.
    Each group has a ``name`` ("body" / "head"). ``torch.optim.SGD(param_groups(model, 0.01,
    head_lr_mult=10), momentum=0.9)``; LR schedulers scale each group's own lr."""
    if not lr > 0 or not head_lr_mult > 0:
        raise ValueError(f"lr and head_lr_mult must be positive, got {lr} and {head_lr_mult}")
    head_ids = {id(p) for p in _head_layer(model, head or head_name(model)).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "body", "params": [p for p in trainable if id(p) not in head_ids], "lr": lr},
        {"name": "head", "params": [p for p in trainable if id(p) in head_ids], "lr": lr * head_lr_mult},
    ]
    if weight_decay is not None:
        for g in groups:
            g["weight_decay"] = weight_decay
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    return groups


# --------------------------------------------------------------------------------------------
# feature extraction
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the feature hook: nothing after the requested layer needs to run."""


def _activation_after(model: nn.Module, layer: str):
    """The activation the model applies right after ``layer`` (C3D fc6/fc7: ReLU; Jester fc5/fc6:
    LeakyReLU), or None."""
    family = _family(model)
    hidden = getattr(model, "fc_names", None) or _HIDDEN_FCS.get(family, ())
    act = getattr(model, "relu", None)
    if layer in hidden and isinstance(act, nn.ReLU):
        return F.relu
    if layer in hidden and isinstance(act, nn.LeakyReLU):
        return lambda x: F.leaky_relu(x, act.negative_slope)
    return None


def _batches(data, batch_size: int) -> Iterable:
    if isinstance(data, Tensor):
        if data.dim() != 5:
            raise ValueError(f"expected clips N × C × T × H × W, got shape {tuple(data.shape)}")
        return (data[i:i + batch_size] for i in range(0, data.shape[0], batch_size))
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        views = getattr(data, "views", 1)  # samples of several views: about batch_size clips a batch
        return torch.utils.data.DataLoader(data, batch_size=max(1, batch_size // views), shuffle=False)
    return data


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


class _EvalMode:
    """Every module in eval mode inside the block; each module's own flag restored after
    (frozen BatchNorms included, which ``model.train(flag)`` alone would not restore)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def extract_features(model: nn.Module, data, layer: str = "fc6", *, activation: str = "auto",
                     batch_size: int = 32, return_labels: bool = False, normalize: Optional[str] = None):
    """Features of ``data`` at module ``layer``: an N × D float32 CPU tensor (each output flattened).

    ``data``: a clip tensor N × C × T × H × W, a map-style Dataset of (clip, label), or an iterable
    of batches (a DataLoader) yielding clips or (clips, labels, ...). The model runs in eval mode
    under ``no_grad`` (fused chains take their folded-BN inference path when it is fused), on its
    own device; a forward hook takes the layer's output at its first call and stops the forward
    there. ``activation="auto"`` applies the activation the model applies after that layer (C3D
    fc6/fc7: ReLU, the convention of the C3D paper's fc6 features — Caffe's in-place ReLU leaves
    the fc6 blob rectified; Jester fc5/fc6: LeakyReLU); ``"none"`` gives the raw output. S3D's
    ``avgpool`` gives the mean over its output positions (1024-d at any clip size), as its head
    averages them.
    ``return_labels=True`` returns ``(features, labels)`` and needs labelled batches.

    Samples of several views (``V × C × T × H × W`` each: ``VideoClipDataset(clips=, crops=)``)
    give one row per sample, the mean of its views' features; ``normalize="l2"`` then scales each
    row to unit length — the C3D paper's video descriptor (fc6 averaged over a video's clips,
    L2-normalised, for a linear SVM). ``batch_size`` counts clips either way.
    """
    if activation not in ("auto", "none"):
        raise ValueError(f"activation must be 'auto' or 'none', got {activation!r}")
    if normalize not in (None, "l2"):
        raise ValueError(f"normalize must be None or 'l2', got {normalize!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no layer {layer!r}; layers: "
                         f"{', '.join(n for n, _ in model.named_children() if not n.startswith('c3dzoo_'))}"
                         ) from None
    act = _activation_after(model, layer) if activation == "auto" else None
    position_mean = layer in _POSITION_MEANS.get(_family(model), lambda model: ())(model)
    device, dtype = _model_device_dtype(model)
    captured: List[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _StopForward

    features, labels = [], []
    handle = module.register_forward_hook(hook)
    try:
        with _EvalMode(model), torch.no_grad():
            for batch in _batches(data, batch_size):
                if isinstance(batch, (tuple, list)):
                    clips = batch[0]
                    if return_labels:
                        if len(batch) < 2:
                            raise ValueError("return_labels=True needs batches of (clips, labels)")
                        labels.append(torch.as_tensor(batch[1]).long().reshape(-1).cpu())
                elif return_labels:
                    raise ValueError("return_labels=True needs batches of (clips, labels), got bare clips")
                else:
                    clips = batch
                views = clips.shape[1] if clips.dim() == 6 else 1  # B × V × C × T × H × W: a video's views
                if views > 1:
                    clips = clips.flatten(0, 1)
                captured.clear()
                try:
                    model(clips.to(device, dtype=dtype if clips.is_floating_point() else None))
                except _StopForward:
                    pass
                if not captured:
                    raise ValueError(
                        f"layer {layer!r} did not run as a module in {type(model).__name__}'s forward; "
                        f"take a layer the forward calls (e.g. an fc)")
                out = captured[0]
                if act is not None:
                    out = act(out)
                if position_mean:
                    out = out.mean(dim=tuple(range(2, out.dim())))
                out = out.flatten(1).float()
                features.append((out.view(-1, views, out.shape[1]).mean(1) if views > 1 else out).cpu())
    finally:
        handle.remove()
    if not features:
        raise ValueError("no clips to extract features from")
    result = torch.cat(features)
    if normalize == "l2":
        result = F.normalize(result, dim=1)
    if return_labels:
        return result, torch.cat(labels)
    return result


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearProbe:
    """A linear classifier on standardised features. ``scores(x)`` gives N × num_classes decision
    scores (logits for logistic regression, margins for the SVM); ``predict(x)`` the classes."""

    classifier: str  # "logreg" or "svm"
    backend: str  # "torch" or "sklearn"
    num_classes: int
    mean: Tensor
    std: Tensor
    weight: Optional[Tensor] = None  # torch backend: num_classes × D, on standardised features
    bias: Optional[Tensor] = None
    estimator: Any = None  # sklearn backend

    def _standardise(self, features: Tensor) -> Tensor:
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected features N × {self.mean.shape[0]}, got shape {tuple(features.shape)}")
        return (features.double() - self.mean) / self.std

    def scores(self, features: Tensor) -> Tensor:
        x = self._standardise(features)
        if self.estimator is None:
            return (x @ self.weight.T + self.bias).float()
        decision = torch.as_tensor(self.estimator.decision_function(x.numpy())).double()
        if decision.dim() == 1:  # scikit-learn's binary case: one margin for classes_[1]
            decision = torch.stack([-decision, decision], 1)
        # classes absent from the training labels can never be predicted
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), dtype=torch.float64)
        out[:, torch.as_tensor(self.estimator.classes_).long()] = decision
        return out.float()

    def predict(self, features: Tensor) -> Tensor:
        return self.scores(features).argmax(1)


def _sklearn_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("sklearn") is not None


def linear_probe(features: Tensor, labels: Tensor, *, num_classes: Optional[int] = None,
                 classifier: str = "logreg", backend: str = "auto", l2: float = 1e-3,
                 max_iter: int = 500) -> LinearProbe:
    """Train a linear classifier on ``features`` (N × D) and integer ``labels`` (N), deterministically.

    ``classifier="logreg"``: multinomial logistic regression, by default our own (zero start,
    full-batch L-BFGS with strong-Wolfe line search, float64); ``"svm"``: scikit-learn's LinearSVC
    (one-vs-rest squared hinge; ``pip install 'c3dzoo[probe]'``). ``backend="sklearn"`` also takes
    scikit-learn's LogisticRegression for logreg. Features are standardised with the training set's
    mean and std. ``l2`` is λ in mean loss + ½λ‖W‖² (bias not penalised); scikit-learn's C = 1/(λ·N).
    """
    if classifier not in ("logreg", "svm"):
        raise ValueError(f"classifier must be 'logreg' or 'svm', got {classifier!r}")
    if backend not in ("auto", "torch", "sklearn"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'sklearn', got {backend!r}")
    if backend == "auto":
        backend = "torch" if classifier == "logreg" else "sklearn"
    if classifier == "svm" and backend == "torch":
        raise ValueError("the linear SVM comes from scikit-learn; use backend='sklearn' or classifier='logreg'")
    if backend == "sklearn" and not _sklearn_available():
        raise ValueError(f"classifier {classifier!r} with scikit-learn needs it installed "
                         f"(pip install 'c3dzoo[probe]'); classifier='logreg' runs without it")
    if not l2 > 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    x = torch.as_tensor(features).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected features N × D with N ≥ 1, got shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if y.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {y.min().item()}")
    num_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.max() >= num_classes:
        raise ValueError(f"label {y.max().item()} is out of range for {num_classes} classes")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay as they are
    probe = LinearProbe(classifier, backend, num_classes, mean, std)
    xs = (x - mean) / std
    n = x.shape[0]

    if backend == "sklearn":
        if len(torch.unique(y)) < 2:
            raise ValueError("scikit-learn's classifiers need at least two classes in the training labels")
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        c = 1.0 / (l2 * n)
        estimator = (LogisticRegression(C=c, max_iter=max_iter) if classifier == "logreg"
                     else LinearSVC(C=c, max_iter=max(max_iter, 1000), random_state=0))
        probe.estimator = estimator.fit(xs.numpy(), y.numpy())
        return probe

    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    probe.weight, probe.bias = weight.detach(), bias.detach()
    return probe


# --------------------------------------------------------------------------------------------
# ensembles
# --------------------------------------------------------------------------------------------


class EnsembleProbabilities(NamedTuple):
    """Class probabilities: ``per_model`` M × N × C (each model's), ``combined`` N × C (their mean)."""

    per_model: Tensor
    combined: Tensor


def ensemble_probabilities(models: Sequence[nn.Module], clips: Tensor, *, batch_size: int = 32
                           ) -> EnsembleProbabilities:
    """Class probabilities of ``clips`` (N × C × T × H × W) from each model (softmax of its logits,
    in eval mode, on the model's own device) and their average, on the CPU in float32."""
    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one model")
    per_model = []
    for i, model in enumerate(models):
        device, dtype = _model_device_dtype(model)
        with _EvalMode(model), torch.no_grad():
            probs = torch.cat([model(batch.to(device, dtype=dtype)).float().softmax(1).cpu()
                               for batch in _batches(clips, batch_size)])
        if per_model and probs.shape[1] != per_model[0].shape[1]:
            raise ValueError(f"ensemble members disagree on the number of classes: model 0 has "
                             f"{per_model[0].shape[1]}, model {i} has {probs.shape[1]}")
        per_model.append(probs)
    stacked = torch.stack(per_model)
    return EnsembleProbabilities(stacked, stacked.mean(0))


def models_from_checkpoints(paths: Sequence[str]) -> Tuple[List[nn.Module], List[str]]:
    """Stock models from c3dzoo training checkpoints (for ``predict --checkpoint A B C``) and their
    shared class names; raises CheckpointError when they disagree on the classes."""
    from . import checkpoint as ckpt

    models, names, first = [], None, None
    for path in paths:
        checkpoint = ckpt.load(path)
        model = ckpt.stock_model(checkpoint, path)
        classes = model.state_dict()[f"{head_name(model)}.weight"].shape[0]
        these = list(checkpoint.get("class_names") or [f"class {i}" for i in range(classes)])
        if names is not None and these != names:
            raise CheckpointError(f"checkpoints disagree on the classes: {first} has {len(names)} "
                                  f"({_first(names)}), {path} has {len(these)} ({_first(these)})")
        names, first = these, first or path
        models.append(model)
    if not models:
        raise ValueError("give at least one checkpoint")
    return models, names
