"""What every zoo model shares: a ``fused`` switch that changes only how conv chains compute."""


import functools
import inspect
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..nn import BATCH_NORMS, conv_bn_act, runs_hooks, stock_conv_bn_act


class FusableModel(nn.Module):
    """Base of the zoo models. ``fused`` and ``backend`` may be changed at any time; neither
    touches parameters or buffers, so fused and stock models have identical state_dicts.

    ``sync_bn`` (and ``process_group``, default WORLD), also changeable at any time: the fused
    forward synchronises training-mode BatchNorm statistics across ranks (fused SyncBatchNorm, see
    ``c3dzoo.ops.sync_batch_norm``). The stock forward (``fused=False``) ignores it.

    ``keep_conv_outputs`` (changeable at any time; fused training only): None keeps each
    training-mode layer's raw conv output for the backward except a stem's on a GPU (see
    ``c3dzoo.ops.keeps_conv_output``); False recomputes every conv in the backward instead (least
    memory, one more conv per layer); True keeps them all. Results are the same bit for bit."""

    def __init__(self, fused: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.fused = bool(fused)
        self.backend = backend
        self.sync_bn = False
        self.process_group = None
        self.keep_conv_outputs: Optional[bool] = None

    def chain(self, x, conv, bn=None, activation: str = "relu", negative_slope: float = 0.01, pool=None,
              defer: bool = False, activation_module=None, residual=None):
        """conv → bn → activation → pool, fused or stock according to ``self.fused``.

        ``defer=True`` when the result feeds the next ``chain`` directly: the fused path may then
        leave a training-mode BN's normalisation to that chain's input prologue (prologue fusion)
        and return a ``c3dzoo.ops.PendingBatchNorm`` instead of a tensor. ``activation_module``:
        the model's own activation module, if the chain has one (it runs, hooks and all, wherever
        the stock model would run it). ``residual``: a residual block's shortcut, added before the
        activation (in the conv kernel's epilogue in fused inference). The fused result keeps the
        backend's memory layout (channels_last_3d on the GPU backends): the zoo models' forwards
        only flatten, add or fuse it further, so a contiguous model pays no layout copies."""
        if self.fused:
            return conv_bn_act(x, conv, bn, activation, negative_slope, pool, self.backend,
                               self.sync_bn, self.process_group, defer=defer,
                               keep_conv_output=self.keep_conv_outputs, activation_module=activation_module,
                               layout="any", residual=residual)
        return stock_conv_bn_act(x, conv, bn, activation, negative_slope, pool, activation_module, residual)


def check_input(x: torch.Tensor, channels: int, input_size: Sequence[int], model: str) -> None:
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (c3dzoo.fuse): no shapes to check
        return
    expected: Tuple[int, ...] = (channels, *input_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != expected:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{model} expects input of shape (N, {', '.join(map(str, expected))}) "
            f"(N × C × frames × height × width), got {got}; build it with input_size=... for other sizes"
        )


def check_video_input(x: torch.Tensor, stem: nn.Module, min_size: Sequence[int], model: str) -> None:
    """``x`` must be N × C × frames × height × width, C the input channels of ``stem``'s first
    Conv3d (3 without one; a user's own stem may take optical flow's 2), each size at least
    ``min_size``'s."""
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (c3dzoo.fuse): no shapes to check
        return
    first = next((m for m in stem.modules() if isinstance(m, nn.Conv3d)), None)
    channels = first.in_channels if first is not None else 3
    if (not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != channels
            or any(s < m for s, m in zip(x.shape[2:], min_size))):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        least = ("every size at least 1" if tuple(min_size) == (1, 1, 1) else
                 f"at least {min_size[0]} frames of {min_size[1]}×{min_size[2]} pixels")
        raise ValueError(f"{model} expects input of shape (N, {channels}, frames, height, width) with {least}, "
                         f"got {got}")


def scaled(channels: int, width_mult: float) -> int:
    """A channel count scaled by ``width_mult`` (at least 1)."""
    return max(1, int(round(channels * width_mult)))


Chain = Callable[..., torch.Tensor]  # FusableModel.chain


def _is_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is the stock one (its children, in order)."""
    return isinstance(module, nn.Sequential) and type(module).forward in (nn.Sequential.forward,
                                                                         ChainSequential.forward)


def call_chained(module: nn.Module, x, chain: Optional[Chain] = None):
    """``module(x)``, with its Conv3d → BN → activation (→ MaxPool3d) chains run through ``chain``
    (a ``FusableModel.chain``) where it has any. A part that takes the chain (``takes_chain``: a
    ``ChainSequential``, a video ResNet block) is called with it, so its own hooks run as in the
    stock model; a plain Sequential without hooks is walked (``run_chained``); anything else —
    including a plain Sequential with hooks — is simply called, stock."""
    if chain is None:
        return module(x)
    if getattr(type(module), "takes_chain", False):
        # by keyword: hooks get the stock call's input, (x,) (and a pre-hook's new input keeps it)
        return module(x, chain=chain)
    if _is_sequential(module) and not runs_hooks(module):
        return run_chained(module, x, chain)
    return module(x)


def run_blocks(model: "FusableModel", x):
    """``x`` through each of ``model.blocks`` in turn (PyTorchVideo's ``Net.forward``), with the
    model's chain where it is fused; each block through ``nn.Module.__call__``, so its hooks run
    fused or not."""
    chain = model.chain if model.fused else None
    for block in model.blocks:
        x = call_chained(block, x, chain)
    return x


class ChainSequential(nn.Sequential):
    """An ``nn.Sequential`` (same children, same state_dict keys) that a fused zoo model calls with
    its chain: ``seq(x)`` is the stock Sequential, ``seq(x, chain=chain)`` runs its chains fused
    (``run_chained``). Called through ``nn.Module.__call__`` either way, so hooks on it (feature
    extraction at ``stem`` or ``layer3``, Grad-CAM on ``layer4``) run as they do in the stock model."""

    takes_chain = True

    def forward(self, x, chain: Optional[Chain] = None):
        if chain is None:
            return super().forward(x)
        return run_chained(self, x, chain)

    def _get_name(self) -> str:  # print(model) reads as torchvision's (subclasses keep their names)
        return "Sequential" if type(self) is ChainSequential else super()._get_name()


def _parts(seq: nn.Module):
    """``seq``'s children in forward order, looking through nested Sequentials that have no hooks
    (so a chain may span one: R(2+1)D's temporal conv and the BatchNorm after its Sequential) and
    leaving out ``nn.Identity`` placeholders without hooks (X3D's blocks without squeeze-excitation
    have one between conv_b's BatchNorm and its Swish)."""
    for child in seq:
        if _is_sequential(child) and not runs_hooks(child):
            yield from _parts(child)
        elif type(child) is nn.Identity and not runs_hooks(child):
            continue
        else:
            yield child


def _activation_of(module: Optional[nn.Module]) -> Optional[Tuple[str, float]]:
    """(activation, negative slope) of a ReLU or LeakyReLU module, else None."""
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", module.negative_slope
    return None


def add_residual_chained(seq: nn.Module, x, residual: torch.Tensor, activation: nn.Module,
                         chain: Optional[Chain] = None) -> torch.Tensor:
    """``activation(seq(x) + residual)``, a residual block's branch, shortcut sum and activation
    (a ReLU or LeakyReLU module). With ``chain``, where ``seq`` is a Sequential ending in a chain
    without activation or pool and neither it nor ``activation`` runs hooks (which must see the
    branch's own output), the sum and activation join that last chain (``FusableModel.chain``'s
    ``residual``: the conv kernel's epilogue in fused inference); else they run stock."""
    if chain is not None and _activation_of(activation) is not None and _is_sequential(seq) \
            and not runs_hooks(seq, activation):
        return run_chained(seq, x, chain, residual=(residual, activation))
    return activation(call_chained(seq, x, chain) + residual)


def run_chained(seq: nn.Module, x: torch.Tensor, chain: Optional[Chain] = None,
                residual: Optional[Tuple[torch.Tensor, nn.Module]] = None) -> torch.Tensor:
    """``seq(x)`` for a (possibly nested) Sequential, with each chain Conv3d → [BatchNorm3d |
    SyncBatchNorm] → [ReLU | LeakyReLU | SiLU] → [MaxPool3d] of its parts run as one ``chain`` call.

    Without ``chain``, ``seq`` is simply called. Parts that start no chain (a block, a Sequential
    with hooks, a module the user put there) are called as they are (``call_chained``).
    ``residual`` (a tensor and a ReLU / LeakyReLU module; see ``add_residual_chained``): the result
    is ``activation(seq(x) + tensor)``, the sum and activation in the last chain where it has
    neither. Reading the chains from the Sequential (rather than unpacking a fixed number of
    modules) lets Net2Net's ``deeper`` insert layers into a block of a fused model.
    """
    if chain is None:
        return seq(x) if residual is None else residual[1](seq(x) + residual[0])
    modules = list(_parts(seq))
    i = 0
    items = []  # chains (tuples) and modules called on their own
    while i < len(modules):
        conv = modules[i]
        i += 1
        if type(conv) is not nn.Conv3d:
            items.append(conv)
            continue
        bn = None
        if i < len(modules) and isinstance(modules[i], BATCH_NORMS):
            bn, i = modules[i], i + 1
        activation, slope, act = "none", 0.0, None
        if i < len(modules) and isinstance(modules[i], nn.ReLU):
            activation, act, i = "relu", modules[i], i + 1
        elif i < len(modules) and isinstance(modules[i], nn.LeakyReLU):
            activation, slope, act, i = "leaky_relu", modules[i].negative_slope, modules[i], i + 1
        elif i < len(modules) and isinstance(modules[i], nn.SiLU):  # (X3D's Swish is one)
            activation, act, i = "silu", modules[i], i + 1
        pool = None
        if i < len(modules) and isinstance(modules[i], nn.MaxPool3d):
            pool, i = modules[i], i + 1
        items.append((conv, bn, activation, slope, pool, act))
    last = items[-1] if items else None
    fold = residual is not None and isinstance(last, tuple) and last[2] == "none" and last[4] is None
    for k, item in enumerate(items):
        if isinstance(item, tuple):
            conv, bn, activation, slope, pool, act = item
            if fold and k == len(items) - 1:  # the shortcut sum and activation join the last chain
                activation, slope = _activation_of(residual[1])
                x = chain(x, conv, bn, activation, slope, None, activation_module=residual[1], residual=residual[0])
                continue
            # a chain that feeds the next chain directly may leave its BN to that one's input
            feeds_chain = k + 1 < len(items) and isinstance(items[k + 1], tuple)
            x = chain(x, conv, bn, activation, slope, pool, defer=feeds_chain, activation_module=act)
        else:
            x = call_chained(item, x, chain)
    if residual is not None and not fold:
        x = residual[1](x + residual[0])
    return x


@torch.fx.wrap  # a call in traced graphs (c3dzoo.fuse), not a branch on a traced shape
def average_pool_within(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """``F.avg_pool3d`` whose window, in each dimension the input is shorter than, covers the input."""
    # int(): a constant window where the TorchScript exporter traces sizes as tensors
    kernel = [k if k <= s else int(s) for k, s in zip(kernel_size, x.shape[-3:])]
    return F.avg_pool3d(x, kernel, stride)


class AvgPool3dWithin(nn.AvgPool3d):
    """``nn.AvgPool3d`` (no padding) whose window shrinks to the input where the input is smaller
    (see ``average_pool_within``); where it fits, exactly ``nn.AvgPool3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return average_pool_within(x, self.kernel_size, self.stride)


def published_weights(builder):
    """Gives a builder the ``weights=`` argument: ``weights="kinetics400"`` builds the model with
    those published weights loaded strictly (``c3dzoo.weights``; downloaded once). They fix the
    class count: for another, fine-tune with
    ``c3dzoo.load_pretrained(model, "r3d_18:kinetics400", head="skip")``."""

    @functools.wraps(builder)
    def build(*args, weights: Optional[str] = None, **kwargs):
        if weights is None:
            return builder(*args, **kwargs)
        from c3dzoo import weights as published
        from c3dzoo.transfer import load_pretrained

        found = published.entry(builder.__name__, weights)
        classes = args[0] if args else kwargs.get("num_classes", found.num_classes)
        if classes != found.num_classes:
            raise ValueError(f"{builder.__name__} weights {weights!r} have {found.num_classes} classes, not "
                             f"{classes}; for another class count fine-tune from them: "
                             f"c3dzoo.load_pretrained(model, '{builder.__name__}:{weights}', head='skip')")
        model = builder(*args, **{**kwargs, "num_classes": found.num_classes})
        # strictly; files of old PyTorch versions lack the BatchNorms' num_batches_tracked
        load_pretrained(model, published.load_state_dict(builder.__name__, weights),
                        name=f"{builder.__name__}:{weights}")
        return model

    signature = inspect.signature(builder)
    build.__signature__ = signature.replace(parameters=[*signature.parameters.values(), inspect.Parameter(
        "weights", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str])])
    return build
