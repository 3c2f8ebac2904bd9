"""Parity of the fused op (through the drop-in module) with stock Conv3d → BatchNorm3d → act → MaxPool3d.

Every case compares three runs of the same chain: the fused module in ``dtype``, stock PyTorch
modules in ``dtype``, and stock PyTorch modules in float64 (the reference), all starting from the
same ``dtype``-rounded parameters and input. Checked: output, gradients of the input, conv weight
and bias, BN γ and β, and running_mean / running_var / num_batches_tracked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Optional, Tuple

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct
from c3dzoo.ops import backends as backend_registry
from c3dzoo.ops.conv3d_bn_act import make_config, normalize_pool
from parity import ambiguous_positions, assert_parity


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int = 2
    c_in: int = 4
    c_out: int = 6
    size: Tuple[int, int, int] = (4, 6, 6)
    kernel: Tuple[int, int, int] = (3, 3, 3)
    stride: Tuple[int, int, int] = (1, 1, 1)
    padding: Tuple[int, int, int] = (1, 1, 1)
    dilation: Tuple[int, int, int] = (1, 1, 1)
    bias: bool = True
    activation: str = "relu"
    slope: float = 0.01
    pool: Optional[Tuple] = None
    affine: bool = True
    track_running_stats: bool = True
    momentum: Optional[float] = 0.1
    layout: str = "contiguous"  # or "channels_last", "strided"


CASES = [
    Case("base"),
    Case("batch1", n=1, size=(3, 5, 5)),
    Case("odd_channels", c_in=3, c_out=5),
    Case("stride2", stride=(2, 2, 2), size=(5, 7, 7)),
    Case("dilation2", dilation=(2, 2, 2), padding=(2, 2, 2)),
    Case("no_padding", padding=(0, 0, 0)),
    Case("kernel_133", kernel=(1, 3, 3), padding=(0, 1, 1)),
    Case("kernel_311", kernel=(3, 1, 1), padding=(1, 0, 0)),
    Case("kernel_233_jester", kernel=(2, 3, 3), padding=(0, 0, 0), activation="leaky_relu", slope=0.2),
    Case("no_bias", bias=False),
    Case("act_none", activation="none"),
    Case("leaky", activation="leaky_relu", slope=0.1),
    # not monotone: the pool's choice, the derivative and pool5's padding (-inf → +inf) all differ
    Case("leaky_negative_slope_pool5", activation="leaky_relu", slope=-0.5,
         pool=((2, 2, 2), (2, 2, 2), (0, 1, 1)), size=(4, 7, 7)),
    Case("pool1_c3d", pool=((1, 2, 2), (1, 2, 2), 0)),
    Case("pool2_c3d", pool=((2, 2, 2), (2, 2, 2), 0)),
    Case("pool5_c3d", pool=((2, 2, 2), (2, 2, 2), (0, 1, 1)), size=(4, 7, 7)),
    Case("pool_overlapping", pool=((3, 3, 3), (2, 2, 2), 1), size=(5, 6, 6)),
    Case("affine_false", affine=False),
    Case("no_running_stats", track_running_stats=False),
    Case("momentum_none", momentum=None),
    Case("channels_last", layout="channels_last"),
    Case("non_contiguous", layout="strided"),
]

MODES = ("train", "eval", "train_frozen_bn")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _available_backends():
    return [name for name in backend_registry.names()]


def _build(case: Case, seed: int = 0):
    """Stock modules in float64 with non-trivial BN parameters and buffers."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(case.c_in, case.c_out, case.kernel, case.stride, case.padding, case.dilation,
                     bias=case.bias).double()
    bn = nn.BatchNorm3d(case.c_out, momentum=case.momentum, affine=case.affine,
                        track_running_stats=case.track_running_stats).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * 0.3)
        if case.bias:
            conv.bias.copy_(torch.randn(case.c_out, generator=g, dtype=torch.float64))
        if case.affine:
            bn.weight.copy_(torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(case.c_out, generator=g, dtype=torch.float64) * 0.5)
        if case.track_running_stats:
            bn.running_mean.copy_(torch.randn(case.c_out, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(case.c_out, generator=g, dtype=torch.float64) + 0.5)
            bn.num_batches_tracked.fill_(3)
    pool = nn.MaxPool3d(*case.pool) if case.pool else None
    x = torch.randn((case.n, case.c_in) + case.size, generator=g, dtype=torch.float64)
    return conv, bn, pool, x


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":  # a non-contiguous view with the same values
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    return x


def _set_mode(conv, bn, mode):
    conv.train(mode != "eval")
    bn.train(mode == "train")


def _tie_mask(conv_d, bn_d, conv_ref, bn_ref, pool, x_d, case):
    """Output positions where ReLU / max-pool decisions are within rounding of a tie (see parity.py)."""
    with torch.no_grad():
        z_d = copy.deepcopy(bn_d)(copy.deepcopy(conv_d)(x_d))
        z_ref = copy.deepcopy(bn_ref)(copy.deepcopy(conv_ref)(x_d.double()))
    p = normalize_pool(pool)
    return ambiguous_positions(z_d, z_ref, case.activation, (p[0:3], p[3:6], p[6:9]) if p else None, case.slope)


def _run(conv, bn, pool, x, case, grad_seed, fused_backend=None, skip=None):
    """Forward + backward; returns output and gradients. ``skip``: positions given zero upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    if fused_backend is None:
        y = conv(_layout(x, case.layout))
        y = bn(y)
        if case.activation == "relu":
            y = torch.relu(y)
        elif case.activation == "leaky_relu":
            y = nn.functional.leaky_relu(y, case.slope)
        out = pool(y) if pool is not None else y
    else:
        module = Conv3dBNAct.from_modules(
            conv, bn, nn.LeakyReLU(case.slope) if case.activation == "leaky_relu" else case.activation,
            pool, backend=fused_backend,
        )
        out = module(_layout(x, case.layout))
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    if skip is not None:
        grad = grad.masked_fill(skip, 0.0)
    (out * grad.to(out.dtype)).sum().backward()
    grads = {
        "x.grad": x.grad,
        "conv.weight.grad": conv.weight.grad,
        "conv.bias.grad": conv.bias.grad if conv.bias is not None else None,
        "bn.weight.grad": bn.weight.grad if bn.weight is not None else None,
        "bn.bias.grad": bn.bias.grad if bn.bias is not None else None,
    }
    return out, grads


def _skip_unless_runs(backend: str, case: Case, mode: str, dtype: torch.dtype, conv, bn, pool, x):
    status = c3dzoo.backends()[backend]
    if not status["available"]:
        pytest.skip(f"backend {backend} unavailable: {status['reason']}")
    if backend == "triton" and dtype != torch.float32 and x.device.type == "cpu":
        pytest.skip("the Triton interpreter is checked in fp32 here (fp16 in test_triton_inference.py)")
    norm = "batch" if (mode == "train" or not case.track_running_stats) else "running"
    cfg = make_config(
        x.to(dtype), conv.weight.to(dtype), norm, case.activation, case.stride, case.padding,
        case.dilation, normalize_pool(pool),
    )
    reason = backend_registry._REGISTRY[backend].supports(cfg)
    if reason is not None:
        pytest.skip(f"backend {backend} does not run this configuration (falls back): {reason}")


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity(case: Case, mode: str, dtype: torch.dtype, backend: str):
    conv64, bn64, pool, x64 = _build(case)
    if backend != "reference":
        _skip_unless_runs(backend, case, mode, dtype, conv64, bn64, pool, x64)
    # round parameters and input to dtype once; the reference starts from the same rounded values
    conv_d, bn_d = copy.deepcopy(conv64).to(dtype), copy.deepcopy(bn64).to(dtype)
    x_d = x64.to(dtype)
    conv_ref, bn_ref = copy.deepcopy(conv_d).double(), copy.deepcopy(bn_d).double()
    conv_f, bn_f = copy.deepcopy(conv_d), copy.deepcopy(bn_d)
    for c, b in ((conv_d, bn_d), (conv_ref, bn_ref), (conv_f, bn_f)):
        _set_mode(c, b, mode)

    ties = _tie_mask(conv_d, bn_d, conv_ref, bn_ref, pool, x_d, case)
    out_ref, grads_ref = _run(conv_ref, bn_ref, pool, x_d.double(), case, 1, skip=ties)
    out_stock, grads_stock = _run(conv_d, bn_d, pool, x_d, case, 1, skip=ties)
    out_fused, grads_fused = _run(conv_f, bn_f, pool, x_d, case, 1, fused_backend=backend, skip=ties)

    assert out_fused.dtype == dtype
    assert_parity(out_fused, out_stock, out_ref, dtype, "output")
    for key in grads_ref:
        assert_parity(grads_fused[key], grads_stock[key], grads_ref[key], dtype, key)
    if case.track_running_stats:
        for name in ("running_mean", "running_var"):
            assert_parity(getattr(bn_f, name), getattr(bn_d, name), getattr(bn_ref, name), dtype, name)
        assert bn_f.num_batches_tracked.item() == bn_ref.num_batches_tracked.item()
        assert bn_f.num_batches_tracked.item() == (4 if mode == "train" else 3)
    if mode != "train" and case.track_running_stats:
        # eval-mode BN never touches its statistics
        assert torch.equal(bn_f.running_mean, bn_d.running_mean)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(momentum):
    """Five training steps: running statistics (incl. cumulative average) follow nn.BatchNorm3d."""
    case = Case("steps", momentum=momentum)
    conv64, bn64, pool, _ = _build(case)
    conv_s, bn_s = copy.deepcopy(conv64).float(), copy.deepcopy(bn64).float()
    conv_f, bn_f = copy.deepcopy(conv_s), copy.deepcopy(bn_s)
    fused = Conv3dBNAct.from_modules(conv_f, bn_f, "relu")
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(2, 4, 4, 6, 6, generator=g) * 3 + 2
        with torch.no_grad():
            torch.relu(bn_s(conv_s(x)))
            fused(x)
    assert bn_f.num_batches_tracked.item() == bn_s.num_batches_tracked.item() == 8
    torch.testing.assert_close(bn_f.running_mean, bn_s.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_f.running_var, bn_s.running_var, rtol=1e-5, atol=1e-6)


def test_batch_statistics_sound_when_mean_dominates():
    """|mean| ≫ std: the variance must not be lost to cancellation (E[y²]−E[y]² in fp32 would give
    garbage here: y² ≈ 9e6 has an fp32 spacing of 0.5, the variance is 2e-4)."""
    conv = nn.Conv3d(2, 3, 1, bias=True)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(3000.0)
    bn = nn.BatchNorm3d(3)
    x = torch.randn(2, 2, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 0.01
    conv_ref, bn_ref = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    conv_s, bn_s = copy.deepcopy(conv), copy.deepcopy(bn)
    fused = Conv3dBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), "none")
    out = fused(x)
    out_s = bn_s(conv_s(x))
    out_ref = bn_ref(conv_ref(x.double()))
    assert_parity(out, out_s, out_ref, torch.float32, "output")
    assert_parity(fused.bn.running_var, bn_s.running_var, bn_ref.running_var, torch.float32, "running_var")
    assert_parity(fused.bn.running_mean, bn_s.running_mean, bn_ref.running_mean, torch.float32, "running_mean")


def test_autocast_bf16_matches_stock_autocast():
    case = Case("autocast", pool=((1, 2, 2), (1, 2, 2), 0))
    conv64, bn64, pool, x64 = _build(case)
    conv_s, bn_s = copy.deepcopy(conv64).float(), copy.deepcopy(bn64).float()
    conv_f, bn_f = copy.deepcopy(conv_s), copy.deepcopy(bn_s)
    conv_r, bn_r = copy.deepcopy(conv_s).double(), copy.deepcopy(bn_s).double()
    x = x64.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_s = copy.deepcopy(bn_s)(copy.deepcopy(conv_s)(x))
    z_r = copy.deepcopy(bn_r)(copy.deepcopy(conv_r)(x.double()))
    ties = ambiguous_positions(z_s, z_r, case.activation, ((1, 2, 2), (1, 2, 2), (0, 0, 0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s, grads_s = _run(conv_s, bn_s, pool, x, case, 1, skip=ties)
        out_f, grads_f = _run(conv_f, bn_f, pool, x, case, 1, fused_backend="reference", skip=ties)
    out_r, grads_r = _run(conv_r, bn_r, pool, x.double(), case, 1, skip=ties)
    # the fused op returns the autocast dtype, as stock does on CUDA (CPU autocast runs batch_norm,
    # and so everything after it, in fp32)
    assert out_f.dtype == torch.bfloat16
    assert_parity(out_f, out_s, out_r, torch.bfloat16, "output")
    for key in grads_r:
        assert grads_f[key] is None or grads_f[key].dtype == torch.float32, key  # fp32 master weights
        assert_parity(grads_f[key], grads_s[key], grads_r[key], torch.bfloat16, key)
    assert_parity(bn_f.running_var, bn_s.running_var, bn_r.running_var, torch.bfloat16, "running_var")


def test_torch_compile_traces_the_fused_op():
    case = Case("compile", pool=((2, 2, 2), (2, 2, 2), 0))
    conv64, bn64, pool, x64 = _build(case)
    conv_s, bn_s = copy.deepcopy(conv64).float(), copy.deepcopy(bn64).float()
    fused = Conv3dBNAct.from_modules(copy.deepcopy(conv_s), copy.deepcopy(bn_s), "relu", pool)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = x64.float().requires_grad_(True)
    out = compiled(x)
    out.sum().backward()
    ref = pool(torch.relu(bn_s(conv_s(x64.float()))))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, bn_s.running_mean)
    assert fused.bn.num_batches_tracked.item() == bn_s.num_batches_tracked.item()
    assert x.grad is not None and fused.conv.weight.grad is not None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eager_path_and_custom_ops_give_the_same_results(backend):
    """Plain tensors in eager mode run the op's implementation through an autograd.Function; under a
    dispatch mode (as with FakeTensor, or torch.compile's tracing) the custom ops run. Same
    implementation: outputs, every gradient and the running statistics agree bit for bit, and the
    mode sees the custom ops (the forward, its backward, the running-statistics update)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if backend == "triton":
        from interpreter import skip_unless_triton_runs_cpu_tensors

        skip_unless_triton_runs_cpu_tensors()

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 3, 6, 6, generator=g)
    base = Conv3dBNAct(4, 6, 3, padding=1, activation="relu", pool=((1, 2, 2), (1, 2, 2), 0), backend=backend)
    results = []
    for use_mode in (False, True):
        module = copy.deepcopy(base).train()
        x = x0.clone().requires_grad_(True)
        recorder = Recorder()
        with recorder if use_mode else contextlib.nullcontext():
            out = module(x)
            out.square().sum().backward()
        tensors = [out.detach(), x.grad, *(p.grad for p in module.parameters()), *module.buffers()]
        results.append((tensors, recorder.ops))
    (eager, eager_ops), (dispatched, dispatched_ops) = results
    assert eager_ops == set()
    assert {"c3dzoo.conv3d_bn_act_forward", "c3dzoo.conv3d_bn_act_backward",
            "c3dzoo.bn_update_running_stats_"} <= dispatched_ops, dispatched_ops
    for a, b in zip(eager, dispatched):
        assert torch.equal(a, b)
