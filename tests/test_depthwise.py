"""Depthwise Conv3d → BatchNorm3d → activation (CSN's and X3D's conv_b): the Triton direct kernels
(``c3dzoo.kernels.conv3d_depthwise``) and the op, module and fuse paths that run them.

On CPU the kernels run under the Triton interpreter in fp32 and fp16 on tiny shapes; every result
is held to the parity budget (tests/parity.py) against stock PyTorch in the same dtype and in
float64. Grouped convs that are not depthwise run on the reference backend, which says why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import c3dzoo
from c3dzoo.kernels import conv3d_depthwise as D
from c3dzoo.kernels._grid import clear_plan_caches
from c3dzoo.nn import Conv3dBNAct, conv_bn_act
from c3dzoo.ops import conv3d_bn_act
from c3dzoo.ops.backends import ConvBNActConfig
from parity import ambiguous_positions, assert_parity

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] if not CUDA else [torch.float32, torch.float16, torch.bfloat16]

# (channels, kernel, stride, padding, dilation, input N, D, H, W)
GEOMETRIES = {
    "k333": (6, (3, 3, 3), 1, 1, 1, (2, 4, 6, 6)),
    "k333_stride2": (20, (3, 3, 3), 2, 1, 1, (1, 5, 7, 7)),  # CSN's first block of a stage
    "k311_stride122": (5, (3, 1, 1), (1, 2, 2), (1, 0, 0), 1, (2, 4, 7, 6)),
    "k233_pad0_dilation2": (7, (2, 3, 3), 1, 0, (1, 2, 2), (1, 4, 8, 8)),
    "k151_asymmetric": (3, (1, 5, 1), (1, 1, 2), (0, 2, 0), 1, (2, 3, 5, 5)),  # X3D's stem conv is (5,1,1)
}


def _inputs(channels, kernel, size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size[0], channels, *size[1:], generator=g, dtype=torch.float64)
    w = torch.randn(channels, 1, *kernel, generator=g, dtype=torch.float64) / (kernel[0] * kernel[1] * kernel[2]) ** 0.5
    b = torch.randn(channels, generator=g, dtype=torch.float64) * 0.1
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _geometry(stride, padding, dilation, kernel):
    triple = lambda v: (v,) * 3 if isinstance(v, int) else tuple(v)  # noqa: E731
    return dict(kernel_size=kernel, stride=triple(stride), padding=triple(padding), dilation=triple(dilation))


# --------------------------------------------------------------------------------------------
# the kernels, one by one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_kernels_match_stock(name, dtype):
    """Forward (bias + residual + leaky ReLU), the statistics epilogue, the input gradient (the
    transposed gather, any stride) and the weight gradient, against F.conv3d(groups=C)."""
    channels, kernel, stride, padding, dilation, size = GEOMETRIES[name]
    x64, w64, b64 = _inputs(channels, kernel, size, dtype)
    geometry = _geometry(stride, padding, dilation, kernel)
    conv_args = (geometry["stride"], geometry["padding"], geometry["dilation"], channels)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    w_packed = D.pack_depthwise_weight(w)

    def stock(x_, w_, b_, res_):
        return F.leaky_relu(F.conv3d(x_, w_, b_, *conv_args) + res_, 0.2)

    y64 = F.conv3d(x64, w64, b64, *conv_args)
    res64 = torch.randn(y64.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    out = D.conv3d_depthwise(x, w_packed, b.float(), **geometry, activation="leaky_relu", negative_slope=0.2,
                             residual=res64.to(dtype))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_parity(out, stock(x, w, b, res64.to(dtype)), stock(x64, w64, b64, res64), dtype, f"{name}: forward")

    y, mean, var = D.conv3d_depthwise_bn_stats(x, w_packed, b.float(), **geometry)
    y_stock = F.conv3d(x, w, b, *conv_args)
    assert_parity(y, y_stock, y64, dtype, f"{name}: raw output")
    dims = (0, 2, 3, 4)
    assert_parity(mean, y_stock.float().mean(dims), y64.mean(dims), dtype, f"{name}: batch mean")
    assert_parity(var, y_stock.float().var(dims, unbiased=False), y64.var(dims, unbiased=False), dtype,
                  f"{name}: batch var")

    dy64 = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    grads = {}
    for key, (xx, ww, dy) in {"ref": (x64, w64, dy64), "stock": (x, w, dy64.to(dtype))}.items():
        xx, ww = xx.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        grads[key] = torch.autograd.grad(F.conv3d(xx, ww, None, *conv_args), (xx, ww), dy)
    dy = dy64.to(dtype)
    dx = D.conv3d_depthwise_dgrad(dy, D.pack_depthwise_weight(w), x.shape, **geometry)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_parity(dx, grads["stock"][0], grads["ref"][0], dtype, f"{name}: input gradient")
    dw = D.conv3d_depthwise_wgrad(x, dy, **geometry)
    assert dw.dtype == torch.float32 and dw.shape == w.shape
    assert_parity(dw, grads["stock"][1], grads["ref"][1], dtype, f"{name}: weight gradient")


def test_input_prologue_equals_materialised_input():
    """The deferred BatchNorm + ReLU of the previous layer, applied on load, gives the values the
    kernel computes from the materialised activation, bit for bit (padding reads zeros)."""
    from c3dzoo.kernels.bn_act_pool import bn_act_pool

    x, w, _ = _inputs(6, (3, 3, 3), (2, 4, 5, 5), torch.float32)
    x, w = x.float() * 3 + 1, D.pack_depthwise_weight(w)
    mean, var = x.mean((0, 2, 3, 4)), x.var((0, 2, 3, 4), unbiased=False)
    gamma, beta = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    geometry = _geometry(1, 1, 1, (3, 3, 3))
    fused = D.conv3d_depthwise(x, w, None, **geometry, input_stats=torch.stack([mean, var, gamma, beta]),
                               input_eps=1e-5, input_activation="relu")
    materialised = bn_act_pool(x.contiguous(memory_format=torch.channels_last_3d), mean, var, gamma, beta, eps=1e-5,
                               activation="relu", negative_slope=0.0, pool=())
    assert torch.equal(fused, D.conv3d_depthwise(materialised, w, None, **geometry))


def test_launchers_reject_a_wrong_packed_weight():
    x, w, _ = _inputs(6, (3, 3, 3), (1, 2, 4, 4), torch.float32)
    with pytest.raises(ValueError, match=r"w_packed must be fp32 of shape \(27, 6\)"):
        D.conv3d_depthwise(x.float(), w.float().reshape(6, 27), None, **_geometry(1, 1, 1, (3, 3, 3)))
    with pytest.raises(ValueError, match="w_packed must be fp32"):
        D.conv3d_depthwise(x.half(), D.pack_depthwise_weight(w).half(), None, **_geometry(1, 1, 1, (3, 3, 3)))


def test_weight_gradient_splits_sum_in_a_fixed_order():
    """Several position splits (the GPU plan) sum to the one-split result; a second run repeats it
    bit for bit (no atomics: the partials are reduced by one torch sum)."""
    x, w, _ = _inputs(5, (3, 3, 3), (2, 3, 4, 4), torch.float32)
    dy = torch.randn(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    geometry = _geometry(1, 1, 1, (3, 3, 3))
    small = D.DepthwiseConfig(16, 16, num_warps=4)
    plan = D.plan_depthwise_wgrad_launch(tuple(x.shape), tuple(dy.shape), **geometry, device=torch.device("cuda"),
                                         config=small)
    assert plan.grid[0] > 1 and plan.out_shape[0] > 1  # several splits
    parts = torch.empty(plan.out_shape, dtype=torch.float32, device=DEVICE)
    xf = x.float().contiguous(memory_format=torch.channels_last_3d)
    dyc = dy.contiguous(memory_format=torch.channels_last_3d)
    D.conv3d_depthwise_wgrad_kernel[plan.grid](xf, dyc, parts, **plan.scalars, **plan.constexprs, num_warps=4)
    one_split = D.conv3d_depthwise_wgrad(xf, dyc, **geometry, config=small)
    torch.testing.assert_close(parts.sum(0).t().reshape(5, 1, 3, 3, 3), one_split, rtol=1e-5, atol=1e-5)
    assert torch.equal(one_split, D.conv3d_depthwise_wgrad(xf, dyc, **geometry, config=small))


# --------------------------------------------------------------------------------------------
# the op: eval (folded BatchNorm), training (batch statistics), a frozen BatchNorm in training
# --------------------------------------------------------------------------------------------

MODES = {
    "eval": dict(conv_train=False, bn_train=False),
    "train": dict(conv_train=True, bn_train=True),
    "frozen_bn": dict(conv_train=True, bn_train=False),  # fine-tuning with a frozen BN
    "train_affine_false_momentum_none": dict(conv_train=True, bn_train=True, affine=False, momentum=None),
}


def _layer(channels, kernel, stride, padding, mode, dtype, bias=False):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(channels, channels, kernel, stride, padding, groups=channels, bias=bias).double()
    bn = nn.BatchNorm3d(channels, affine=mode.get("affine", True), momentum=mode.get("momentum", 0.1)).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * 0.3)
        if bias:
            conv.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        if bn.affine:
            bn.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64) * 0.5)
        bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
    conv.train(mode["conv_train"])
    bn.train(mode["bn_train"])
    return conv.to(DEVICE, dtype), bn.to(DEVICE, dtype)


OP_CASES = [(mode, stride, "relu") for mode in MODES for stride in (1, 2)] + [
    ("train", 1, "silu"), ("eval", 2, "silu")]  # X3D's conv_b → BN → (SE) → swish


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,stride,activation", OP_CASES)
def test_op_matches_stock(mode, stride, activation, dtype):
    """Output, gradients of x, conv weight and bias, γ and β, and the running statistics and
    num_batches_tracked, on the triton backend with no fallback."""
    act = {"relu": F.relu, "silu": F.silu}[activation]
    spec = MODES[mode]
    channels, kernel = 6, (3, 3, 3)
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(2, channels, 4, 7, 7, generator=g, dtype=torch.float64).to(DEVICE)
    results = {}
    for key, (dt, fused) in {"ref": (torch.float64, False), "stock": (dtype, False), "fused": (dtype, True)}.items():
        conv, bn = _layer(channels, kernel, stride, 1, spec, dt, bias=True)
        x = x64.to(dt).detach().clone().requires_grad_(True)
        with torch.no_grad():  # the pre-activation, for positions within rounding of the ReLU's kink
            z = copy.deepcopy(bn)(copy.deepcopy(conv)(x))
        out = conv_bn_act(x, conv, bn, activation, backend="triton") if fused else act(bn(conv(x)))
        results[key] = (out, x, conv, bn, z)
    out_r = results["ref"][0]
    skip = ambiguous_positions(results["stock"][4], results["ref"][4], activation, None)
    dy = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    dy = dy.masked_fill(skip, 0.0)
    for out, *_ in results.values():
        (out * dy.to(out.dtype)).sum().backward()
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    fused, stock, ref = results["fused"], results["stock"], results["ref"]
    assert_parity(fused[0], stock[0], ref[0], dtype, f"{mode}: output")
    assert_parity(fused[1].grad, stock[1].grad, ref[1].grad, dtype, f"{mode}: x.grad")
    for name in ("weight", "bias"):
        assert_parity(getattr(fused[2], name).grad, getattr(stock[2], name).grad, getattr(ref[2], name).grad, dtype,
                      f"{mode}: conv.{name}.grad")
    if spec.get("affine", True):
        for name in ("weight", "bias"):
            assert_parity(getattr(fused[3], name).grad, getattr(stock[3], name).grad, getattr(ref[3], name).grad,
                          dtype, f"{mode}: bn.{name}.grad")
    for name in ("running_mean", "running_var"):
        assert_parity(getattr(fused[3], name), getattr(stock[3], name), getattr(ref[3], name), dtype, f"{mode}: {name}")
    assert fused[3].num_batches_tracked.item() == ref[3].num_batches_tracked.item()


def test_deferred_batch_norm_feeds_a_depthwise_conv():
    """A bottleneck's conv_a → BN → ReLU deferred into the depthwise conv_b's input prologue
    (training): values and gradients as the stock pair, no fallback."""
    torch.manual_seed(0)
    conv_a, bn_a = nn.Conv3d(4, 6, 1, bias=False), nn.BatchNorm3d(6)
    conv_b, bn_b = nn.Conv3d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm3d(6)
    modules = nn.ModuleList([conv_a, bn_a, conv_b, bn_b]).to(DEVICE)
    x0 = torch.randn(2, 4, 3, 5, 5, device=DEVICE)
    results = []
    for fused in (False, True):
        m = copy.deepcopy(modules)
        x = x0.clone().requires_grad_(True)
        if fused:
            h = conv_bn_act(x, m[0], m[1], "relu", backend="triton", defer=True)
            assert isinstance(h, c3dzoo.ops.PendingBatchNorm)
            out = conv_bn_act(h, m[2], m[3], "relu", backend="triton")
        else:
            out = F.relu(m[3](m[2](F.relu(m[1](m[0](x))))))
        out.square().sum().backward()
        results.append([out, x.grad, m[0].weight.grad, m[1].weight.grad, m[2].weight.grad, m[3].bias.grad,
                        m[1].running_var, m[3].running_var])
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_residual_epilogue_of_a_depthwise_conv():
    conv, bn = _layer(6, (3, 3, 3), 1, 1, MODES["eval"], torch.float32)
    x = torch.randn(2, 6, 3, 5, 5, device=DEVICE)
    shortcut = torch.randn(2, 6, 3, 5, 5, device=DEVICE)
    with torch.no_grad():
        out = conv_bn_act(x, conv, bn, "relu", backend="triton", residual=shortcut)
        expected = F.relu(bn(conv(x)) + shortcut)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# what does not run on the kernels: grouped (not depthwise) convs, a fused pool
# --------------------------------------------------------------------------------------------


def _config(**fields):
    base = dict(norm="running", activation="relu", stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1),
                kernel_size=(3, 3, 3), pool=(), dtype="torch.float32", device="cpu", in_channels=8,
                out_channels=8, groups=8)
    base.update(fields)
    return ConvBNActConfig(**base)


def test_backends_say_what_they_cannot_run():
    from c3dzoo.ops import cuda_impl, triton_impl

    assert triton_impl.supports(_config()) is None
    assert "dense (groups=1) and depthwise" in triton_impl.supports(_config(groups=2))
    assert "dense (groups=1) and depthwise" in triton_impl.supports(_config(out_channels=16))  # multiplier 2
    assert "max-pool" in triton_impl.supports(_config(pool=(1, 2, 2, 1, 2, 2, 0, 0, 0)))
    assert "groups=8" in cuda_impl.supports(_config(in_channels=8, device="cuda"))
    assert "groups=3" in cuda_impl.supports(_config(in_channels=3, out_channels=3, groups=3, device="cuda"))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_runs_on_reference_and_says_why(groups):
    """groups=2 (ResNeXt-style) and a depthwise conv with a channel multiplier (8 → 16, groups 4 of 2
    in, 4 out): fused through the reference backend, same values and gradients as stock, and the
    fallback names the reason."""
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 16, 3, padding=1, groups=groups).to(DEVICE)
    bn = nn.BatchNorm3d(16).to(DEVICE)
    x = torch.randn(2, 8, 3, 5, 5, device=DEVICE, requires_grad=True)
    stock_conv, stock_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    with pytest.warns(RuntimeWarning, match="depthwise"):
        out = conv_bn_act(x, conv, bn, "relu", backend="triton")
    expected = F.relu(stock_bn(stock_conv(x)))
    torch.testing.assert_close(out, expected)
    gx, gw = torch.autograd.grad(out.sum(), (x, conv.weight))
    ex, ew = torch.autograd.grad(expected.sum(), (x, stock_conv.weight))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)
    torch.testing.assert_close(bn.running_var, stock_bn.running_var)
    assert any("depthwise" in reason for reason in c3dzoo.fallbacks().values())


def test_op_rejects_channels_the_weight_cannot_group():
    x = torch.randn(1, 6, 3, 4, 4)
    with pytest.raises(ValueError, match="per group"):
        conv3d_bn_act(x, torch.randn(6, 4, 3, 3, 3), training=False, batch_norm=False)  # 6 % 4
    with pytest.raises(ValueError, match="per group"):
        conv3d_bn_act(x, torch.randn(4, 2, 3, 3, 3), training=False, batch_norm=False)  # 3 groups, 4 outputs


def test_beyond_int32_positions_run_on_reference(monkeypatch):
    conv, bn = _layer(6, (3, 3, 3), 1, 1, MODES["train"], torch.float32)
    x = torch.randn(2, 6, 3, 5, 5, device=DEVICE, requires_grad=True)
    monkeypatch.setattr(D, "INT32_LIMIT", 32)
    clear_plan_caches()
    try:
        with pytest.warns(RuntimeWarning, match="int32"):
            out = conv_bn_act(x, copy.deepcopy(conv), copy.deepcopy(bn), "relu", backend="triton")
    finally:
        monkeypatch.undo()
        clear_plan_caches()
    torch.testing.assert_close(out, F.relu(bn(conv(x))))
    assert any("int32" in reason for reason in c3dzoo.fallbacks().values())


# --------------------------------------------------------------------------------------------
# modules: Conv3dBNAct and c3dzoo.fuse take depthwise chains
# --------------------------------------------------------------------------------------------


class _SeparableBlock(nn.Module):
    """conv_a 1×1×1 → BN → ReLU → depthwise 3×3×3 → BN → ReLU → conv_c 1×1×1 → BN (CSN's bottleneck)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv3d(4, 8, 1, bias=False), nn.BatchNorm3d(8)
        self.conv_b, self.bn_b = nn.Conv3d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm3d(8)
        self.conv_c, self.bn_c = nn.Conv3d(8, 4, 1, bias=False), nn.BatchNorm3d(4)

    def forward(self, x):
        h = F.relu(self.bn_a(self.conv_a(x)))
        h = F.relu(self.bn_b(self.conv_b(h)))
        return F.relu(self.bn_c(self.conv_c(h)) + x)


def test_fuse_rewrites_depthwise_chains():
    """fuse takes the depthwise chain too: train and eval outputs as stock, on the kernels."""
    torch.manual_seed(0)
    model = _SeparableBlock().to(DEVICE)
    fused = c3dzoo.fuse(copy.deepcopy(model), backend="triton")
    assert hasattr(fused, "c3dzoo_fused_conv_b"), fused  # the depthwise conv's chain
    x = torch.randn(2, 4, 3, 5, 5, device=DEVICE)
    for train in (True, False):
        model.train(train)
        fused.train(train)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    assert fused.state_dict().keys() == model.state_dict().keys()


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels,spatial,stride,activation", [
    # CSN R101's (32 × 224 × 224 clips): ReLU after the BN
    (64, (16, 56, 56), 1, "relu"), (256, (8, 28, 28), 2, "relu"), (512, (4, 14, 14), 1, "relu"),
    # X3D-M's (16 × 224 × 224 clips): SiLU after the BN where the block has no squeeze-excitation;
    # each stage's first conv_b strides space only
    (54, (16, 112, 112), (1, 2, 2), "silu"), (216, (16, 14, 14), 1, "silu"),
    (432, (16, 14, 14), (1, 2, 2), "silu")])
def test_depthwise_layer_shapes_on_gpu(channels, spatial, stride, activation, dtype):
    """CSN R101's and X3D-M's depthwise conv_b at their real sizes (batch 8, channels_last_3d),
    training step: output, gradients and running statistics within the parity budget."""
    results = {}
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, channels, *spatial, generator=g, dtype=torch.float64).cuda()
    for key, (dt, fused) in {"ref": (torch.float64, False), "stock": (dtype, False), "fused": (dtype, True)}.items():
        conv, bn = _layer(channels, (3, 3, 3), stride, 1, MODES["train"], dt)
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = x64.to(dt).detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
        stock_act = {"relu": F.relu, "silu": F.silu}[activation]
        out = conv_bn_act(x, conv, bn, activation, backend="triton") if fused else stock_act(bn(conv(x)))
        results[key] = (out, x, conv, bn)
    dy = torch.randn(results["ref"][0].shape, generator=g, dtype=torch.float64).cuda()
    for out, *_ in results.values():
        (out * dy.to(out.dtype)).sum().backward()
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    f, s, r = results["fused"], results["stock"], results["ref"]
    assert_parity(f[0], s[0], r[0], dtype, "output")
    assert_parity(f[1].grad, s[1].grad, r[1].grad, dtype, "x.grad")
    assert_parity(f[2].weight.grad, s[2].weight.grad, r[2].weight.grad, dtype, "conv.weight.grad")
    assert_parity(f[3].weight.grad, s[3].weight.grad, r[3].weight.grad, dtype, "bn.weight.grad")
    assert_parity(f[3].running_var, s[3].running_var, r[3].running_var, dtype, "running_var")


def test_module_runs_a_depthwise_chain_fused():
    """Conv3dBNAct of a depthwise conv runs the kernels (train and eval), with the stock modules' keys."""
    torch.manual_seed(0)
    layer = Conv3dBNAct(8, 8, 3, padding=1, bias=False, groups=8, backend="triton").to(DEVICE)
    assert layer.conv.groups == 8
    stock = nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), nn.ReLU())
    x = torch.randn(2, 8, 3, 5, 5, device=DEVICE)
    for train in (True, False):
        layer.train(train)
        stock.train(train)
        torch.testing.assert_close(layer(x), stock(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_var, stock[1].running_var)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()


def test_batch_statistics_stay_sound_when_the_mean_dominates():
    """A conv bias of 1000 over outputs of std 0.01 (|mean|/std = 1e5): Σy² − (Σy)²/n in fp32 would
    lose every digit of the variance; the per-tile two-pass statistics keep it to 1e-3 relative of
    the exact variance of the stored outputs, the mean to a few ulps of 1000.

    (With |mean|/std this large, each tile's fp32 mean carries half an ulp of |mean| into the
    combination of tiles, about 5e-4 of the variance here: the input gradient of such a layer
    then drifts by up to ~2.5× stock CPU's error, whose BatchNorm sums in double.)"""
    x, w, _ = _inputs(6, (3, 3, 3), (2, 4, 6, 6), torch.float32)
    x, w = x.float() * 0.01, D.pack_depthwise_weight(w)
    bias = torch.full((6,), 1000.0, device=DEVICE)
    y, mean, var = D.conv3d_depthwise_bn_stats(x, w, bias, **_geometry(1, 1, 1, (3, 3, 3)))
    exact = y.double()
    dims = (0, 2, 3, 4)
    exact_var = exact.var(dims, unbiased=False)
    assert ((mean.double() - exact.mean(dims)).abs() <= 4 * 6.1e-5).all(), (mean.double() - exact.mean(dims))
    assert ((var.double() - exact_var).abs() <= 1e-3 * exact_var).all(), (var.double() - exact_var) / exact_var
    naive = (y.float().square().mean(dims) - y.float().mean(dims).square())
    assert ((naive.double() - exact_var).abs() > 0.5 * exact_var).any()  # what the test guards against
