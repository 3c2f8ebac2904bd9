"""The Triton backend's inference path: Conv3d (+ folded eval-mode BatchNorm) + activation (+ MaxPool3d).

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), in fp32 and
fp16, on tiny shapes: the interpreter pays per program instance. Every result is held to the parity
budget (tests/parity.py): its error against a float64 reference at most 2× stock PyTorch's error in
the same dtype. The ``gpu`` tests run C3D's real layer shapes and the whole model in bf16/fp16.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import c3dzoo
from c3dzoo.kernels import conv3d_bias_act_pool as K
from c3dzoo.kernels._implicit_gemm import round_to_tf32
from c3dzoo.ops import backends as backends_module
from c3dzoo.ops import conv3d_bn_act
from parity import assert_parity

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
# the interpreter computes bf16 wrongly (kernels.md), so on CPU the backend refuses bf16
CPU_DTYPES = [torch.float32, torch.float16]

POOL1 = ((1, 2, 2), (1, 2, 2), 0)
POOL2 = ((2, 2, 2), (2, 2, 2), 0)
POOL5 = ((2, 2, 2), (2, 2, 2), (0, 1, 1))
POOL_OVERLAP = ((3, 3, 3), (2, 2, 2), 1)  # windows overlap and reach into the padding


@pytest.fixture(autouse=True)
def _no_stale_fallbacks():
    c3dzoo.ops.backends.clear_fallbacks()
    yield


def make_params(c_in, c_out, kernel, *, dtype, device=DEVICE, bias=True, batch_norm=True, seed=0):
    """Conv weight/bias in ``dtype``; BatchNorm parameters and statistics in fp32 (as in a model)."""
    g = torch.Generator().manual_seed(seed)
    fan_in = c_in * kernel[0] * kernel[1] * kernel[2]
    p = {
        "weight": torch.randn(c_out, c_in, *kernel, generator=g) / fan_in**0.5,
        "bias": torch.randn(c_out, generator=g) * 0.1 if bias else None,
    }
    if batch_norm:
        p.update(
            bn_weight=torch.rand(c_out, generator=g) + 0.5,
            bn_bias=torch.randn(c_out, generator=g) * 0.1,
            running_mean=torch.randn(c_out, generator=g) * 0.1,
            running_var=torch.rand(c_out, generator=g) + 0.5,
        )
    conv_dtype = {"weight": dtype, "bias": dtype}
    return {
        k: None if v is None else v.to(device=device, dtype=conv_dtype.get(k, torch.float32))
        for k, v in p.items()
    }


def stock(x, p, *, stride, padding, dilation, activation, negative_slope, pool, dtype):
    """Stock PyTorch, op by op, with everything in ``dtype`` (fp64 for the reference)."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y = F.conv3d(x.to(dtype), cast(p["weight"]), cast(p["bias"]), stride, padding, dilation)
    if "running_mean" in p:
        y = F.batch_norm(
            y, cast(p["running_mean"]), cast(p["running_var"]), cast(p["bn_weight"]), cast(p["bn_bias"]),
            training=False, eps=1e-5,
        )
    if activation == "relu":
        y = F.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, negative_slope)
    elif activation == "silu":
        y = F.silu(y)
    if pool is not None:
        y = F.max_pool3d(y, *pool)
    return y


def fused(x, p, *, backend="triton", training=False, **geometry):
    """The op as the backend computes it: ``layout="any"`` keeps the kernels' output layout (the
    stock-layout default is tests/test_memory_layout.py's)."""
    bn = "running_mean" in p
    return conv3d_bn_act(
        x, p["weight"], p["bias"], p.get("bn_weight"), p.get("bn_bias"), p.get("running_mean"),
        p.get("running_var"), training=training, batch_norm=bn, backend=backend, eps=1e-5, layout="any",
        **geometry,
    )


def check_against_stock(x, p, dtype, what, **geometry):
    out = fused(x, p, **geometry)
    assert out.dtype == dtype
    reference = stock(x, p, dtype=torch.float64, **geometry)
    assert_parity(out, stock(x, p, dtype=dtype, **geometry), reference, dtype, what)
    assert not c3dzoo.fallbacks(), f"{what}: fell back to reference: {c3dzoo.fallbacks()}"
    return out


# --------------------------------------------------------------------------------------------
# geometry: odd channels, kernels, stride, padding, dilation, every pool, every activation
# --------------------------------------------------------------------------------------------

# (C_in, C_out, kernel, stride, padding, dilation, pool, activation, batch norm, input N,D,H,W)
GEOMETRIES = {
    "cin3_k333_pool1": (3, 7, (3, 3, 3), 1, 1, 1, POOL1, "relu", True, (2, 4, 8, 8)),
    "cin5_k333_stride2_leaky": (5, 7, (3, 3, 3), 2, 1, 1, None, "leaky_relu", True, (2, 5, 9, 9)),
    "cin5_k333_dilation2_none": (5, 7, (3, 3, 3), 1, 2, 2, None, "none", True, (1, 4, 8, 8)),
    "cin3_k133_pool2_nobn": (3, 7, (1, 3, 3), 1, (0, 1, 1), 1, POOL2, "relu", False, (2, 4, 8, 8)),
    "cin5_k311_pool5": (5, 7, (3, 1, 1), 1, (1, 0, 0), 1, POOL5, "relu", True, (2, 4, 6, 6)),
    "cin3_k233_pad0": (3, 7, (2, 3, 3), 1, 0, 1, None, "relu", True, (2, 4, 8, 8)),
    "cin5_k233_pad1_pool2": (5, 7, (2, 3, 3), 1, 1, 1, POOL2, "leaky_relu", True, (1, 4, 8, 8)),
    "cin5_k333_pool_overlap": (5, 7, (3, 3, 3), 1, 1, 1, POOL_OVERLAP, "none", True, (1, 4, 7, 7)),
    "cin5_k333_silu_pool1": (5, 7, (3, 3, 3), 1, 1, 1, POOL1, "silu", True, (1, 4, 8, 8)),  # X3D's activation
    # C_in ≥ 16 takes the (tap, channel block) main loop; 20 and 24 are no multiples of 16
    "cin20_k333_pool5_channel_blocks": (20, 24, (3, 3, 3), 1, 1, 1, POOL5, "relu", True, (2, 2, 6, 6)),
    "cin20_k133_stride2_nobias": (20, 7, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, None, "relu", True, (1, 3, 9, 9)),
    # the video ResNets' stems: more than 32 taps take the flat-K loop's per-element bounds path
    "cin3_k377_stride122_r3d_stem": (3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), 1, None, "relu", True, (2, 4, 12, 12)),
    "cin3_k177_stride122_r2plus1d_stem": (3, 8, (1, 7, 7), (1, 2, 2), (0, 3, 3), 1, None, "relu", True, (1, 3, 11, 11)),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_matches_stock(name, dtype):
    c_in, c_out, kernel, stride, padding, dilation, pool, activation, bn, size = GEOMETRIES[name]
    p = make_params(c_in, c_out, kernel, dtype=dtype, batch_norm=bn, bias="nobias" not in name)
    x = torch.randn(size[0], c_in, *size[1:], generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    check_against_stock(
        x, p, dtype, name, stride=stride, padding=padding, dilation=dilation,
        activation=activation, negative_slope=0.2, pool=pool,
    )


@pytest.mark.parametrize("layout", ["channels_last_3d", "sliced", "permuted"])
def test_input_layouts(layout):
    dtype = torch.float32
    p = make_params(5, 7, (3, 3, 3), dtype=dtype)
    base = torch.randn(2, 5, 4, 8, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    if layout == "channels_last_3d":
        x = base.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        x = base[:, :, :, :, ::2]  # non-contiguous in every memory format
    else:
        x = base[:, :, :, :, :8].permute(0, 1, 2, 4, 3)  # H and W swapped: strided view
    assert not x.is_contiguous()
    geometry = dict(stride=1, padding=1, dilation=1, activation="relu", negative_slope=0.0, pool=POOL1)
    out = check_against_stock(x, p, dtype, layout, **geometry)
    # the triton backend's output contract (and its fake implementation's): channels_last_3d
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


def test_batch_one_and_output_channels_last():
    dtype = torch.float16
    p = make_params(3, 7, (3, 3, 3), dtype=dtype)
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    out = check_against_stock(x, p, dtype, "batch 1", stride=1, padding=1, dilation=1,
                              activation="relu", negative_slope=0.0, pool=POOL5)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


# --------------------------------------------------------------------------------------------
# the launcher directly: both main loops, tiles that straddle samples, many programs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        K.TileConfig(16, 16, 16, num_warps=4, num_stages=1),  # channel blocks, C_in 5 masked
        K.TileConfig(16, 16, 32, num_warps=4, num_stages=1, flat_k=True),  # flat K, chunks straddle taps
    ],
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("pool", [(), (2, 2, 2, 2, 2, 2, 0, 1, 1)], ids=["nopool", "pool5"])
def test_launcher_main_loops(config, pool):
    """Small tiles: many programs, tiles that straddle two samples (rows address x relative to the
    tile's first sample), several channel blocks; both main loops on the same problem."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 3, 5, 7, generator=g).to(DEVICE, dtype)
    w = torch.randn(20, 5, 2, 3, 3, generator=g).to(DEVICE, dtype)
    b = torch.randn(20, generator=g).to(DEVICE)
    geometry = dict(stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2))
    out = K.conv3d_bias_act_pool(
        x, K.pack_weight(w), b, kernel_size=(2, 3, 3), activation="leaky_relu", negative_slope=0.1,
        pool=pool, out_dtype=dtype, config=config, **geometry,
    )

    def run(dt):
        y = F.leaky_relu(F.conv3d(x.to(dt), w.to(dt), b.to(dt), **geometry), 0.1)
        return F.max_pool3d(y, pool[0:3], pool[3:6], pool[6:9]) if pool else y

    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_parity(out, run(dtype), run(torch.float64), dtype, f"{config.name} {pool}")


def test_launcher_rejects_mismatched_weight():
    x = torch.randn(1, 4, 3, 3, 3, device=DEVICE)
    w = K.pack_weight(torch.randn(6, 5, 1, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match="does not match"):
        K.conv3d_bias_act_pool(x, w, None, kernel_size=(1, 1, 1), stride=(1, 1, 1), padding=(0, 0, 0),
                               dilation=(1, 1, 1), activation="none", negative_slope=0.0, pool=(),
                               out_dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# the folded weight cache
# --------------------------------------------------------------------------------------------


def _cache():
    from c3dzoo.ops import triton_impl

    return triton_impl._weight_cache


def test_weight_cache_invalidated_by_in_place_updates():
    dtype = torch.float32
    p = make_params(3, 7, (1, 3, 3), dtype=dtype)
    x = torch.randn(1, 3, 2, 6, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    geometry = dict(stride=1, padding=(0, 1, 1), dilation=1, activation="none", negative_slope=0.0, pool=None)
    _cache().clear()
    first = fused(x, p, **geometry)
    again = fused(x, p, **geometry)
    assert len(_cache()) == 1 and torch.equal(first, again)  # second call hit the cache

    p["running_var"].mul_(4.0)  # as a BatchNorm in training mode updates it: in place
    after_var = fused(x, p, **geometry)
    assert not torch.allclose(after_var, first)
    assert_parity(after_var, stock(x, p, dtype=dtype, **geometry), stock(x, p, dtype=torch.float64, **geometry),
                  dtype, "after running_var.mul_")

    with torch.no_grad():
        p["weight"].add_(0.5)  # as an optimizer step does
    after_weight = fused(x, p, **geometry)
    assert_parity(after_weight, stock(x, p, dtype=dtype, **geometry),
                  stock(x, p, dtype=torch.float64, **geometry), dtype, "after weight.add_")


def test_weight_cache_is_bounded_and_drops_dead_weights(monkeypatch):
    # a small bound for the test: the real one (thousands of layers) would take thousands of
    # interpreted launches
    monkeypatch.setattr(_cache(), "capacity", 6)
    dtype = torch.float32
    x = torch.randn(1, 3, 1, 3, 3, device=DEVICE)
    geometry = dict(stride=1, padding=0, dilation=1, activation="relu", negative_slope=0.0, pool=None)
    _cache().clear()
    p = make_params(3, 4, (1, 1, 1), dtype=dtype)
    fused(x, p, **geometry)
    assert len(_cache()) == 1
    del p
    gc.collect()
    assert len(_cache()) == 0  # the entry died with its conv weight
    kept = []
    for seed in range(_cache().capacity + 5):
        kept.append(make_params(3, 4, (1, 1, 1), dtype=dtype, seed=seed))
        fused(x, kept[-1], **geometry)
    assert len(_cache()) == _cache().capacity


# --------------------------------------------------------------------------------------------
# registry: availability, supports(), fallbacks, backward
# --------------------------------------------------------------------------------------------


def test_triton_backend_available():
    info = c3dzoo.backends()["triton"]
    assert info["available"], info["reason"]


def test_supports_reasons(monkeypatch):
    from c3dzoo.ops import triton_impl

    def cfg(**kw):
        base = dict(norm="running", activation="relu", stride=(1, 1, 1), padding=(1, 1, 1),
                    dilation=(1, 1, 1), kernel_size=(3, 3, 3), pool=(), dtype="torch.float16",
                    device="cuda", in_channels=3, out_channels=8)
        base.update(kw)
        return backends_module.ConvBNActConfig(**base)

    assert triton_impl.supports(cfg()) is None
    assert triton_impl.supports(cfg(norm="none", dtype="torch.bfloat16")) is None
    assert triton_impl.supports(cfg(norm="batch")) is None  # training forward: tests/test_triton_training.py
    assert "norm" in triton_impl.supports(cfg(norm="group"))
    assert "float64" in triton_impl.supports(cfg(dtype="torch.float64"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if K.runs_interpreted():
        assert triton_impl.supports(cfg(device="cpu", dtype="torch.float32")) is None
        assert "bfloat16" in triton_impl.supports(cfg(device="cpu", dtype="torch.bfloat16"))
    else:  # kernels compiled for the GPU: setting the variable now is too late
        reason = triton_impl.supports(cfg(device="cpu", dtype="torch.float32"))
        assert "after the Triton kernels were imported" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_impl.supports(cfg(device="cpu", dtype="torch.float32"))


def test_training_mode_runs_in_triton():
    """Training-mode BatchNorm no longer falls back: the triton backend runs it (parity in
    tests/test_triton_training.py) and updates the running statistics as the reference backend does."""
    p = make_params(3, 5, (3, 3, 3), dtype=torch.float32)
    x = torch.randn(2, 3, 3, 5, 5, device=DEVICE)
    p_ref = {k: None if v is None else v.clone() for k, v in p.items()}
    geometry = dict(training=True, stride=1, padding=1, dilation=1, activation="relu", negative_slope=0.0, pool=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns
        out = fused(x, p, **geometry)
    expected = fused(x, p_ref, backend="reference", **geometry)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p["running_mean"], p_ref["running_mean"])
    torch.testing.assert_close(p["running_var"], p_ref["running_var"])


@pytest.mark.skipif(CUDA, reason="the interpreter-only bf16 refusal applies on CPU")
def test_bf16_on_the_interpreter_falls_back():
    p = make_params(3, 5, (1, 1, 1), dtype=torch.bfloat16)
    x = torch.randn(1, 3, 2, 3, 3, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fused(x, p, stride=1, padding=0, dilation=1, activation="relu", negative_slope=0.0, pool=None)
    assert any("bfloat16" in v for v in c3dzoo.fallbacks().values())


def test_forward_returns_distinct_empty_statistics():
    from c3dzoo.ops import triton_impl
    from c3dzoo.ops.backends import LayerParams

    p = make_params(3, 5, (1, 1, 1), dtype=torch.float32)
    x = torch.randn(1, 3, 2, 3, 3, device=DEVICE)
    out, mean, var, _, _ = triton_impl.forward(
        x, p["weight"], p["bias"], p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"],
        LayerParams.of("running", 1e-5, [1, 1, 1], [0, 0, 0], [1, 1, 1], "relu", 0.0, []),
    )
    assert mean.numel() == 0 and var.numel() == 0 and mean.dtype == var.dtype == torch.float32
    assert mean is not var and mean.untyped_storage() is not var.untyped_storage()


def test_gradients_match_reference_backend():
    """backward delegates to the reference backend: gradients equal the reference backend's."""
    dtype = torch.float32
    p = make_params(3, 5, (3, 3, 3), dtype=dtype)
    x = torch.randn(1, 3, 3, 6, 6, device=DEVICE)
    geometry = dict(stride=1, padding=1, dilation=1, activation="relu", negative_slope=0.0, pool=POOL1)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in p.items() if k in ("weight", "bias", "bn_weight")}
        xx = x.clone().requires_grad_(True)
        out = fused(xx, {**p, **leaves}, backend=backend, **geometry)
        out.square().sum().backward()
        grads[backend] = [xx.grad] + [leaves[k].grad for k in ("weight", "bias", "bn_weight")]
    for got, expected in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_tiny_c3d_bn_model_matches_stock():
    """The whole (narrow, small-input) C3D-BN through the Triton backend, fp32, eval mode."""
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(num_classes=5, width_mult=1 / 16, input_size=(16, 16, 16)).eval().to(DEVICE)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):  # non-trivial running statistics to fold
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16, 16, device=DEVICE)
    reference = copy.deepcopy(model).double()(x.double())
    stock_out = model(x)
    model.fused, model.backend = True, "triton"
    fused_out = model(x)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    assert_parity(fused_out, stock_out, reference, torch.float32, "tiny C3D-BN logits")


# --------------------------------------------------------------------------------------------
# GPU: C3D's real layer shapes and the whole model
# --------------------------------------------------------------------------------------------

# (name, C_in, C_out, D, H, W at 16×112×112 input, pool after it)
C3D_LAYERS = [
    ("conv1", 3, 64, 16, 112, 112, POOL1),
    ("conv2", 64, 128, 16, 56, 56, POOL2),
    ("conv3a", 128, 256, 8, 28, 28, None),
    ("conv3b", 256, 256, 8, 28, 28, POOL2),
    ("conv4a", 256, 512, 4, 14, 14, None),
    ("conv4b", 512, 512, 4, 14, 14, POOL2),
    ("conv5a", 512, 512, 2, 7, 7, None),
    ("conv5b", 512, 512, 2, 7, 7, POOL5),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", C3D_LAYERS, ids=lambda layer: layer[0])
def test_c3d_layer_shapes_on_gpu(layer, dtype):
    name, c_in, c_out, d, h, w, pool = layer
    p = make_params(c_in, c_out, (3, 3, 3), dtype=dtype, device="cuda")
    x = torch.randn(2, c_in, d, h, w, device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    check_against_stock(x, p, dtype, f"{name} {dtype}", stride=1, padding=1, dilation=1,
                        activation="relu", negative_slope=0.0, pool=pool)


@triton.jit
def _round_to_tf32_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, round_to_tf32(tl.load(src_ptr + offs, mask=mask)), mask=mask)


def _nearest_tf32(values: torch.Tensor) -> torch.Tensor:
    """The reference: of the two TF32 neighbours of each value (its truncation, and one TF32 ulp
    further from zero), the nearer in exact (float64) arithmetic; ties away from zero."""
    bits = values.view(torch.int32)
    low = (bits & -0x2000).view(torch.float32)
    high = ((bits & -0x2000) + 0x2000).view(torch.float32)
    # past the largest finite float the upper neighbour is 2^128 (rounding there overflows to inf)
    high_exact = torch.where(high.isinf(), high.sign().double() * 2.0 ** 128, high.double())
    d_low = (values.double() - low.double()).abs()
    d_high = (high_exact - values.double()).abs()
    nearest = torch.where(d_high <= d_low, high, low)
    return torch.where(values.isfinite(), nearest, values)


def test_tf32_operands_are_rounded_to_nearest():
    """Tensor cores would truncate fp32 operands to TF32; the kernels round them first, as cuDNN
    does, so TF32 convolutions stay within the parity budget of cuDNN's own TF32 error."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=g) * torch.logspace(-30, 30, 200)
    tf32_values = torch.tensor([1.0, -3.0, 2.0 ** -100, 65504.0])  # their low 13 bits are 0
    ties = (tf32_values.view(torch.int32) + 0x1000).view(torch.float32)  # exactly halfway to the next TF32 value
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4028235e38, 1e-45])
    values = torch.cat([values, ties, special]).to(DEVICE)
    out = torch.empty_like(values)
    _round_to_tf32_kernel[(1,)](values, out, values.numel(), BLOCK=256)
    expected = _nearest_tf32(values.cpu())
    out = out.cpu()
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite]), (values.cpu()[finite][out[finite] != expected[finite]])
    assert torch.equal(out[200:204], (ties.view(torch.int32) + 0x1000).view(torch.float32))  # away from zero
    assert torch.equal(torch.signbit(out[finite]), torch.signbit(expected[finite]))  # -0.0 stays negative


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layer", C3D_LAYERS[1:], ids=lambda layer: layer[0])
def test_c3d_layer_shapes_tf32_on_gpu(layer, monkeypatch):
    """fp32 with allow_tf32 (the default for convolutions): the kernel uses TF32 tensor cores, as
    cuDNN does for these shapes (conv1, C_in = 3, is left out: cuDNN may run it in full fp32), with
    its operands rounded to TF32 (test_tf32_operands_are_rounded_to_nearest), as cuDNN rounds them."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    name, c_in, c_out, d, h, w, pool = layer
    p = make_params(c_in, c_out, (3, 3, 3), dtype=torch.float32, device="cuda")
    x = torch.randn(2, c_in, d, h, w, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    check_against_stock(x, p, torch.float32, f"{name} tf32", stride=1, padding=1, dilation=1,
                        activation="relu", negative_slope=0.0, pool=pool)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last_3d"])
def test_c3d_bn_model_bf16_on_gpu(channels_last):
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn().eval().cuda()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, 112, 112, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        stock_model = copy.deepcopy(model).bfloat16()
        stock_out = stock_model(x.bfloat16())
        fused_model = c3dzoo.c3d_bn(fused=True, backend="triton").cuda()
        fused_model.load_state_dict(model.state_dict())
        fused_model = fused_model.eval().bfloat16()
        fused_out = fused_model(x.bfloat16())
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    assert_parity(fused_out, stock_out, reference, torch.bfloat16, "C3D-BN logits (bf16)")
