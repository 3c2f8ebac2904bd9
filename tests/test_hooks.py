"""Module hooks on the conv, BatchNorm, activation or pool of a fused chain run as in a stock model:
such a chain runs module by module (``c3dzoo.nn.runs_hooks``), so Grad-CAM, feature extraction,
guided backprop and module tracers see what they see in the stock model; chains without hooks stay
fused."""

from __future__ import annotations

import copy
import functools
import importlib
import warnings

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo import net2net

conv_bn_act_module = importlib.import_module("c3dzoo.nn.conv_bn_act")

SMALL = dict(width_mult=0.125, input_size=(16, 32, 32), num_classes=4)


def _pair(**kwargs):
    torch.manual_seed(0)
    fused = c3dzoo.c3d_bn(fused=True, **SMALL, **kwargs)
    for module in fused.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    stock = copy.deepcopy(fused)
    stock.fused = False
    return fused, stock


@pytest.fixture
def stock_chain_calls(monkeypatch):
    """How many chains ran module by module."""
    calls = []
    real = conv_bn_act_module.stock_conv_bn_act
    monkeypatch.setattr(conv_bn_act_module, "stock_conv_bn_act",
                        lambda x, conv, *args: calls.append(conv) or real(x, conv, *args))
    return calls


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_grad_cam_hooks_on_a_fused_model_see_the_stock_activations_and_gradients(mode, stock_chain_calls):
    fused, stock = _pair()
    x = torch.randn(2, 3, 16, 32, 32)
    seen = {}
    for name, model in (("fused", fused), ("stock", stock)):
        model.train(mode == "train")
        record = seen.setdefault(name, {})
        handles = [
            model.conv5b.register_forward_hook(lambda m, i, o, r=record: r.__setitem__("activation", o.detach())),
            model.conv5b.register_full_backward_hook(lambda m, gi, go, r=record: r.__setitem__("gradient", go[0])),
        ]
        model(x)[:, 1].sum().backward()
        for handle in handles:
            handle.remove()
    assert stock_chain_calls == [fused.conv5b]  # only the hooked chain left the fused path
    for what in ("activation", "gradient"):
        torch.testing.assert_close(seen["fused"][what], seen["stock"][what], rtol=1e-5, atol=1e-6, msg=what)


def test_without_hooks_every_chain_stays_fused(stock_chain_calls):
    fused, _ = _pair()
    handle = fused.conv5b.register_forward_hook(lambda *args: None)
    handle.remove()  # a removed hook leaves nothing behind
    fused.eval()(torch.randn(1, 3, 16, 32, 32))
    assert stock_chain_calls == []


def test_hooks_on_bn_and_pool_and_a_global_hook(stock_chain_calls):
    fused, stock = _pair()
    x = torch.randn(2, 3, 16, 32, 32)
    outputs = {}
    for name, model in (("fused", fused), ("stock", stock)):
        model.eval()
        handles = [model.conv2_bn.register_forward_pre_hook(lambda m, i: None),
                   model.pool5.register_forward_hook(
                       lambda m, i, o, n=name: outputs.__setitem__(n, o.detach()))]
        with torch.no_grad():
            model(x)
        for handle in handles:
            handle.remove()
    assert stock_chain_calls == [fused.conv2, fused.conv5b]
    torch.testing.assert_close(outputs["fused"], outputs["stock"], rtol=1e-5, atol=1e-6)

    # a global hook (module tracers): every module the stock model calls is called, in order
    calls = {}
    for name, model in (("fused", fused), ("stock", stock)):
        called = calls.setdefault(name, [])
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o, c=called: c.append(m))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
    names = {id(m): n for n, m in stock.named_modules()} | {id(m): n for n, m in fused.named_modules()}
    assert [names[id(m)] for m in calls["fused"]] == [names[id(m)] for m in calls["stock"]]


def test_hooks_on_the_activation_module_of_a_chain():
    """Guided backprop hooks the ReLU modules: in a fused video ResNet (whose blocks hold them)
    and in a model fused by ``c3dzoo.fuse``, those hooks run and change the gradient as in stock."""
    torch.manual_seed(0)
    resnet = c3dzoo.r3d_18(num_classes=3, fused=True).eval()
    for module in resnet.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # torch refuses full backward hooks on in-place ReLUs, stock or not
    stock_resnet = copy.deepcopy(resnet)
    stock_resnet.fused = False

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU()
            self.pool = nn.MaxPool3d(2)

        def forward(self, x):
            return self.pool(self.relu(self.bn(self.conv(x))))

    net = Net().eval()
    fused_net = c3dzoo.fuse(copy.deepcopy(net))
    assert fused_net.c3dzoo_fused_chains == 1

    def guided(m, grad_input, grad_output):  # guided backprop: only positive gradients pass a ReLU
        return (grad_input[0].clamp_min(0),)

    for fused, stock, shape in ((resnet, stock_resnet, (1, 3, 4, 32, 32)), (fused_net, net, (2, 3, 4, 6, 6))):
        grads = []
        for model in (fused, stock):
            handles = [m.register_full_backward_hook(guided) for m in model.modules() if isinstance(m, nn.ReLU)]
            assert handles
            x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
            model(x).sum().backward()
            grads.append(x.grad)
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_deeper_with_data_on_a_fused_convcolumn():
    """net2net.deeper fits the new BatchNorm on the activation a hook captures inside a fused block
    (it raised IndexError when the fused block skipped the hooked module)."""
    torch.manual_seed(0)
    fused = c3dzoo.jester_convcolumn(num_classes=5, fused=True).eval()
    stock = copy.deepcopy(fused)
    stock.fused = False
    x = torch.randn(2, 3, 18, 84, 84)
    for model in (fused, stock):
        net2net.deeper(model, "conv_layer2.0", data=x)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)


def test_weight_norm_pre_hook_recomputes_the_weight_the_fused_chain_reads():
    """``torch.nn.utils.weight_norm`` recomputes ``conv.weight`` in a forward pre-hook: the fused
    model must not read a stale weight after weight_g changes."""
    def build(fused):
        torch.manual_seed(0)
        model = c3dzoo.c3d_bn(fused=fused, **SMALL).eval()
        with warnings.catch_warnings():  # deprecated for torch.nn.utils.parametrizations.weight_norm
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(model.conv2)
        with torch.no_grad():
            model.conv2.weight_g.mul_(2.0)
        return model

    fused, stock = build(True), build(False)
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), rtol=1e-5, atol=1e-6)


_VIDEO_MODELS = {
    "r3d_18": (lambda: c3dzoo.r3d_18(num_classes=3), (2, 3, 4, 32, 32)),
    "r2plus1d_18": (lambda: c3dzoo.r2plus1d_18(num_classes=3), (2, 3, 4, 32, 32)),
    "jester_convcolumn": (lambda: c3dzoo.jester_convcolumn(num_classes=3), (2, 3, 18, 84, 84)),
    "s3d": (lambda: c3dzoo.s3d(num_classes=3), (2, 3, 8, 32, 32)),
    "i3d_r50": (lambda: c3dzoo.i3d_r50(num_classes=3), (2, 3, 4, 32, 32)),
    # every bottleneck's conv_b a Conv2plus1d container
    "r2plus1d_r50": (lambda: c3dzoo.r2plus1d_r50(num_classes=3), (2, 3, 4, 32, 32)),
    "slowfast_r50": (lambda: c3dzoo.slowfast_r50(num_classes=3), (1, 3, 4, 32, 32)),
    "x3d_xs": (lambda: c3dzoo.x3d_xs(num_classes=3), (2, 3, 4, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(_VIDEO_MODELS))
def test_hooks_on_the_containers_of_video_models_run_and_keep_the_chains_fused(name, stock_chain_calls):
    """Feature extraction at ``stem``, ``layer3`` or a block's ``downsample`` (forward hooks on the
    Sequentials the stock forward calls): the fused forward calls each of them too, with the same
    input and output, and the chains inside stay fused (a hook on a container is not a hook on
    its conv, BN, activation or pool)."""
    build, shape = _VIDEO_MODELS[name]
    torch.manual_seed(0)
    fused = build().eval()
    fused.fused = True
    stock = copy.deepcopy(fused)
    stock.fused = False
    # Sequentials, and the blocks that take the chain (video ResNet and bottleneck blocks, stages,
    # Inception blocks)
    containers = [n for n, m in fused.named_modules()
                  if n and (isinstance(m, nn.Sequential) or getattr(type(m), "takes_chain", False))]
    assert len(containers) >= 4
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    seen = {}
    for label, model in (("fused", fused), ("stock", stock)):
        record = seen.setdefault(label, [])
        modules = dict(model.named_modules())
        def pre_hook(module, args, n, r=record):  # the input as stock gives it: exactly (x,)
            r.append(("pre", n, [getattr(t, "shape", type(t).__name__) for t in args]))

        handles = [modules[n].register_forward_pre_hook(functools.partial(pre_hook, n=n)) for n in containers]
        # (SlowFast's pathway blocks take and give [slow, fast] lists)
        handles += [modules[n].register_forward_hook(
            lambda m, i, o, n=n, r=record: r.append(("out", n, [t.detach() for t in o] if isinstance(o, list)
                                                     else o.detach())))
                    for n in containers]
        with torch.no_grad():
            seen[label + "_out"] = model(x)
        for handle in handles:
            handle.remove()
    assert [r[:2] for r in seen["fused"]] == [r[:2] for r in seen["stock"]]
    for (kind, where, got), (_, _, want) in zip(seen["fused"], seen["stock"]):
        if kind == "pre":
            assert got == want, where
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=where: f"{n}: {m}")
    torch.testing.assert_close(seen["fused_out"], seen["stock_out"], rtol=1e-4, atol=1e-5)
    assert stock_chain_calls == []


def test_a_global_hook_sees_a_fused_video_resnet_call_what_stock_calls():
    """Module tracers (a global forward hook): the fused R3D-18 calls every module the stock one
    calls, containers included, in the same order."""
    torch.manual_seed(0)
    fused = c3dzoo.r3d_18(num_classes=3, fused=True).eval()
    stock = copy.deepcopy(fused)
    stock.fused = False
    x = torch.randn(1, 3, 4, 32, 32)
    calls = {}
    for label, model in (("fused", fused), ("stock", stock)):
        names = {id(m): n for n, m in model.named_modules()}
        called = calls.setdefault(label, [])
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o, c=called, k=names: c.append(k[id(m)]))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
    assert "layer2.0.downsample" in calls["stock"]
    assert calls["fused"] == calls["stock"]
