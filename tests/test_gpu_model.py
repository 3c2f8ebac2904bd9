"""GPU-only checks of whole fused models: CUDA graphs, torch.compile, and training steps of the full
C3D-BN at its real size in bf16 autocast, against stock PyTorch in the same dtype and in float64.

These need a CUDA device (the Triton kernels run compiled there; on CPU the interpreter is far too
slow for full-size layers) and skip with that reason without one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import c3dzoo
from parity import assert_parity

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


def _c3d_bn_with_statistics(**kwargs):
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(**kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.cuda()


@pytest.fixture(autouse=True)
def _fresh_fallbacks():
    c3dzoo.ops.backends.clear_fallbacks()
    yield


def test_cuda_graph_replays_fused_inference():
    """Capture the fused bf16 model in a CUDA graph: no host synchronisation, no allocation per call
    beyond the outputs (the graph's pool), and replays equal eager calls bit for bit."""
    model = _c3d_bn_with_statistics(fused=True, backend="triton").eval().bfloat16()
    static_x = torch.randn(4, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    static_x = static_x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, fills the folded-weight cache
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for seed in (1, 2):
            torch.manual_seed(seed)
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            eager = model(static_x)
            torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()


def test_torch_compile_of_fused_model_matches_eager():
    model = _c3d_bn_with_statistics(fused=True, backend="triton").eval().bfloat16()
    x = torch.randn(2, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("frozen_bn", [False, True], ids=["train_bn", "frozen_bn"])
def test_c3d_bn_training_step_bf16_autocast(frozen_bn):
    """One forward/backward of the full C3D-BN (16×112×112, batch 4) under bf16 autocast: loss,
    every parameter's gradient and the running statistics within the parity budget of stock
    autocast against a float64 model."""
    base = _c3d_bn_with_statistics(num_classes=101)
    x = torch.randn(4, 3, 16, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, 101, (4,), device="cuda")

    def step(model, dtype):
        model.train()
        if frozen_bn:
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm3d):
                    module.eval()
        if dtype == torch.float64:
            logits = model.double()(x.double())
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x)
        loss = F.cross_entropy(logits.float() if dtype != torch.float64 else logits, labels)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        buffers = {name: b for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")}
        return logits, grads, buffers

    reference = step(copy.deepcopy(base), torch.float64)
    stock = step(copy.deepcopy(base), torch.bfloat16)
    fused_model = c3dzoo.c3d_bn(num_classes=101, fused=True, backend="triton").cuda()
    fused_model.load_state_dict(base.state_dict())
    fused = step(fused_model, torch.bfloat16)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    assert_parity(fused[0], stock[0], reference[0], torch.bfloat16, "logits")
    for name in reference[1]:
        assert_parity(fused[1][name], stock[1][name], reference[1][name], torch.bfloat16, f"{name}.grad")
    for name in reference[2]:
        assert_parity(fused[2][name], stock[2][name], reference[2][name], torch.bfloat16, name)
