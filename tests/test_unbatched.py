"""Unbatched clips (C, D, H, W): stock Conv3d and MaxPool3d take them as a batch of one, BatchNorm3d
refuses them. A fused chain without BN refused them too ("x must be 5-D"); now it takes them as
stock does, and a chain with BN raises BatchNorm3d's own error."""

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


def _no_bn_model():
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(4, 5, (1, 3, 3), padding=(0, 1, 1)), nn.LeakyReLU(0.2),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_chains_take_an_unbatched_clip(backend):
    torch.manual_seed(0)
    stock = _no_bn_model()
    fused = c3dzoo.fuse(copy.deepcopy(stock), backend=_backend(backend))
    assert fused.c3dzoo_fused_chains == 2
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    x_stock = x.detach().clone().requires_grad_(True)
    out, expected = fused(x), stock(x_stock)
    assert out.shape == expected.shape == (5, 4, 3, 3)
    assert out.is_contiguous()  # stock's layout: ``view`` works on it as on stock's
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_stock.grad, rtol=1e-5, atol=1e-6)
    assert_same_state(fused, stock, rtol=1e-5, atol=1e-5, buffers=False)


def test_conv_act_pool_module_takes_an_unbatched_clip():
    torch.manual_seed(0)
    layer = Conv3dBNAct(3, 4, 3, padding=1, batch_norm=False, pool=nn.MaxPool3d(2))
    x = torch.randn(3, 4, 6, 6)
    expected = layer.pool(torch.relu(layer.conv(x)))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_chain_with_batch_norm_refuses_an_unbatched_clip_as_stock_does(mode):
    stock = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU()).train(mode == "train")
    fused = c3dzoo.fuse(copy.deepcopy(stock))
    layer = Conv3dBNAct(3, 4, 3, padding=1).train(mode == "train")
    x = torch.randn(3, 4, 6, 6)
    for model in (stock, fused, layer):
        with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
            model(x)


def test_the_op_names_the_unbatched_fix():
    with pytest.raises(ValueError, match=r"unbatched clip .* x\.unsqueeze\(0\)"):
        c3dzoo.ops.conv3d_bn_act(torch.randn(3, 4, 6, 6), torch.randn(4, 3, 3, 3, 3), None,
                                 batch_norm=False, training=False)
