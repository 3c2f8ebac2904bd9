"""NaN goes where it goes in stock modules: a diverging run (or an fp16 overflow under a GradScaler)
must show as NaN, not turn into numbers.

The kernels had stock's NaN semantics nowhere: their ReLU was ``where(y > 0, y, 0)`` (NaN → 0),
their pool max was Triton's default maximum, which returns the non-NaN operand (so even a conv with
no activation and no pool turned NaN into -inf: the output tile is a one-element pool), and the batch
variance clamp dropped NaN too. The CUDA stem had the same three. Now relu keeps NaN, the pool
takes it (as MaxPool3d does) and the statistics carry it into running_mean / running_var."""

import copy

import pytest
import torch
from torch import nn

from c3dzoo.nn import Conv3dBNAct
from c3dzoo.ops import cuda_impl, reference
from c3dzoo.ops.backends import LayerParams
from c3dzoo.ops.conv3d_bn_act import normalize_pool
from interpreter import skip_unless_triton_runs_cpu_tensors

POOLS = {"no_pool": None, "pool1": ((1, 2, 2), (1, 2, 2), 0), "pool5": ((2, 2, 2), (2, 2, 2), (0, 1, 1))}
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "none": nn.Identity, "silu": nn.SiLU}


def _x_with_nan(c_in=3):
    x = torch.randn(2, c_in, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    x[0, 0, 1, 2, 3] = float("nan")
    return x


def _same_nans(got, expected, what):
    assert torch.equal(got.isnan(), expected.isnan()), (
        f"{what}: NaN at {int(got.isnan().sum())} places, stock {int(expected.isnan().sum())}")
    finite = ~expected.isnan()
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_nan_propagates_as_in_stock(backend, pool, activation, mode):
    if backend == "triton":
        skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    fused = Conv3dBNAct(3, 4, 3, padding=1, pool=POOLS[pool], activation=activation, backend=backend)
    twin = copy.deepcopy(fused)
    stock = nn.Sequential(twin.conv, twin.bn, ACTIVATIONS[activation](), *([twin.pool] if twin.pool else []))
    fused.train(mode == "train")
    stock.train(mode == "train")
    x_fused = _x_with_nan().requires_grad_(True)
    x_stock = _x_with_nan().requires_grad_(True)
    out, expected = fused(x_fused), stock(x_stock)
    assert expected.isnan().any()
    _same_nans(out, expected, "output")
    out.sum().backward()
    expected.sum().backward()
    _same_nans(x_fused.grad, x_stock.grad, "x.grad")
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        if name == "0.bias" and mode == "train":
            continue  # before a training-mode BN the exact gradient is 0: the fused op returns 0
        _same_nans(q.grad, p.grad, name)
    for (name, b), c in zip(stock.named_buffers(), fused.buffers()):
        assert torch.equal(c.double().isnan(), b.double().isnan()), name  # running_mean/var NaN too


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "none"])
@pytest.mark.parametrize("pool", ["no_pool", "pool1", "pool5"])
def test_cuda_stem_propagates_nan_on_the_host_build(activation, pool, monkeypatch):
    """The CUDA stem's per-element math (built for the host): inference and training statistics."""
    pytest.importorskip("c3dzoo._C_host", reason="c3dzoo._C_host is not built")
    from host_lib import use_host_extension

    use_host_extension(monkeypatch)
    torch.manual_seed(0)
    conv, bn = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)
    x = _x_with_nan()
    for norm in ("running", "batch"):
        params = LayerParams.of(norm, 1e-5, (1, 1, 1), (1, 1, 1), (1, 1, 1), activation, 0.01,
                                normalize_pool(POOLS[pool]))
        args = (x, conv.weight.detach(), conv.bias.detach(), bn.weight.detach(), bn.bias.detach(),
                bn.running_mean, bn.running_var)
        got, mean, var, _, _ = cuda_impl.forward(*args, params)
        expected, stock_mean, stock_var, _, _ = reference.forward(*args, params)
        assert expected.isnan().any()
        _same_nans(got, expected, f"stem {norm} output")
        if norm == "batch":
            assert torch.equal(mean.isnan(), stock_mean.isnan()) and torch.equal(var.isnan(), stock_var.isnan())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the compiled kernels' NaN "
                    "semantics (PTX max.NaN, selects) are what this checks")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("pool", ["no_pool", "pool1", "pool5"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_nan_propagates_on_gpu(backend, pool, mode):
    """The compiled kernels (Triton and the CUDA stem: 3 input channels) on CUDA tensors, fp32."""
    torch.manual_seed(0)
    fused = Conv3dBNAct(3, 16, 3, padding=1, pool=POOLS[pool], backend=backend).cuda()
    twin = copy.deepcopy(fused)
    stock = nn.Sequential(twin.conv, twin.bn, nn.ReLU(), *([twin.pool] if twin.pool else []))
    fused.train(mode == "train")
    stock.train(mode == "train")
    x = _x_with_nan().cuda()
    with torch.backends.cudnn.flags(allow_tf32=False):
        out, expected = fused(x), stock(x)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan()), (int(out.isnan().sum()), int(expected.isnan().sum()))
    for (name, b), c in zip(stock.named_buffers(), fused.buffers()):
        assert torch.equal(c.double().isnan(), b.double().isnan()), name
