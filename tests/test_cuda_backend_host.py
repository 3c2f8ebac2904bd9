"""The cuda backend's Python side on CPU: ``c3dzoo.ops.cuda_impl`` (and the Net2Net remap's cuda
path) with ``c3dzoo._C`` replaced by its host build (tests/host_lib.py), fp32.

The host build runs the same per-element math as the device kernels (tests/test_csrc_host.py), so
what is checked here is everything around it that otherwise first runs on a GPU: BatchNorm folding,
weight packing, layouts, the output and statistics-partials buffers and their shapes, the Chan
finalize, the normalise/activation/pool step, the kept conv output, and the remap arguments —
against the reference backend, within the parity budget (float64 reference).
"""

from __future__ import annotations

import pytest
import torch

import c3dzoo
from c3dzoo.ops import cuda_impl, reference
from c3dzoo.ops.backends import LayerParams
from c3dzoo.ops.conv3d_bn_act import normalize_pool
from parity import assert_parity

pytest.importorskip(
    "c3dzoo._C_host",
    reason="c3dzoo._C_host is not built (reinstall with pybind11 importable: pip install -e . --no-build-isolation)",
)
from host_lib import use_host_extension  # noqa: E402
from interpreter import skip_unless_triton_runs_cpu_tensors  # noqa: E402

# x shape, C_out, kernel, stride, padding, pool, activation (the stems of tests/test_cuda_backend.py,
# smaller)
CASES = {
    "c3d_conv1": ((2, 3, 4, 12, 12), 16, (3, 3, 3), 1, 1, ((1, 2, 2), (1, 2, 2), 0), "relu"),
    "c3d_conv1_odd": ((1, 3, 5, 9, 7), 12, (3, 3, 3), 1, 1, ((1, 2, 2), (1, 2, 2), 0), "leaky_relu"),
    "r3d_stem": ((2, 3, 4, 16, 16), 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), None, "relu"),
    "r2plus1d_stem": ((1, 3, 4, 14, 14), 10, (1, 7, 7), (1, 2, 2), (0, 3, 3), None, "relu"),
    "pool5_style": ((2, 4, 4, 6, 6), 8, (3, 3, 3), 1, 1, ((2, 2, 2), (2, 2, 2), (0, 1, 1)), "none"),
}


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def _tensors(x_shape, c_out, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    c_in = x_shape[1]
    fan_in = c_in * kernel[0] * kernel[1] * kernel[2]
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, *kernel, generator=g, dtype=torch.float64) / fan_in ** 0.5
    bias = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1
    gamma = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1
    running_mean = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1
    running_var = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5
    return x, weight, bias, gamma, beta, running_mean, running_var


def _params(name, norm):
    _, _, _, stride, padding, pool, act = CASES[name]
    if norm == "stats":  # the raw conv output (a deferred BN: the next layer normalises and activates)
        act, pool = "none", None
    return LayerParams.of(norm, 1e-5, _triple(stride), _triple(padding), (1, 1, 1), act, 0.05, normalize_pool(pool))


def _as_fp32(tensors):
    x, weight, bias, *bn = tensors
    return (x.float(), weight.float(), bias.float(), *(t.float() for t in bn))


@pytest.mark.parametrize("norm", ["running", "none"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_stem_inference_on_the_host_build(name, norm, monkeypatch):
    ext = use_host_extension(monkeypatch)
    x_shape, c_out, kernel, *_ = CASES[name]
    t64 = _tensors(x_shape, c_out, kernel, seed=len(name))
    params = _params(name, norm)
    args = _as_fp32(t64)
    out, mean, var, kept, argmax = cuda_impl.forward(*args, params)
    assert ext.calls == ["stem_forward"]
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert mean.numel() == var.numel() == kept.numel() == argmax.numel() == 0
    stock = reference.forward(*args, params)[0]
    assert_parity(out, stock, reference.forward(*t64, params)[0], torch.float32, f"{name} {norm}")


@pytest.mark.parametrize("norm", ["batch", "stats"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_stem_training_forward_on_the_host_build(name, norm, monkeypatch):
    ext = use_host_extension(monkeypatch)
    x_shape, c_out, kernel, *_ = CASES[name]
    t64 = _tensors(x_shape, c_out, kernel, seed=len(name))
    x64, w64, b64, g64, beta64, _, _ = t64
    params = _params(name, norm)
    args = (*_as_fp32(t64)[:5], None, None)
    out, mean, var, kept, argmax = cuda_impl.forward(*args, params, keep_conv_output=True)
    assert ext.calls == ["stem_conv_stats", "bn_chan_finalize"]
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert argmax.numel() == 0 and argmax.dtype == torch.int32  # its backward recomputes the pool's decisions
    stock_out, stock_mean, stock_var, stock_kept, _ = reference.forward(*args, params, keep_conv_output=True)
    ref_out, ref_mean, ref_var, ref_kept, _ = reference.forward(x64, w64, b64, g64, beta64, None, None, params,
                                                             keep_conv_output=True)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (c_out,)
    assert_parity(mean, stock_mean, ref_mean, torch.float32, f"{name}: mean")
    assert_parity(var, stock_var, ref_var, torch.float32, f"{name}: var")
    assert_parity(out, stock_out, ref_out, torch.float32, f"{name} {norm}: out")
    if norm == "batch":  # the raw conv output, kept for the backward
        assert kept.shape == ref_kept.shape and kept.is_contiguous(memory_format=torch.channels_last_3d)
        assert_parity(kept, stock_kept, ref_kept, torch.float32, f"{name}: kept conv output")
    else:  # "stats": out is the conv output itself, nothing else is kept
        assert kept.numel() == 0


@pytest.mark.parametrize("name", ["c3d_conv1", "c3d_conv1_odd", "r3d_stem"])
def test_stem_backward_recomputes_the_forwards_own_conv_output(name, monkeypatch):
    """A training stem on a GPU keeps no conv output by default (here: none passed to the backward);
    its backward recomputes it with the forward's kernel, so the values the backward's pool and
    activation decide on are the forward's bit for bit (another conv would round some differently);
    the gradients are within the budget."""
    from c3dzoo.ops import triton_impl

    ext = use_host_extension(monkeypatch)
    x_shape, c_out, kernel, *_ = CASES[name]
    t64 = _tensors(x_shape, c_out, kernel, seed=len(name) + 1)
    params = _params(name, "batch")
    args = (*_as_fp32(t64)[:5], None, None)
    out, mean, var, kept, argmax = cuda_impl.forward(*args, params, keep_conv_output=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    needs = [True] * 5
    stock_mean, stock_var = reference.forward(*args, params)[1:3]
    stock = reference.backward(grad_out.float(), *args, stock_mean, stock_var, params, needs)
    _, ref_mean, ref_var, _, _ = reference.forward(*t64[:5], None, None, params)
    ref = reference.backward(grad_out, *t64[:5], None, None, ref_mean, ref_var, params, needs)
    seen = []
    for module in (reference, triton_impl):  # whichever runs the rest of the backward here
        real = module.backward

        def spy(*a, _real=real):
            seen.append(a[12])
            return _real(*a)

        monkeypatch.setattr(module, "backward", spy)
    ext.calls.clear()
    grads = cuda_impl.backward(grad_out.float(), *args, mean, var, params, needs)
    assert ext.calls == ["stem_conv_stats"] and len(seen) == 1 and torch.equal(seen[0], kept)
    for label, got, want, exact in zip(("x", "weight", "bias", "gamma", "beta"), grads, stock, ref):
        assert_parity(got, want, exact, torch.float32, f"{name}: grad {label}")


def test_the_host_build_is_really_called(monkeypatch):
    """The shim serves fp32 only: another dtype must reach it and fail there, not be computed elsewhere."""
    use_host_extension(monkeypatch)
    x_shape, c_out, kernel, *_ = CASES["c3d_conv1"]
    x, weight, bias, *bn = _tensors(x_shape, c_out, kernel, seed=0)
    with pytest.raises(NotImplementedError, match="fp32 only"):
        cuda_impl.forward(x.half(), weight.half(), bias.half(), *(t.float() for t in bn), _params("c3d_conv1", "running"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.float16], ids=str)
@pytest.mark.parametrize("power", [0, 1, 2])
def test_net2net_remap_cuda_path_on_the_host_build(dtype, power, monkeypatch):
    from c3dzoo.ops import net2net_remap as remap

    if power and dtype not in (torch.float32, torch.float64):
        pytest.skip("the divide runs on floating point tensors, and the host build on fp32/fp64 only")
    ext = use_host_extension(monkeypatch)
    g = torch.Generator().manual_seed(3)
    t = (torch.randn(6, 10, 3, 3, 3, generator=g) * 10).to(dtype)
    mapping = torch.tensor([0, 1, 2, 3, 4, 0, 3, 3], dtype=torch.int64)  # 5 units of group 2, widened to 8
    counts = torch.bincount(mapping, minlength=5)
    got = remap._remap_cuda(t, mapping, counts, dim=1, group=2, power=power)
    want = remap._remap_reference(t, mapping, counts, dim=1, group=2, power=power)
    assert ext.calls == ["net2net_divide" if power else "net2net_gather"]
    assert got.shape == want.shape == (6, 16, 3, 3, 3)
    if power:
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# BatchNorm statistics: every training backend finalizes and updates through c3dzoo._C where it runs
# --------------------------------------------------------------------------------------------


def _training_steps(backend, momentum, steps=3, dtype=torch.float32):
    """``steps`` training calls of the fused op and of stock modules on the same data: (fused
    outputs, BN buffers), (stock outputs, BN buffers)."""
    g = torch.Generator().manual_seed(8)
    conv = torch.nn.Conv3d(5, 6, 3, padding=1).to(dtype)
    bn = torch.nn.BatchNorm3d(6, momentum=momentum).to(dtype)
    with torch.no_grad():
        conv.bias.add_(50.0)  # |mean| ≫ std for the statistics
        bn.running_var.fill_(2.0)
    buffers = [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    outs, stock = [], []
    for _ in range(steps):
        x = torch.randn(2, 5, 3, 5, 5, generator=g, dtype=dtype)
        outs.append(c3dzoo.ops.conv3d_bn_act(
            x, conv.weight, conv.bias, bn.weight, bn.bias, buffers[0], buffers[1], num_batches_tracked=buffers[2],
            training=True, momentum=momentum, padding=1, activation="relu", backend=backend,
        ).detach())
        stock.append(torch.relu(bn.train()(conv(x))).detach())
    return (outs, buffers), (stock, [bn.running_mean, bn.running_var, bn.num_batches_tracked])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_training_statistics_run_on_the_extension(backend, momentum, monkeypatch):
    """The Triton conv's partials are finalized by bn_chan_finalize and its running statistics
    updated by bn_update_running (momentum=None: 1/num_batches_tracked after its increment); the
    reference backend stays stock PyTorch. Both equal stock BatchNorm3d over several steps."""
    if backend == "triton":
        skip_unless_triton_runs_cpu_tensors()
    ext = use_host_extension(monkeypatch)
    (outs, buffers), (stock, stock_buffers) = _training_steps(backend, momentum)
    step_calls = ["bn_chan_finalize", "bn_update_running"] if backend == "triton" else []
    assert ext.calls == step_calls * 3
    for out, want in zip(outs, stock):
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(buffers, stock_buffers):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert buffers[2].item() == 3


def test_statistics_kernels_can_be_switched_off_and_skip_what_they_do_not_take(monkeypatch):
    ext = use_host_extension(monkeypatch)
    ones64 = torch.ones(4, dtype=torch.float64)
    strided = torch.zeros(8)[::2]
    for rm, rv, mean in ((torch.zeros(4, dtype=torch.float64), ones64.clone(), ones64),  # fp64 buffers
                         (strided, torch.ones(4), torch.ones(4)),  # a non-contiguous buffer
                         (torch.zeros(4), torch.ones(4), torch.ones(5))):  # mismatched lengths
        before = (rm.clone(), rv.clone())
        assert not cuda_impl.update_running_stats(rm, rv, None, mean, mean.clone(), 10, 0.1)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert ext.calls == []
    skip_unless_triton_runs_cpu_tensors()
    monkeypatch.setenv(cuda_impl.STATISTICS_ENV_VAR, "0")
    (_, buffers), (_, stock_buffers) = _training_steps("triton", 0.1, steps=1)
    assert ext.calls == []
    torch.testing.assert_close(buffers[1], stock_buffers[1], rtol=1e-5, atol=1e-5)
