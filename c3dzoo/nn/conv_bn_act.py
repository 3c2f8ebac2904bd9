"""Drop-in fused Conv3d → BatchNorm3d → activation (→ MaxPool3d) built from real torch.nn modules."""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import PendingBatchNorm, conv3d_bn_act, unsupported_pool_reason
from ..ops._weight_cache import mark_changed
from ..ops.reference import apply_activation

Tensor = torch.Tensor


# the BatchNorms a fused chain takes (a SyncBatchNorm synchronises its statistics, see conv_bn_act)
BATCH_NORMS = (nn.BatchNorm3d, nn.SyncBatchNorm)


def has_stock_forward(module: nn.Module, *classes: type) -> bool:
    """Whether ``module`` is one of ``classes`` and computes what that class computes: a subclass
    that overrides ``forward`` (a frozen BatchNorm that ignores the training flag, a clipped ReLU)
    computes something the fused op cannot know, so its chain runs stock."""
    return isinstance(module, classes) and any(type(module).forward is cls.forward for cls in classes)


ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.SiLU)


def _activation_reason(act: nn.Module) -> Optional[str]:
    """Why an activation module cannot be fused (None if it can)."""
    if not has_stock_forward(act, *ACTIVATION_MODULES):
        return f"{type(act).__name__} is not an nn.ReLU, nn.LeakyReLU or nn.SiLU (or overrides forward)"
    return None


def activation_spec(act) -> Tuple[str, float]:
    """(name, negative_slope) for an activation given as None, a name, or an nn module."""
    if act is None or (isinstance(act, nn.Identity) and type(act).forward is nn.Identity.forward):
        return "none", 0.0
    if isinstance(act, str):
        if act not in ("none", "relu", "leaky_relu", "silu"):
            raise ValueError(f"activation must be 'none', 'relu', 'leaky_relu' or 'silu', got {act!r}")
        return act, 0.01
    if _activation_reason(act) is None:
        if isinstance(act, nn.LeakyReLU):
            return "leaky_relu", float(act.negative_slope)
        return ("silu", 0.0) if isinstance(act, nn.SiLU) else ("relu", 0.0)
    raise ValueError(f"unsupported activation {act!r}: the fused op takes none, ReLU, LeakyReLU or SiLU "
                     f"(modules that override forward are not fused)")


def conv_padding(conv: nn.Conv3d) -> Optional[Tuple[int, int, int]]:
    """The conv's symmetric zero padding as 3 ints, or None if it has none we can express."""
    if conv.padding == "valid":
        return (0, 0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None  # asymmetric 'same' padding
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def unsupported_reason(conv: nn.Module, bn: Optional[nn.Module], pool: Optional[nn.Module],
                       activation_module: Optional[nn.Module] = None) -> Optional[str]:
    """Why this chain cannot run through the fused op (None if it can)."""
    if type(conv) is not nn.Conv3d:
        return f"{type(conv).__name__} is not an nn.Conv3d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zeros is fused)"
    if conv_padding(conv) is None:
        return "padding='same' with an even effective kernel is asymmetric"
    if bn is not None:
        if not has_stock_forward(bn, *BATCH_NORMS):
            return f"{type(bn).__name__} is not an nn.BatchNorm3d or nn.SyncBatchNorm (or overrides forward)"
        if bn.num_features != conv.out_channels:
            return f"{type(bn).__name__} has {bn.num_features} features but the conv has {conv.out_channels} outputs"
    if activation_module is not None:
        reason = _activation_reason(activation_module)
        if reason is not None:
            return reason
    if pool is not None:
        if not has_stock_forward(pool, nn.MaxPool3d):
            return f"{type(pool).__name__} is not an nn.MaxPool3d (or overrides forward)"
        return unsupported_pool_reason(pool)
    return None


def stock_conv_bn_act(
    x: Tensor,
    conv: nn.Conv3d,
    bn: Optional[nn.BatchNorm3d] = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    pool: Optional[nn.MaxPool3d] = None,
    activation_module: Optional[nn.Module] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The same chain run module by module with stock PyTorch (the activation by
    ``activation_module`` when the model has one, so that its hooks run); ``residual`` is added
    before the activation."""
    y = conv(x)
    if bn is not None:
        y = bn(y)
    if residual is not None:
        y = y + residual
    y = activation_module(y) if activation_module is not None else apply_activation(y, activation, negative_slope)
    return pool(y) if pool is not None else y


_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name, {}) for name in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks"))


def runs_hooks(*modules: Optional[nn.Module]) -> bool:
    """Whether calling any of these modules would run hooks: their own (forward, forward-pre,
    backward) or global ones (``nn.modules.module.register_module_forward_hook`` and friends).
    A fused chain with such a module runs module by module instead (``conv_bn_act``), so every hook
    sees what it sees in a stock model: Grad-CAM, feature extraction, guided backprop, tracers."""
    if any(_GLOBAL_HOOKS):
        return True
    for m in modules:  # (a loop, not a generator: this runs for every chain of every forward)
        if m is not None and (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                              or m._backward_hooks):
            return True
    return False


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv3d,
    bn: Optional[nn.BatchNorm3d] = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    pool: Optional[nn.MaxPool3d] = None,
    backend: Optional[str] = None,
    sync_bn: bool = False,
    process_group=None,
    defer: bool = False,
    keep_conv_output: Optional[bool] = None,
    activation_module: Optional[nn.Module] = None,
    layout: str = "stock",
    residual: Optional[Tensor] = None,
):
    """Run ``conv → bn → activation → pool`` through the fused op, reading each module's own
    parameters, buffers and flags (so a frozen BN in a training model uses running statistics).
    Chains the fused op cannot express run stock, as do chains with a module that has hooks
    (``runs_hooks``; ``activation_module``: the model's activation module, if it has one). Under
    ``torch.fx`` symbolic tracing a chain calls its modules, so a fused model traces as the stock
    graph (torchvision's feature extraction, FX passes, ``c3dzoo.fuse`` of a fused model).

    ``defer=True``: the result goes straight into another ``conv_bn_act``, so a training-mode BN
    without a pool may hand its normalisation to that call (a ``c3dzoo.ops.PendingBatchNorm`` is
    returned then; see ``c3dzoo.ops.conv3d_bn_act``). ``x`` may be such a pending output.

    ``sync_bn=True``, or a ``bn`` that is an ``nn.SyncBatchNorm``: training-mode batch statistics
    are synchronised over ``process_group`` (else the SyncBatchNorm's own group, else WORLD) by the
    fused op (``c3dzoo.ops.sync_batch_norm``); with no initialised torch.distributed or one rank
    this changes nothing. ``keep_conv_output``, ``layout`` (the output's memory layout: stock's by
    default) and ``residual`` (added before the activation: a residual block's shortcut): see
    ``c3dzoo.ops.conv3d_bn_act``."""
    unbatched = isinstance(x, Tensor) and x.dim() == 4
    if (isinstance(x, torch.fx.Proxy) or runs_hooks(conv, bn, activation_module, pool)
            or unsupported_reason(conv, bn, pool, activation_module) or (unbatched and bn is not None)):
        # (an unbatched clip with a BN: BatchNorm3d refuses it, and says so)
        if isinstance(x, PendingBatchNorm):
            x = x.materialize()
        return stock_conv_bn_act(x, conv, bn, activation, negative_slope, pool, activation_module, residual)
    if unbatched:  # (C, D, H, W), which Conv3d and MaxPool3d take as a batch of one
        return conv_bn_act(x.unsqueeze(0), conv, None, activation, negative_slope, pool, backend,
                           sync_bn, process_group, defer, keep_conv_output, activation_module, layout,
                           None if residual is None else residual.unsqueeze(0)).squeeze(0)
    common = dict(
        stride=conv.stride, padding=conv_padding(conv), dilation=conv.dilation,
        activation=activation, negative_slope=negative_slope, pool=pool, backend=backend, defer=defer,
        keep_conv_output=keep_conv_output, layout=layout, residual=residual,
    )
    if bn is None:
        return conv3d_bn_act(x, conv.weight, conv.bias, training=False, batch_norm=False, **common)
    if isinstance(bn, nn.SyncBatchNorm):
        sync_bn = True
        process_group = process_group if process_group is not None else bn.process_group
    tracks = bn.track_running_stats
    use_running = (not bn.training) or tracks
    if not bn.training and tracks:
        note_stock_updates(bn)
    return conv3d_bn_act(
        x, conv.weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        training=bn.training,
        momentum=bn.momentum,
        eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked if (bn.training and tracks) else None,
        sync=sync_bn,
        process_group=process_group if sync_bn else None,
        **common,
    )


# each eval-mode BatchNorm's num_batches_tracked version when a fused call last folded it
_FOLDED_AT: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def note_stock_updates(bn: nn.Module) -> None:
    """Stock BatchNorm updates running_mean/var in training mode inside its kernel, which moves no
    version counter but ``num_batches_tracked``'s (its ``add_(1)``). When that counter moved since
    this BN was last folded — the model ran stock in training mode (``fused=False``, a hooked
    chain, a BN recalibration), then fused in eval — the running statistics' counters are bumped
    (``mark_changed``), so the folded-weight cache rebuilds instead of serving the old fold."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return  # (a compiled graph or a trace holds no Python state: the counters are never read)
    nbt = bn.num_batches_tracked
    if nbt is None or nbt.is_inference():
        return
    version = nbt._version
    if _FOLDED_AT.get(bn, version) != version:
        mark_changed(bn.running_mean, bn.running_var)
    _FOLDED_AT[bn] = version


class Conv3dBNAct(nn.Module):
    """Conv3d → BatchNorm3d → activation (→ MaxPool3d), computed by one fused op.

    Its children are a real ``nn.Conv3d`` named ``conv``, a real ``nn.BatchNorm3d`` named ``bn``
    (absent with ``batch_norm=False``) and, with ``pool``, an ``nn.MaxPool3d`` named ``pool``, so
    optimizers, checkpoints and ``train()``/``eval()`` behave as for the stock modules.

    ``sync_bn=True`` synchronises the training-mode batch statistics over ``process_group``
    (default: WORLD) inside the fused op — fused SyncBatchNorm, also on CPU with gloo. ``bn`` stays
    a plain ``nn.BatchNorm3d`` (same state_dict; DDP accepts it on CPU). Without an initialised
    torch.distributed, or with one rank, it changes nothing.

    ``groups`` as ``nn.Conv3d``'s: a depthwise conv (groups = C_in = C_out) runs on the Triton
    backend's direct kernels; other grouped convs run fused on the reference backend.

    ``keep_conv_output`` (attribute, None by default): whether training keeps the raw conv output for
    the backward or recomputes it, see ``c3dzoo.ops.conv3d_bn_act``.
    """

    keep_conv_output: Optional[bool] = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
        pool=None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        batch_norm: bool = True,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
        sync_bn: bool = False,
        process_group=None,
        groups: int = 1,
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias,
                              **factory)
        self.bn = (
            nn.BatchNorm3d(out_channels, eps, momentum, affine, track_running_stats, **factory)
            if batch_norm else None
        )
        if pool is None or isinstance(pool, nn.MaxPool3d):
            self.pool = pool
        else:
            kernel, pool_stride, pool_padding = pool
            self.pool = nn.MaxPool3d(kernel, pool_stride, pool_padding)
        self.activation, self.negative_slope = activation_spec(activation)
        if activation == "leaky_relu":
            self.negative_slope = negative_slope
        self.backend = backend
        self.sync_bn, self.process_group = _check_sync_args(sync_bn, process_group)
        reason = unsupported_reason(self.conv, self.bn, self.pool)
        if reason is not None:
            raise ValueError(f"Conv3dBNAct cannot fuse this configuration: {reason}")

    @classmethod
    def from_modules(cls, conv: nn.Conv3d, bn: Optional[nn.BatchNorm3d] = None, activation="relu",
                     pool: Optional[nn.MaxPool3d] = None, backend: Optional[str] = None,
                     sync_bn: bool = False, process_group=None) -> "Conv3dBNAct":
        """Wrap existing modules (shared, not copied)."""
        reason = unsupported_reason(conv, bn, pool)
        if reason is not None:
            raise ValueError(f"Conv3dBNAct cannot fuse this configuration: {reason}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn, self.pool = conv, bn, pool
        self.activation, self.negative_slope = activation_spec(activation)
        self.backend = backend
        self.sync_bn, self.process_group = _check_sync_args(sync_bn, process_group)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_act(x, self.conv, self.bn, self.activation, self.negative_slope, self.pool, self.backend,
                           self.sync_bn, self.process_group, keep_conv_output=self.keep_conv_output)

    def extra_repr(self) -> str:
        act = self.activation + (f"({self.negative_slope})" if self.activation == "leaky_relu" else "")
        return f"activation={act}, backend={self.backend or 'auto'}" + (", sync_bn=True" if self.sync_bn else "")


def _check_sync_args(sync_bn, process_group):
    if not isinstance(sync_bn, bool):
        raise TypeError(f"sync_bn must be True or False, got {sync_bn!r}")
    if process_group is not None and not sync_bn:
        raise ValueError("process_group is given but sync_bn=False: pass sync_bn=True to synchronise "
                         "BatchNorm statistics over it")
    return sync_bn, process_group


Conv3dBNReLU = Conv3dBNAct
