"""An empty batch (N = 0: the last shard of an uneven split, a filtered batch) does what stock
modules do: an empty output, zero gradients, running statistics untouched, num_batches_tracked
counted. Before, a training-mode fused layer refused it ("Expected more than 1 value per channel",
which stock says only of a single value) and the triton backward divided by zero."""

import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct
from interpreter import skip_unless_triton_runs_cpu_tensors
from twins import assert_same_state


def _backend(name):
    if name == "triton":
        skip_unless_triton_runs_cpu_tensors()
    return name


def _stock(layer):
    return nn.Sequential(*[m for m in (layer.conv, layer.bn, nn.ReLU(), layer.pool) if m is not None])


BN_MODES = {
    "train": dict(),
    "eval": dict(),
    "frozen_bn": dict(),  # a training model whose BN is in eval mode
    "momentum_none": dict(momentum=None),
    "no_running_stats": dict(track_running_stats=False),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pool", [None, ((1, 2, 2), (1, 2, 2), 0)], ids=["no_pool", "pool"])
@pytest.mark.parametrize("mode", list(BN_MODES))
def test_empty_batch_matches_stock(backend, pool, mode):
    torch.manual_seed(0)
    fused = Conv3dBNAct(3, 5, 3, padding=1, pool=pool, backend=_backend(backend), **BN_MODES[mode])
    if fused.bn.running_mean is not None:
        fused.bn.running_mean.uniform_(-1, 1)
        fused.bn.running_var.uniform_(0.5, 2)
    stock = copy.deepcopy(fused)
    for layer in (fused, stock):
        layer.train(mode != "eval")
        if mode == "frozen_bn":
            layer.bn.eval()
    x = torch.randn(0, 3, 4, 6, 6, requires_grad=True)
    x_stock = x.detach().clone().requires_grad_(True)
    out, expected = fused(x), _stock(stock)(x_stock)
    assert out.shape == expected.shape == (0, 5, 4, *((3, 3) if pool else (6, 6)))
    out.sum().backward()
    expected.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None for p in fused.parameters())
    assert_same_state(fused, stock, rtol=0, atol=0)  # zero gradients, both
    if mode in ("train", "momentum_none"):
        assert int(fused.bn.num_batches_tracked) == 1  # counted, as nn.BatchNorm3d counts it


def test_empty_batch_through_fused_models():
    """A whole fused C3D-BN in training mode (prologue fusion included) and a fuse()'d model."""
    torch.manual_seed(0)
    stock = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32))
    fused = copy.deepcopy(stock)
    fused.fused = True
    rewritten = c3dzoo.fuse(copy.deepcopy(stock))
    x = torch.randn(0, 3, 16, 32, 32)
    expected = stock.train()(x)
    expected.sum().backward()
    for model in (fused, rewritten):
        out = model.train()(x)
        assert out.shape == expected.shape == (0, 4)
        out.sum().backward()
        assert_same_state(model, stock, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch_on_gpu(backend, mode):
    torch.manual_seed(0)
    fused = Conv3dBNAct(3, 16, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend=backend).cuda()
    stock = copy.deepcopy(fused)
    for layer in (fused, stock):
        layer.train(mode == "train")
    x = torch.randn(0, 3, 4, 6, 6, device="cuda", requires_grad=True)
    out, expected = fused(x), _stock(stock)(x)
    assert out.shape == expected.shape
    out.sum().backward()
    expected.sum().backward()
    assert_same_state(fused, stock, rtol=0, atol=0)
