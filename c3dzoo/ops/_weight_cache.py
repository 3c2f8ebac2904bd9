"""The folded + packed conv weight cache the kernel backends share.

Folding BatchNorm into the conv weight and packing it into a kernel's layout costs a pass over the
weight on every call; the cache keeps the result per set of source tensors and notices any change.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Callable, Optional, Sequence

import torch

Tensor = torch.Tensor


def capturing(sources: Sequence[Optional[Tensor]]) -> bool:
    """Whether a CUDA graph is being captured on the current stream of the sources' GPU."""
    for t in sources:
        if t is not None and t.is_cuda:
            return torch.cuda.is_current_stream_capturing()
    return False


_CACHES: "weakref.WeakSet[FoldedWeightCache]" = weakref.WeakSet()


def clear_weight_caches() -> None:
    """Forget every folded/packed weight the backends cached: needed only after writing parameters
    or BatchNorm buffers of an eval-mode fused model through ``.data`` (which no version counter
    sees); updates under ``torch.no_grad()``, optimizers and ``load_state_dict`` are seen anyway."""
    for cache in list(_CACHES):
        cache.clear()


def mark_changed(*tensors: Optional[Tensor]) -> None:
    """Bump the version counters of tensors written where no counter sees it, so that cached folds
    of them are rebuilt: a kernel writing through a raw pointer (the CUDA running-statistics
    update), or stock ``nn.BatchNorm3d``, whose training forward updates running_mean/var inside
    its kernel without a bump (only its ``num_batches_tracked.add_(1)`` shows)."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


class FoldedWeightCache:
    """Folded, cast and packed (weight, bias) per set of source tensors.

    One entry per set of sources (and ``extra``), where a source is a storage and a place in it (address,
    shape, strides, dtype), not a tensor object: ``p.detach()`` or a view made anew on every call
    (``functional_call`` with detached parameters) finds the parameter's entry instead of adding one
    per call. An entry is valid while each source's storage is the very same object (weak
    references to the storages, so an entry never keeps a model alive and a recycled id never
    matches) and its ``_version`` counter is unchanged (any in-place update — an optimizer step,
    ``load_state_dict``, the fused op's running-statistics update — bumps it; where stock BatchNorm
    updates them, the fused layers bump it themselves, see ``mark_changed``). The
    tensors themselves are never weakly referenced: ``torch.utils.swap_tensors`` (``module.to()`` /
    ``.double()`` under ``torch.__future__.set_swap_module_params_on_conversion(True)``, DTensor
    conversions) refuses a tensor that has a weak reference. A changed source rebuilds its entry in
    place: a training loop holds one packed copy per layer, not one per step until the cache fills.
    Entries die with any of their sources' storages (a parameter given new storage through ``.data``
    or a swap frees its stale entry), and at most ``capacity`` are kept (least recently used first
    out). One cache serves every layer of every live model on its backend, and a forward visits the
    layers in a cycle: with fewer entries than layers (S3D has 77 chains; a few models alive at once)
    least-recently-used eviction would miss on every call, so the bound is far above any model's.
    Not detected: writes through ``tensor.data``, which bypass the version counter (training-mode
    layers do not cache for that reason, see ``cached_folded``; ``clear_weight_caches()`` forgets
    every entry).

    Nothing is cached or looked up while a CUDA graph is being captured: the folding and packing
    are captured too, so each replay reads the parameters as they are then (as a captured stock
    model does) instead of a copy frozen at capture time, which a later rebuild could also free.
    """

    def __init__(self, capacity: int = 4096):
        _CACHES.add(self)
        self.capacity = capacity
        # (where each source is, extra) -> (weak references to the storages, versions, value)
        self._entries: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, sources: Sequence[Optional[Tensor]], extra: tuple, build):
        # (one loop of plain attribute reads: a model's eval forward looks up every layer's entry)
        storages, places, versions = [], [], []
        for t in sources:
            if t is None:
                storages.append(None)
                places.append(None)
                versions.append(None)
                continue
            if t.is_inference():  # no version counter: never cached
                return build()
            s = t.untyped_storage()
            storages.append(s)
            places.append((id(s), t.data_ptr(), t.shape, t.stride(), t.dtype))
            versions.append(t._version)
        if capturing(sources):
            return build()
        key = (tuple(places), tuple(extra))
        versions = tuple(versions)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                refs, seen, value = entry
                if seen == versions and _same_storages(refs, storages):
                    self._entries.move_to_end(key)
                    return value
                del self._entries[key]  # a source changed, or an id was recycled: stale, freed now
        value = build()
        entries = self._entries

        def drop(ref, key=key):  # a source's storage died (freed, or replaced): the entry is useless
            entry = entries.get(key)
            if entry is not None and ref in entry[0]:  # not a newer entry under the same key
                del entries[key]

        refs = tuple(None if s is None else weakref.ref(s, drop) for s in storages)
        with self._lock:
            entries[key] = (refs, versions, value)
            entries.move_to_end(key)
            while len(entries) > self.capacity:
                entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)



def _same_storages(refs, storages) -> bool:
    for ref, storage in zip(refs, storages):
        if ref is not None and ref() is not storage:
            return False
    return True


def cached_folded(
    cache: FoldedWeightCache,
    pack: Callable[[Tensor, Optional[Tensor]], object],
    weight, bias, bn_weight, bn_bias, running_mean, running_var, *, norm: str, eps: float, extra: tuple = (),
    use_cache: bool = True,
):
    """``pack(w, b)`` of the conv weight and bias with BatchNorm folded in fp32 (norm "running"),
    or of the conv's own weight and fp32 bias (norm "none"), cached in ``cache``.

    ``use_cache=False`` builds it afresh: what training-mode (batch-statistics) layers do. Their
    weights change every step, so a cache would only hold a stale-prone copy per layer (memory), and
    a weight updated through ``.data`` — an EMA teacher (mean teacher, DINO: ``p.data.mul_(m)``) —
    changes no version counter: a cached copy would never see it."""

    def build():
        from .reference import fold_batch_norm  # reference caches its own folds here: no import cycle

        with torch.no_grad():
            if norm == "running":
                w, b = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
            else:
                w, b = weight, (None if bias is None else bias.float())
            return pack(w, b)

    if not use_cache:
        return build()
    sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
    if norm != "running":
        sources = (weight, bias, None, None, None, None)
    return cache.get_or_build(sources, (norm, float(eps)) + tuple(extra), build)
