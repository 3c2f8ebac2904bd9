"""``c3dzoo.fuse``: rewrite a model's Conv3d → BatchNorm3d (or SyncBatchNorm) → ReLU (→ MaxPool3d) chains to the fused op.

The model is traced with torch.fx. A chain is fused only when every intermediate value has the
next link as its only user; anything else stays stock. A residual block's ending, Conv3d →
BatchNorm3d → ``+ shortcut`` → ReLU, is one chain too: the fused op adds the shortcut before the
activation (in the conv kernel's epilogue in inference). The original conv and BN modules stay
registered at their original names, so the state_dict keys, values and ``train()``/``eval()``
behaviour are unchanged; the fused graph module shares them with the input model (as
``torch.fx.symbolic_trace`` does).
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..ops import in_layout
from ..ops.conv3d_bn_act import output_shape
from ..ops.reference import apply_activation
from .conv_bn_act import (ACTIVATION_MODULES, BATCH_NORMS, _check_sync_args, activation_spec, conv_bn_act, conv_padding,
                          has_stock_forward, unsupported_reason)


class FusedChain(nn.Module):
    """Runs one fused chain. The rewritten forward hands it the model's own conv, BN, activation and
    pool modules on every call (``self.c3dzoo_fused_conv1(x, self.conv1, self.conv1_bn, ...)``)
    rather than the chain keeping references to them: it adds nothing to the state_dict, and a copy
    of the model whose modules are swapped for copies (``nn.DataParallel``'s replicas,
    ``torch.nn.parallel.replicate``) runs on its own copies. A pool written as ``F.max_pool3d(...)``
    has no module in the model: the chain keeps a stand-in ``MaxPool3d`` (no state) as ``pool``.

    Memory layout: a chain whose only user is the next fused chain (``layout == "any"``) hands it the
    backend's layout (channels_last_3d on the GPU backends) with no copy; any other chain gives what
    the stock model gives there (``c3dzoo.ops.stock_memory_format`` of the input of the run of
    chains it ends, ``path_input``, and of their convs' weights, ``upstream`` + its own), so the
    model's own code — a ``view(-1, 8192)`` after pool5 — sees stock's layout."""

    def __init__(self, activation: str, negative_slope: float, backend: Optional[str], sync_bn: bool = False,
                 process_group=None, pool: Optional[nn.MaxPool3d] = None, description: str = ""):
        super().__init__()
        self.pool = pool  # only a functional pool's stand-in: a pool module of the model is an argument
        self.activation = activation
        self.negative_slope = negative_slope
        self.backend = backend
        self.layout = "stock"
        self.description = description
        self.sync_bn, self.process_group = _check_sync_args(sync_bn, process_group)

    def forward(self, x, conv, bn=None, pool=None, activation_module=None, *, path_input=None, upstream=(),
                residual=None):
        pool = self.pool if pool is None else pool
        if residual is not None and not _adds_elementwise(x, conv, residual):
            # a shortcut the sum broadcasts: the chain without activation, then the stock sum
            out = conv_bn_act(x, conv, bn, "none", 0.0, None, self.backend, self.sync_bn, self.process_group,
                              layout="stock") + residual
            return (activation_module(out) if activation_module is not None
                    else apply_activation(out, self.activation, self.negative_slope))
        out = conv_bn_act(x, conv, bn, self.activation, self.negative_slope, pool, self.backend,
                          self.sync_bn, self.process_group, activation_module=activation_module, layout="any",
                          residual=residual)
        if self.layout == "any" or isinstance(out, torch.fx.Proxy):  # traced: stock modules (conv_bn_act)
            return out
        weights = [c.weight for c in upstream] + [conv.weight]
        return in_layout(out, "stock", x if path_input is None else path_input, *weights)

    def extra_repr(self) -> str:
        return f"{self.description}, backend={self.backend or 'auto'}" + (", sync_bn=True" if self.sync_bn else "")


def _adds_elementwise(x, conv: nn.Conv3d, residual) -> bool:
    """Whether ``residual`` has exactly the shape of ``conv``'s output on ``x`` (a sum that does not
    broadcast, which the fused op's residual is); traced, the chain's stock modules run anyway."""
    padding = conv_padding(conv)
    if not isinstance(x, torch.Tensor) or not isinstance(residual, torch.Tensor) or padding is None:
        return isinstance(x, torch.fx.Proxy)
    shape = output_shape(x.shape, conv.weight.shape, conv.stride, padding, conv.dilation, ())
    return tuple(residual.shape) == tuple(shape)


_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_IN_PLACE_ADDS = (operator.iadd, "add_")


def _shortcut_of(node: torch.fx.Node, value: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The other operand when ``node`` is ``value + other`` (or ``other + value``; an in-place add
    only into ``value``, whose only user it is, so nothing else sees the sum), else None."""
    if node.kwargs or len(node.args) != 2 or len(value.users) != 1:
        return None
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        target = node.target
    elif node.op == "call_method" and node.target in ("add", "add_"):
        target = node.target
    else:
        return None
    first, second = node.args
    other = second if first is value else first if second is value else None
    if not isinstance(other, torch.fx.Node) or other is value:
        return None
    if target in _IN_PLACE_ADDS and first is not value:
        return None
    return other


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_LEAKY_FUNCTIONS = (F.leaky_relu,)
_SILU_FUNCTIONS = (F.silu,)


def _sole_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    # the value must be the user's first (and only tensor) argument
    if not user.args or user.args[0] is not node:
        return None
    if any(a is node for a in list(user.args[1:]) + list(user.kwargs.values())):
        return None
    return user


def _as_activation(node: torch.fx.Node, modules: Dict[str, nn.Module]):
    """(name, slope) if ``node`` applies ReLU, LeakyReLU or SiLU to its input, else None."""
    if node.op == "call_module":
        mod = modules[node.target]
        if has_stock_forward(mod, *ACTIVATION_MODULES):
            return activation_spec(mod)
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS and len(node.args) == 1:
            return "relu", 0.0
        if node.target in _LEAKY_FUNCTIONS:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
        if node.target in _SILU_FUNCTIONS and len(node.args) == 1:
            return "silu", 0.0
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu", 0.0
    return None


def _as_pool(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[nn.MaxPool3d]:
    if node.op == "call_module":
        mod = modules[node.target]
        return mod if has_stock_forward(mod, nn.MaxPool3d) else None
    if node.op == "call_function" and node.target is F.max_pool3d:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        kwargs = dict(zip(names, node.args[1:]))
        kwargs.update(node.kwargs)
        if any(isinstance(v, torch.fx.Node) for v in kwargs.values()) or "kernel_size" not in kwargs:
            return None
        return nn.MaxPool3d(**kwargs)
    return None


def fuse(model: nn.Module, backend: Optional[str] = None, *, sync_bn: bool = False,
         process_group=None) -> torch.fx.GraphModule:
    """Return a module computing what ``model`` computes, with its Conv3d → BatchNorm3d → ReLU/LeakyReLU
    (→ MaxPool3d) chains running the fused op. The state_dict is unchanged (same keys, same tensors).

    ``sync_bn=True``: every fused chain synchronises its training-mode batch statistics over
    ``process_group`` (default: WORLD) — fused SyncBatchNorm; the BN children stay plain
    ``nn.BatchNorm3d`` (so DDP accepts the model on CPU too). Chains whose BN is an
    ``nn.SyncBatchNorm`` (from ``nn.SyncBatchNorm.convert_sync_batchnorm``) are fused with
    synchronisation over that module's own group whatever ``sync_bn`` says. Without an initialised
    torch.distributed, or with one rank, synchronisation changes nothing.

    Raises TypeError if ``model`` cannot be traced by torch.fx.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}")
    _check_sync_args(sync_bn, process_group)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise TypeError(
            f"c3dzoo.fuse: {type(model).__name__} cannot be traced by torch.fx "
            f"({type(exc).__name__}: {exc}); fuse its traceable submodules instead, or use "
            f"c3dzoo.nn.Conv3dBNAct directly"
        ) from exc
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused_count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.Conv3d:
            continue
        conv = modules[node.target]
        chain: List[torch.fx.Node] = [node]
        bn = pool = shortcut = None
        activation, slope, activation_module = "none", 0.0, None
        nxt = _sole_user(node)
        if nxt is not None and nxt.op == "call_module" and type(modules[nxt.target]) in BATCH_NORMS:
            bn = modules[nxt.target]
            chain.append(nxt)
            nxt = _sole_user(nxt)
        added = next(iter(chain[-1].users)) if bn is not None and len(chain[-1].users) == 1 else None
        other = _shortcut_of(added, chain[-1]) if added is not None else None
        if other is not None:
            after = _sole_user(added)  # a residual block's sum: it joins the chain if an activation follows
            if after is not None and _as_activation(after, modules) is not None:
                shortcut = other
                chain.append(added)
                nxt = after
        act = _as_activation(nxt, modules) if nxt is not None else None
        if act is not None:
            activation, slope = act
            if nxt.op == "call_module":  # the model's own module: its hooks must still run
                activation_module = modules[nxt.target]
            chain.append(nxt)
            nxt = _sole_user(nxt)
            candidate = _as_pool(nxt, modules) if nxt is not None and shortcut is None else None
            if candidate is not None and unsupported_reason(conv, bn, candidate) is None:
                pool = candidate
                chain.append(nxt)
        if bn is None and act is None:
            continue  # a lone conv gains nothing
        if unsupported_reason(conv, bn, pool) is not None:
            continue
        name = base = "c3dzoo_fused_" + node.target.replace(".", "_")
        suffix = 0
        while hasattr(gm, name):  # fuse() of a fused model: its chains keep their names (and stand-ins)
            suffix += 1
            name = f"{base}_{suffix}"
        pool_node = chain[-1] if pool is not None else None
        pool_target = pool_node.target if pool_node is not None and pool_node.op == "call_module" else None
        parts = ["Conv3d", type(bn).__name__ if bn is not None else None, "+ shortcut" if shortcut is not None else None,
                 activation if activation != "none" else None, "MaxPool3d" if pool is not None else None]
        sync = sync_bn or isinstance(bn, nn.SyncBatchNorm)
        gm.add_module(name, FusedChain(activation, slope, backend, sync, process_group if sync_bn else None,
                                       pool=pool if pool is not None and pool_target is None else None,
                                       description=" → ".join(p for p in parts if p)))
        # the model's modules are read at call time (see FusedChain); get_attr nodes in creation order
        with graph.inserting_before(chain[-1].next):
            targets = [node.target, chain[1].target if bn is not None else None, pool_target,
                       next((n.target for n in chain if n.op == "call_module" and modules[n.target] is activation_module),
                            None) if activation_module is not None else None]
            module_args = tuple(graph.get_attr(t) if t is not None else None for t in targets)
            fused_node = graph.call_module(name, (node.args[0], *module_args),
                                           {"residual": shortcut} if shortcut is not None else {})
        chain[-1].replace_all_uses_with(fused_node)
        for dead in reversed(chain):
            graph.erase_node(dead)
        fused_count += 1
    _link_chains(gm)
    graph.lint()
    gm.recompile()
    _restore_missing_state(model, gm)
    gm.c3dzoo_fused_chains = fused_count
    return gm


def _link_chains(gm: torch.fx.GraphModule) -> None:
    """Let a fused chain whose only user is the next fused chain keep the backend's layout, and give
    the chain ending such a run what it needs to restore stock's: the run's input (a second
    argument) and its convs (see ``FusedChain``)."""
    def chain_of(node):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FusedChain):
            return gm.get_submodule(node.target)
        return None

    nodes = [n for n in gm.graph.nodes if chain_of(n) is not None]
    for node in nodes:
        producer = node.args[0]
        if isinstance(producer, torch.fx.Node) and chain_of(producer) is not None and _sole_user(producer) is node:
            chain_of(producer).layout = "any"
    for node in nodes:
        if chain_of(node).layout == "any":
            continue
        upstream, head = [], node
        while isinstance(head.args[0], torch.fx.Node) and chain_of(head.args[0]) is not None \
                and chain_of(head.args[0]).layout == "any":
            head = head.args[0]
            upstream.insert(0, head.args[1])  # its conv's get_attr node
        if upstream:
            node.kwargs = {**node.kwargs, "path_input": head.args[0], "upstream": tuple(upstream)}


def _restore_missing_state(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Tracing keeps only the modules the forward uses; put back any that hold state, so the
    state_dict keeps every key of the original."""
    for name, mod in model.named_modules():
        if not name:
            continue
        holds_state = any(True for _ in mod.parameters(recurse=False)) or any(
            True for _ in mod.buffers(recurse=False)
        )
        if not holds_state:
            continue
        try:
            present = gm.get_submodule(name)
        except AttributeError:
            present = None
        if present is not mod:
            _set_submodule(gm, name, mod)


def _set_submodule(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent = root
    *path, last = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    setattr(parent, last, mod)

