"""The folded + packed weight cache the kernel backends share (c3dzoo.ops._weight_cache)."""

from __future__ import annotations

import gc
import weakref

import torch

from c3dzoo.ops._weight_cache import FoldedWeightCache


def _packer(built):
    def build():
        value = torch.empty(16)
        built.append(weakref.ref(value))
        return value
    return build


def test_a_changed_source_rebuilds_its_entry_and_frees_the_stale_value():
    """A training loop updates every weight in place each step: the cache must hold one packed copy
    per layer, not one per step until it fills (a copy of every conv weight per step, on the GPU)."""
    cache = FoldedWeightCache(capacity=64)
    weight, bias = torch.randn(4, 3), torch.randn(4)
    built = []
    first = cache.get_or_build((weight, bias), ("none",), _packer(built))
    assert cache.get_or_build((weight, bias), ("none",), _packer(built)) is first and len(built) == 1
    del first
    for step in range(5):
        with torch.no_grad():
            weight.add_(0.1)  # an optimizer step
        value = cache.get_or_build((weight, bias), ("none",), _packer(built))
        assert len(built) == step + 2 and len(cache) == 1
        del value
        gc.collect()
        assert all(ref() is None for ref in built[:-1])  # every stale copy is gone
    # another mode of the same tensors is another entry
    cache.get_or_build((weight, bias), ("running",), _packer(built))
    assert len(cache) == 2


def test_entries_notice_new_storage_and_die_with_the_weight():
    cache = FoldedWeightCache()
    weight = torch.randn(4, 3)
    built = []
    cache.get_or_build((weight, None), (), _packer(built))
    weight.data = torch.randn(4, 3)  # new storage under the same tensor object
    cache.get_or_build((weight, None), (), _packer(built))
    assert len(built) == 2 and len(cache) == 1
    del weight
    gc.collect()
    assert len(cache) == 0


def test_inference_tensors_are_never_cached():
    cache = FoldedWeightCache()
    with torch.inference_mode():
        weight = torch.randn(4, 3)
    built = []
    cache.get_or_build((weight, None), (), _packer(built))
    cache.get_or_build((weight, None), (), _packer(built))
    assert len(built) == 2 and len(cache) == 0


def test_capacity_evicts_the_least_recently_used():
    cache = FoldedWeightCache(capacity=3)
    weights = [torch.randn(2) for _ in range(4)]
    built = []
    for w in weights[:3]:
        cache.get_or_build((w,), (), _packer(built))
    cache.get_or_build((weights[0],), (), _packer(built))  # used again: now the most recent
    cache.get_or_build((weights[3],), (), _packer(built))  # evicts weights[1]'s entry
    assert len(cache) == 3 and len(built) == 4
    cache.get_or_build((weights[0],), (), _packer(built))
    assert len(built) == 4
    cache.get_or_build((weights[1],), (), _packer(built))
    assert len(built) == 5


def test_nothing_is_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """Captured, the folding runs inside the graph, so replays see in-place parameter updates (as a
    captured stock model does); the real capture is tested in tests/test_gpu_model.py."""
    from c3dzoo.ops import _weight_cache

    cache = FoldedWeightCache()
    weight = torch.randn(4, 3)
    built = []
    monkeypatch.setattr(_weight_cache, "capturing", lambda sources: True)
    cache.get_or_build((weight, None), (), _packer(built))
    cache.get_or_build((weight, None), (), _packer(built))
    assert len(built) == 2 and len(cache) == 0
    monkeypatch.undo()
    assert not _weight_cache.capturing((weight, None))  # CPU tensors: never (and no CUDA call)
    cache.get_or_build((weight, None), (), _packer(built))
    cache.get_or_build((weight, None), (), _packer(built))
    assert len(built) == 3 and len(cache) == 1


def test_reference_backend_folds_each_eval_layer_once_and_notices_updates():
    """The reference backend caches its folded weights too (an eval model on CPU folded every layer
    on every call); an in-place update of any source is seen on the next call."""
    from c3dzoo.ops import conv3d_bn_act, reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 6, generator=g)
    conv = torch.nn.Conv3d(3, 5, 3, padding=1)
    bn = torch.nn.BatchNorm3d(5).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)

    def fused():
        return conv3d_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                             training=False, padding=1, backend="reference")

    def stock():
        with torch.no_grad():
            return torch.relu(bn(conv(x)))

    cache = reference._fold_cache
    cache.clear()
    first = fused()
    assert len(cache) == 1 and torch.equal(fused(), first) and len(cache) == 1
    torch.testing.assert_close(first, stock(), rtol=1e-5, atol=1e-5)
    for update in (lambda: bn.running_var.mul_(3.0), lambda: conv.weight.mul_(-1.0), lambda: bn.bias.add_(1.0)):
        with torch.no_grad():
            update()
        torch.testing.assert_close(fused(), stock(), rtol=1e-5, atol=1e-5)
        assert len(cache) == 1
