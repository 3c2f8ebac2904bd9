"""The reference backend's BatchNorm and max-pool building blocks, which the other backends'
fallbacks share.

* ``batch_norm_output`` (the in-place z) equals ``batch_norm_affine``'s z bit for bit: the fused
  SyncBatchNorm and the cuda backend's normalise step compute a forward's z with one and the
  backward's with the other, so activation and max-pool decisions must agree exactly;
* ``batch_statistics`` (stock BatchNorm's reduction) is accurate against float64 when |mean| ≫ std,
  and reports fp32 statistics for bf16/fp16 inputs;
* ``batch_norm_backward`` equals autograd through ``F.batch_norm`` in float64, affine or not;
* a layer whose output is its raw conv output (norm "stats"/"none", no activation, no pool) runs
  no conv in its backward: the gradient is grad_out itself;
* max-pool through a channels-last copy (CPU) gives the NCDHW kernel's values and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from c3dzoo.ops import reference
from c3dzoo.ops.backends import LayerParams

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _y(dtype, channels_last: bool, mean: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(3, 5, 4, 6, 7, generator=g, dtype=torch.float64) * 2 + mean).to(dtype)
    return y.contiguous(memory_format=torch.channels_last_3d) if channels_last else y


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_output_is_batch_norm_affine_z(dtype, affine, channels_last):
    y = _y(dtype, channels_last, mean=0.5)
    y_before = y.clone()
    stats = reference.stats_dtype(dtype)
    mean, var = reference.batch_statistics(y)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = torch.rand(5, dtype=stats) + 0.5 if affine else None
    beta = torch.randn(5, dtype=stats) if affine else None
    _, z = reference.batch_norm_affine(y, mean, invstd, gamma, beta)
    z_only = reference.batch_norm_output(y, mean, invstd, gamma, beta)
    assert z_only.dtype == dtype and z.dtype == dtype
    assert torch.equal(z_only, z)
    assert torch.equal(y, y_before)  # in place on a temporary, never on y


@pytest.mark.parametrize("mean", [0.0, 1e3], ids=["centred", "mean_dominates"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_statistics_against_float64(dtype, mean):
    y = _y(dtype, channels_last=False, mean=mean)
    got_mean, got_var = reference.batch_statistics(y)
    assert got_mean.dtype == reference.stats_dtype(dtype) and got_var.dtype == reference.stats_dtype(dtype)
    want_var, want_mean = torch.var_mean(y.double(), dim=(0, 2, 3, 4), correction=0)
    eps = torch.finfo(reference.stats_dtype(dtype)).eps
    # a two-pass variance: error relative to var (≈4 here) stays near eps even at mean 1e3, where
    # E[y²] − E[y]² would lose (1e3)²/4 · eps
    torch.testing.assert_close(got_mean.double(), want_mean, rtol=0, atol=64 * eps * (abs(mean) + 2))
    torch.testing.assert_close(got_var.double(), want_var, rtol=64 * eps, atol=0)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_batch_norm_backward_is_autograd_of_batch_norm(affine):
    y = _y(torch.float64, channels_last=False, mean=0.3).requires_grad_()
    gamma = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    beta = torch.randn(5, dtype=torch.float64).requires_grad_() if affine else None
    z = F.batch_norm(y, None, None, gamma, beta, training=True, eps=1e-5)
    grad_z = torch.randn_like(z)
    wanted = torch.autograd.grad(z, [t for t in (y, gamma, beta) if t is not None], grad_z)
    mean, var = reference.batch_statistics(y.detach())
    got_y, got_gamma, got_beta = reference.batch_norm_backward(grad_z, y.detach(), mean, torch.rsqrt(var + 1e-5),
                                                               None if gamma is None else gamma.detach())
    torch.testing.assert_close(got_y, wanted[0], rtol=1e-10, atol=1e-12)
    no_y = reference.batch_norm_backward(grad_z, y.detach(), mean, torch.rsqrt(var + 1e-5),
                                         None if gamma is None else gamma.detach(), need_y=False)
    assert no_y[0] is None and torch.equal(no_y[1], got_gamma) and torch.equal(no_y[2], got_beta)
    if affine:
        torch.testing.assert_close(got_gamma, wanted[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_beta, wanted[2], rtol=1e-10, atol=1e-12)
    else:  # the sums γ and β would get: Σdz·x̂ and Σdz
        xhat = (y.detach() - mean.view(1, -1, 1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(got_gamma, (grad_z * xhat).sum(dim=(0, 2, 3, 4)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_beta, grad_z.sum(dim=(0, 2, 3, 4)), rtol=1e-10, atol=1e-12)


class _NoConv:
    """torch.nn.functional, except that conv3d fails the test."""

    def __getattr__(self, name):
        if name == "conv3d":
            raise AssertionError("the backward recomputed the conv output")
        return getattr(F, name)


@pytest.mark.parametrize("norm", ["stats", "none"])
def test_raw_conv_output_backward_recomputes_nothing(norm, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 6, generator=g)
    weight = torch.randn(4, 3, 3, 3, 3, generator=g)
    bias = torch.randn(4, generator=g)
    params = LayerParams(norm, 1e-5, (1, 1, 1), (1, 1, 1), (1, 1, 1), "none", 0.0, ())
    out, mean, var, _, _ = reference.forward(x, weight, bias, None, None, None, None, params)
    grad_out = torch.randn(out.shape, generator=g)
    monkeypatch.setattr(reference, "F", _NoConv())
    gx, gw, gb, _, _ = reference.backward(grad_out, x, weight, bias, None, None, None, None, mean, var, params,
                                          (True, True, True, False, False))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    wanted = torch.autograd.grad(F.conv3d(xr, wr, br, padding=1), (xr, wr, br), grad_out)
    torch.testing.assert_close(gx, wanted[0])
    torch.testing.assert_close(gw, wanted[1])
    if norm == "none":
        torch.testing.assert_close(gb, wanted[2])
    else:  # "stats": the consumer batch-normalises this output, which removes any per-channel shift
        assert torch.equal(gb, torch.zeros_like(gb))


POOLS = {
    "pool1": (1, 2, 2, 1, 2, 2, 0, 0, 0),
    "pool2": (2, 2, 2, 2, 2, 2, 0, 0, 0),
    "pool5": (2, 2, 2, 2, 2, 2, 0, 1, 1),
    "overlapping": (3, 3, 3, 2, 2, 2, 1, 1, 1),
}


@pytest.mark.parametrize("with_nan", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("pool", list(POOLS), ids=list(POOLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_pool_through_channels_last_is_the_ncdhw_pool(dtype, pool, with_nan):
    """The reference max-pools an NCDHW CPU tensor through a channels-last copy (faster): values,
    the window element each gradient goes to (ties included: a ReLU output is full of zeros, and
    integers make ties everywhere) and NaN propagation are those of the NCDHW kernel."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-2, 3, (2, 5, 4, 7, 6), generator=g).to(dtype).clamp_min(0)
    if with_nan:
        a[0, 1, 1, 2, 3] = float("nan")
    assert reference._pool_channels_last(a)
    p = POOLS[pool]
    kernel, stride, padding = p[0:3], p[3:6], p[6:9]
    out = reference.apply_pool(a, p)
    want, indices = F.max_pool3d(a, kernel, stride, padding, return_indices=True)
    assert out.is_contiguous() and torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dtype)
    grad = reference._pool_backward(grad_out, a, p, reference._pool_argmax(a, p)[1])
    want_grad = torch.ops.aten.max_pool3d_with_indices_backward(
        grad_out, a, list(kernel), list(stride), list(padding), [1, 1, 1], False, indices)
    assert grad.is_contiguous() and torch.equal(grad, want_grad)


@pytest.mark.parametrize("activation", ["relu", "none", "leaky_relu", "silu"])
@pytest.mark.parametrize("pool", list(POOLS), ids=list(POOLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_act_pool_and_its_backward_are_stock_order_bit_for_bit(dtype, pool, activation):
    """``act_pool`` pools before a ReLU (or no activation) and ``act_pool_backward`` then takes the
    window maxima of the pre-activation z: values, which element each gradient goes to and the
    gradient itself equal stock's pool(act(z)) and its autograd bit for bit, on inputs made of ties
    (small integers: windows of equal values, of negatives that ReLU maps to tied zeros, a -0.0 and a
    0.0; the sign of a zero is not compared: stock's own bf16 ReLU gives either, by tensor size), a
    NaN, overlapping windows, on the channels-last detour (NCDHW) and without it (channels-last z).
    LeakyReLU and SiLU keep stock's order."""
    g = torch.Generator().manual_seed(1)
    z = torch.randint(-2, 3, (2, 5, 4, 7, 6), generator=g).to(dtype)
    z[0, 2, 1, 1, 1], z[1, 0, 2, 3, 3], z[0, 1, 1, 2, 3] = -0.0, 0.0, float("nan")
    p = POOLS[pool]
    kernel, stride, padding = p[0:3], p[3:6], p[6:9]
    grad_out = None
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        z_in = z.contiguous(memory_format=layout)
        leaf = z_in.detach().requires_grad_()
        want = F.max_pool3d(reference.apply_activation(leaf, activation, 0.1), kernel, stride, padding)
        if grad_out is None:
            grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64).to(dtype)
        want.backward(grad_out)
        out = reference.act_pool(z_in, activation, 0.1, p)
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.detach().nan_to_num())
        grad = reference.act_pool_backward(grad_out, z_in, activation, 0.1, p)
        assert grad.dtype == reference.stats_dtype(dtype)
        torch.testing.assert_close(grad.to(dtype), leaf.grad, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{layout}: gradient: {m}")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("pool", list(POOLS), ids=list(POOLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_backward_from_the_kept_argmax_is_the_recomputed_one_bit_for_bit(dtype, pool, activation, index_dtype):
    """A training forward that keeps its conv output keeps the pool's argmax too (``encode_pool_argmax``:
    ReLU's dead windows as negative indices), and the backward reads it instead of recomputing the
    BatchNorm output and pooling it again: the same gradient bit for bit as ``act_pool_backward``
    (itself stock's order, above), on ties, a NaN and zeros of either sign in z, NaN and infinite
    incoming gradients (a dead window's is dropped as ReLU's backward drops it), both layouts."""
    g = torch.Generator().manual_seed(2)
    z = torch.randint(-2, 3, (2, 5, 4, 7, 6), generator=g).to(dtype)
    z[0, 2, 1, 1, 1], z[1, 0, 2, 3, 3], z[0, 1, 1, 2, 3] = -0.0, 0.0, float("nan")
    z[1, 3, :3, :3, :3] = -1.0  # a dead window at index 0: its code is ~0 = -1
    p = POOLS[pool]
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        z_in = z.contiguous(memory_format=layout)
        pooled, indices = reference._pool_argmax(z_in, p, index_dtype)
        assert indices.dtype == index_dtype
        argmax = reference.encode_pool_argmax(indices, pooled, activation)
        assert torch.equal(reference.apply_activation(pooled, activation, 0.0).nan_to_num(),
                           reference.act_pool(z_in, activation, 0.0, p).nan_to_num())
        dead = pooled <= 0
        assert torch.equal(argmax < 0, dead if activation == "relu" else torch.zeros_like(dead))
        grad_out = torch.randn(pooled.shape, generator=g, dtype=torch.float64).to(dtype)
        grad_out.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        want = reference.act_pool_backward(grad_out, z_in, activation, 0.0, p)
        got = reference.act_pool_backward_from_argmax(grad_out, z_in, argmax, activation, p)
        assert got.dtype == want.dtype == reference.stats_dtype(dtype)
        assert got.stride() == want.stride(), layout
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{layout}: gradient: {m}")


def test_kept_argmax_is_int32_while_a_plane_fits_it():
    assert reference.pool_argmax_dtype((2, 64, 16, 112, 112)) == torch.int32
    assert reference.pool_argmax_dtype((1, 1, 2 ** 10, 2 ** 10, 2 ** 11 - 1)) == torch.int32
    assert reference.pool_argmax_dtype((1, 1, 2 ** 10, 2 ** 10, 2 ** 11)) == torch.int64  # 2³¹ positions


# (kernel, stride, frames) of temporal convs whose torch 2.13 CPU oneDNN backward returned a
# garbage weight gradient or crashed in batches over 1 (S3D's stem is the first)
_ONEDNN_BAD = [(7, 2, 5), (7, 2, 6), (7, 2, 7), (9, 2, 6), (9, 3, 8), (9, 3, 10)]


@pytest.mark.parametrize("kernel,stride,frames", _ONEDNN_BAD, ids=lambda v: str(v))
def test_convolution_backward_steers_around_onednn(kernel, stride, frames):
    """``reference.convolution_backward`` (every backend's conv backward on the CPU) is right where
    oneDNN's is not: PyTorch's own kernel runs for strided dimensions shorter than twice the kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, frames, 3, 5, generator=g)
    w = torch.randn(16, 16, kernel, 1, 1, generator=g)
    stride3, padding3, dilation3 = (stride, 1, 1), (kernel // 2, 0, 0), (1, 1, 1)
    grad_y = torch.randn(F.conv3d(x, w, None, stride3, padding3).shape, generator=g)
    gx, gw, _ = reference.convolution_backward(grad_y, x, w, stride3, padding3, dilation3, [True, True, False])
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    F.conv3d(x64, w64, None, stride3, padding3).backward(grad_y.double())
    torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx.double(), x64.grad, rtol=1e-5, atol=1e-4)
    assert torch.backends.mkldnn.enabled  # switched off for the one call only


@pytest.mark.parametrize("activation,slope", [("relu", 0.0), ("none", 0.0), ("leaky_relu", 0.1), ("leaky_relu", 0.0),
                                              ("leaky_relu", -0.2), ("silu", 0.0)],
                         ids=["relu", "none", "leaky", "leaky0", "leaky_negative", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_norm_backward_from_the_normalised_input_is_bit_for_bit(dtype, activation, slope, monkeypatch):
    """``input_norm_backward(normalized=...)`` (the op hands the reference backend the normalised
    input its layer's backward ran on) gives the recomputing call's gradients bit for bit, on zeros,
    values that round to zero and a NaN; it normalises x again only where the activation's output
    does not have its input's sign (SiLU, a negative LeakyReLU slope), and never for none."""
    from c3dzoo.ops.backends import InputNorm

    y = _y(dtype, channels_last=False, mean=0.5, seed=3)
    y[0, 1, 0, 0, :3] = torch.tensor([0.0, -0.0, float("nan")], dtype=dtype)
    mean, var = reference.batch_statistics(y.nan_to_num())
    g = torch.Generator().manual_seed(4)
    gamma = torch.randn(5, generator=g, dtype=mean.dtype)
    beta = -mean * gamma * torch.rsqrt(var + 1e-5)  # z = γ·x̂ + β puts values near 0 for some channels
    y[1, 2, 1, 1, 1] = mean[2].to(dtype)  # z rounds to ~0 there
    norm = InputNorm(torch.stack([mean, var, gamma, beta]), 1e-5, activation, slope)
    grad_input = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    want = reference.input_norm_backward(grad_input, y, norm, need_x=True)
    normalized = reference.normalize_input(y, norm)
    recomputes = activation == "silu" or slope < 0
    if not recomputes:
        def no_recompute(*args, **kwargs):
            raise AssertionError("normalised x again")
        monkeypatch.setattr(reference, "batch_norm_output", no_recompute)
    got = reference.input_norm_backward(grad_input, y, norm, need_x=True, normalized=normalized)
    for w, o in zip(want, got):
        assert o.dtype == w.dtype
        torch.testing.assert_close(o, w, rtol=0, atol=0, equal_nan=True)
    assert reference.activation_sign_kept(activation, slope) == (not recomputes)
    assert reference.input_norm_backward_reads_normalized(activation, slope) == (not recomputes and activation != "none")
