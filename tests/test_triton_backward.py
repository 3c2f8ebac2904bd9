"""The Triton backend's backward kernels, each against stock PyTorch in the same dtype and float64.

* ``conv3d_wgrad`` (implicit GEMM over positions, split-K) and ``conv3d_dgrad`` (the forward kernel
  on the flipped weight) against ``aten.convolution_backward``;
* ``act_pool_backward`` + ``bn_backward_`` against autograd through F.batch_norm → act → max_pool3d;
* the whole backward inside a training loop: three SGD-with-momentum steps of a small fused model.

On CPU under the Triton interpreter (conftest), fp32 and fp16, tiny shapes; on a GPU bf16 too.
Every comparison is the parity budget (c3dzoo.testing): error vs float64 ≤ 2× stock's + floor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo.kernels.bn_act_pool_backward import act_pool_backward, bn_backward_, pool_overlaps
from c3dzoo.kernels.conv3d_bias_act_pool import TileConfig
from c3dzoo.kernels.conv3d_dgrad import conv3d_dgrad, dgrad_unsupported_reason, pack_dgrad_weight
from c3dzoo.kernels.conv3d_wgrad import conv3d_wgrad
from c3dzoo.ops import conv3d_bn_act
from parity import ambiguous_positions, assert_parity

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # interpreter bf16 is wrong

# (C_in, C_out, kernel, stride, padding, dilation, input N×D×H×W)
GEOMETRIES = {
    "c3d_3x3x3": (5, 7, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 4, 6, 6)),
    "tiny_cin_flat_k": (3, 6, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 4, 6, 6)),
    "channel_blocks_cin20": (20, 9, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 3, 5, 5)),
    "kernel_133": (6, 8, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1), (2, 3, 6, 6)),
    "kernel_311": (6, 8, (3, 1, 1), (1, 1, 1), (1, 0, 0), (1, 1, 1), (2, 5, 4, 4)),
    "even_kernel_233_asym": (4, 5, (2, 3, 3), (1, 1, 1), (0, 1, 0), (1, 1, 1), (2, 4, 6, 5)),
    "dilation2": (4, 6, (3, 3, 3), (1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 5, 7, 7)),
    "stride2": (6, 5, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (2, 5, 7, 7)),
}


def _conv_case(name, dtype):
    c_in, c_out, kernel, stride, padding, dilation, (n, d, h, w) = GEOMETRIES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, d, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, *kernel, generator=g, dtype=torch.float64) * 0.3
    y_shape = F.conv3d(x, weight, None, stride, padding, dilation).shape
    dy = torch.randn(y_shape, generator=g, dtype=torch.float64)
    geometry = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
    return x, weight, dy, geometry


def _stock_grads(x, weight, dy, geometry, dtype):
    """(dx, dW) from aten.convolution_backward in ``dtype``."""
    x, weight, dy = (t.to(DEVICE, dtype) for t in (x, weight, dy))
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, list(geometry["stride"]), list(geometry["padding"]), list(geometry["dilation"]),
        False, [0, 0, 0], 1, [True, True, False],
    )
    return dx, dw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_wgrad_matches_stock(name, dtype):
    x, weight, dy, geometry = _conv_case(name, dtype)
    _, dw_ref = _stock_grads(x, weight, dy, geometry, torch.float64)
    _, dw_stock = _stock_grads(x, weight, dy, geometry, dtype)
    dw = conv3d_wgrad(x.to(DEVICE, dtype), dy.to(DEVICE, dtype), **geometry)
    assert dw.dtype == torch.float32 and dw.shape == weight.shape
    assert_parity(dw, dw_stock, dw_ref, dtype, f"{name}: weight grad")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("flat_k", [False, True], ids=["channel_blocks", "flat_k"])
def test_wgrad_small_tiles_and_splits(flat_k, splits):
    """Many weight tiles and split-K partials (the GPU's shape of launch), on the interpreter."""
    x, weight, dy, geometry = _conv_case("channel_blocks_cin20", torch.float32)
    config = TileConfig(16, 16, 16, num_warps=4, num_stages=1, flat_k=flat_k)
    _, dw_ref = _stock_grads(x, weight, dy, geometry, torch.float64)
    _, dw_stock = _stock_grads(x, weight, dy, geometry, torch.float32)
    dw = conv3d_wgrad(x.to(DEVICE, torch.float32), dy.to(DEVICE, torch.float32), **geometry,
                      config=config, splits=splits)
    assert_parity(dw, dw_stock, dw_ref, torch.float32, f"weight grad, {config.name}, {splits} splits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in GEOMETRIES if GEOMETRIES[n][3] == (1, 1, 1)])
def test_dgrad_matches_stock(name, dtype):
    x, weight, dy, geometry = _conv_case(name, dtype)
    dx_ref, _ = _stock_grads(x, weight, dy, geometry, torch.float64)
    dx_stock, _ = _stock_grads(x, weight, dy, geometry, dtype)
    w_packed = pack_dgrad_weight(weight.to(DEVICE, dtype))
    dx = conv3d_dgrad(dy.to(DEVICE, dtype), w_packed, **geometry)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_parity(dx, dx_stock, dx_ref, dtype, f"{name}: input grad")


def test_dgrad_refuses_what_it_cannot_compute():
    assert "stride" in dgrad_unsupported_reason((3, 3, 3), (2, 1, 1), (1, 1, 1), (1, 1, 1))
    assert "padding" in dgrad_unsupported_reason((3, 3, 3), (1, 1, 1), (3, 1, 1), (1, 1, 1))
    assert dgrad_unsupported_reason((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)) is None
    x, weight, dy, geometry = _conv_case("stride2", torch.float32)
    with pytest.raises(ValueError, match="stride"):
        conv3d_dgrad(dy.float(), pack_dgrad_weight(weight.float()), **geometry)


# --------------------------------------------------------------------------------------------
# BatchNorm + activation + pool backward
# --------------------------------------------------------------------------------------------

POOLS = {
    "nopool": (),
    "pool1": (1, 2, 2, 1, 2, 2, 0, 0, 0),
    "pool2": (2, 2, 2, 2, 2, 2, 0, 0, 0),
    "pool5_padding": (2, 2, 2, 2, 2, 2, 0, 1, 1),
    "gaps_k1_s2": (1, 1, 1, 1, 2, 2, 0, 0, 0),  # positions no window covers: gradient 0 before BN
    "floor_leftover": (2, 2, 2, 2, 2, 2, 0, 0, 0),  # on an odd-sized input: the last row is uncovered
}


# name → (activation, negative_slope); a negative slope is not monotone: act(z) > 0 for z < 0, so
# neither the pool's choice nor the derivative follows from the sign of act(z)
ACTIVATIONS = {"relu": ("relu", 0.0), "leaky_relu": ("leaky_relu", 0.1),
               "leaky_relu_negative_slope": ("leaky_relu", -0.5), "none": ("none", 0.0),
               "silu": ("silu", 0.0)}  # not monotone either: its minimum is at z ≈ -1.28


def _stock_act_pool_bn(y, gamma, beta, activation, slope, pool, batch_norm):
    if batch_norm:
        z = F.batch_norm(y, None, None, gamma, beta, True, 0.0, 1e-5)
    else:
        z = y
    a = {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope), "silu": F.silu}.get(activation,
                                                                                          lambda t: t)(z)
    return (F.max_pool3d(a, pool[0:3], pool[3:6], pool[6:9]) if pool else a), z


@pytest.mark.parametrize("norm", ["batch_affine", "batch_no_affine", "no_norm"])
@pytest.mark.parametrize("activation_name", list(ACTIVATIONS))
@pytest.mark.parametrize("pool_name", list(POOLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_pool_bn_backward_matches_stock(dtype, pool_name, activation_name, norm):
    activation, slope = ACTIVATIONS[activation_name]
    batch_norm, affine = norm.startswith("batch"), norm == "batch_affine"
    pool = POOLS[pool_name]
    g = torch.Generator().manual_seed(1)
    size = (2, 6, 5, 7, 7) if pool_name == "floor_leftover" else (2, 6, 4, 8, 8)
    y64 = torch.randn(size, generator=g, dtype=torch.float64) + 0.3
    gamma = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5) if affine else None
    beta = (torch.randn(6, generator=g, dtype=torch.float64) * 0.5) if affine else None
    y = y64.to(DEVICE, dtype)
    y_rounded = y.double()

    def run(y_in, out_dtype):
        """Stock forward in ``out_dtype``: (out, z, y leaf, γ leaf, β leaf)."""
        y_in = y_in.detach().clone().requires_grad_(True)
        leaf = lambda t: None if t is None else t.detach().to(DEVICE, out_dtype).clone().requires_grad_(True)  # noqa: E731
        gam, bet = leaf(gamma), leaf(beta)
        out, z = _stock_act_pool_bn(y_in, gam, bet, activation, slope, pool, batch_norm)
        return out, z, y_in, gam, bet

    with torch.no_grad():
        z_d, z_r = run(y, dtype)[1], run(y_rounded, torch.float64)[1]
    skip = ambiguous_positions(z_d, z_r, activation, (pool[0:3], pool[3:6], pool[6:9]) if pool else None, slope)
    out_r, _, y_r, gamma_r, beta_r = run(y_rounded, torch.float64)
    grad_out = torch.randn(out_r.shape, generator=g, dtype=torch.float64).to(DEVICE).masked_fill(skip, 0.0)
    out_r.backward(grad_out)
    out_s, _, y_s, gamma_s, beta_s = run(y, dtype)
    out_s.backward(grad_out.to(dtype))

    mean, var = (y.float().mean(dim=(0, 2, 3, 4)), y.float().var(dim=(0, 2, 3, 4), unbiased=False)) \
        if batch_norm else (None, None)
    f32 = lambda t: None if t is None else t.to(DEVICE, torch.float32)  # noqa: E731
    dz, sum_dz, sum_dz_xhat = act_pool_backward(
        grad_out.to(dtype), y, mean, var, f32(gamma) if batch_norm else None, f32(beta) if batch_norm else None,
        eps=1e-5, activation=activation, negative_slope=slope, pool=pool,
    )
    assert dz.dtype == dtype and dz.shape == y.shape
    stock_sum = lambda grad: grad.double().sum(dim=(0, 2, 3, 4))  # noqa: E731
    if batch_norm:
        if affine:  # Σdz is β's gradient and Σdz·x̂ is γ's
            assert_parity(sum_dz, beta_s.grad, beta_r.grad, dtype, "sum dz = beta grad")
            assert_parity(sum_dz_xhat, gamma_s.grad, gamma_r.grad, dtype, "sum dz*xhat = gamma grad")
        dy = bn_backward_(dz, y, mean, var, f32(gamma), sum_dz, sum_dz_xhat, eps=1e-5)
        assert dy.data_ptr() == dz.data_ptr()  # in place
    else:
        assert sum_dz_xhat is None
        assert_parity(sum_dz, stock_sum(y_s.grad), stock_sum(y_r.grad), dtype, "sum of dz")
        dy = dz
    assert_parity(dy, y_s.grad, y_r.grad, dtype, f"{pool_name}/{activation}: grad of the conv output")


def test_act_pool_backward_refuses_overlapping_windows():
    assert pool_overlaps((3, 3, 3, 2, 2, 2, 1, 1, 1)) and not pool_overlaps((2, 2, 2, 2, 2, 2, 0, 1, 1))
    y = torch.randn(1, 2, 4, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="overlapping"):
        act_pool_backward(torch.zeros(1, 2, 2, 2, 2, device=DEVICE), y, None, None, None, None, eps=1e-5,
                          activation="relu", negative_slope=0.0, pool=(3, 3, 3, 2, 2, 2, 1, 1, 1))


def test_op_backward_with_overlapping_pool_still_correct():
    """The Triton backend hands overlapping pools to the reference backward: same gradients."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 6, 6, generator=g)
    w = torch.randn(4, 3, 3, 3, 3, generator=g) * 0.3
    grads = {}
    for backend in ("reference", "triton"):
        xb, wb = x.clone().to(DEVICE).requires_grad_(), w.clone().to(DEVICE).requires_grad_()
        gamma = torch.ones(4, device=DEVICE, requires_grad=True)
        out = conv3d_bn_act(xb, wb, None, gamma, None, training=True, padding=1, pool=((3, 3, 3), (2, 2, 2), 1),
                            backend=backend)
        out.square().sum().backward()
        grads[backend] = (xb.grad, wb.grad, gamma.grad)
    for ref, tri in zip(grads["reference"], grads["triton"]):
        torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# training steps
# --------------------------------------------------------------------------------------------


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(8, 12, 3, padding=1), nn.BatchNorm3d(12, momentum=None), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(12, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 2 * 2 * 2, 5),
    )


def _train(model, batches, dtype):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for x, labels in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x.to(DEVICE, dtype)).double(), labels.to(DEVICE))
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_three_sgd_momentum_steps_match_stock(dtype):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 3, 4, 8, 8, generator=g), torch.randint(0, 5, (3,), generator=g)) for _ in range(3)]
    stock64 = _small_model().double().to(DEVICE)
    stock = copy.deepcopy(stock64).to(dtype)
    fused = c3dzoo.fuse(copy.deepcopy(stock), backend="triton")
    c3dzoo.ops.backends.clear_fallbacks()
    _train(stock64, batches, torch.float64)
    _train(stock, batches, dtype)
    _train(fused, batches, dtype)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    reference, stock_state, fused_state = stock64.state_dict(), stock.state_dict(), fused.state_dict()
    assert fused_state.keys() == stock_state.keys()
    for key in reference:
        if key.endswith("num_batches_tracked"):
            assert fused_state[key].item() == reference[key].item() == 3
            continue
        assert_parity(fused_state[key], stock_state[key], reference[key], dtype, key)


def test_gradient_checkpointing_matches_stock():
    """Under torch.utils.checkpoint the fused forward runs twice (forward, then recomputed in the
    backward), exactly as the stock model's does, running statistics included."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 8, 8, generator=g)
    stock64 = _small_model().double().to(DEVICE).train()
    stock = copy.deepcopy(stock64).float()
    fused = c3dzoo.fuse(copy.deepcopy(stock), backend="triton")
    results = {}
    for name, model, dtype in (("reference", stock64, torch.float64), ("stock", stock, torch.float32),
                               ("fused", fused, torch.float32)):
        xin = x.to(DEVICE, dtype).requires_grad_(True)
        out = checkpoint(model, xin, use_reentrant=False)
        out.double().square().sum().backward()
        results[name] = {"x.grad": xin.grad, **{f"{k}.grad": p.grad for k, p in model.named_parameters()},
                         **{k: b for k, b in model.named_buffers() if not k.endswith("num_batches_tracked")}}
        assert dict(model.named_buffers())["1.num_batches_tracked"].item() == 2  # forward + recompute
    for key, ref in results["reference"].items():
        assert_parity(results["fused"][key], results["stock"][key], ref, torch.float32, key)
