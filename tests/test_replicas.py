"""Copies of a fused model whose modules are swapped for copies run on their own copies:
``nn.DataParallel``'s replicas (``torch.nn.parallel.replicate``) and ``torch.func.functional_call``.

A ``c3dzoo.fuse`` chain used to keep references to the model's modules, so every DataParallel
replica ran the original modules' weights (on a second GPU: a device mismatch error; in this CPU
stand-in: silently the wrong weights). Replication needs GPUs; the tests replace its broadcast by
a CPU one that gives replica 1 shifted copies of every parameter and buffer, so a replica that
reads the originals shows."""

import copy
import importlib

import pytest
import torch

import c3dzoo
from test_memory_layout import ViewsAfterPool
from twins import assert_same_state

_replicate_module = importlib.import_module("torch.nn.parallel.replicate")


def _cpu_broadcast(tensors, devices, detach=False):
    """replicate()'s broadcast, on the CPU: replica 0 gets the originals (as on the source GPU),
    the others shifted copies (as if the weights on that device differed)."""
    def copy_of(t):
        c = t.detach().clone()
        if t.is_floating_point():
            c = (c + 0.25).requires_grad_(t.requires_grad and not detach)
        return c
    return [list(tensors)] + [[copy_of(t) for t in tensors] for _ in devices[1:]]


@pytest.fixture
def cpu_replicate(monkeypatch):
    monkeypatch.setattr(_replicate_module, "_broadcast_coalesced_reshape", _cpu_broadcast)
    return lambda model: _replicate_module.replicate(model, [0, 1])


def _models():
    torch.manual_seed(0)
    stock = ViewsAfterPool()
    zoo = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32))
    zoo_fused = copy.deepcopy(zoo)
    zoo_fused.fused = True
    return {
        "fuse": (stock, c3dzoo.fuse(copy.deepcopy(stock)), torch.randn(2, 3, 4, 8, 8)),
        "zoo": (zoo, zoo_fused, torch.randn(2, 3, 16, 32, 32)),
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["fuse", "zoo"])
def test_data_parallel_replicas_run_their_own_weights(cpu_replicate, kind, mode):
    stock, fused, x = _models()[kind]
    stock.train(mode == "train")
    fused.train(mode == "train")
    for replica_stock, replica_fused in zip(cpu_replicate(stock), cpu_replicate(fused)):
        torch.manual_seed(1)  # dropout
        expected = replica_stock(x)
        torch.manual_seed(1)
        got = replica_fused(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert_same_state(replica_fused, replica_stock, rtol=1e-5, atol=1e-6, grads=False)


@pytest.mark.parametrize("kind", ["fuse", "zoo"])
def test_functional_call_swaps_parameters(kind):
    """torch.func.functional_call (ensembles, MAML): the fused model runs the parameters given."""
    stock, fused, x = _models()[kind]
    stock.eval()
    fused.eval()
    params = {name: p.detach() + 0.1 * torch.randn_like(p) for name, p in stock.named_parameters()}
    expected = torch.func.functional_call(stock, params, (x,))
    got = torch.func.functional_call(fused, params, (x,))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, fused(x), rtol=1e-3, atol=1e-3)  # the swapped parameters counted
