"""fp32 convolutions use TF32 exactly when stock cuDNN convolutions would, whichever of torch's two
TF32 APIs the user set: the legacy ``torch.backends.cudnn.allow_tf32`` or the ``fp32_precision``
settings that the PyTorch docs recommend since 2.9 (``torch.backends.cudnn.conv.fp32_precision``).

The kernels read the legacy flag, which raises once conv's precision was set with the new API and
RNN's was not ("a mix of the legacy and new APIs"): every triton launch failed for such a user."""

import copy

import pytest
import torch
from torch import nn

import c3dzoo
from c3dzoo.kernels._grid import cached_plan, conv_allows_tf32
from interpreter import skip_unless_triton_runs_cpu_tensors
from parity import assert_parity

CUDA = torch.cuda.is_available()
NEW_API = getattr(torch.backends.cudnn, "conv", None) is not None
new_api = pytest.mark.skipif(not NEW_API, reason=f"torch {torch.__version__} has no fp32_precision API (2.9+)")


@pytest.fixture
def precision_settings():
    """Restores the new API's settings this test changes (conftest restores the legacy flag)."""
    saved = (torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision,
             torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision)
    yield
    (torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision,
     torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision) = saved


@new_api
def test_conv_allows_tf32_follows_either_api(precision_settings):
    torch.backends.cudnn.allow_tf32 = True
    assert conv_allows_tf32()
    torch.backends.cudnn.allow_tf32 = False
    assert not conv_allows_tf32()

    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # what the kernels used to read
    assert not conv_allows_tf32()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    assert conv_allows_tf32()

    # "none" inherits: from cuDNN's setting, then the global one
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "tf32"
    assert conv_allows_tf32()
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.fp32_precision = "ieee"
    assert not conv_allows_tf32()


@new_api
def test_plans_are_keyed_by_the_setting(precision_settings):
    seen = []

    @cached_plan
    def planner(n):
        seen.append(conv_allows_tf32())
        return n

    torch.backends.cudnn.conv.fp32_precision = "tf32"
    planner(1)
    planner(1)
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    planner(1)
    assert seen == [True, False]


def _backend(name):
    if name == "triton" and not CUDA:
        skip_unless_triton_runs_cpu_tensors()
    if name == "auto":
        if not CUDA:
            pytest.skip("auto takes the reference backend for CPU tensors, which reads no TF32 setting")
        return None
    return name


@new_api
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fused_model_runs_under_the_new_api(precision_settings, backend, mode):
    """Under ``conv.fp32_precision = "ieee"`` (RNN's left as it was) the fused model trains and
    infers as stock does: on a GPU in full fp32 (the parity budget is fp32's, which TF32 would
    miss), on CPU through the interpreter."""
    device = "cuda" if CUDA else "cpu"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
                          nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU()).to(device)
    stock.train(mode == "train")
    fused = c3dzoo.fuse(copy.deepcopy(stock), backend=_backend(backend))
    c3dzoo.ops.backends.clear_fallbacks()
    reference = copy.deepcopy(stock).double()
    clip = torch.randn(2, 3, 4, 8, 8, device=device)
    outs, grads = [], []
    for model, x in ((fused, clip), (stock, clip), (reference, clip.double())):
        x = x.clone().requires_grad_(True)
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append(x.grad)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    assert_parity(outs[0], outs[1], outs[2], torch.float32, f"{mode} output")
    assert_parity(grads[0], grads[1], grads[2], torch.float32, f"{mode} input gradient")
    for (name, p_fused), p_stock, p_ref in zip(fused.named_parameters(), stock.parameters(), reference.parameters()):
        assert_parity(p_fused.grad, p_stock.grad, p_ref.grad, torch.float32, f"{mode} {name} gradient")
    for (name, b_fused), b_stock, b_ref in zip(fused.named_buffers(), stock.buffers(), reference.buffers()):
        if b_fused.is_floating_point():
            assert_parity(b_fused, b_stock, b_ref, torch.float32, f"{mode} {name}")
        else:
            assert torch.equal(b_fused, b_stock), name
