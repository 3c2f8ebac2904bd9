"""torch.onnx.export of fused models (both exporters: dynamo and TorchScript): ONNX has no c3dzoo
operator, so an exporting call runs the stock layer's standard ops and the file is the one the stock
twin exports — the same nodes in the same order (ONNX Runtime and TensorRT fuse Conv + BN + Relu
themselves), the same outputs in ONNX Runtime, and the same BatchNorm buffers afterwards as the
stock twin (a train-mode export updates them as stock's does). The files compute what the exporter
makes of the stock model (which, for a train-mode model, is its eval-mode forward here); momentum=None
in train mode does not export with the dynamo exporter, for stock BatchNorm3d as for the fused one."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import c3dzoo
fused_op_module = importlib.import_module("c3dzoo.ops.conv3d_bn_act")  # the module, not the function it exports

pytest.importorskip("onnx", reason="the ONNX export tests need onnx (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX export tests run the files in onnxruntime")
import onnx  # noqa: E402

from twins import assert_same_state  # noqa: E402

SMALL_C3D = dict(width_mult=0.125, input_size=(16, 32, 32), num_classes=10)
EXPORTERS = {"dynamo": True, "torchscript": False}


class OddChains(nn.Module):
    """Chains of every kind fuse() takes: bias-free conv, leaky_relu, a padded pool, no BN, stride."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 5, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm3d(5)
        self.a_act = nn.LeakyReLU(0.2)
        self.a_pool = nn.MaxPool3d(2, 2, padding=1)
        self.b = nn.Conv3d(5, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.b_act = nn.ReLU()
        self.c = nn.Conv3d(6, 4, 3, padding=1)
        self.c_bn = nn.BatchNorm3d(4, momentum=0.3)
        self.c_act = nn.ReLU()

    def forward(self, x):
        x = self.a_pool(self.a_act(self.a_bn(self.a(x))))
        x = self.b_act(self.b(x))
        return self.c_act(self.c_bn(self.c(x))).mean((2, 3, 4))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):  # non-trivial statistics and affine, so folding them matters
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def _twins(kind):
    """(fused, stock): the same state, the fused one running c3dzoo's op."""
    torch.manual_seed(0)
    if kind == "c3d_bn":
        stock = _randomise_bn(c3dzoo.c3d_bn(**SMALL_C3D))
        fused = c3dzoo.c3d_bn(fused=True, **SMALL_C3D)
        fused.load_state_dict(stock.state_dict())
        return fused, stock, torch.randn(2, 3, 16, 32, 32)
    stock = _randomise_bn(OddChains())
    fused = c3dzoo.fuse(copy.deepcopy(stock))
    assert fused.c3dzoo_fused_chains == 3
    return fused, stock, torch.randn(2, 3, 6, 10, 10)


def _export(model, x, path, exporter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=EXPORTERS[exporter], input_names=["x"])
    return onnx.load(str(path))


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _ops(model_proto):
    return [(node.domain, node.op_type) for node in model_proto.graph.node]


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
@pytest.mark.parametrize("kind", ["c3d_bn", "odd_chains"])
@pytest.mark.parametrize("mode", ["eval", "train", "frozen_bn"])
def test_onnx_export_is_the_stock_models_export(kind, exporter, mode, tmp_path):
    fused, stock, x = _twins(kind)
    for model in (fused, stock):
        model.train(mode != "eval")
        if mode == "frozen_bn":  # fine-tuning with frozen BN: train-mode model, eval-mode BatchNorm
            for m in model.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.eval()
    fused_proto = _export(fused, x, tmp_path / "fused.onnx", exporter)
    stock_proto = _export(stock, x, tmp_path / "stock.onnx", exporter)

    ops = _ops(fused_proto)
    assert not [op for op in ops if op[0].startswith("c3dzoo") or op[1].startswith("conv3d_bn_act")], ops
    assert ops == _ops(stock_proto)
    assert "Conv" in {op for _, op in ops}
    # a train-mode export traces one call: the buffers move (or not) exactly as the stock twin's
    assert_same_state(fused, stock, rtol=0, atol=0, grads=False)

    out = _run(tmp_path / "fused.onnx", x)
    torch.testing.assert_close(out, _run(tmp_path / "stock.onnx", x), rtol=0, atol=0)
    if mode == "eval":  # and it computes the model (ONNX Runtime's kernels against torch's: fp32 rounding apart)
        with torch.no_grad():
            torch.testing.assert_close(out, stock(x), rtol=1e-4, atol=1e-5)


def test_exporting_does_not_change_eager_calls(monkeypatch):
    """Only an exporting trace takes the stock ops: eager calls after an export still run the fused
    op (torch.onnx stays imported, its flag is off again)."""
    fused, _, x = _twins("odd_chains")
    fused.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), dynamo=True)  # no file: the ONNXProgram is returned
    calls = []
    original, original_plan = fused_op_module._forward_impl, fused_op_module._InferencePlan.run
    monkeypatch.setattr(fused_op_module, "_forward_impl", lambda *args: calls.append(1) or original(*args))
    # (an eager inference call may run its kept plan: the same implementation, without the checks)
    monkeypatch.setattr(fused_op_module._InferencePlan, "run", lambda *args: calls.append(1) or original_plan(*args))
    with torch.no_grad():
        fused(x)
        fused(x)
    assert len(calls) == 6, "an eager call after an export must run the fused op's implementation"
