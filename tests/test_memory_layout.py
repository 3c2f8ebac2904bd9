"""Fused outputs have the memory layout stock modules give, so user code that ``view``s them works.

The triton and cuda backends compute in channels_last_3d. Handing that layout back where stock
gives a contiguous tensor broke ``x.view(-1, 8192)`` after pool5 — the C3D idiom — in a model
passed to ``c3dzoo.fuse`` on a GPU, while the stock model ran. The triton backend runs CPU tensors
under the interpreter here, so these tests see the GPU backends' layout."""

import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.nn import Conv3dBNAct, FusedChain
from c3dzoo.ops import conv3d_bn_act, stock_memory_format
from interpreter import skip_unless_triton_runs_cpu_tensors
from twins import assert_same_state

CL = torch.channels_last_3d
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": CL}


class ViewsAfterPool(nn.Module):
    """Two fused chains, then the C3D idiom: ``view`` the pooled features into the classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(8)
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.conv2 = nn.Conv3d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm3d(6)
        self.pool2 = nn.MaxPool3d(2)
        self.fc = nn.Linear(6 * 2 * 2 * 2, 3)

    def forward(self, x):
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool2(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.view(-1, 48))


def _outcome(fn):
    try:
        return fn(), None
    except RuntimeError as exc:
        return None, str(exc)


def _backend(name):
    if name == "triton":
        skip_unless_triton_runs_cpu_tensors()
    return name


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weights", list(FORMATS))
@pytest.mark.parametrize("inputs", list(FORMATS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_model_views_where_stock_does(backend, weights, inputs, mode):
    torch.manual_seed(0)
    model = ViewsAfterPool().to(memory_format=FORMATS[weights])
    fused = c3dzoo.fuse(copy.deepcopy(model), backend=_backend(backend))
    assert fused.c3dzoo_fused_chains == 2
    # conv1's chain feeds conv2's only: it keeps the backend's layout; conv2's restores stock's
    assert [c.layout for c in fused.modules() if isinstance(c, FusedChain)] == ["any", "stock"]
    x = torch.randn(2, 3, 4, 8, 8).contiguous(memory_format=FORMATS[inputs])
    model.train(mode == "train")
    fused.train(mode == "train")
    expected, stock_error = _outcome(lambda: model(x))
    got, fused_error = _outcome(lambda: fused(x))
    # stock's own view fails when its pooled features are channels_last_3d; the fused model's must
    # not fail where stock's works (the reference backend keeps x's layout, contiguous where stock
    # is channels_last_3d with channels_last_3d weights: its view works where stock's fails)
    assert fused_error is None or stock_error is not None, fused_error
    if backend == "triton":  # computes in channels_last_3d: it keeps that wherever stock does
        assert (fused_error is None) == (stock_error is None), (stock_error, fused_error)
    if stock_error is None:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        if mode == "train":
            got.sum().backward()
            expected.sum().backward()
            assert_same_state(fused, model, rtol=1e-4, atol=1e-5, buffers=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", list(FORMATS))
@pytest.mark.parametrize("inputs", list(FORMATS))
def test_module_output_is_contiguous_where_stock_is(backend, dtype, weights, inputs):
    torch.manual_seed(0)
    layer = Conv3dBNAct(3, 5, 3, padding=1, pool=nn.MaxPool3d((1, 2, 2)), backend=_backend(backend))
    layer = layer.to(dtype=dtype, memory_format=FORMATS[weights])
    stock = nn.Sequential(layer.conv, layer.bn, nn.ReLU(), layer.pool)
    x = torch.randn(2, 3, 4, 6, 6, dtype=dtype).contiguous(memory_format=FORMATS[inputs])
    for training in (True, False):
        layer.train(training)
        expected = stock(x)
        got = layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        if expected.is_contiguous():
            # a channels_last_3d result where stock's is contiguous is what user code trips on;
            # the other way round (the reference backend keeps x's layout) every view works
            assert got.is_contiguous(), (tuple(got.stride()), tuple(expected.stride()))
        if backend == "triton" and not expected.is_contiguous():
            assert got.is_contiguous(memory_format=CL)  # no needless copy back


def test_stock_memory_format_rule():
    x = torch.randn(2, 3, 4, 6, 6)
    w = torch.randn(5, 3, 3, 3, 3)
    assert stock_memory_format(x, w) == torch.contiguous_format
    assert stock_memory_format(x.contiguous(memory_format=CL), w) == CL
    assert stock_memory_format(x, w.contiguous(memory_format=CL)) == CL
    assert stock_memory_format(x, w, w.contiguous(memory_format=CL)) == CL  # any weight of a run
    # oneDNN takes no float64: stock CPU convs give contiguous float64 whatever the layouts
    assert stock_memory_format(x.double().contiguous(memory_format=CL), w.double()) == torch.contiguous_format


def test_layout_any_keeps_the_backends_layout_and_bad_layout_is_named():
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 6)
    w = torch.randn(5, 3, 3, 3, 3)
    common = dict(training=False, batch_norm=False, padding=1, backend="triton")
    stock_like = conv3d_bn_act(x, w, **common)
    fast = conv3d_bn_act(x, w, layout="any", **common)
    assert stock_like.is_contiguous()
    assert fast.is_contiguous(memory_format=CL) and not fast.is_contiguous()
    torch.testing.assert_close(fast, stock_like)
    with pytest.raises(ValueError, match="layout must be one of"):
        conv3d_bn_act(x, w, layout="channels_last", **common)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_fused_model_views_and_trains(backend):
    """torch.compile(fullgraph=True) traces fuse()'s runs of chains and the layout restore (aot_eager:
    dynamo and the ops' fake implementations, without Inductor's C++ build)."""
    torch.manual_seed(0)
    model = ViewsAfterPool()
    fused = c3dzoo.fuse(copy.deepcopy(model), backend=_backend(backend))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 8, 8)
    for training in (True, False):
        model.train(training)
        fused.train(training)
        expected, got = model(x), compiled(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        if training:
            expected.sum().backward()
            got.sum().backward()
            assert_same_state(fused, model, rtol=1e-4, atol=1e-5, buffers=False)
            assert_same_state(fused, model, rtol=1e-5, atol=1e-6, grads=False)


class FlattensAfterPool(ViewsAfterPool):
    def forward(self, x):  # runs in any layout (channels_last_3d weights included)
        x = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool2(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weights", list(FORMATS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_input_gradient_has_stocks_layout(backend, weights, mode):
    """torch.autograd.grad hands the input's gradient to user code as the op returns it: a gradient
    penalty's ``g.view(g.size(0), -1).norm(dim=1)`` must work where it works for stock."""
    torch.manual_seed(0)
    model = FlattensAfterPool().to(memory_format=FORMATS[weights]).train(mode == "train")
    fused = c3dzoo.fuse(copy.deepcopy(model), backend=_backend(backend))
    x = torch.randn(2, 3, 4, 8, 8)
    grads = []
    for m in (model, fused):
        clip = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(clip).square().sum(), clip)
        grads.append(g)
    expected, got = grads
    if expected.is_contiguous():
        assert got.is_contiguous(), tuple(got.stride())
        got.view(got.size(0), -1).norm(dim=1)  # the gradient-penalty idiom
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled kernels' layout)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_model_views_where_stock_does_on_gpu(backend, mode):
    torch.manual_seed(0)
    model = ViewsAfterPool().cuda().train(mode == "train")
    fused = c3dzoo.fuse(copy.deepcopy(model), backend=backend)
    x = torch.randn(2, 3, 4, 8, 8, device="cuda", requires_grad=True)
    x_stock = x.detach().clone().requires_grad_(True)
    with torch.backends.cudnn.flags(allow_tf32=False):
        got, expected = fused(x), model(x_stock)  # fused's view(-1, 48) raised here
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        (g,) = torch.autograd.grad(got.square().sum(), x)
        (g_stock,) = torch.autograd.grad(expected.square().sum(), x_stock)
    assert g.is_contiguous() == g_stock.is_contiguous()
    torch.testing.assert_close(g, g_stock, rtol=1e-3, atol=1e-4)
