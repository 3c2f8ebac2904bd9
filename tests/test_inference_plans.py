"""Inference plans: an eager inference call of ``conv3d_bn_act`` (BatchNorm folded or absent, nothing
needing a gradient) keeps what its checks and backend choice decided, and the next call like it runs
that directly. These tests hold the plans to the contract of the full path: the same result, every
setting, tensor property and choice state that the full path reads is seen, bad input still gets
its clear error, and what is recorded about fallbacks is recorded again after ``clear_fallbacks()``.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.nn.conv_bn_act import conv_bn_act, stock_conv_bn_act
from c3dzoo.ops import backends, conv3d_bn_act
from interpreter import skip_unless_triton_runs_cpu_tensors

ops_module = importlib.import_module("c3dzoo.ops.conv3d_bn_act")  # (the package exports a function of that name)

BACKENDS = ["reference", "triton"]


@pytest.fixture
def full_path_calls(monkeypatch):
    """The calls that took the full path (which checks its arguments, once a call), counted from an
    empty plan store."""
    calls = []
    original = ops_module._check_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops_module, "_check_inputs", counted)
    ops_module._INFERENCE_PLANS.clear()
    yield calls
    ops_module._INFERENCE_PLANS.clear()


def _ready(backend):
    if backend == "triton":
        skip_unless_triton_runs_cpu_tensors()


def _layer(c_in=3, c_out=5, seed=0, dtype=torch.float32):
    """An eval-mode Conv3d and BatchNorm3d with running statistics far from the defaults."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(c_in, c_out, 3, padding=1).to(dtype)
    bn = nn.BatchNorm3d(c_out).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    return conv, bn


def _stock(x, conv, bn, activation="relu", slope=0.01, pool=None):
    with torch.no_grad():
        return stock_conv_bn_act(x, conv, bn, activation, slope, pool)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_second_eval_call_runs_the_kept_plan(full_path_calls, backend):
    _ready(backend)
    conv, bn = _layer()
    pool = nn.MaxPool3d((1, 2, 2))
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        first = conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)
        second = conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)
        other_clip = conv_bn_act(x.flip(0), conv, bn, "relu", 0.0, pool, backend)
    assert len(full_path_calls) == 1, "one full call, then the plan"
    assert len(ops_module._INFERENCE_PLANS) == 1
    assert torch.equal(first, second)
    _close(first, _stock(x, conv, bn, pool=pool))
    _close(other_clip, _stock(x.flip(0), conv, bn, pool=pool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plan_keeps_the_output_layout_of_each_call(full_path_calls, backend):
    """Layouts are not in the key: a channels_last_3d call after a contiguous one (same shapes) runs
    the plan, and each output has the layout its own call asks for (stock's, by default)."""
    _ready(backend)
    conv, bn = _layer()
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        contiguous = conv_bn_act(x, conv, bn, "relu", 0.0, None, backend)
        last = conv_bn_act(x.to(memory_format=torch.channels_last_3d), conv, bn, "relu", 0.0, None, backend)
    assert len(full_path_calls) == 1
    assert contiguous.is_contiguous()
    assert contiguous.view(-1).numel() == contiguous.numel()  # stock's layout: views work
    _close(last, contiguous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_that_needs_a_gradient_takes_the_full_path(full_path_calls, backend):
    _ready(backend)
    conv, bn = _layer()
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        conv_bn_act(x, conv, bn, "relu", 0.0, None, backend)
    assert len(ops_module._INFERENCE_PLANS) == 1
    out = conv_bn_act(x, conv, bn, "relu", 0.0, None, backend)  # grad enabled, parameters require it
    assert len(full_path_calls) == 2 and len(ops_module._INFERENCE_PLANS) == 1, \
        "a call with a backward to follow takes the full path and keeps no plan"
    out.square().sum().backward()
    fused_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    stock_conv_bn_act(x, conv, bn, "relu", 0.0).square().sum().backward()
    _close(fused_grad, conv.weight.grad)


def _change_eps(x, conv, bn, pool):
    bn.eps = 0.5
    return x, pool


def _change_pool_module(x, conv, bn, pool):
    pool.kernel_size, pool.stride = (2, 2, 2), (2, 2, 2)  # the same module object, other settings
    return x, pool


def _change_batch(x, conv, bn, pool):
    return torch.randn(3, *x.shape[1:]), pool


def _change_dtype(x, conv, bn, pool):
    conv.double(), bn.double()
    return x.double(), pool


def _change_weights_in_place(x, conv, bn, pool):
    with torch.no_grad():
        conv.weight.mul_(-1)
        bn.running_var.mul_(3)
    return x, pool


def _change_parameter_object(x, conv, bn, pool):
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))
    return x, pool


CHANGES = {
    "bn_eps": _change_eps,
    "pool_module_settings": _change_pool_module,
    "batch_size": _change_batch,
    "dtype": _change_dtype,
    "weights_in_place": _change_weights_in_place,
    "new_parameter": _change_parameter_object,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_after_the_plan_is_seen(full_path_calls, backend, change):
    """Each change gives another result; the fused call after it matches stock after it."""
    _ready(backend)
    if backend == "triton" and change == "dtype":
        pytest.skip("float64 runs on 'reference' (the triton backend has no fp64 path)")
    conv, bn = _layer()
    pool = nn.MaxPool3d((1, 2, 2))
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        before = conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)
        conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)  # the plan
        x, pool = CHANGES[change](x, conv, bn, pool)
        after = conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)
    expected = _stock(x, conv, bn, pool=pool)
    assert (before.shape != expected.shape or before.dtype != expected.dtype
            or not torch.allclose(before, expected)), "the change must change the result, or this test shows nothing"
    _close(after, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_after_a_kept_plan_gets_its_error(full_path_calls, backend):
    _ready(backend)
    conv, bn = _layer()
    x = torch.randn(2, 3, 4, 6, 6)

    def call(x, **kwargs):
        return conv3d_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                             training=False, padding=1, backend=backend, **kwargs)

    with torch.no_grad():
        call(x)
        call(x)
        assert len(full_path_calls) == 1
        with pytest.raises(ValueError, match="channels"):
            call(torch.randn(2, 4, 4, 6, 6))
        with pytest.raises(TypeError, match="conv_weight is torch.float32"):
            call(x.double())
        with pytest.raises(ValueError, match="too small"):
            call(torch.randn(2, 3, 4, 6, 6)[..., :0, :])
        with pytest.raises(ValueError, match="residual must be a floating-point tensor of the output's shape"):
            call(x, residual=torch.randn(2, 5, 4, 6, 5))
        with pytest.raises(ValueError, match="layout"):
            call(x, layout="channels_last")


def test_autocast_is_part_of_the_plan(full_path_calls):
    conv, bn = _layer()
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        plain = conv_bn_act(x, conv, bn, "relu", 0.0, None, "reference")
        conv_bn_act(x, conv, bn, "relu", 0.0, None, "reference")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = conv_bn_act(x, conv, bn, "relu", 0.0, None, "reference")
            cast_again = conv_bn_act(x, conv, bn, "relu", 0.0, None, "reference")
    assert plain.dtype == torch.float32 and cast.dtype == cast_again.dtype == torch.bfloat16
    assert len(full_path_calls) == 2, "one full call per autocast state"
    assert torch.equal(cast, cast_again)
    torch.testing.assert_close(cast.float(), plain, rtol=3e-2, atol=3e-2)


def test_the_backend_variable_and_cleared_fallbacks_are_seen(full_path_calls, monkeypatch):
    """A plan made under one ``C3DZOO_BACKEND`` is not run under another; after ``clear_fallbacks()``
    a call that falls back records its reason again, as the full path does."""
    skip_unless_triton_runs_cpu_tensors()
    conv, bn = _layer(dtype=torch.float64)
    x = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the fallback's warning, once)
        conv_bn_act(x, conv, bn, "relu", 0.0, None)
        assert any("float64" in reason for reason in c3dzoo.fallbacks().values())
        conv_bn_act(x, conv, bn, "relu", 0.0, None)
        assert len(full_path_calls) == 1
        backends.clear_fallbacks()
        assert c3dzoo.fallbacks() == {}
        conv_bn_act(x, conv, bn, "relu", 0.0, None)
        assert len(full_path_calls) == 2
        assert any("float64" in reason for reason in c3dzoo.fallbacks().values()), "recorded again"
        monkeypatch.setenv(backends.ENV_VAR, "reference")
        backends.clear_fallbacks()
        conv_bn_act(x, conv, bn, "relu", 0.0, None)
        assert len(full_path_calls) == 3 and c3dzoo.fallbacks() == {}


def test_a_choice_waiting_to_measure_is_not_kept(full_path_calls, monkeypatch):
    """Where "auto" has several contenders and may not measure now (a CUDA graph being captured),
    it answers by preference for now: that answer is not kept, so a later call measures."""
    registry = dict(backends._REGISTRY)
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "PREFERENCE", ("slow", "fast", "reference"))
    reference = backends.get("reference")
    ran = []

    def recording(name):
        class Recording:  # a backend without the residual epilogue: its forward takes no residual
            @staticmethod
            def forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params, input_norm=None, *,
                        keep_conv_output=False):
                ran.append(name)
                return reference.forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, params,
                                         input_norm, keep_conv_output=keep_conv_output)
        return Recording

    for name in ("slow", "fast"):
        backends.register(backends.Backend(name, lambda: None, lambda cfg: None, lambda name=name: recording(name)))
    allowed = {"now": False}
    old_timer, old_can = backends._timer, backends._can_measure
    backends.set_timer(lambda name, cfg: {"slow": 2.0, "fast": 1.0}[name], lambda: allowed["now"])
    monkeypatch.delenv(backends.AUTOTUNE_ENV_VAR, raising=False)
    try:
        conv, bn = _layer()
        x = torch.randn(2, 3, 4, 6, 6)
        with torch.no_grad():
            conv_bn_act(x, conv, bn, "relu", 0.0, None, "auto")
            conv_bn_act(x, conv, bn, "relu", 0.0, None, "auto")
            assert ran == ["slow", "slow"] and len(full_path_calls) == 2, "no plan while the choice waits"
            allowed["now"] = True
            conv_bn_act(x, conv, bn, "relu", 0.0, None, "auto")
            conv_bn_act(x, conv, bn, "relu", 0.0, None, "auto")
        assert ran[2:] == ["fast", "fast"] and len(full_path_calls) == 3
    finally:
        backends.set_timer(old_timer, old_can)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_residual_epilogue_keeps_its_plan(full_path_calls, backend):
    _ready(backend)
    conv, bn = _layer(c_in=5, c_out=5)
    x = torch.randn(2, 5, 4, 6, 6)
    shortcut = torch.randn(2, 5, 4, 6, 6)
    with torch.no_grad():
        first = conv_bn_act(x, conv, bn, "relu", 0.0, None, backend, residual=shortcut)
        second = conv_bn_act(x, conv, bn, "relu", 0.0, None, backend, residual=shortcut)
        expected = torch.relu(bn(conv(x)) + shortcut)
    assert len(full_path_calls) == 1 and torch.equal(first, second)
    _close(second, expected)


def test_a_fused_models_second_eval_forward_runs_only_plans(full_path_calls):
    model = c3dzoo.c3d_bn(num_classes=7, width_mult=0.125, input_size=(16, 32, 32), fused=True,
                          backend="reference").eval()
    stock = c3dzoo.c3d_bn(num_classes=7, width_mult=0.125, input_size=(16, 32, 32)).eval()
    stock.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 32, 32)
    with torch.no_grad():
        first = model(x)
        chains = len(full_path_calls)
        second = model(x)
        expected = stock(x)
    assert chains == 8 and len(full_path_calls) == chains, "every chain of the second forward runs its plan"
    assert torch.equal(first, second)
    _close(second, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_plans_on_a_gpu(full_path_calls, backend):
    """C3D's stem in bf16 on the GPU: "auto" measures its contenders (CUDA stem, Triton) on the first
    call, which then keeps its plan; the next call runs it, bit for bit the same."""
    conv, bn = _layer(c_in=3, c_out=64)
    conv, bn = conv.cuda().bfloat16(), bn.cuda().bfloat16()
    pool = nn.MaxPool3d((1, 2, 2))
    x = torch.randn(4, 3, 16, 56, 56, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        first = conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)
        second = conv_bn_act(x, conv, bn, "relu", 0.0, pool, backend)
        expected = _stock(x, conv, bn, pool=pool)
    assert len(full_path_calls) == 1 and len(ops_module._INFERENCE_PLANS) == 1
    assert torch.equal(first, second)
    torch.testing.assert_close(second.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
