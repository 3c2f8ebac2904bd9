"""The folded + packed weight cache the kernel backends share (c3dzoo.ops._weight_cache)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import c3dzoo
from c3dzoo.ops._weight_cache import FoldedWeightCache
from interpreter import skip_unless_triton_runs_cpu_tensors


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


def test_views_made_anew_on_every_call_share_their_storage_entry():
    """``p.detach()`` or a fresh view of a parameter (``functional_call`` with detached parameters,
    on every call) is the parameter's data: it finds the parameter's entry, it does not add one per
    call until the cache holds ``capacity`` packed copies; an in-place update through any of them
    is still seen."""
    cache = FoldedWeightCache(capacity=64)
    weight, bias = torch.randn(4, 3), torch.randn(4)
    built = []
    first = cache.get_or_build((weight, bias), (), _packer(built))
    for _ in range(10):
        assert cache.get_or_build((weight.detach(), bias[:]), (), _packer(built)) is first
    assert len(built) == 1 and len(cache) == 1
    weight.detach().add_(1.0)  # shares the version counter
    cache.get_or_build((weight.detach(), bias), (), _packer(built))
    assert len(built) == 2 and len(cache) == 1
    # another place in the same storage is another source
    cache.get_or_build((weight[1:], bias[1:]), (), _packer(built))
    assert len(built) == 3 and len(cache) == 2


def test_a_source_given_new_storage_frees_its_stale_entry():
    """A BatchNorm buffer or conv bias replaced through ``.data`` (or by a swap) gets a new storage:
    the entry made from the old one can never match again and is dropped with it, not kept (with its
    packed weight) until the cache is full."""
    cache = FoldedWeightCache()
    weight, bias, running_var = torch.randn(4, 3), torch.randn(4), torch.rand(4)
    built = []
    cache.get_or_build((weight, bias, running_var), (), _packer(built))
    running_var.data = torch.rand(4)
    cache.get_or_build((weight, bias, running_var), (), _packer(built))
    bias.data = torch.randn(4)
    cache.get_or_build((weight, bias, running_var), (), _packer(built))
    gc.collect()
    assert len(built) == 3 and len(cache) == 1


def test_functional_call_with_detached_parameters_keeps_one_entry_per_layer():
    """An eval-mode fused model run through ``torch.func.functional_call`` with freshly detached
    parameters and buffers on every call (a common way to run a frozen copy) folds each layer once."""
    from c3dzoo.ops import reference

    model = c3dzoo.c3d_bn(fused=True, num_classes=4, width_mult=0.0625, input_size=(16, 32, 32)).eval()
    x = torch.randn(1, 3, 16, 32, 32)
    reference._fold_cache.clear()
    with torch.no_grad():
        expected = model(x)
        layers = len(reference._fold_cache)
        for _ in range(12):
            state = {name: t.detach() for name, t in (*model.named_parameters(), *model.named_buffers())}
            torch.testing.assert_close(torch.func.functional_call(model, state, (x,)), expected, rtol=0, atol=0)
    assert layers == 8 and len(reference._fold_cache) == layers


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


def _layer_pair(backend):
    if backend == "triton":
        skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    fused = c3dzoo.nn.Conv3dBNAct(3, 5, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend=backend)
    with torch.no_grad():
        fused.bn.running_mean.normal_(0, 0.2)
        fused.bn.running_var.uniform_(0.5, 1.5)
    stock = copy.deepcopy(fused)
    return fused, lambda x: stock.pool(torch.relu(stock.bn(stock.conv(x)))), stock


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_training_mode_teacher_updated_through_data_is_seen(backend):
    """An EMA teacher (mean teacher, DINO) runs in train mode under no_grad and is updated with
    ``p.data.mul_(m).add_(...)``, which no version counter sees: training-mode layers do not cache
    their packed weights, so every forward reads the weights as they are."""
    from c3dzoo.ops import triton_impl

    fused, stock_forward, stock = _layer_pair(backend)
    student = [p.detach().clone() for p in fused.parameters()]
    x = torch.randn(2, 3, 4, 6, 6)
    triton_impl._weight_cache.clear()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fused(x), stock_forward(x), rtol=1e-5, atol=1e-5)
            for model in (fused, stock):
                for p, s in zip(model.parameters(), student):
                    p.data.mul_(0.5).add_(s, alpha=0.5)
            for s in student:
                s.add_(0.1)  # the student moves on
    assert len(triton_impl._weight_cache) == 0  # and no packed copy is held between steps


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_clear_weight_caches_after_writes_through_data_in_eval_mode(backend):
    """Eval mode caches the folded weights; a write through ``.data`` is invisible to it until
    ``c3dzoo.clear_weight_caches()``. A write under no_grad is seen without it."""
    fused, stock_forward, stock = _layer_pair(backend)
    fused.eval(), stock.eval()
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        fused(x)  # cached
        for model in (fused, stock):
            model.conv.weight.mul_(-1.0)  # seen: the version counter moves
        torch.testing.assert_close(fused(x), stock_forward(x), rtol=1e-5, atol=1e-5)
        for model in (fused, stock):
            model.conv.weight.data.mul_(2.0)
            model.bn.running_var.data.mul_(3.0)
        c3dzoo.clear_weight_caches()
        torch.testing.assert_close(fused(x), stock_forward(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def swap_module_params():
    """``module.to()``/``.double()``/``load_state_dict`` replace parameters with
    ``torch.utils.swap_tensors`` (the conversion DTensor and FSDP2 parameters always take)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.filterwarnings("ignore:c3dzoo. backend 'triton' cannot run this call:RuntimeWarning")  # fp64
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_conversions_that_swap_tensors_work_after_cached_calls(backend, swap_module_params):
    """swap_tensors refuses a tensor that has a weak reference ("Couldn't swap Conv3d.weight"), so the
    cache must not weakly reference the parameters; and a swapped parameter is the same object with
    new storage, which the cache must see (no stale fold of the values before the swap)."""
    from c3dzoo.ops import reference, triton_impl

    fused, stock_forward, stock = _layer_pair(backend)
    fused.eval(), stock.eval()
    x = torch.randn(2, 3, 4, 6, 6)
    cache = triton_impl._weight_cache if backend == "triton" else reference._fold_cache
    cache.clear()
    with torch.no_grad():
        fused(x)
    assert len(cache) == 1
    weight = fused.conv.weight
    for model in (fused, stock):
        model.double()
    assert fused.conv.weight is weight and weight.dtype == torch.float64  # swapped, not replaced
    with torch.no_grad():
        torch.testing.assert_close(fused(x.double()), stock_forward(x.double()))
        for model in (fused, stock):
            model.conv.weight.mul_(-1.0)
            model.bn.running_var.mul_(2.0)
    for model in (fused, stock):
        model.float()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock_forward(x), rtol=1e-5, atol=1e-5)
    state = {k: v.clone().uniform_(0.5, 1.5) if v.is_floating_point() else v for k, v in stock.state_dict().items()}
    stock.load_state_dict(state)
    fused.load_state_dict(state)
    assert fused.conv.weight is weight
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock_forward(x), rtol=1e-5, atol=1e-5)


def test_whole_fused_model_moves_dtype_with_swapped_parameters_after_training(swap_module_params):
    """A train step, an eval call (cached folds), then ``model.double()``: what a user converting a
    trained checkpoint does; the stock twin's conversion works, so the fused one must."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=4, width_mult=0.0625, input_size=(16, 32, 32))
    fused = c3dzoo.c3d_bn(fused=True, **kwargs)
    stock = c3dzoo.c3d_bn(**kwargs)
    stock.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16, 32, 32)
    for model in (fused, stock):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().mean().backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            model(x)
        model.double()
    with torch.no_grad():
        torch.testing.assert_close(fused(x.double()), stock(x.double()))


def test_a_model_with_more_layers_than_the_old_bound_folds_once(monkeypatch):
    """S3D's 77 eval-mode chains, then a second forward: nothing folded again. (A bound of 64
    entries, shared by every layer, evicted each layer just before its next use: every call
    refolded every layer, on every backend.)"""
    from c3dzoo.ops import reference

    folds, real = [], reference.fold_batch_norm
    monkeypatch.setattr(reference, "fold_batch_norm", lambda *a, **k: (folds.append(1), real(*a, **k))[1])
    torch.manual_seed(0)
    model = c3dzoo.s3d(num_classes=4, fused=True, backend="reference").eval()
    x = torch.randn(1, 3, 5, 17, 17)
    with torch.no_grad():
        first = model(x)
        assert len(folds) == 77
        assert torch.equal(model(x), first) and len(folds) == 77


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_running_statistics_updated_by_stock_batch_norm_are_seen(backend):
    """Stock BatchNorm updates running_mean/var in training mode without moving their version
    counters: a model folded in eval, run stock in training mode (``fused=False``), then fused in
    eval again must fold the new statistics, not serve the old fold (found on CSN and Slow R50)."""
    if backend == "triton":
        skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(width_mult=0.125, input_size=(16, 16, 16), num_classes=5, fused=True, backend=backend)
    x = torch.randn(1, 3, 16, 16, 16)  # (one clip: the fused eval calls run under the interpreter)
    model.eval()
    with torch.no_grad():
        model(x)  # folds and caches every layer
        model.fused = False
        model.train()
        for _ in range(2):
            model(torch.randn(2, 3, 16, 16, 16) * 3 + 1)  # stock: the statistics move, no counter does
        model.eval()
        stock = model(x)
        model.fused = True
        fused = model(x)
    torch.testing.assert_close(fused, stock, rtol=1e-4, atol=1e-6)


def test_a_bn_recalibrated_by_a_hooked_stock_chain_is_seen():
    """The same through a hook: a hooked chain runs module by module (stock BN) in training mode."""
    torch.manual_seed(0)
    layer = c3dzoo.nn.Conv3dBNAct(3, 4, 3, padding=1, backend="reference").eval()
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        layer(x)
        handle = layer.bn.register_forward_hook(lambda *args: None)
        layer.train()
        layer(x * 5 + 2)
        handle.remove()
        layer.eval()
        expected = torch.relu(layer.bn(layer.conv(x)))
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_the_cuda_running_statistics_update_bumps_version_counters(monkeypatch):
    """The CUDA kernel writes running_mean/var through raw pointers: the wrapper bumps their
    counters, or an eval-mode fold cached before a BN recalibration (swa_utils.update_bn, fused in
    training mode with no optimizer step) would outlive it. The kernel itself is stubbed here."""
    from c3dzoo.ops import cuda_impl

    class _Extension:
        def bn_update_running(self, *args):
            pass

    monkeypatch.setattr(cuda_impl, "extension", lambda: _Extension())
    monkeypatch.setattr(cuda_impl, "stream_handle", lambda t: 0)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    before = (running_mean._version, running_var._version)
    assert cuda_impl.update_running_stats(running_mean, running_var, torch.zeros((), dtype=torch.int64),
                                          torch.zeros(4), torch.ones(4), 10, 0.1)
    assert running_mean._version > before[0] and running_var._version > before[1]
