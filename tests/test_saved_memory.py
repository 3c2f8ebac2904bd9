"""What a training step keeps alive between forward and backward, fused vs stock.

The fused op saves its input x (plus parameters and the fp32 batch mean/var) and, by default, the raw
conv output of every training-mode layer but a stem on a GPU (on the CPU the stem's too; the
reference backend, the CPU's, keeps a pool's int32 argmax with it; ``keep_conv_outputs=False``:
none, the conv is recomputed in the backward); stock PyTorch keeps the conv input, the BatchNorm
input, the ReLU output, the MaxPool input and its int64 indices. The bytes are counted exactly with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once: a layer's output is the next
layer's saved input in both models), so this holds on any device; peak GPU memory, which also
counts the workspaces of the kernels, is measured by the benchmarks (bench/).
"""

from __future__ import annotations

import sys

import pytest
import torch

import c3dzoo
from c3dzoo.ops import reference

OPS = sys.modules["c3dzoo.ops.conv3d_bn_act"]


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_training_saves_a_fraction_of_stock(dtype, monkeypatch):
    kwargs = dict(num_classes=10, width_mult=0.125, input_size=(16, 32, 32))
    stock = c3dzoo.c3d_bn(**kwargs).to(dtype).train()
    fused = c3dzoo.c3d_bn(**kwargs, fused=True, backend="reference").to(dtype).train()
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(4, 3, 16, 32, 32, dtype=dtype)
    stock_bytes, cpu_bytes = _saved_bytes(stock, x), _saved_bytes(fused, x)
    # the GPU's policy (the stem recomputes its conv), counted on these CPU tensors; the GPU backends
    # keep no pool argmax (their backward kernels find it again), the CPU's reference keeps one
    policy = OPS.keeps_conv_output
    monkeypatch.setattr(OPS, "keeps_conv_output", lambda keep, norm, c_in, grad, device_type: policy(
        keep, norm, c_in, grad, "cuda"))
    monkeypatch.setattr(reference, "keeps_pool_argmax", lambda params, keep: False)
    gpu_bytes = _saved_bytes(fused, x)
    monkeypatch.undo()
    fused.keep_conv_outputs = False
    recompute_bytes = _saved_bytes(fused, x)
    # measured on this model: fp32 0.31 / 0.18 of stock, bf16 0.27 / 0.16 (at C3D's real size, fp32:
    # 0.26 / 0.12, bf16 0.23 / 0.10); the issue asks peak memory ≤ 0.6×. The CPU's default, which
    # keeps the stem's conv output too, and the pool layers' int32 argmax: fp32 0.57, bf16 0.56
    assert gpu_bytes < stock_bytes * 0.4, f"fused saves {gpu_bytes} B, stock {stock_bytes} B"
    assert recompute_bytes < stock_bytes * 0.2, f"fused, recomputing, saves {recompute_bytes} B, stock {stock_bytes} B"
    assert gpu_bytes < cpu_bytes < stock_bytes * 0.6, f"fused on the CPU saves {cpu_bytes} B, stock {stock_bytes} B"
