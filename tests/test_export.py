"""torch.export of fused models: the program keeps the fused custom ops (one per conv layer, no stock
conv/BatchNorm in its graph), takes a dynamic batch, saves and loads (in a fresh process after
``import c3dzoo``), and runs like the eager fused model — in eval mode, and in train mode with its
gradients and BatchNorm running statistics. The backend is chosen when the program is traced; run
on tensors of a device that backend cannot take, the op falls back to the reference backend with a
recorded reason instead of launching a kernel on the wrong device."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.export import Dim

import c3dzoo
from c3dzoo.ops import backends
from interpreter import skip_unless_triton_runs_cpu_tensors
from twins import assert_same_state

FUSED_OP = torch.ops.c3dzoo.conv3d_bn_act_forward.default
CONV_LAYERS = 8  # conv1 .. conv5b
SMALL = dict(width_mult=0.125, input_size=(16, 32, 32), num_classes=10)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = c3dzoo.c3d_bn(fused=True, **SMALL, **kwargs)
    for module in model.modules():  # non-trivial running statistics, so folding them matters
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


def _call_targets(program):
    return [node.target for node in program.graph.nodes if node.op == "call_function"]


@pytest.fixture(autouse=True)
def _fresh_fallbacks():
    backends.clear_fallbacks()
    yield


def test_exported_eval_model_keeps_fused_ops_and_takes_any_batch():
    model = _model().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 16, 32, 32),),
                                  dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}})
    targets = _call_targets(program)
    assert targets.count(FUSED_OP) == CONV_LAYERS, targets
    stock = {torch.ops.aten.convolution.default, torch.ops.aten.conv3d.default,
             torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.batch_norm.default}
    assert not stock.intersection(targets), targets
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
    assert not c3dzoo.fallbacks()


def test_exported_program_loads_in_a_fresh_process(tmp_path):
    model = _model().eval()
    x = torch.randn(3, 3, 16, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}})
    torch.export.save(program, tmp_path / "c3d_bn.pt2")
    with torch.no_grad():
        torch.save({"x": x, "expected": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, c3dzoo  # c3dzoo registers the custom ops the program calls
        program = torch.export.load({str(tmp_path / "c3d_bn.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(program.module()(io["x"]), io["expected"], rtol=0, atol=0)
        print("loaded and matched")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "loaded and matched" in result.stdout, result.stderr[-3000:]


def test_exported_train_model_trains_like_the_eager_model():
    """Train mode: batch statistics, the deferred BatchNorm between conv layers, running statistics
    updated by the program's mutating op, and gradients through the fused ops' backward."""
    model = _model().train()
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 32, 32)
    program = torch.export.export(model, (x,))
    targets = _call_targets(program)
    assert targets.count(FUSED_OP) == CONV_LAYERS, targets
    assert targets.count(torch.ops.c3dzoo.bn_update_running_stats_.default) == CONV_LAYERS, targets
    exported = program.module()
    grad_out = torch.randn(4, SMALL["num_classes"])
    torch.manual_seed(1)  # dropout
    out_exported = exported(x)
    (out_exported * grad_out).sum().backward()
    torch.manual_seed(1)
    out_eager = eager(x)
    (out_eager * grad_out).sum().backward()
    torch.testing.assert_close(out_exported, out_eager, rtol=0, atol=0)
    exported_params = dict(exported.named_parameters())
    for name, param in eager.named_parameters():
        assert exported_params[name].grad is not None, name
        torch.testing.assert_close(exported_params[name].grad, param.grad, rtol=0, atol=0, msg=name)
    exported_buffers = dict(exported.named_buffers())
    for name, buffer in eager.named_buffers():
        torch.testing.assert_close(exported_buffers[name], buffer, rtol=0, atol=0, msg=name)
    assert int(exported_buffers["conv1_bn.num_batches_tracked"]) == 1


def test_exported_triton_layer_runs_its_kernels():
    """The triton backend's op traces too (its fake output is channels_last_3d, as its kernels write):
    one small layer under the interpreter on CPU, or compiled on a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = c3dzoo.nn.Conv3dBNAct(5, 6, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend="triton")
    layer = layer.to(device).eval()
    layer.bn.running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(2, 5, 3, 6, 6, device=device)
    program = torch.export.export(layer, (x,))
    assert _call_targets(program).count(FUSED_OP) == 1
    with torch.no_grad():
        out = program.module()(x)
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    # the kernel writes channels_last_3d; the layer hands back stock's layout for a contiguous x and
    # weight, in the exported program too (tests/test_memory_layout.py)
    assert out.is_contiguous()
    assert not c3dzoo.fallbacks()


@pytest.mark.parametrize("backend, reason", [
    ("cuda", "the cuda backend takes CUDA tensors only, got 'cpu' tensors"),
    ("triton", "a CPU tensor needs TRITON_INTERPRET=1"),
])
def test_op_traced_for_a_gpu_backend_falls_back_on_cpu_tensors(backend, reason, monkeypatch):
    """An exported program carries the backend chosen at export; given CPU tensors, a GPU backend
    must not launch its kernel on them (the CUDA kernels would read CPU pointers): the op runs the
    reference backend, forward and backward, and says why."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine that runs the Triton kernels compiled
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 8, requires_grad=True)
    weight = torch.randn(8, 3, 3, 3, 3, requires_grad=True)
    gamma = torch.rand(8, requires_grad=True)
    beta = torch.randn(8, requires_grad=True)
    args = (None, gamma, beta, None, None, "batch", 1e-5, [1, 1, 1], [1, 1, 1], [1, 1, 1], "relu", 0.0, [],
            None, 0.0, "none", 0.0)
    with pytest.warns(RuntimeWarning, match="cannot run this call, using 'reference'"):
        out = FUSED_OP(x, weight, *args, backend, False)[0]
    assert reason in " ".join(c3dzoo.fallbacks().values())
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, weight, gamma, beta)]
    for t in (x, weight, gamma, beta):
        t.grad = None
    stock = torch.relu(torch.nn.functional.batch_norm(torch.nn.functional.conv3d(x, weight, padding=1), None, None,
                                                      gamma, beta, training=True, eps=1e-5))
    stock.square().sum().backward()
    torch.testing.assert_close(out, stock)
    for got, t in zip(grads, (x, weight, gamma, beta)):
        torch.testing.assert_close(got, t.grad)


def _small_layer(seed=0):
    torch.manual_seed(seed)
    layer = c3dzoo.nn.Conv3dBNAct(5, 6, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0))
    layer.bn.running_mean.uniform_(-0.2, 0.2)
    return layer


# the tracer warns of every shape check it bakes in (input checks; the values it must not bake are
# what the test checks, at another batch size)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("what", ["c3d_bn-reference", "layer-triton"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace_records_the_fused_ops(what, mode):
    """torch.jit.trace (TorchScript deployment) records the fused custom ops and the traced module
    runs like stock after torch.jit.save/load: it used to record what an eager call's implementation
    did instead (the reference backend's graph changed between calls with the folded-weight cache,
    the triton backend failed inside the interpreter). The triton case is one layer: a whole model
    under the interpreter takes a minute."""
    kind, backend = what.split("-")
    if backend == "triton":
        skip_unless_triton_runs_cpu_tensors()
    if kind == "c3d_bn":
        stock = _model()
        stock.fused = False
        fused = copy.deepcopy(stock)
        fused.fused, fused.backend = True, backend
        shape = (2, 3, *SMALL["input_size"])
    else:
        fused = _small_layer()
        fused.backend = backend
        stock = copy.deepcopy(fused)
        stock = torch.nn.Sequential(stock.conv, stock.bn, torch.nn.ReLU(), stock.pool)
        shape = (2, 5, 3, 6, 6)
    for model in (stock, fused):
        model.train(mode == "train")
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the traced and stock runs draw no common masks
    x = torch.randn(*shape)
    traced = torch.jit.trace(fused, x, check_trace=False)
    stock(x)  # tracing ran one forward: the stock twin runs it too (running statistics)
    assert "c3dzoo::conv3d_bn_act_forward" in str(traced.graph)
    saved = io.BytesIO()
    torch.jit.save(traced, saved)
    saved.seek(0)
    loaded = torch.jit.load(saved)
    x = torch.randn(3, *shape[1:])  # another batch size: nothing of the traced batch is baked in
    expected, got = stock(x), loaded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if mode == "train":
        expected.sum().backward()
        got.sum().backward()
        # atol: a conv bias before a training-mode BN has a true gradient of 0; stock's is
        # rounding noise of ~1e-5 (gradients here are of order 1)
        assert_same_state(loaded, stock, rtol=1e-4, atol=1e-4, buffers=False)
        assert_same_state(loaded, stock, rtol=1e-5, atol=1e-6, grads=False)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="AOTInductor compiles C++: no C++ compiler on this machine")
def test_aot_inductor_package_runs_the_fused_model(tmp_path):
    """AOTInductor (torch._inductor.aoti_compile_and_package) of an exported fused model: the fused
    ops run through its proxy executor, which passes an empty int list as None, so a layer without
    a pool (conv3a, conv4a, conv5a) has the op's pool argument None, never []."""
    model = _model().eval()
    x = torch.randn(2, 3, 16, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    pools = [node.args[14] for node in program.graph.nodes if node.target == FUSED_OP]
    assert pools.count(None) == 3 and [] not in pools, pools
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "c3d_bn.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for batch in (2, 3):
        x = torch.randn(batch, 3, 16, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
