"""The residual epilogue: a residual block's last conv adds the block's shortcut before its
activation, ``act(bn(conv(x)) + shortcut)``, in one pass of the Triton inference kernel.

Kernel and op under the Triton interpreter on CPU (fp32 and fp16, tiny shapes), held to the parity
budget against float64; the op's stock composition wherever the epilogue does not apply
(training, gradients); the zoo's residual blocks taking it, and leaving it to stock wherever a
hook must see the branch's own output.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import c3dzoo
import c3dzoo.ops.triton_impl as triton_impl
from c3dzoo.kernels import conv3d_bias_act_pool as K
from c3dzoo.ops import conv3d_bn_act
from interpreter import skip_unless_triton_runs_cpu_tensors
from parity import assert_parity
from test_triton_inference import make_params, stock

CPU_DTYPES = [torch.float32, torch.float16]
ops_module = importlib.import_module("c3dzoo.ops.conv3d_bn_act")  # (the package exports a function of that name)

# (C_in, C_out, kernel, stride, padding, activation, input N, D, H, W): the zoo's block endings
# (a ResNet-50's 1×1×1 conv_c, R3D's 3×3×3, R(2+1)D's 3×1×1), odd channels, a strided conv
CASES = {
    "cin20_k111_relu_bottleneck": (20, 24, (1, 1, 1), 1, 0, "relu", (2, 3, 5, 5)),
    "cin5_k333_relu_basic": (5, 7, (3, 3, 3), 1, 1, "relu", (2, 3, 6, 6)),
    "cin6_k311_leaky_temporal": (6, 9, (3, 1, 1), 1, (1, 0, 0), "leaky_relu", (1, 4, 5, 5)),
    "cin5_k133_stride2_none": (5, 7, (1, 3, 3), (1, 2, 2), (0, 1, 1), "none", (2, 3, 7, 7)),
}


@pytest.fixture(autouse=True)
def _interpreter_and_no_stale_fallbacks():
    skip_unless_triton_runs_cpu_tensors()
    c3dzoo.ops.backends.clear_fallbacks()
    yield


def _residual_launches(monkeypatch) -> list:
    """The residual tensors the inference kernel's launcher is given, one entry per launch."""
    seen, real = [], K.conv3d_bias_act_pool

    def spy(*args, residual=None, **kwargs):
        seen.append(residual)
        return real(*args, residual=residual, **kwargs)

    monkeypatch.setattr(K, "conv3d_bias_act_pool", spy)
    monkeypatch.setattr(triton_impl, "conv3d_bias_act_pool", spy)
    return seen


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_op_adds_the_residual_in_the_kernel_epilogue(name, dtype, monkeypatch):
    """eval-mode conv → BN (folded) → + residual → activation in one launch, within the parity
    budget of stock's op-by-op sum against float64; the residual in either layout."""
    c_in, c_out, kernel, stride, padding, activation, size = CASES[name]
    p = make_params(c_in, c_out, kernel, dtype=dtype, device="cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(size[0], c_in, *size[1:], generator=gen).to(dtype)
    geometry = dict(stride=stride, padding=padding, dilation=1, activation="none", negative_slope=0.2, pool=None)
    shape = stock(x, p, dtype=torch.float32, **geometry).shape
    residual = torch.randn(shape, generator=gen).to(dtype)
    if "stride2" in name:
        residual = residual.contiguous(memory_format=torch.channels_last_3d)

    def reference(dt):
        z = stock(x, p, dtype=dt, **geometry) + residual.to(dt)
        return {"relu": F.relu, "none": lambda t: t, "leaky_relu": lambda t: F.leaky_relu(t, 0.2)}[activation](z)

    launches = _residual_launches(monkeypatch)
    out = conv3d_bn_act(x, p["weight"], p["bias"], p["bn_weight"], p["bn_bias"], p["running_mean"],
                        p["running_var"], training=False, stride=stride, padding=padding, activation=activation,
                        negative_slope=0.2, backend="triton", residual=residual)
    assert len(launches) == 1 and launches[0] is residual  # one kernel launch, given the residual
    assert out.dtype == dtype and out.shape == shape
    assert_parity(out, reference(dtype), reference(torch.float64), dtype, name)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()


def test_training_and_gradients_compose_with_stock_ops(monkeypatch):
    """Batch statistics, or a residual that needs a gradient: the layer runs without activation,
    then the sum and activation as stock ops, so autograd takes both (the gradients match stock's)."""
    p = make_params(5, 7, (3, 3, 3), dtype=torch.float32, device="cpu")
    x = torch.randn(2, 5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    residual = torch.randn(2, 7, 3, 6, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    launches = _residual_launches(monkeypatch)
    for training in (True, False):
        mean, var = p["running_mean"].clone(), p["running_var"].clone()
        out = conv3d_bn_act(x, p["weight"], None, p["bn_weight"], p["bn_bias"], mean, var, training=training,
                            padding=1, backend="triton", residual=residual)
        ref_mean, ref_var = p["running_mean"].clone(), p["running_var"].clone()
        expected = F.relu(F.batch_norm(F.conv3d(x, p["weight"], None, 1, 1), ref_mean, ref_var, p["bn_weight"],
                                       p["bn_bias"], training=training) + residual)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean, ref_mean) and torch.testing.assert_close(var, ref_var)
        grad = torch.autograd.grad(out.square().sum(), residual)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), residual)[0])
    # training runs the statistics kernel; eval with a gradient to take: the conv alone, the sum stock
    assert launches == [None]


def test_bad_residuals_are_refused():
    p = make_params(5, 7, (3, 3, 3), dtype=torch.float32, device="cpu")
    x = torch.randn(2, 5, 3, 6, 6)
    args = (x, p["weight"], p["bias"], p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"])
    for residual, pool, match in [
        (torch.randn(2, 7, 3, 3, 3), None, r"output's shape \(2, 7, 3, 6, 6\), got \(2, 7, 3, 3, 3\)"),
        (torch.ones(2, 7, 3, 6, 6, dtype=torch.int64), None, "floating-point tensor .* torch.int64"),
        (torch.randn(2, 7, 3, 3, 3), ((1, 2, 2), (1, 2, 2), 0), "does not combine with a pool"),
    ]:
        with pytest.raises(ValueError, match=match):
            conv3d_bn_act(*args, training=False, padding=1, backend="triton", residual=residual, pool=pool)


def _epilogue_calls(monkeypatch) -> list:
    """The residuals the op hands a backend's forward (its epilogue), one entry per call: on its full
    path, or running the plan an earlier call like it kept."""
    seen, real, real_plan = [], ops_module._forward_with_residual, ops_module._InferencePlan.run

    def spy(*args):
        seen.append(args[15])  # residual
        return real(*args)

    def plan_spy(plan, *args):
        if args[7] is not None:  # residual
            seen.append(args[7])
        return real_plan(plan, *args)

    monkeypatch.setattr(ops_module, "_forward_with_residual", spy)
    monkeypatch.setattr(ops_module._InferencePlan, "run", plan_spy)
    return seen


@pytest.mark.parametrize("name, backend", [("r3d_18", "reference"), ("r2plus1d_18", "reference"),
                                           ("i3d_r50", "triton")])
def test_residual_blocks_take_the_epilogue_unless_a_hook_watches(name, backend, monkeypatch):
    """A fused video ResNet in eval mode: every residual block's last chain gets the shortcut (8
    BasicBlocks, R(2+1)D's through its factored conv; the cut I3D's 3 bottlenecks, on the Triton
    kernels) and the output matches stock. A forward hook on one block's branch sees that branch's
    own output, as in stock: that block adds its shortcut after it, stock."""
    torch.manual_seed(0)
    if name == "i3d_r50":
        from test_resnet3d import _cut_i3d
        stock_model, blocks, branch = _cut_i3d(3).eval(), 3, "blocks.3.res_blocks.1.branch2"
    else:
        stock_model, blocks, branch = c3dzoo.get_model(name, num_classes=3).eval(), 8, "layer2.1.conv2"
    x = torch.randn(1, 3, 2, 16, 16)
    fused = copy.deepcopy(stock_model)
    fused.fused, fused.backend = True, backend
    calls = _epilogue_calls(monkeypatch)
    launches = _residual_launches(monkeypatch)
    with torch.no_grad():
        expected = stock_model(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        assert len(calls) == blocks and all(r is not None for r in calls)
        assert sum(r is not None for r in launches) == (blocks if backend == "triton" else 0)
        seen = {}
        for label, model in (("stock", stock_model), ("fused", fused)):
            handle = model.get_submodule(branch).register_forward_hook(
                lambda m, i, o, label=label: seen.__setitem__(label, o.clone()))
            calls.clear()
            out = model(x)
            handle.remove()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen["fused"], seen["stock"], rtol=1e-4, atol=1e-5)
        assert len(calls) == blocks - 1
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()


def test_a_leaky_relu_after_the_sum_joins_the_chain_too(monkeypatch):
    """``add_residual_chained`` takes the block's activation module as it is: a LeakyReLU's slope."""
    from c3dzoo.models._common import ChainSequential, add_residual_chained
    from c3dzoo.models.resnet3d import ResNet3D  # (c3dzoo.models imports its submodules lazily)

    torch.manual_seed(0)
    branch = ChainSequential(nn.Conv3d(4, 6, 3, padding=1, bias=False), nn.BatchNorm3d(6)).eval()
    act = nn.LeakyReLU(0.3)
    model = ResNet3D((1, 7, 7), [[(1, 1, 1)]] * 4)
    model.fused, model.backend = True, "triton"
    x, shortcut = torch.randn(2, 4, 2, 5, 5), torch.randn(2, 6, 2, 5, 5)
    launches = _residual_launches(monkeypatch)
    with torch.no_grad():
        out = add_residual_chained(branch, x, shortcut, act, model.chain)
        torch.testing.assert_close(out, act(branch(x) + shortcut), rtol=1e-5, atol=1e-5)
    assert len(launches) == 1 and launches[0] is shortcut


class _Sums(nn.Module):
    """Five ways to end a residual block (fx traces ``out += x`` as an add), and one that must
    stay stock."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(4, 4, 3, padding=1, bias=False) for _ in range(6))
        self.norms = nn.ModuleList(nn.BatchNorm3d(4) for _ in range(6))
        self.relu = nn.ReLU(inplace=True)
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1, 1))

    def branch(self, i, x):
        return self.norms[i](self.convs[i](x))

    def forward(self, x):
        out = self.branch(0, x)
        out += x  # torchvision's BasicBlock
        x = self.relu(out)
        x = F.relu(x + self.branch(1, x))  # PyTorchVideo's order: the branch second
        x = torch.relu(torch.add(self.branch(2, x), x))
        x = self.branch(3, x).add_(x).relu()
        x = self.relu(self.branch(4, x) + self.bias)  # a sum that broadcasts: stock sum at run time
        shortcut = x.clone()
        shortcut.add_(self.branch(5, x))  # in place into the shortcut: not folded (the sum is the shortcut's)
        return self.relu(shortcut)


def test_fuse_folds_residual_sums_into_the_chain(monkeypatch):
    """``c3dzoo.fuse``: conv → BN → + shortcut → activation is one chain, whichever operand order
    or add form; the zoo's R3D-18 traced stock gets 8 such chains; outputs match in eval and train."""
    torch.manual_seed(0)
    model = _Sums().eval()
    gm = c3dzoo.fuse(model, backend="reference")
    descriptions = [m.description for m in gm.modules() if isinstance(m, c3dzoo.nn.FusedChain)]
    assert descriptions == ["Conv3d → BatchNorm3d → + shortcut → relu"] * 5 + ["Conv3d → BatchNorm3d"]
    calls = _epilogue_calls(monkeypatch)
    x = torch.randn(2, 4, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # the broadcasting sum ran stock
    gm.train(), model.train()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    r3d = c3dzoo.r3d_18(num_classes=3).eval()
    fused = c3dzoo.fuse(r3d)
    assert sum("shortcut" in m.description for m in fused.modules() if isinstance(m, c3dzoo.nn.FusedChain)) == 8
    calls.clear()
    with torch.no_grad():
        clip = torch.randn(1, 3, 2, 16, 16)
        torch.testing.assert_close(fused(clip), r3d(clip), rtol=1e-4, atol=1e-5)
    assert len(calls) == 8
