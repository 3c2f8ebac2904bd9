"""Backend choice: argument, then $C3DZOO_BACKEND, then the best available; fallbacks say why."""

import warnings

import pytest
import torch

import c3dzoo
from c3dzoo.ops import backends as registry
from c3dzoo.ops import conv3d_bn_act


def _call(**kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 5, 5, generator=g)
    w = torch.randn(3, 2, 3, 3, 3, generator=g)
    return conv3d_bn_act(x, w, None, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3),
                         training=False, padding=1, **kwargs)


def test_backends_report_availability_and_reasons():
    status = c3dzoo.backends()
    assert list(status) == ["cuda", "triton", "reference"]  # order of preference
    assert status["reference"] == {"available": True, "reason": None}
    for name, info in status.items():
        assert isinstance(info["available"], bool)
        if not info["available"]:
            assert isinstance(info["reason"], str) and info["reason"], name


def test_cuda_backend_unavailable_without_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU reason cannot be observed")
    reason = c3dzoo.backends()["cuda"]["reason"]
    assert "c3dzoo._C" in reason or "CUDA" in reason


def test_auto_never_picks_the_interpreter_on_cpu():
    cfg = registry.ConvBNActConfig("running", "relu", (1,) * 3, (1,) * 3, (1,) * 3, (3,) * 3, (),
                                   "torch.float32", "cpu", 2, 3)
    assert registry.resolve(None, cfg) == "reference"
    assert registry.resolve("auto", cfg) == "reference"


def test_environment_variable_selects_backend(monkeypatch):
    cfg = registry.ConvBNActConfig("running", "relu", (1,) * 3, (1,) * 3, (1,) * 3, (3,) * 3, (),
                                   "torch.float32", "cpu", 2, 3)
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.requested_backend(None) == "reference"
    assert registry.requested_backend("auto") == "auto"  # the argument wins over the environment
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="C3DZOO_BACKEND"):
        registry.resolve(None, cfg)


def test_the_remembered_choice_follows_the_environment(monkeypatch):
    """resolve() remembers its answers; a change of what the choice reads (C3DZOO_BACKEND, the
    interpreter switch) must still change the answer on the next call."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: triton under the interpreter
    cfg = registry.ConvBNActConfig("running", "relu", (1,) * 3, (1,) * 3, (1,) * 3, (3,) * 3, (),
                                   "torch.float32", device, 2, 3)
    if registry.backends()["triton"]["reason"] is not None:
        pytest.skip(f"the triton backend is unavailable here: {registry.backends()['triton']['reason']}")
    registry.clear_fallbacks()  # the fallback below is warned about once per configuration
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.resolve(None, cfg) == "triton"
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert registry.resolve(None, cfg) == "reference"
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.resolve(None, cfg) == "triton"
    if device == "cuda":
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need the interpreter
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        assert registry.resolve(None, cfg) == "reference"


def test_unavailable_backend_falls_back_with_reason(monkeypatch):
    registry.clear_fallbacks()
    reason = c3dzoo.backends()["cuda"]["reason"]
    if reason is None:
        pytest.skip("the cuda backend is available here")
    with pytest.warns(RuntimeWarning, match="backend 'cuda' cannot run this call"):
        out = _call(backend="cuda")
    ref = _call(backend="reference")
    torch.testing.assert_close(out, ref)
    recorded = c3dzoo.fallbacks()
    assert any(key.startswith("cuda:") and value == reason for key, value in recorded.items())
    # warned once per configuration, not per call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(backend="cuda")


def test_interpreter_switched_on_after_the_kernels_were_compiled_is_refused():
    """TRITON_INTERPRET=1 set after the Triton kernels were imported (so built for a GPU): CPU
    tensors must go to stock ops with the reason, never be handed to a compiled kernel."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = "\n".join([
        "import os, torch",
        "import c3dzoo.kernels.bn_act_pool, c3dzoo.kernels.conv3d_bias_act_pool",
        "from c3dzoo.ops import _normalize, triton_impl",
        "os.environ['TRITON_INTERPRET'] = '1'",
        "print(_normalize.kernel_available(torch.zeros(2)))",
        "from c3dzoo.ops.backends import ConvBNActConfig",
        "cfg = ConvBNActConfig('running', 'relu', (1,)*3, (1,)*3, (1,)*3, (3,)*3, (), 'torch.float32', 'cpu', 2, 3)",
        "print(triton_impl.supports(cfg))",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    available, reason = done.stdout.strip().splitlines()[-2:]
    assert available == "False" and "was set after the Triton kernels were imported" in reason
