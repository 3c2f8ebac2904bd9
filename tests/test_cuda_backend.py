"""backend="cuda" (csrc/ kernels through c3dzoo._C) against stock PyTorch, on a GPU.

The stem kernel (C_in ≤ 4, folded BN, activation, MaxPool3d) is held to the parity budget of
tests/parity.py: its error against a float64 reference ≤ 2× stock PyTorch's error in the same dtype.
Without a CUDA device (or without the built module) the tests skip with the reason; ``supports``'s
scope messages are checked everywhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import c3dzoo
from c3dzoo.ops import backends as backends_module
from c3dzoo.ops import conv3d_bn_act, cuda_impl
from c3dzoo.ops.backends import ConvBNActConfig
from parity import assert_parity

CUDA = torch.cuda.is_available()


def _cuda_reason():
    return backends_module.backends()["cuda"]["reason"]


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")


def _cfg(**over):
    base = dict(norm="running", activation="relu", stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1),
                kernel_size=(3, 3, 3), pool=(1, 2, 2, 1, 2, 2, 0, 0, 0), dtype="torch.bfloat16", device="cuda",
                in_channels=3, out_channels=64)
    base.update(over)
    return ConvBNActConfig(**base)


def test_supports_scope():
    assert cuda_impl.supports(_cfg()) is None
    assert cuda_impl.supports(_cfg(norm="none", pool=())) is None
    reason = cuda_impl.supports(_cfg(in_channels=64))
    assert reason and "only the stem (C_in ≤ 4)" in reason
    assert cuda_impl.supports(_cfg(norm="batch")) is None  # the training forward's stem
    assert "device" in cuda_impl.supports(_cfg(device="cpu"))
    assert "float64" in cuda_impl.supports(_cfg(dtype="torch.float64"))


def _params(c_in, c_out, kernel, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    fan_in = c_in * kernel[0] * kernel[1] * kernel[2]
    p = dict(
        conv_weight=torch.randn(c_out, c_in, *kernel, generator=g) / fan_in**0.5,
        conv_bias=torch.randn(c_out, generator=g) * 0.1,
        bn_weight=1 + 0.2 * torch.randn(c_out, generator=g),
        bn_bias=0.1 * torch.randn(c_out, generator=g),
        running_mean=0.1 * torch.randn(c_out, generator=g),
        running_var=0.5 + torch.rand(c_out, generator=g),
    )
    return {k: v.to(device) for k, v in p.items()}


SHAPES = {
    "c3d_conv1": ((2, 3, 16, 112, 112), 64, (3, 3, 3), 1, 1, ((1, 2, 2), (1, 2, 2), 0), "relu"),
    "c3d_conv1_odd": ((1, 3, 5, 37, 29), 64, (3, 3, 3), 1, 1, ((1, 2, 2), (1, 2, 2), 0), "leaky_relu"),
    "r3d_stem": ((2, 3, 8, 112, 112), 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), None, "relu"),
    "r2plus1d_stem": ((2, 3, 8, 112, 112), 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), None, "relu"),
    "pool5_style": ((2, 4, 6, 20, 20), 24, (3, 3, 3), 1, 1, ((2, 2, 2), (2, 2, 2), (0, 1, 1)), "none"),
}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_cuda_stem_parity(name, dtype, monkeypatch):
    if _cuda_reason() is not None:
        pytest.skip(f"cuda backend unavailable: {_cuda_reason()}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x_shape, c_out, kernel, stride, padding, pool, act = SHAPES[name]
    p = _params(x_shape[1], c_out, kernel, "cuda", seed=len(name))
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(training=False, stride=stride, padding=padding, activation=act, negative_slope=0.05, pool=pool)

    def run(dt, backend):
        q = dict(p)
        q["conv_weight"] = q["conv_weight"].to(dt)
        q["conv_bias"] = q["conv_bias"].to(dt)
        if dt == torch.float64:
            q = {k: v.double() for k, v in q.items()}
        return conv3d_bn_act(x.to(dt), **q, **kw, backend=backend, layout="any")  # the kernel's own layout

    c3dzoo.ops.backends.clear_fallbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to reference would warn
        fused = run(dtype, "cuda")
    assert not c3dzoo.ops.backends.fallbacks(), c3dzoo.ops.backends.fallbacks()
    assert fused.is_contiguous(memory_format=torch.channels_last_3d)
    stock = run(dtype, "reference")
    ref = run(torch.float64, "reference")
    assert_parity(fused, stock, ref, dtype, f"cuda stem {name} {dtype}")

    # channels_last_3d input and a non-default stream give the same result
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        again = conv3d_bn_act(x.to(dtype).contiguous(memory_format=torch.channels_last_3d),
                              **{k: (v.to(dtype) if k.startswith("conv") else v) for k, v in p.items()},
                              **kw, backend="cuda")
    stream.synchronize()
    assert torch.equal(again, fused)


@gpu
@pytest.mark.gpu
def test_cuda_backend_declines_non_stem_layers():
    if _cuda_reason() is not None:
        pytest.skip(f"cuda backend unavailable: {_cuda_reason()}")
    p = _params(16, 32, (3, 3, 3), "cuda")
    x = torch.randn(1, 16, 4, 8, 8, device="cuda")
    with pytest.warns(RuntimeWarning, match="only the stem"):
        conv3d_bn_act(x, **p, training=False, padding=1, backend="cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_cuda_stem_training_parity(name, dtype, monkeypatch):
    """Training mode (batch statistics): output, batch statistics through the running statistics,
    and gradients, cuda backend vs stock in the same dtype, both against float64."""
    if _cuda_reason() is not None:
        pytest.skip(f"cuda backend unavailable: {_cuda_reason()}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x_shape, c_out, kernel, stride, padding, pool, act = SHAPES[name]
    p = _params(x_shape[1], c_out, kernel, "cuda", seed=len(name))
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(training=True, stride=stride, padding=padding, activation=act, negative_slope=0.05, pool=pool)

    def run(dt, backend):
        q = {k: v.clone() for k, v in p.items()}
        q["conv_weight"] = q["conv_weight"].to(dt)
        q["conv_bias"] = q["conv_bias"].to(dt)
        if dt == torch.float64:
            q = {k: v.double() for k, v in q.items()}
        xin = x.to(dt).requires_grad_(True)
        q["conv_weight"].requires_grad_(True)
        out = conv3d_bn_act(xin, **q, **kw, backend=backend)
        out.double().square().mean().backward()
        return out, q["running_mean"], q["running_var"], xin.grad, q["conv_weight"].grad

    c3dzoo.ops.backends.clear_fallbacks()
    fused = run(dtype, "cuda")
    assert not c3dzoo.ops.backends.fallbacks(), c3dzoo.ops.backends.fallbacks()
    stock, ref = run(dtype, "reference"), run(torch.float64, "reference")
    for what, f, s_, r in zip(("output", "running_mean", "running_var", "x.grad", "weight.grad"), fused, stock, ref):
        assert_parity(f, s_, r, dtype, f"cuda stem training {name} {dtype}: {what}")


def _exact_combination(part_mean, part_m2, positions, block_m):
    tiles = part_mean.shape[0]
    counts = torch.full((tiles, 1), float(block_m), dtype=torch.float64, device=part_mean.device)
    counts[-1] = positions - (tiles - 1) * block_m
    mean = (counts * part_mean.double()).sum(dim=0) / positions
    m2 = part_m2.double().sum(dim=0) + (counts * (part_mean.double() - mean) ** 2).sum(dim=0)
    return mean, m2 / positions


@gpu
@pytest.mark.gpu
# positions, C, block_m: conv1 and conv3a of C3D at batch 32 (Triton tiles of 128 / 64), a short last tile
@pytest.mark.parametrize("positions,C,block_m", [(32 * 16 * 112 * 112, 64, 128), (32 * 8 * 28 * 28, 256, 64),
                                                 (1000, 5, 64)])
def test_statistics_kernels_on_the_gpu(positions, C, block_m):
    """bn_chan_finalize against the exact combination of the same partials (|mean| ≫ spread), also
    inside a CUDA graph; bn_update_running against nn.BatchNorm3d over several steps."""
    if _cuda_reason() is not None:
        pytest.skip(f"cuda backend unavailable: {_cuda_reason()}")
    from c3dzoo.kernels._statistics import finalize_statistics

    tiles = -(-positions // block_m)
    g = torch.Generator(device="cuda").manual_seed(0)
    part_mean = 100.0 + 0.1 * torch.randn(tiles, C, device="cuda", generator=g)
    part_m2 = torch.rand(tiles, C, device="cuda", generator=g) * block_m * 0.01
    mean, var = cuda_impl.finalize_statistics(part_mean, part_m2, positions, block_m)
    exact_mean, exact_var = _exact_combination(part_mean, part_m2, positions, block_m)
    torch.testing.assert_close(mean, exact_mean.float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(var, exact_var.float(), rtol=1e-6, atol=0)
    torch_mean, torch_var = finalize_statistics(part_mean, part_m2, positions, block_m)
    torch.testing.assert_close(mean, torch_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, torch_var, rtol=1e-3, atol=0)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_mean, g_var = cuda_impl.finalize_statistics(part_mean, part_m2, positions, block_m)
    part_mean.add_(1.0)  # the replay reads the new partials
    graph.replay()
    torch.cuda.synchronize()
    exact_mean, exact_var = _exact_combination(part_mean, part_m2, positions, block_m)
    torch.testing.assert_close(g_mean, exact_mean.float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(g_var, exact_var.float(), rtol=1e-6, atol=0)

    for momentum in (0.1, None):
        bn = torch.nn.BatchNorm3d(C, momentum=momentum).cuda()
        rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
        for _ in range(3):
            y = torch.randn(2, C, 2, 3, 3, device="cuda", generator=g) * 3 + 1
            bn.train()(y)
            var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3, 4), correction=0)
            assert cuda_impl.update_running_stats(rm, rv, nbt, mean64.float(), var64.float(), y.numel() // C, momentum)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-6)
        assert torch.equal(nbt, bn.num_batches_tracked)
