"""``torch.library.opcheck`` of the fused op's custom ops: the schema, the autograd registration, the
fake implementation (output shapes, dtypes, strides and layouts against what the real op returns,
which torch.compile, torch.export and AOTInductor trace with), and a run through AOT autograd with
dynamic shapes.

The forward's fifth output (the pool's argmax, kept only by the reference backend, only with a kept
conv output, a pool and an activation that commutes with it) has a shape, a dtype and a layout its
fake must predict, so the cases cover both layouts, each activation and every norm. The triton
backend's case runs its kernels under the Triton interpreter (CPU, tiny shapes).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from c3dzoo.ops import backends, normalize_pool
from interpreter import skip_unless_triton_runs_cpu_tensors

FORWARD = torch.ops.c3dzoo.conv3d_bn_act_forward.default
BACKWARD = torch.ops.c3dzoo.conv3d_bn_act_backward.default
UPDATE_RUNNING_STATS = torch.ops.c3dzoo.bn_update_running_stats_.default
POOL = list(normalize_pool(((1, 2, 2), (1, 2, 2), (0, 0, 0))))
C_IN, C_OUT = 4, 5


def _layer_tensors(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C_IN, 4, 6, 6, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(C_OUT, C_IN, 3, 3, 3, generator=g) * 0.2
    bias = torch.randn(C_OUT, generator=g) * 0.1
    gamma = torch.rand(C_OUT, generator=g) + 0.5
    beta = torch.randn(C_OUT, generator=g) * 0.1
    running_mean = torch.randn(C_OUT, generator=g) * 0.1
    running_var = torch.rand(C_OUT, generator=g) + 0.5
    tensors = [x, weight, bias, gamma, beta]
    return ([t.requires_grad_() for t in tensors], running_mean, running_var)


def _input_stats(seed=1):
    """A deferred BatchNorm's (mean, var, γ, β) of x's channels, for the input prologue."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(C_IN, generator=g), torch.rand(C_IN, generator=g) + 0.5,
                        torch.rand(C_IN, generator=g) + 0.5, torch.randn(C_IN, generator=g)]).requires_grad_()


def _forward_args(norm, activation, pool, layout, keep, backend="reference", prologue=None):
    """The forward op's arguments; ``prologue``: the input prologue's activation (x is then a
    previous layer's raw conv output, normalised by ``_input_stats`` on the way in)."""
    tensors, running_mean, running_var = _layer_tensors(layout)
    running = norm == "running"
    input_norm = (None, 0.0, "none", 0.0) if prologue is None else (_input_stats(), 1e-5, prologue, 0.01)
    return (*tensors, running_mean if running else None, running_var if running else None, norm, 1e-5,
            [1, 1, 1], [1, 1, 1], [1, 1, 1], activation, 0.01, pool, *input_norm, backend, keep)


LAYOUTS = {"ncdhw": torch.contiguous_format, "channels_last": torch.channels_last_3d}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("norm,activation,pool,keep,prologue", [
    ("batch", "relu", POOL, True, None),        # conv output and argmax kept
    ("batch", "none", POOL, True, None),        # argmax kept, no dead windows
    ("batch", "leaky_relu", POOL, True, None),  # conv output kept, no argmax (stock's order)
    ("batch", "relu", POOL, False, None),       # nothing kept
    ("batch", "relu", None, True, None),        # no pool: conv output only
    ("stats", "none", None, False, None),       # a deferred BatchNorm's layer
    ("batch", "relu", POOL, True, "relu"),      # the layer after it: input prologue
    ("stats", "none", None, False, "silu"),     # a deferred layer after a deferred layer
    ("running", "relu", POOL, False, None),     # BatchNorm folded
    ("none", "silu", POOL, False, None),        # no BatchNorm
], ids=lambda v: str(v) if not isinstance(v, list) else "pool")
def test_forward_op(norm, activation, pool, keep, prologue, layout):
    args = _forward_args(norm, activation, pool, LAYOUTS[layout], keep, prologue=prologue)
    outputs = FORWARD(*args)
    kept_argmax = norm == "batch" and keep and pool is not None and activation in ("relu", "none")
    assert (outputs[4].numel() > 0) == kept_argmax and outputs[4].dtype == torch.int32
    torch.library.opcheck(FORWARD, args)


def test_forward_op_on_the_triton_backend():
    skip_unless_triton_runs_cpu_tensors()
    args = _forward_args("batch", "relu", POOL, torch.contiguous_format, True, backend="triton", prologue="relu")
    outputs = FORWARD(*args)
    assert outputs[0].is_contiguous(memory_format=torch.channels_last_3d)
    assert outputs[4].numel() == 0  # its backward kernels find the pool's argmax again
    torch.library.opcheck(FORWARD, args, test_utils=("test_schema", "test_faketensor"))


def test_forward_op_of_a_gpu_backend_on_cpu_tensors():
    """The op carries the backend chosen when it was called or traced; given tensors that backend
    cannot take, it runs the reference backend (``backends.runnable_on``), and its fake says what
    that returns: x's layout, the reference's argmax."""
    args = _forward_args("batch", "relu", POOL, torch.contiguous_format, True, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's (said once per reason)
        outputs = FORWARD(*args)
        assert outputs[0].is_contiguous() and outputs[4].numel() > 0
        torch.library.opcheck(FORWARD, args)
    assert any(key.startswith("cuda: ") for key in backends.fallbacks())


def test_forward_op_on_a_registered_backend_that_keeps_no_argmax(monkeypatch):
    """A backend registered from outside, whose implementation says nothing of a pool argmax
    (no ``keeps_pool_argmax``) and returns none: the fake says none either."""
    from c3dzoo.ops import reference

    class KeepsNoArgmax:
        def forward(self, *args, **kwargs):
            out, mean, var, conv_output, _ = reference.forward(*args, **kwargs)
            return out, mean, var, conv_output, reference.no_pool_argmax(out)

        def backward(self, *args):
            return reference.backward(*args)

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register(backends.Backend("outside", lambda: None, lambda cfg: None, KeepsNoArgmax))
    args = _forward_args("batch", "relu", POOL, torch.contiguous_format, True, backend="outside")
    assert FORWARD(*args)[4].numel() == 0
    torch.library.opcheck(FORWARD, args)


@pytest.mark.parametrize("prologue", [None, "relu"], ids=["plain", "prologue"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_op(layout, keep, prologue):
    forward_args = _forward_args("batch", "relu", POOL, LAYOUTS[layout], keep, prologue=prologue)
    with torch.no_grad():
        out, mean, var, conv_output, argmax = FORWARD(*forward_args)
    tensors = [t.detach() for t in forward_args[:5]]
    stats = None if prologue is None else forward_args[15].detach()
    grad_out = torch.randn(out.shape).contiguous(memory_format=LAYOUTS[layout])
    args = (grad_out, *tensors, None, None, mean, var, conv_output if keep else None, argmax, "batch", 1e-5,
            [1, 1, 1], [1, 1, 1], [1, 1, 1], "relu", 0.01, POOL, stats, *forward_args[16:19], "reference",
            [True, True, True, True, True, stats is not None])
    grads = BACKWARD(*args)
    assert [tuple(g.shape) for g in grads[:5]] == [tuple(t.shape) for t in tensors]
    assert tuple(grads[5].shape) == ((0,) if stats is None else tuple(stats.shape))
    torch.library.opcheck(BACKWARD, args)


def test_update_running_stats_op():
    g = torch.Generator().manual_seed(0)
    args = (torch.zeros(C_OUT), torch.ones(C_OUT), torch.zeros((), dtype=torch.long),
            torch.randn(C_OUT, generator=g), torch.rand(C_OUT, generator=g), 64, 0.1, "reference")
    torch.library.opcheck(UPDATE_RUNNING_STATS, args)
