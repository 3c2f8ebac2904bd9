"""Net2Net (Chen, Goodfellow, Shlens, ICLR 2016): grow a zoo model without changing its function.

* ``wider(model, layer, width)`` gives a Conv3d (or Linear) more output units: new units copy
  random old ones (mapping ``g``), the BatchNorm after the layer copies γ, β and the running
  statistics of the same units, and the next layer's incoming weights are divided by the number of
  copies, so the output is unchanged (eval and train mode; replicas have identical batch stats).
* ``wider_group(model, stream, width)`` does that for a residual stream of a video ResNet (or a
  PyTorchVideo ResNet-50, SlowFast, X3D): every layer adding into the stream grows with one
  shared mapping, every layer reading it is divided.
* ``deeper(model, after)`` inserts an identity layer: Dirac Conv3d → identity BatchNorm3d → ReLU
  (or identity Linear → ReLU) in the C3D family, a BasicBlock (a bottleneck ResBlock in the
  ResNet-50s) whose branch adds exactly 0 in the video ResNets, a Dirac Conv3d → identity
  BatchNorm3d (no activation) in the ConvColumn, a 1×1×1 Dirac Conv3dNormActivation in S3D (an X3D
  block without squeeze-excitation in X3D).
* A depthwise Conv3d (groups = its channels: CSN's conv_b) follows its input's channels: it grows
  with the layer before it (its filters and BatchNorm copied with the same mapping), and the
  layer after it is divided; it cannot be widened on its own. So does a depthwise conv ending a
  stream's writer (X3D's stem: a 1×3×3 conv, then a depthwise 5×1×1 one).
* A squeeze-excitation (X3D: ``x · sigmoid(conv2(relu(conv1(mean of x over positions))))``)
  gates the channels of the layer before it one to one: when those channels grow, conv1 reads
  them (its incoming weights divided: replicas have equal means) and conv2's output units (its
  weight rows and bias) are copied with the same mapping, so replicas get equal gates. Its conv1
  is a layer to widen of its own (conv2's inputs divided); conv2 only grows with the gated layer.
* In S3D a branch's last conv writes a slice of its Inception block's channel concatenation: its
  ``wider`` divides only that slice of the next block's branch heads' (or the head's) inputs.
  SlowFast likewise: a fusion conv's output follows the slow stream's channels in the
  concatenation the next slow stage reads, and the head reads the [slow, fast] concatenation.

All rewrite the optimizer too (momentum and Adam moments follow their parameters), validate
everything before touching the model, and replace or insert plain ``nn.Conv3d``/``nn.BatchNorm*``/
``nn.Linear`` modules, so the state_dict keys are those of the stock architecture grown the same
way (inserting into a Sequential shifts the later indices), and the fused path (which reads the
same modules) keeps working.
Models wrapped by ``c3dzoo.fuse`` hold references to the old modules: grow first, then fuse.

Tensor rewrites all go through ``c3dzoo.ops.net2net_remap`` (the place for faster backends).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["wider", "wider_group", "deeper", "widenable_layers", "residual_streams"]

# optimizer state entries that are quadratic in the gradient (and so in the parameter's scale)
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
_UNIT_LAYERS = (nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm)  # SyncBatchNorm: convert_sync_batchnorm's


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
    segment: it is the model's output; or, when ``stream`` is set, it is added into that
    residual stream (see ``_Stream``); or, when ``readers`` is set, it is one slice of a channel
    concatenation (S3D's Inception blocks) that each reader takes in, starting at that reader's
    channel offset; or, when ``gates`` is set, it gates that layer's output (a squeeze-excitation)."""

    stages: Tuple[_Stage, ...]
    stream: Optional[str] = None
    readers: Tuple[Tuple[str, int], ...] = ()
    # a squeeze-excitation: its first stage reads the mean of this layer's output, its last
    # stage's output multiplies that output channel by channel (so it grows with that layer)
    gates: Optional[str] = None


@dataclass(frozen=True)
class _Stream:
    """A residual stream of a video ResNet: the channels that ``writers`` (the stem's last conv
    or the downsample shortcut that starts the stream, then each block's last conv, each with its
    BatchNorm) produce and the residual additions sum, and that ``readers`` take in (each block's
    first conv, the next stage's downsample conv, ``fc``). Its channels only grow all together.
    ``followers``: depthwise stages after a writer (X3D's stem), whose channels are the writer's."""

    name: str
    writers: Tuple[_Stage, ...]
    readers: Tuple[Tuple[str, Optional[int]], ...]  # each with its offset in a concatenation, or None
    followers: Tuple[_Stage, ...] = ()


def _graph(model: nn.Module) -> Tuple[List[_Segment], List[_Stream]]:
    """The segments of ``model`` and its residual streams (none outside the video ResNets)."""
    from .models.c3d_family import C3D
    from .models.jester import ConvColumn
    from .models.resnet3d import ResNet3D, SlowFast
    from .models.separable_inception import S3D
    from .models.video_resnet import VideoResNet
    from .models.x3d import X3D

    if isinstance(model, C3D):
        convs = [_Stage(n, n + "_bn" if model.batch_norm else None) for n in model.layer_names]
        fcs = [_Stage(n) for n in _c3d_fc_names(model) + ("fc8",)]
        return [_Segment(tuple(convs + fcs))], []
    if isinstance(model, ConvColumn):
        paths = [p for i in range(1, 5) for p in _leaf_paths(model, f"conv_layer{i}")]
        paths += ["conv_layer5", "fc5", "batch0", "fc6", "batch1", "fc7"]  # forward order
        return [_Segment(_stages(model, paths))], []
    if isinstance(model, VideoResNet):
        return _resnet_graph(model)
    if isinstance(model, S3D):
        return _s3d_graph(model), []
    if isinstance(model, (ResNet3D, X3D)):
        return _resnet3d_graph(model)
    if isinstance(model, SlowFast):
        return _slowfast_graph(model)
    raise ValueError(
        f"net2net does not know the layer graph of {type(model).__name__}; it supports the zoo's "
        f"C3D, ConvColumn (jester_convcolumn), VideoResNet, S3D, ResNet3D, SlowFast and X3D models "
        f"(not fx-fused copies: grow, then fuse)"
    )


def _segments(model: nn.Module) -> List[_Segment]:
    return _graph(model)[0]


def _leaf_paths(model: nn.Module, prefix: str) -> List[str]:
    """Paths of the leaf modules under ``prefix``, in registration (= Sequential forward) order. A
    squeeze-excitation below ``prefix`` is one leaf: its convs are a side branch, not a link of the
    chain (``_ResidualGraph.chain`` makes them a segment of their own)."""
    modules = list(model.get_submodule(prefix).named_modules(prefix=prefix))
    inside = tuple(n + "." for n, m in modules if n != prefix and _squeeze_excitation(m))  # their parts' prefixes
    return [n for n, m in modules if not n.startswith(inside) and (not any(m.children()) or n + "." in inside)]


def _squeeze_excitation(module: nn.Module) -> bool:
    """X3D's (fvcore's) squeeze-excitation: its input times per-channel gates computed from it."""
    from .models.x3d import SqueezeExcitation

    return isinstance(module, SqueezeExcitation)


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


class _ResidualGraph:
    """Builds the segments and residual streams of a residual network. A block's first conv (and
    its projection shortcut) reads the stream the blocks before it wrote; its last conv adds into
    the stream it outputs, which a projection starts afresh. A reader may take a stream as one
    slice of a channel concatenation (SlowFast's fusions): it then reads it from a channel offset.
    A squeeze-excitation in a chain is a chain of its own gating the stage before it (X3D's)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names: List[str] = []
        self.writers: List[List[_Stage]] = []
        self.followers: List[List[_Stage]] = []
        self.readers: List[List[Tuple[str, Optional[int]]]] = []
        # chains: (stages, the stream they add into or None, readers of their output when it is a
        # slice of a concatenation, the layer whose output they gate or None)
        self.chains: List[Tuple[Tuple[_Stage, ...], Optional[int], List[Tuple[str, int]], Optional[str]]] = []

    def stream(self, name: str) -> int:
        self.names.append(name)
        self.writers.append([])
        self.followers.append([])
        self.readers.append([])
        return len(self.names) - 1

    def chain(self, paths: Sequence[str], stream: Optional[int] = None) -> Tuple[Tuple[_Stage, ...], List]:
        """The chain of the leaves under ``paths``, adding into ``stream`` (its last stage that is
        not depthwise writes it; depthwise ones after that follow its channels), then a chain for
        each squeeze-excitation in it; (its stages, the list of (reader, offset) that read its
        output as a concatenation's slice, to fill)."""
        leaves = [p for path in paths for p in _leaf_paths(self.model, path)]
        stages = _stages(self.model, leaves)
        sliced: List[Tuple[str, int]] = []
        self.chains.append((stages, stream, sliced, None))
        if stream is not None:
            writer = max((i for i, stage in enumerate(stages) if not _depthwise(self.model.get_submodule(stage.layer))),
                         default=0)
            self.writers[stream].append(stages[writer])
            self.followers[stream].extend(stages[writer + 1:])
        for k, leaf in enumerate(leaves):
            if _squeeze_excitation(self.model.get_submodule(leaf)):
                gated = _stages(self.model, leaves[:k])
                if not gated:
                    raise ValueError(f"{leaf} gates no layer's output that net2net can see")
                self.chains.append((_stages(self.model, _leaf_paths(self.model, leaf)), None, [], gated[-1].layer))
        return stages, sliced

    def read(self, stream: int, layer: str, offset: Optional[int] = None) -> None:
        self.readers[stream].append((layer, offset))

    def width(self, stream: int) -> int:
        return _units(self.model.get_submodule(self.writers[stream][-1].layer))

    def block(self, stream: int, name: str, prefix: str, shortcut: Sequence[str], branch: Sequence[str],
              offset: Optional[int] = None) -> Tuple[int, List[str]]:
        """A residual block reading ``stream`` (from ``offset`` of a concatenation, or alone), its
        parts under ``prefix``; (the stream it writes, named ``name``; its first layers)."""
        reads, firsts = stream, []
        if shortcut:
            stream = self.stream(name)
            firsts.append(self.chain([prefix + part for part in shortcut], stream)[0][0].layer)
        self.names[stream] = name  # a stream is named after the last stage adding into it
        firsts.append(self.chain([prefix + part for part in branch], stream)[0][0].layer)
        for layer in firsts:
            self.read(reads, layer, offset)
        return stream, firsts

    def result(self) -> Tuple[List[_Segment], List[_Stream]]:
        segments = [_Segment(stages, None if s is None else self.names[s], tuple(sliced), gates)
                    for stages, s, sliced, gates in self.chains]
        return segments, [_Stream(n, tuple(w), tuple(r), tuple(f))
                          for n, w, r, f in zip(self.names, self.writers, self.readers, self.followers)]


def _residual_graph(model: nn.Module, stem: str, blocks: Sequence[Tuple[str, str, Sequence[str], Sequence[str]]],
                    head: str) -> Tuple[List[_Segment], List[_Stream]]:
    # ``blocks``: per block in forward order, (the stream it adds into, its path prefix, its
    # shortcut's parts (none: the identity), its branch's parts); ``head``: the chain reading the
    # last stream (a Linear, or X3D's head: its projected pool's two convs, then proj)
    graph = _ResidualGraph(model)
    stream = graph.stream("stem")
    graph.chain([stem], stream)
    for name, prefix, shortcut, branch in blocks:
        stream, _ = graph.block(stream, name, prefix, shortcut, branch)
    graph.read(stream, graph.chain([head])[0][0].layer)
    return graph.result()


def _resnet_graph(model: nn.Module) -> Tuple[List[_Segment], List[_Stream]]:
    # a BasicBlock: downsample (where the shape changes), then conv1 → conv2
    blocks = [(layer, f"{layer}.{index}.", ["downsample"] if block.downsample is not None else [], ["conv1", "conv2"])
              for layer in ("layer1", "layer2", "layer3", "layer4")
              for index, block in enumerate(model.get_submodule(layer))]
    return _residual_graph(model, "stem", blocks, "fc")


def _resnet3d_graph(model: nn.Module) -> Tuple[List[_Segment], List[_Stream]]:
    # a ResBlock of a ResStage: branch1_conv → branch1_norm (where the shape changes), then the
    # bottleneck branch2; the temporal pool after stage 1 (I3D, C2D) acts per channel. X3D's too:
    # its stem's depthwise conv follows the conv before it, a bottleneck's squeeze-excitation
    # gates conv_b's channels, and its head's ProjectedPool convs come before proj.
    from .models.resnet3d import ResStage

    blocks = [(f"blocks.{i}", f"blocks.{i}.res_blocks.{index}.", _shortcut_parts(block), ["branch2"])
              for i, stage in enumerate(model.blocks) if isinstance(stage, ResStage)
              for index, block in enumerate(stage.res_blocks)]
    return _residual_graph(model, "blocks.0", blocks, f"blocks.{len(model.blocks) - 1}")


def _shortcut_parts(block: nn.Module) -> List[str]:
    """A PyTorchVideo ResBlock's projection shortcut parts (none for an identity shortcut; X3D's
    stage 1 projects without a BatchNorm)."""
    if block.branch1_conv is None:
        return []
    return ["branch1_conv"] + (["branch1_norm"] if block.branch1_norm is not None else [])


def _slowfast_graph(model: nn.Module) -> Tuple[List[_Segment], List[_Stream]]:
    # Each pathway is a residual network of its own. A fusion (conv_fast_to_slow → norm) reads
    # the fast stream; its output is concatenated after the slow stream's channels, and that
    # concatenation is what the next slow stage's first block (shortcut and conv_a) reads. The
    # head's proj reads the pooled [slow, fast] concatenation.
    from .models.resnet3d import FuseFastToSlow, MultiPathWayWithFuse

    graph = _ResidualGraph(model)
    streams = []
    for pathway in range(2):
        stem = f"blocks.0.multipathway_blocks.{pathway}"
        streams.append(graph.stream(stem))
        graph.chain([stem], streams[-1])
    fused: Optional[List[Tuple[str, int]]] = None  # the readers of the last fusion's output
    for i, block in enumerate(model.blocks):
        if not isinstance(block, MultiPathWayWithFuse):
            continue
        if i > 0:
            for pathway, stage in enumerate(block.multipathway_blocks):
                name = f"blocks.{i}.multipathway_blocks.{pathway}"
                for j, res_block in enumerate(stage.res_blocks):
                    concatenated = pathway == 0 and j == 0 and fused is not None
                    slow_width = graph.width(streams[0])
                    streams[pathway], firsts = graph.block(streams[pathway], name, f"{name}.res_blocks.{j}.",
                                                           _shortcut_parts(res_block), ["branch2"],
                                                           0 if concatenated else None)
                    if concatenated:
                        fused.extend((layer, slow_width) for layer in firsts)
        fused = None
        if isinstance(block.multipathway_fusion, FuseFastToSlow):
            stages, fused = graph.chain([f"blocks.{i}.multipathway_fusion"])
            graph.read(streams[1], stages[0].layer)
    head = graph.chain([f"blocks.{len(model.blocks) - 1}.proj"])[0][0].layer
    graph.read(streams[0], head, 0)
    graph.read(streams[1], head, graph.width(streams[0]))
    return graph.result()


def _s3d_graph(model: nn.Module) -> List[_Segment]:
    # Chains: the stem's convs, each Inception branch's. A block's input (the stem's output, or
    # the concatenation of the previous block's four branch outputs) is read by the first conv of
    # each of its branches (branch3's through a per-channel max-pool); the last block's output,
    # through the average pool and dropout, by the classifier's 1×1×1 conv.
    from .models.separable_inception import SepInceptionBlock3D

    segments: List[_Segment] = []
    writers: List[Tuple[_Stage, ...]] = []  # chains whose outputs, concatenated in order, are the current tensor
    chain: List[str] = []  # leaf paths of the chain being read, outside the blocks

    def read_by(heads: Sequence[str]) -> None:
        offset = 0
        for stages in writers:
            segments.append(_Segment(stages, readers=tuple((head, offset) for head in heads)))
            offset += _units(model.get_submodule(stages[-1].layer))
        writers.clear()

    def close_chain() -> None:
        stages = _stages(model, chain)
        if stages:
            writers[:] = [stages]
        chain.clear()

    for index, part in model.features.named_children():
        path = f"features.{index}"
        if isinstance(part, SepInceptionBlock3D):
            close_chain()
            branches = [_stages(model, _leaf_paths(model, f"{path}.branch{b}")) for b in range(4)]
            read_by([branch[0].layer for branch in branches])
            writers.extend(branches)
        else:
            paths = _leaf_paths(model, path)
            stages = _stages(model, paths) if not chain and writers else ()
            if stages:
                read_by([stages[0].layer])  # a chain after a block reads its output
            chain.extend(paths)
    close_chain()
    head = _stages(model, _leaf_paths(model, "classifier"))
    read_by([head[0].layer])
    segments.append(_Segment(head))
    return segments


def _depthwise(module: nn.Module) -> bool:
    """A Conv3d whose every output channel is one input channel's own (groups = in = out channels,
    more than one): its channels follow its input's."""
    return (type(module) is nn.Conv3d and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _followers(model: nn.Module, seg: _Segment, index: int) -> Tuple[Tuple[_Stage, ...], int]:
    """The depthwise stages right after ``seg.stages[index]`` (they grow with it) and the index of
    the stage after them (``len(seg.stages)`` where they end the segment)."""
    end = index + 1
    while end < len(seg.stages) and _depthwise(model.get_submodule(seg.stages[end].layer)):
        end += 1
    return seg.stages[index + 1:end], end


def widenable_layers(model: nn.Module) -> List[str]:
    """The layers ``wider`` grows one at a time for ``model``, in forward order (see
    ``residual_streams`` for the layers of a video ResNet that only grow together). A depthwise
    conv is not one: it grows with the layer before it; nor is a squeeze-excitation's last conv,
    which grows with the layer whose channels it gates (its first conv is one)."""
    found = []
    for seg in _segments(model):
        for i, stage in enumerate(seg.stages):
            if not _depthwise(model.get_submodule(stage.layer)) and (
                    seg.readers or _followers(model, seg, i)[1] < len(seg.stages)):
                found.append(stage.layer)
    return found


def residual_streams(model: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """The residual streams of a video ResNet, ResNet3D, SlowFast or X3D ``model`` (empty for
    other models), in forward order: stream name (``"layer1"`` … ``"layer4"``, ``"blocks.N"``,
    SlowFast's ``"blocks.N.multipathway_blocks.P"``: the stage (or stem) whose blocks add into it;
    the stem writes into ``"layer1"``, or into ``"stem"`` where stage 1 starts with a projection)
    → the layers writing into it (then the depthwise convs following a writer's channels: X3D's
    stem's second conv), which ``wider_group`` grows together."""
    return {s.name: tuple(w.layer for w in (*s.writers, *s.followers)) for s in _graph(model)[1]}


def _find_stream(model: nn.Module, name: str) -> _Stream:
    """The residual stream called ``name`` or written by layer ``name`` (or a depthwise conv
    following a writer), or ValueError."""
    streams = _graph(model)[1]
    members = {s.name: [w.layer for w in (*s.writers, *s.followers)] for s in streams}
    for stream in streams:
        if name == stream.name or name in members[stream.name]:
            return stream
    if not streams:
        raise ValueError(f"{type(model).__name__} has no residual streams; grow its layers one at a time "
                         f"with wider: {', '.join(widenable_layers(model))}")
    raise ValueError(
        f"unknown residual stream {name!r} in {type(model).__name__}: give a stream "
        f"({', '.join(members)}) or a layer writing into one ({', '.join(w for m in members.values() for w in m)})"
    )


def _squeeze_excitations(segments: Sequence[_Segment],
                         stages: Sequence[_Stage]) -> Tuple[Tuple[_Stage, ...], Tuple[Tuple[str, None], ...]]:
    """The squeeze-excitations gating the outputs of ``stages``: (their last stages, whose output
    units are the gates of those channels; their first layers, which read those channels)."""
    gated = {stage.layer for stage in stages}
    found = [seg for seg in segments if seg.gates in gated]
    return tuple(seg.stages[-1] for seg in found), tuple((seg.stages[0].layer, None) for seg in found)


def _grown_with(model: nn.Module, segments: Sequence[_Segment], layer: str) -> str:
    """How ``layer``'s output channels grow: with the call that grows the last layer before it that
    is not depthwise (its own where it is not depthwise)."""
    seg, i = next((seg, i) for seg in segments for i, stage in enumerate(seg.stages) if stage.layer == layer)
    while i > 0 and _depthwise(model.get_submodule(seg.stages[i].layer)):
        i -= 1
    if _depthwise(model.get_submodule(seg.stages[i].layer)):
        return "the layers that write its input"
    if seg.stream is not None and _followers(model, seg, i)[1] == len(seg.stages):
        return f"wider_group(model, {seg.stream!r}, width)"
    return f"wider(model, {seg.stages[i].layer!r}, width)"


def _link(model: nn.Module, layer: str) -> Tuple[_Stage, Tuple[_Stage, ...], Tuple[_Stage, ...],
                                                  Tuple[Tuple[str, Optional[int]], ...]]:
    """(the stage of ``layer``, the depthwise stages that follow its channels, the last stages of
    the squeeze-excitations gating those channels, the layers that consume them), or ValueError.
    Each consumer comes with the channel offset where it reads that output in a concatenation, or
    None where it reads nothing else (see ``_grow``); a squeeze-excitation's first layer is one."""
    segments, streams = _graph(model)
    for seg in segments:
        for i, stage in enumerate(seg.stages):
            if stage.layer != layer:
                continue
            module = model.get_submodule(layer)
            if _depthwise(module):
                raise ValueError(
                    f"{layer!r} is a depthwise Conv3d (groups={module.groups}): each of its channels is its "
                    f"input's, so it grows with the layer before it, not on its own: "
                    f"{_grown_with(model, segments, layer)}"
                )
            followers, end = _followers(model, seg, i)
            gates, squeezes = _squeeze_excitations(segments, (stage, *followers))
            if end < len(seg.stages):
                return stage, followers, gates, ((seg.stages[end].layer, None), *squeezes)
            if seg.readers:
                return stage, followers, gates, (*seg.readers, *squeezes)
            if seg.stream is not None:
                stream = next(s for s in streams if s.name == seg.stream)
                others = ", ".join(w.layer for w in stream.writers if w.layer != layer)
                tied = f"{others} and to the layers reading it" if others else "the layers reading it"
                raise ValueError(
                    f"{layer!r} writes into the residual stream {stream.name!r}: its output channels are "
                    f"tied to {tied}; grow them all together with wider_group(model, {stream.name!r}, width)"
                )
            if seg.gates is not None:
                raise ValueError(
                    f"{layer!r} is the last conv of a squeeze-excitation: its outputs gate the channels of "
                    f"{seg.gates!r} one to one, so they grow with those, not on their own: "
                    f"{_grown_with(model, segments, seg.gates)}"
                )
            raise ValueError(
                f"{layer!r} is the output layer of {type(model).__name__}: no following layer "
                f"whose inputs net2net can rewrite"
            )
    try:
        what = f"is a {type(model.get_submodule(layer)).__name__}, not a Conv3d or Linear net2net knows"
    except AttributeError:
        what = "is unknown"
    streams_note = f"; residual streams: {', '.join(s.name for s in streams)}" if streams else ""
    raise ValueError(
        f"layer {layer!r} {what} in {type(model).__name__}; layers that can be widened: "
        f"{', '.join(widenable_layers(model))}{streams_note}"
    )


# --------------------------------------------------------------------------------------------
# module rebuilding and optimizer rewriting (shared by wider and deeper)
# --------------------------------------------------------------------------------------------


def _factory(module: nn.Module) -> dict:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return {} if t is None else dict(device=t.device, dtype=t.dtype)


def _resized(module: nn.Module, in_units: Optional[int] = None, out_units: Optional[int] = None,
             groups: Optional[int] = None) -> nn.Module:
    """A fresh module of ``module``'s exact type and hyper-parameters with new unit counts (and,
    for a Conv3d, ``groups``)."""
    f = _factory(module)
    if type(module) is nn.Conv3d:
        return nn.Conv3d(in_units or module.in_channels, out_units or module.out_channels, module.kernel_size,
                         module.stride, module.padding, module.dilation, groups or module.groups,
                         module.bias is not None, module.padding_mode, **f)
    if type(module) is nn.Linear:
        return nn.Linear(in_units or module.in_features, out_units or module.out_features,
                         module.bias is not None, **f)
    if type(module) in _NORMS:
        group = {"process_group": module.process_group} if isinstance(module, nn.SyncBatchNorm) else {}
        return type(module)(out_units or module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, **group, **f)
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

    A depthwise Conv3d after ``layer`` (CSN's and X3D's conv_b after conv_a) grows with it: its
    channel ``j`` is a copy of channel ``g(j)`` (filter and BatchNorm), and the layer after it is
    divided. A squeeze-excitation on those channels (X3D's, after conv_b's BatchNorm) reads them
    (its first conv's incoming weights divided) and gates them (its last conv's output unit ``j``,
    weights and bias, a copy of ``g(j)``'s). Its first conv (``"...norm_b.1.block.0"``) may be
    widened too: the last one's inputs are divided.

    ``layer`` may also name a residual stream of a video ResNet (``"layer1"`` … ``"layer4"``; a
    ResNet3D's ``"stem"``, ``"blocks.1"`` …): that is ``wider_group(model, layer, width, ...)``.
    A single layer writing into a stream cannot grow alone.

    Raises ValueError, leaving model and optimizer untouched, for an unknown layer, a width not
    larger than the current one, a layer with no following layer to rewrite (the output layer),
    or one whose output feeds a residual addition, or a depthwise conv (it grows with the layer
    before it).
    """
    if layer in residual_streams(model):
        return wider_group(model, layer, width, noise=noise, generator=generator, optimizer=optimizer)
    stage, followers, gates, consumers = _link(model, layer)
    return _grow(model, repr(layer), (stage,), consumers, width, noise, generator, optimizer, followers, gates)


def wider_group(model: nn.Module, stream: str, width: int, *, noise: float = 0.0,
                generator: Optional[torch.Generator] = None,
                optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
    """Grow a residual stream of a video ResNet ``model`` to ``width`` channels, in place,
    without changing what the model computes; returns ``model``.

    ``stream`` is a stream name (``"layer1"`` … ``"layer4"``, see ``residual_streams``; the stem
    writes into ``"layer1"``) or any layer writing into it (``"stem.0"``,
    ``"layer2.0.downsample.0"``, ``"layer3.1.conv2.0"``, R(2+1)D's ``"stem.3"`` …). A ResNet3D's
    streams are ``"stem"`` (its stage 1 starts with a projection) and ``"blocks.N"`` for each
    stage, written by its first block's ``branch1_conv`` and every block's ``branch2.conv_c``
    (X3D's alike: its stem's ``conv.conv_t`` writes ``"stem"``, the depthwise ``conv.conv_xy``
    and ``norm`` following its channels; its head's ``pool.pre_conv`` reads ``"blocks.4"``);
    SlowFast's are each pathway's stem and stages (readers that take the stream as a slice of a
    concatenation have only that slice divided). Every writer
    (the stem's last conv or the downsample shortcut that starts the stream, and each block's
    last conv) grows with one shared mapping ``g``, its BatchNorm copying γ, β and the running
    statistics, so every residual addition adds replicas to replicas; every reader (each block's
    first conv, the next stage's downsample conv, ``fc`` after the last stream) has its incoming
    weights divided by the replica counts. Exact in eval and train mode (replicated channels have
    identical batch statistics). ``noise``, ``generator`` and ``optimizer`` as for ``wider``
    (noise goes on each writer's replicas, scaled by that writer's weight std).

    Raises ValueError, leaving model and optimizer untouched, for a model without residual
    streams, an unknown stream, or a width not larger than the current one.
    """
    found = _find_stream(model, stream)
    gates, squeezes = _squeeze_excitations(_segments(model), (*found.writers, *found.followers))
    return _grow(model, f"residual stream {found.name!r}", found.writers, (*found.readers, *squeezes), width, noise,
                 generator, optimizer, found.followers, gates)


def _grow(model: nn.Module, what: str, producers: Sequence[_Stage],
          consumers: Sequence[Tuple[str, Optional[int]]], width: int, noise: float,
          generator: Optional[torch.Generator], optimizer: Optional[torch.optim.Optimizer],
          followers: Sequence[_Stage] = (), gates: Sequence[_Stage] = ()) -> nn.Module:
    """Grow the layers of ``producers`` (all with the same units; each with its BatchNorm, if
    any) to ``width`` units with one shared replica mapping, and the depthwise convs of
    ``followers`` (reading the producers' output in turn) to ``width`` channels and groups with
    it (filters copied, no noise), and the output units of ``gates`` (squeeze-excitation convs
    whose outputs multiply those channels one to one) with it too (weights and biases copied, no
    noise), and divide the incoming weights of
    every layer in ``consumers``: (path, None) reads exactly the producers' units (or, for a
    Linear after a flatten, groups of D·H·W columns per unit); (path, offset), a Conv3d, reads
    them as the channels (a Linear: the inputs) from ``offset`` of a concatenation, the others
    keeping their weights.
    ``what`` names the grown thing in errors. Validates everything before touching model or
    optimizer."""
    layers = {path: model.get_submodule(path)
              for path in [s.layer for s in (*producers, *followers, *gates)] + [c for c, _ in consumers]}
    following = {s.layer for s in followers}
    for path, module in layers.items():
        if path in following and _depthwise(module):
            continue
        if type(module) not in _UNIT_LAYERS or getattr(module, "groups", 1) != 1:
            raise ValueError(f"net2net grows plain nn.Conv3d (groups=1) and nn.Linear layers, and depthwise "
                             f"Conv3d after one; {path} is {module}")
    old = _units(layers[producers[0].layer])
    for stage in (*producers[1:], *followers, *gates):
        if _units(layers[stage.layer]) != old:
            raise ValueError(f"{stage.layer} has {_units(layers[stage.layer])} output units, not the {old} "
                             f"of {producers[0].layer}, so {what} cannot grow as one")
    if isinstance(width, bool) or not isinstance(width, int) or width <= old:
        raise ValueError(f"width must be an int larger than {what}'s current {old} units, got {width!r}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    norms = {s.norm: model.get_submodule(s.norm) for s in (*producers, *followers) if s.norm}
    for path, norm in norms.items():
        if type(norm) not in _NORMS or norm.num_features != old:
            raise ValueError(f"{path} ({norm}) does not normalise {what}'s {old} outputs")
    groups = {}  # consumer → input columns per producer unit (D·H·W when a flatten feeds a Linear)
    for path, offset in consumers:
        fan_in = _units(layers[path], incoming=True)
        if offset is not None:
            if not 0 <= offset <= fan_in - old:
                raise ValueError(f"{path} takes {fan_in} inputs, which cannot hold {what}'s {old} outputs "
                                 f"from channel {offset}")
        elif fan_in % old or (isinstance(layers[path], nn.Conv3d) and fan_in != old):
            raise ValueError(f"{path} takes {fan_in} inputs, not a multiple of {what}'s {old} outputs")
        groups[path] = fan_in // old

    g = remap.replica_mapping(old, width, generator, device=layers[producers[0].layer].weight.device)
    counts = remap.replica_counts(g, old)

    def replicate(t: Tensor, power: int = 1) -> Tensor:
        return remap.gather_units(t, g, 0)

    def divide_by(group: int) -> Remap:
        return lambda t, power=1: remap.divide_incoming(t, g, counts, 1, group, power=power)

    def divide_slice(offset: int) -> Remap:
        # the producers' channels of a concatenation; the channels around them stay as they are
        def divide(t: Tensor, power: int = 1) -> Tensor:
            grown = remap.divide_incoming(t[:, offset:offset + old], g, counts, 1, 1, power=power)
            return torch.cat([t[:, :offset], grown, t[:, offset + old:]], 1)
        return divide

    # running stats and affine parameters are per channel; num_batches_tracked (0-d) is copied
    norm_remaps: Dict[str, Remap] = {"weight": replicate, "bias": replicate,
                                     "running_mean": replicate, "running_var": replicate}
    rewrites = []  # (path, module, its grown replacement, remaps)
    for stage in (*producers, *gates):  # a gate's output unit j gates channel j: it copies g(j)'s
        producer = layers[stage.layer]
        rewrites.append((stage.layer, producer, _resized(producer, out_units=width),
                         {"weight": replicate, "bias": replicate}))
        if stage.norm:
            rewrites.append((stage.norm, norms[stage.norm], _resized(norms[stage.norm], out_units=width), norm_remaps))
    for stage in followers:  # channel j of a depthwise conv reads channel j: its filter copies g(j)'s
        follower = layers[stage.layer]
        rewrites.append((stage.layer, follower, _resized(follower, width, width, groups=width),
                         {"weight": replicate, "bias": replicate}))
        if stage.norm:
            rewrites.append((stage.norm, norms[stage.norm], _resized(norms[stage.norm], out_units=width), norm_remaps))
    for path, offset in consumers:
        consumer = layers[path]
        if offset is None:
            rewrites.append((path, consumer, _resized(consumer, in_units=width * groups[path]),
                             {"weight": divide_by(groups[path])}))
        else:
            fan_in = _units(consumer, incoming=True) + width - old
            rewrites.append((path, consumer, _resized(consumer, in_units=fan_in), {"weight": divide_slice(offset)}))
    swaps = [s for path, module, new, remaps in rewrites for s in _param_swaps(path, module, new, remaps)]
    commit_optimizer = _optimizer_commit(optimizer, swaps)

    # nothing above touched model or optimizer; from here on nothing can fail on bad input
    built = {path: _rebuilt(module, new, remaps) for path, module, new, remaps in rewrites}
    if noise > 0:
        for stage in producers:
            weight = layers[stage.layer].weight
            _perturb_replicas_(built[stage.layer].weight, old, noise * weight.float().std(correction=0).item(),
                               generator)
    for path, new in built.items():
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
# deeper
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Insertion:
    """A validated deeper step: ``commit()`` puts ``modules`` into the model (nothing before it
    touches the model) and cannot fail; their parameters join the optimizer's param group that
    holds ``anchor``."""

    modules: Tuple[nn.Module, ...]
    anchor: nn.Parameter
    commit: Callable[[], None]


def deeper(model: nn.Module, after: str, *, optimizer: Optional[torch.optim.Optimizer] = None,
           data: Optional[Tensor] = None, name: Optional[str] = None,
           generator: Optional[torch.Generator] = None) -> nn.Module:
    """Insert an identity layer after ``after`` in ``model``, in place, without changing what it
    computes; returns ``model``. New parameters join ``optimizer``'s param group of ``after``
    with empty state.

    C3D / C3D-BN (``after``: a conv of ``layer_names`` or a hidden Linear of ``fc_names``).
    After a conv: a 3×3×3 Conv3d (padding 1, same channels) with a Dirac kernel and zero bias,
    then (C3D-BN) a BatchNorm3d, then ReLU (idempotent on the ReLU output it receives). The pool
    that followed ``after`` moves after the new layer (the model's ``pool_names``). Without
    ``data`` the BatchNorm has running mean 0, variance 1, γ = sqrt(1 + eps), β = 0: identity in
    eval mode. With ``data`` (an input batch) the model is run to ``after`` in train mode
    (buffers restored) and the BatchNorm gets the batch's mean μ and biased variance σ² as
    running statistics, γ = sqrt(σ² + eps) and β = μ: identity in eval mode, and in train mode
    on that batch. (C3D without BatchNorm needs no ``data``.) After a hidden Linear: an identity
    Linear with zero bias; the forward's ReLU follows it (dropout too, so train-mode outputs with
    dropout > 0 differ in distribution). That needs the model to list its hidden Linears in
    ``fc_names`` (each run as Linear → ReLU → dropout before ``fc8``). The new layer is named
    ``name`` or the next free letter (``conv3b`` → ``conv3c``, its BN ``conv3c_bn``; ``fc6`` →
    ``fc6a``) and registered in ``layer_names`` (or ``fc_names``).

    Video ResNets (``after``: a block such as ``"layer2.1"``). A new BasicBlock of the stream's
    width and the stage's convolution kind (3×3×3, 1×3×3 or (2+1)D) goes into the ``layerN``
    Sequential right after it (later blocks move up one index: ``layer2.2`` becomes
    ``layer2.3``). Its convs get torchvision's initialisation (drawn from ``generator``, else the
    global RNG) and its last BatchNorm γ = β = 0, so its residual branch adds exactly 0 in eval
    and train mode, and the ReLU after the addition is idempotent on the stream it receives (a
    ReLU output): exact without ``data`` (ignored). γ still gets gradients, so the block learns.

    ConvColumn (``after``: a conv of ``conv_layer1`` … ``conv_layer4``, e.g.
    ``"conv_layer2.3"``). An identity Conv3d and BatchNorm3d (as for C3D-BN, ``data`` included)
    go into the block's Sequential right after that conv's BatchNorm and activation, before the
    block's pool (later modules move up). No activation follows them: the model's LeakyReLU is
    not idempotent (leaky(leaky(x)) = s²·x for x < 0), so one there would change the function
    (after a ReLU a ReLU is added). A fused ConvColumn runs each block as exactly its seven stock
    modules, so it is refused, and a deepened ConvColumn must stay unfused.

    ResNet3D (slow_r50, i3d_r50, c2d_r50, csn_r101; ``after``: a block such as
    ``"blocks.3.res_blocks.1"``) and SlowFast (a block of either pathway's stage:
    ``"blocks.2.multipathway_blocks.1.res_blocks.0"``). A new ResBlock like that one (its first
    conv's kernel and inner width, its middle conv's kernel and groups: CSN's is depthwise; stride
    1, identity shortcut) goes into the stage's ``res_blocks`` right after it (later blocks move up
    one index), PyTorchVideo's initialisation, its last BatchNorm γ = β = 0: exact as for the
    video ResNets. X3D (x3d_xs … x3d_l; ``after``: ``"blocks.2.res_blocks.3"``): likewise, the
    new block an X3D block (1×1×1 conv_a → BN → ReLU → depthwise 3×3×3 conv_b → BN → Swish →
    1×1×1 conv_c → BN) of the stream's width and the inner width of the block before it, without
    squeeze-excitation.

    S3D (``after``: a Conv3dNormActivation inside a Sequential: ``"features.2"``, a separable
    conv's half ``"features.3.1"``, a branch's ``"features.5.branch1.0"``; not ``branch0``, which
    is no Sequential). An identity Conv3dNormActivation (a 1×1×1 Dirac Conv3d, a BatchNorm3d as
    for C3D-BN, ``data`` included, and a ReLU, idempotent on the ReLU output it receives) goes
    into that Sequential right after it (later modules move up).

    In the Sequential-based models the new module's path is fixed by its position; ``name`` may
    only repeat it.

    Raises ValueError, leaving model and optimizer untouched, for other models, unknown or
    unsupported layers, taken names, bad ``data``, or an optimizer without ``after``'s weight.
    """
    from .models.c3d_family import C3D
    from .models.jester import ConvColumn
    from .models.resnet3d import ResNet3D, SlowFast
    from .models.separable_inception import S3D
    from .models.video_resnet import VideoResNet
    from .models.x3d import X3D

    if isinstance(model, C3D):
        insertion = _c3d_insertion(model, after, data, name)
    elif isinstance(model, VideoResNet):
        insertion = _resnet_insertion(model, after, name, generator)
    elif isinstance(model, ConvColumn):
        insertion = _convcolumn_insertion(model, after, data, name)
    elif isinstance(model, S3D):
        insertion = _s3d_insertion(model, after, data, name)
    elif isinstance(model, (ResNet3D, SlowFast, X3D)):
        insertion = _resnet3d_insertion(model, after, name, generator)
    else:
        raise ValueError(f"deeper supports the zoo's C3D, ConvColumn, VideoResNet, S3D, ResNet3D, SlowFast and X3D "
                         f"models, not {type(model).__name__}")
    group = None
    if optimizer is not None:
        group = next((g for g in optimizer.param_groups if any(p is insertion.anchor for p in g["params"])), None)
        if group is None:
            raise ValueError(f"the optimizer does not hold {after}'s weight, so the new layer has no group to join")
    insertion.commit()
    if group is not None:
        group["params"].extend(p for m in insertion.modules for p in m.parameters())
    return model


def _fixed_path(name: Optional[str], path: str) -> None:
    if name is not None and name != path:
        raise ValueError(f"the new layer's path is fixed by its position in the Sequential ({path!r}), "
                         f"so name={name!r} cannot be used")


@contextlib.contextmanager
def _train_mode_probe(model: nn.Module):
    """Run ``model`` in train mode (no grad) inside the block, then restore every buffer and
    train/eval flag it had."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        model.train()
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode


def _identity_conv(channels: int, factory: dict) -> nn.Conv3d:
    """A 3×3×3 Conv3d (padding 1, zero bias) that returns its input."""
    conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1, **factory)
    remap.dirac_(conv.weight.data)
    with torch.no_grad():
        conv.bias.zero_()
    return conv


def _identity_norm(reference: _BatchNorm, factory: dict, batch: Optional[Tensor]) -> _BatchNorm:
    """A BatchNorm3d (``reference``'s eps and momentum; a SyncBatchNorm of its group if it is one)
    that is identity in eval mode: running statistics μ, σ² with γ = sqrt(σ² + eps), β = μ; μ, σ²
    are ``batch``'s per-channel mean and biased variance (so it is identity in train mode on that
    batch too), else 0 and 1."""
    channels = reference.num_features
    if isinstance(reference, nn.SyncBatchNorm):
        norm = nn.SyncBatchNorm(channels, eps=reference.eps, momentum=reference.momentum,
                                process_group=reference.process_group, **factory)
    else:
        norm = nn.BatchNorm3d(channels, eps=reference.eps, momentum=reference.momentum, **factory)
    mean, var = torch.zeros(channels, **factory), torch.ones(channels, **factory)
    if batch is not None:
        batch = batch.to(**factory)
        mean, var = batch.mean(dim=(0, 2, 3, 4)), batch.var(dim=(0, 2, 3, 4), correction=0)
    with torch.no_grad():
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(var + norm.eps))
        norm.bias.copy_(mean)
    return norm


# C3D family ---------------------------------------------------------------------------------


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


def _c3d_activation(model: nn.Module, after: str, data: Tensor) -> Tensor:
    """The output of conv ``after``'s chain (after ReLU, before its pool) on ``data`` in train
    mode, leaving every buffer and train/eval flag of the model as it was."""
    from .models._common import check_input

    check_input(data, model.in_channels, model.input_size, type(model).__name__)
    pools = _c3d_pool_names(model)
    with _train_mode_probe(model):
        x = data
        for name in model.layer_names:
            bn = getattr(model, name + "_bn") if model.batch_norm else None
            pool = getattr(model, pools[name]) if name in pools and name != after else None
            x = model.chain(x, getattr(model, name), bn, "relu", 0.0, pool)
            if name == after:
                return x
    raise AssertionError("unreachable: after is in layer_names")


def _c3d_insertion(model: nn.Module, after: str, data: Optional[Tensor], name: Optional[str]) -> _Insertion:
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
        modules = {name: _identity_conv(old.out_channels, f)}
        if model.batch_norm:
            batch = _c3d_activation(model, after, data) if data is not None else None
            modules[name + "_bn"] = _identity_norm(getattr(model, after + "_bn"), f, batch)
        update = dict(layer_names=_insert(convs, after, name))
        if after in pools:
            moved = {k: v for k, v in pools.items() if k != after}
            moved[name] = pools[after]
            update["pool_names"] = moved
    for module in modules.values():
        module.train(old.training)

    def commit() -> None:
        for key, module in modules.items():
            setattr(model, key, module)
        for key, value in update.items():
            setattr(model, key, value)

    return _Insertion(tuple(modules.values()), old.weight, commit)


def _insert(names: Tuple[str, ...], after: str, name: str) -> Tuple[str, ...]:
    i = names.index(after) + 1
    return names[:i] + (name,) + names[i:]


# video ResNets ------------------------------------------------------------------------------


def _resnet_insertion(model: nn.Module, after: str, name: Optional[str],
                      generator: Optional[torch.Generator]) -> _Insertion:
    from .models.video_resnet import BasicBlock

    blocks = [f"layer{li}.{bi}" for li in range(1, 5) for bi in range(len(model.get_submodule(f"layer{li}")))]
    if after not in blocks:
        raise ValueError(f"deeper inserts a block after a block of {type(model).__name__}; {after!r} is not "
                         f"one of {', '.join(blocks)}")
    layer_name, index = after.split(".")
    layer, index = model.get_submodule(layer_name), int(index)
    _fixed_path(name, f"{layer_name}.{index + 1}")
    block = layer[index]
    writer = model.get_submodule(_stages(model, _leaf_paths(model, after + ".conv2"))[-1].layer)
    reader = model.get_submodule(_stages(model, _leaf_paths(model, after + ".conv1"))[0].layer)
    channels = writer.out_channels
    new = BasicBlock(channels, channels, _resnet_conv_builder(block.conv2[0]))
    # VideoResNet's (torchvision's) initialisation
    return _zero_branch_insertion(new, new.conv2[-1], block, writer, reader, lambda: layer.insert(index + 1, new),
                                  generator)


def _resnet3d_insertion(model: nn.Module, after: str, name: Optional[str],
                        generator: Optional[torch.Generator]) -> _Insertion:
    from .models.resnet3d import Conv2plus1d, ResBlock, ResStage
    from .models.x3d import X3D, x3d_res_block

    blocks = [f"{path}.res_blocks.{bi}" for path, stage in model.named_modules() if isinstance(stage, ResStage)
              for bi in range(len(stage.res_blocks))]  # ResNet3D's stages, or SlowFast's pathways' stages
    if after not in blocks:
        raise ValueError(f"deeper inserts a block after a block of {type(model).__name__}; {after!r} is not "
                         f"one of {', '.join(blocks)}")
    stage_name, index = after.rsplit(".", 1)
    stage, index = model.get_submodule(stage_name), int(index)
    _fixed_path(name, f"{stage_name}.{index + 1}")
    block = stage[index]
    branch = block.branch2
    channels, inner = branch.conv_c.out_channels, branch.conv_a.out_channels
    if isinstance(model, X3D):
        # an X3D block without squeeze-excitation (as every other one is): the branch adds
        # exactly 0 either way, and this is the simpler of the two, with no SE to grow along
        new = x3d_res_block(channels, inner, channels, (1, 1, 1), se_channels=0)
    elif isinstance(branch.conv_b, Conv2plus1d):  # R(2+1)D's: a (2+1)D conv_b of the same kernels
        conv_t, conv_xy = branch.conv_b.conv_t, branch.conv_b.conv_xy
        new = ResBlock(channels, inner, channels, branch.conv_a.kernel_size, 1,
                       (conv_t.kernel_size[0], *conv_xy.kernel_size[1:]), separable_b=True)
    else:  # the block before it, at the stream's width (a copy of its kernels and inner width)
        new = ResBlock(channels, inner, channels, branch.conv_a.kernel_size, 1, branch.conv_b.kernel_size,
                       branch.conv_b.groups)
    # PyTorchVideo's initialisation (BatchNorms: γ = 1, β = 0 from construction)
    return _zero_branch_insertion(new, new.branch2.norm_c, block, branch.conv_c, branch.conv_a,
                                  lambda: stage.insert(index + 1, new), generator)


def _zero_branch_insertion(new: nn.Module, last_norm: nn.Module, like: nn.Module, writer: nn.Module,
                           reader: nn.Module, insert: Callable[[], None],
                           generator: Optional[torch.Generator]) -> _Insertion:
    """``new``, a residual block (convs He-initialised from ``generator``) whose branch ends in
    ``last_norm``, made to add exactly 0: γ = β = 0 there, in eval and train mode alike (the ReLU
    after the addition is idempotent on the stream, a ReLU output). γ still gets gradients, so the
    block learns. On ``writer``'s device and dtype, in ``like``'s mode, SyncBatchNorms if ``like``
    has them; ``insert`` puts it in."""
    if generator is not None:
        new.to(generator.device)  # nn.init draws on the tensor's device
    for m in new.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
    if not isinstance(last_norm, nn.BatchNorm3d):
        raise ValueError(f"the new block's branch does not end in a BatchNorm3d ({last_norm}); cannot zero it")
    nn.init.zeros_(last_norm.weight)
    nn.init.zeros_(last_norm.bias)
    synced = next((m for m in like.modules() if isinstance(m, nn.SyncBatchNorm)), None)
    if synced is not None:  # a converted model (convert_sync_batchnorm): so is the new block
        new = nn.SyncBatchNorm.convert_sync_batchnorm(new, synced.process_group)
    new.to(**_factory(writer)).train(like.training)
    return _Insertion((new,), reader.weight, insert)


def _resnet_conv_builder(conv: nn.Module) -> Callable[..., nn.Module]:
    """The VideoResNet conv builder that made ``conv`` (a block's first module of conv2)."""
    from .models.video_resnet import Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple

    if type(conv) is Conv2Plus1D:
        return Conv2Plus1D  # its constructor takes the builder's (in, out, mid, stride)
    for builder in (Conv3DSimple(), Conv3DNoTemporal()):
        probe = builder(1, 1, 1)
        if type(conv) is nn.Conv3d and (conv.kernel_size, conv.padding) == (probe.kernel_size, probe.padding):
            return builder
    raise ValueError(f"no VideoResNet conv builder makes {conv}, so deeper cannot build a matching block")


# ConvColumn ---------------------------------------------------------------------------------

_STAGE_TAIL = (_BatchNorm, nn.ReLU, nn.LeakyReLU)  # what follows a conv within its stage


class _Captured(Exception):
    """Stops a probing forward once the wanted activation is captured."""


def _module_output(model: nn.Module, module: nn.Module, data: Tensor) -> Tensor:
    """``module``'s output when ``model`` runs ``data`` in train mode (buffers and modes restored;
    the forward stops there)."""
    captured: List[Tensor] = []

    def capture(_module, _inputs, output):
        captured.append(output.detach().clone())
        raise _Captured

    handle = module.register_forward_hook(capture)
    try:
        with _train_mode_probe(model):
            model(data)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


def _convcolumn_insertion(model: nn.Module, after: str, data: Optional[Tensor], name: Optional[str]) -> _Insertion:
    sites = {}  # conv path → (its block, the index right after its BatchNorm and activation)
    for i in range(1, 5):
        block = model.get_submodule(f"conv_layer{i}")
        for k, module in enumerate(block):
            if type(module) is nn.Conv3d:
                end = k + 1
                while end < len(block) and isinstance(block[end], _STAGE_TAIL):
                    end += 1
                sites[f"conv_layer{i}.{k}"] = (block, end)
    if after not in sites:
        raise ValueError(f"deeper inserts after a conv of conv_layer1..4 of {type(model).__name__}; {after!r} "
                         f"is not one of {', '.join(sites)}")
    block, end = sites[after]
    _fixed_path(name, f"{after.split('.')[0]}.{end}")
    conv = model.get_submodule(after)
    norms = [m for m in block[int(after.split(".")[1]) + 1:end] if isinstance(m, _BatchNorm)]
    if not norms:
        raise ValueError(f"{after!r} has no BatchNorm to take eps and momentum from")
    f = _factory(conv)
    batch = _module_output(model, block[end - 1], data) if data is not None else None
    new = [_identity_conv(conv.out_channels, f), _identity_norm(norms[0], f, batch)]
    if isinstance(block[end - 1], nn.ReLU):  # idempotent on its own output, so exact
        new.append(nn.ReLU())
    for module in new:
        module.train(conv.training)

    def commit() -> None:
        for offset, module in enumerate(new):
            block.insert(end + offset, module)

    return _Insertion(tuple(new), conv.weight, commit)


# S3D ----------------------------------------------------------------------------------------


def _s3d_insertion(model: nn.Module, after: str, data: Optional[Tensor], name: Optional[str]) -> _Insertion:
    from .models.separable_inception import Conv3dNormActivation

    sites = {f"{path}.{k}": (seq, k) for path, seq in model.named_modules() if isinstance(seq, nn.Sequential)
             for k, unit in enumerate(seq) if isinstance(unit, Conv3dNormActivation)}
    if after not in sites:
        raise ValueError(f"deeper inserts after a Conv3dNormActivation inside a Sequential of "
                         f"{type(model).__name__}; {after!r} is not one of {', '.join(sites)}")
    seq, k = sites[after]
    _fixed_path(name, f"{after.rpartition('.')[0]}.{k + 1}")
    unit = seq[k]
    parts = list(unit)
    if (len(parts) != 3 or type(parts[0]) is not nn.Conv3d or not isinstance(parts[1], _BatchNorm)
            or not isinstance(parts[2], nn.ReLU)):
        raise ValueError(f"{after!r} is not Conv3d → BatchNorm → ReLU ({unit}), so no identity layer can "
                         f"follow it")
    conv = parts[0]
    f = _factory(conv)
    batch = _module_output(model, unit, data) if data is not None else None
    new = Conv3dNormActivation(conv.out_channels, conv.out_channels).to(**f)
    remap.dirac_(new[0].weight.data)
    new[1] = _identity_norm(parts[1], f, batch)
    new.train(unit.training)
    return _Insertion((new,), conv.weight, lambda: seq.insert(k + 1, new))
