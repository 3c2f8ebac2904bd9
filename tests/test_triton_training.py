"""The Triton backend's training forward: Conv3d → BatchNorm3d with batch statistics → act (→ MaxPool3d).

Forward is two Triton kernels (conv with a per-tile (mean, M2) statistics epilogue, then normalise +
activation + pool), backward is the Triton backward (recompute y from x, act/pool/BN backward, dgrad,
wgrad; its kernels are tested one by one in test_triton_backward.py). On CPU they run under the
Triton interpreter (conftest sets TRITON_INTERPRET=1), in fp32 and fp16, on tiny shapes with large
tiles. Every result — output, running statistics, gradients — is held to the parity budget
(tests/parity.py) against stock modules in the same dtype and in float64.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo.kernels import bn_act_pool as E
from c3dzoo.kernels import conv3d_bias_act_pool as K
from c3dzoo.kernels import conv3d_bn_stats as S
from c3dzoo.kernels._grid import clear_plan_caches
from c3dzoo.ops import conv3d_bn_act
from c3dzoo.ops.conv3d_bn_act import normalize_pool
from parity import ambiguous_positions, assert_parity

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter computes bf16 wrongly (kernels.md)

POOL1 = ((1, 2, 2), (1, 2, 2), 0)
POOL2 = ((2, 2, 2), (2, 2, 2), 0)
POOL5 = ((2, 2, 2), (2, 2, 2), (0, 1, 1))


@pytest.fixture(autouse=True)
def _no_stale_fallbacks():
    c3dzoo.ops.backends.clear_fallbacks()
    yield


@dataclasses.dataclass(frozen=True)
class Case:
    c_in: int = 5
    c_out: int = 7
    size: Tuple[int, int, int, int] = (2, 4, 6, 6)  # N, D, H, W
    kernel: Tuple[int, int, int] = (3, 3, 3)
    stride: Tuple[int, int, int] = (1, 1, 1)
    padding: Tuple[int, int, int] = (1, 1, 1)
    activation: str = "relu"
    slope: float = 0.01
    pool: Optional[tuple] = None
    affine: bool = True
    bias: bool = True
    momentum: Optional[float] = 0.1
    big_mean: bool = False  # conv bias 1000, inputs ×0.01: |mean| ≫ std
    groups: int = 1  # c_in when depthwise (the direct kernels)


CASES = {
    "odd_channels_pool1": Case(c_in=3, c_out=5, pool=POOL1),
    "stride2_leaky": Case(stride=(2, 2, 2), size=(2, 5, 7, 7), activation="leaky_relu", slope=0.2),
    "kernel_133_pool2": Case(kernel=(1, 3, 3), padding=(0, 1, 1), pool=POOL2),
    "pool5_padding": Case(pool=POOL5, size=(2, 4, 7, 7)),
    "affine_false_momentum_none": Case(affine=False, momentum=None, activation="none"),
    "channel_blocks_cin20": Case(c_in=20, c_out=9, size=(1, 2, 5, 5), pool=POOL5, bias=False),
    "mean_dominates": Case(big_mean=True, activation="none"),
    "mean_dominates_pool1": Case(big_mean=True, pool=POOL1, momentum=None),
    "silu_pool1": Case(activation="silu", pool=POOL1),
    "depthwise_silu": Case(c_in=6, c_out=6, groups=6, activation="silu"),
    "depthwise_stride2_leaky_no_bias": Case(c_in=6, c_out=6, groups=6, stride=(2, 2, 2), size=(2, 5, 7, 7),
                                            activation="leaky_relu", slope=0.2, bias=False),
    # (a depthwise conv with |mean| ≫ std: tests/test_depthwise.py's statistics test)
    "depthwise_momentum_none": Case(c_in=6, c_out=6, groups=6, momentum=None, activation="none"),
}


def _build(case: Case, dtype: torch.dtype):
    """conv + BatchNorm3d (train mode) in float64 with non-trivial parameters and statistics, then
    rounded to ``dtype``; returns (conv, bn, x) in dtype."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(case.c_in, case.c_out, case.kernel, case.stride, case.padding, bias=case.bias,
                     groups=case.groups).double()
    bn = nn.BatchNorm3d(case.c_out, momentum=case.momentum, affine=case.affine).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * 0.3)
        if case.bias:
            conv.bias.copy_(torch.randn(case.c_out, generator=g, dtype=torch.float64))
            if case.big_mean:
                conv.bias.add_(1000.0)
        if case.affine:
            bn.weight.copy_(torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(case.c_out, generator=g, dtype=torch.float64) * 0.5)
        bn.running_mean.copy_(torch.randn(case.c_out, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5)
        bn.num_batches_tracked.fill_(3)
    n, d, h, w = case.size
    x = torch.randn(n, case.c_in, d, h, w, generator=g, dtype=torch.float64)
    if case.big_mean:
        x = x * 0.01
    return conv.to(DEVICE, dtype).train(), bn.to(DEVICE, dtype).train(), x.to(DEVICE, dtype)


def _act(y, case):
    if case.activation == "silu":
        return F.silu(y)
    if case.activation == "relu":
        return F.relu(y)
    if case.activation == "leaky_relu":
        return F.leaky_relu(y, case.slope)
    return y


def _run(conv, bn, x, case, skip, fused):
    x = x.detach().clone().requires_grad_(True)
    pool = normalize_pool(case.pool)
    if fused:
        out = conv3d_bn_act(
            x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            training=True, momentum=case.momentum, eps=bn.eps, stride=case.stride, padding=case.padding,
            activation=case.activation, negative_slope=case.slope, pool=case.pool,
            num_batches_tracked=bn.num_batches_tracked, backend="triton", layout="any",  # the kernels' layout
        )
    else:
        out = _act(bn(conv(x)), case)
        if pool:
            out = F.max_pool3d(out, pool[0:3], pool[3:6], pool[6:9])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.to(out.device).masked_fill(skip, 0.0)
    (out * grad.to(out.dtype)).sum().backward()
    grads = {"x.grad": x.grad, "conv.weight.grad": conv.weight.grad,
             "conv.bias.grad": None if conv.bias is None else conv.bias.grad,
             "bn.weight.grad": None if bn.weight is None else bn.weight.grad,
             "bn.bias.grad": None if bn.bias is None else bn.bias.grad}
    return out, grads


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_training_forward_matches_stock(name, dtype):
    case = CASES[name]
    conv_d, bn_d, x = _build(case, dtype)
    conv_r, bn_r = copy.deepcopy(conv_d).double(), copy.deepcopy(bn_d).double()
    conv_f, bn_f = copy.deepcopy(conv_d), copy.deepcopy(bn_d)
    with torch.no_grad():  # positions whose ReLU / pool decision is within rounding of a tie
        z_d = copy.deepcopy(bn_d)(conv_d(x))
        z_r = copy.deepcopy(bn_r)(conv_r(x.double()))
    pool = normalize_pool(case.pool)
    skip = ambiguous_positions(z_d, z_r, case.activation, (pool[0:3], pool[3:6], pool[6:9]) if pool else None)

    out_r, grads_r = _run(conv_r, bn_r, x.double(), case, skip, fused=False)
    out_s, grads_s = _run(conv_d, bn_d, x, case, skip, fused=False)
    out_f, grads_f = _run(conv_f, bn_f, x, case, skip, fused=True)
    assert not c3dzoo.fallbacks(), f"{name}: fell back to reference: {c3dzoo.fallbacks()}"
    assert out_f.dtype == dtype and out_f.is_contiguous(memory_format=torch.channels_last_3d)

    assert_parity(out_f, out_s, out_r, dtype, f"{name}: output")
    for name_ in ("running_mean", "running_var"):
        assert_parity(getattr(bn_f, name_), getattr(bn_d, name_), getattr(bn_r, name_), dtype, f"{name}: {name_}")
    assert bn_f.num_batches_tracked.item() == bn_r.num_batches_tracked.item() == 4
    for key in grads_r:
        assert_parity(grads_f[key], grads_s[key], grads_r[key], dtype, f"{name}: {key}")


def test_forward_returns_fp32_statistics():
    """The backend's forward: (out, mean, biased var, kept conv output), the statistics two distinct
    fp32 tensors, as reference's; the conv output is there only when asked for."""
    from c3dzoo.ops import reference, triton_impl
    from c3dzoo.ops.backends import LayerParams

    case = CASES["pool5_padding"]
    conv, bn, x = _build(case, torch.float32)
    params = LayerParams.of("batch", 1e-5, case.stride, case.padding, (1, 1, 1), "relu", 0.0,
                            normalize_pool(case.pool))
    args = (x, conv.weight.detach(), conv.bias.detach(), bn.weight.detach(), bn.bias.detach(), None, None)
    out, mean, var, y, argmax = triton_impl.forward(*args, params, keep_conv_output=True)
    out_r, mean_r, var_r, y_r, _ = reference.forward(*args, params, keep_conv_output=True)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (case.c_out,)
    assert mean.data_ptr() != var.data_ptr()
    y64 = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=case.padding)
    assert y.shape == y64.shape and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert_parity(y, y_r, y64, torch.float32, "kept conv output")
    assert triton_impl.forward(*args, params)[3].numel() == 0  # not kept unless asked
    assert argmax.numel() == 0 and argmax.dtype == torch.int32  # the backward kernels find the pool's argmax again
    var64, mean64 = torch.var_mean(y64, dim=(0, 2, 3, 4), correction=0)
    assert_parity(mean, mean_r, mean64, torch.float32, "mean")
    assert_parity(var, var_r, var64, torch.float32, "var")
    assert_parity(out, out_r, reference.forward(*(a.double() if a is not None else None for a in args), params)[0],
                  torch.float32, "out")


# --------------------------------------------------------------------------------------------
# the launchers directly: many tiles (the Chan combination), both main loops, small pool blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        K.TileConfig(16, 16, 16, num_warps=4, num_stages=1),  # channel blocks, C_in 5 masked
        K.TileConfig(16, 16, 32, num_warps=4, num_stages=1, flat_k=True),  # flat K
    ],
    ids=lambda c: c.name,
)
def test_stats_launcher_many_tiles(config):
    """Small tiles: dozens of partial statistics (the last tile partial), tiles straddling samples,
    two channel blocks; with |mean| ≫ std in one half of the channels."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 4, 7, 7, generator=g).to(DEVICE)
    w = torch.randn(20, 5, 2, 3, 3, generator=g).to(DEVICE) * 0.05
    b = (torch.randn(20, generator=g) + torch.arange(20).ge(10) * 1000.0).to(DEVICE)
    geometry = dict(stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2))
    y, mean, var = S.conv3d_bn_stats(x, K.pack_weight(w), b, kernel_size=(2, 3, 3), config=config, **geometry)
    y_stock = F.conv3d(x, w, b, **geometry)
    y_ref = F.conv3d(x.double(), w.double(), b.double(), **geometry)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    positions = y.numel() // y.shape[1]
    assert positions % config.block_m != 0 and positions // config.block_m >= 10
    assert_parity(y, y_stock, y_ref, torch.float32, "y")
    var_s, mean_s = torch.var_mean(y_stock, dim=(0, 2, 3, 4), correction=0)
    var_r, mean_r = torch.var_mean(y_ref, dim=(0, 2, 3, 4), correction=0)
    assert_parity(mean, mean_s, mean_r, torch.float32, "mean")
    assert_parity(var, var_s, var_r, torch.float32, "var")
    # naive E[y²] − E[y]² in fp32 would lose the large-mean channels' variance entirely
    assert ((var - var_r).abs() / var_r).max().item() < 1e-3


@pytest.mark.parametrize("pool", [(), (2, 2, 2, 2, 2, 2, 0, 1, 1), (3, 3, 3, 2, 2, 2, 1, 1, 1)],
                         ids=["nopool", "pool5", "overlap"])
def test_bn_act_pool_launcher_small_blocks(pool):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, 20, 3, 5, 5, generator=g).to(DEVICE) * 3 + 100
    mean = y.double().mean(dim=(0, 2, 3, 4)).float()
    var = y.double().var(dim=(0, 2, 3, 4), correction=0).float()
    gamma = (torch.rand(20, generator=g) + 0.5).to(DEVICE)
    beta = torch.randn(20, generator=g).to(DEVICE)
    config = E.ElementwiseConfig(16, 16, 4)  # several position and channel blocks
    out = E.bn_act_pool(y, mean, var, gamma, beta, eps=1e-5, activation="leaky_relu", negative_slope=0.1,
                        pool=pool, config=config)

    def run(dt):
        z = F.batch_norm(y.to(dt), mean.to(dt), var.to(dt), gamma.to(dt), beta.to(dt), training=False, eps=1e-5)
        z = F.leaky_relu(z, 0.1)
        return F.max_pool3d(z, pool[0:3], pool[3:6], pool[6:9]) if pool else z

    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_parity(out, run(torch.float32), run(torch.float64), torch.float32, "bn_act_pool")


def test_beyond_int32_indexing_runs_on_reference(monkeypatch):
    """A call the kernels cannot index in int32 runs on the reference backend instead of failing:
    recorded in c3dzoo.fallbacks(), same results as the reference (here with the limit lowered)."""
    from c3dzoo.kernels import conv3d_wgrad as W

    case = CASES["pool5_padding"]
    conv, bn, x = _build(case, torch.float32)
    results = {}
    for backend in ("reference", "triton"):
        if backend == "triton":
            monkeypatch.setattr(K, "INT32_LIMIT", 64)  # every launch of this layer is "too large" now
            monkeypatch.setattr(W, "INT32_LIMIT", 64)
            clear_plan_caches()  # plans made under the real limit by earlier calls would skip the check
        c, b = copy.deepcopy(conv), copy.deepcopy(bn)
        xx = x.clone().requires_grad_(True)
        with pytest.warns(RuntimeWarning, match="int32") if backend == "triton" else contextlib.nullcontext():
            out = conv3d_bn_act(xx, c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var,
                                training=True, eps=b.eps, padding=case.padding, pool=case.pool,
                                num_batches_tracked=b.num_batches_tracked, backend=backend, layout="any")
            out.square().sum().backward()
        results[backend] = (out, xx.grad, c.weight.grad, b.weight.grad, b.running_var)
    assert any("int32" in reason for reason in c3dzoo.fallbacks().values()), c3dzoo.fallbacks()
    assert results["triton"][0].is_contiguous(memory_format=torch.channels_last_3d)
    for got, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, expected)
