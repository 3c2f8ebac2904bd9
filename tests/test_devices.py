"""Kernels launch on their tensors' device, not the current one.

Triton and the extension launch on the CURRENT CUDA device (and its current stream). The cuda
backend switched to the tensors' device; the triton backend did not, so a model on cuda:1 while
device 0 is current handed device-1 pointers to a device-0 kernel. Every triton entry point (the
fused op's forward and backward, the prologue's normalisation, the sync path's normalise step,
the Net2Net remap) now runs inside ``c3dzoo.ops._device.device_scope`` of its first tensor.

On CPU the scope is a no-op, so the CPU tests check the wiring (the scope is entered, with the
op's tensors); the two-GPU test checks the result and skips with its reason on fewer GPUs."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct
from c3dzoo.ops import net2net_remap, triton_impl
from interpreter import skip_unless_triton_runs_cpu_tensors


def _recording_scope(monkeypatch, module):
    seen = []

    def scope(t):
        seen.append(t.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "device_scope", scope)
    return seen


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_triton_op_launches_inside_the_tensors_device_scope(mode, monkeypatch):
    skip_unless_triton_runs_cpu_tensors()
    seen = _recording_scope(monkeypatch, triton_impl)
    c3dzoo.ops.backends.clear_fallbacks()  # other tests' (a process runs several)
    layer = Conv3dBNAct(3, 4, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend="triton").train(mode == "train")
    x = torch.randn(2, 3, 4, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert not c3dzoo.fallbacks()
    assert len(seen) == 2 and all(d == x.device for d in seen), seen  # forward and backward


def test_triton_net2net_remap_launches_inside_the_tensors_device_scope(monkeypatch):
    skip_unless_triton_runs_cpu_tensors()
    seen = _recording_scope(monkeypatch, net2net_remap)
    t = torch.randn(6, 4)
    out = net2net_remap.gather_units(t, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), dim=0, backend="triton")
    assert out.shape == (8, 4) and torch.equal(out[3], t[0])
    assert seen == [t.device]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a layer on cuda:1 while "
                    "cuda:0 is current)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layer_on_the_second_gpu_while_the_first_is_current(backend, mode):
    torch.manual_seed(0)
    layer = Conv3dBNAct(3, 16, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend=backend)
    stock = copy.deepcopy(layer)
    stock = nn.Sequential(stock.conv, stock.bn, nn.ReLU(), stock.pool).to("cuda:1").train(mode == "train")
    layer = layer.to("cuda:1").train(mode == "train")
    x = torch.randn(2, 3, 8, 16, 16, device="cuda:1")
    c3dzoo.ops.backends.clear_fallbacks()
    with torch.cuda.device(0):
        got = layer(x)
        expected = stock(x)
        torch.cuda.synchronize(1)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_model_runs_on_meta_tensors(mode):
    """Shape inference with meta tensors (a model built under ``torch.device("meta")``, as
    ``init_empty_weights``-style loaders do) runs a fused model as it runs a stock one: it failed on
    asking the meta device for its autocast state."""
    with torch.device("meta"):
        fused = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32), fused=True)
        stock = c3dzoo.c3d_bn(num_classes=4, width_mult=0.125, input_size=(16, 32, 32))
    x = torch.randn(2, 3, 16, 32, 32, device="meta", requires_grad=True)
    for model in (fused, stock):
        model.train(mode == "train")
    out = fused(x)
    assert out.device.type == "meta" and out.shape == stock(x).shape == (2, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape and fused.conv1.weight.grad.device.type == "meta"
