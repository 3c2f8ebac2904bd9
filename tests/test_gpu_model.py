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


def _captured(model, static_x):
    """(graph, its output tensor) of ``model(static_x)`` captured after a side-stream warm-up (which
    compiles the kernels and fills the folded-weight cache); call under no_grad."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
    return graph, static_out


def test_cuda_graph_replays_fused_inference():
    """Capture the fused bf16 model in a CUDA graph: no host synchronisation, no allocation per call
    beyond the outputs (the graph's pool), and replays equal eager calls bit for bit."""
    model = _c3d_bn_with_statistics(fused=True, backend="triton").eval().bfloat16()
    static_x = torch.randn(4, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    static_x = static_x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        graph, static_out = _captured(model, static_x)
        for seed in (1, 2):
            torch.manual_seed(seed)
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            eager = model(static_x)
            torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_cuda_graph_replays_see_parameter_updates(backend):
    """A captured stock model reads its parameters at each replay; so must a fused one, although
    eager calls fold and pack the weights once (cached): loading new weights in place after the
    capture changes the replay's output exactly as it changes an eager call's."""
    model = _c3d_bn_with_statistics(fused=True, backend=backend).eval().bfloat16()
    static_x = torch.randn(2, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    static_x = static_x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        graph, static_out = _captured(model, static_x)
        graph.replay()
        before = static_out.clone()
        torch.testing.assert_close(before, model(static_x), rtol=0, atol=0)
        model.conv3a.weight.mul_(-1.5)  # as load_state_dict or an optimizer step would: in place
        model.conv5b_bn.running_var.mul_(4.0)
        graph.replay()
        eager = model(static_x)  # rebuilds its cached packing (and frees the old one)
        graph.replay()
        assert not torch.equal(static_out, before)
        torch.testing.assert_close(static_out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fused_inference_allocates_only_its_outputs(backend):
    """Each fused layer of C3D-BN in eval mode makes one allocation per call, its output (folded
    weights are cached, statistics are empty, channels-last inputs are read in place)."""
    model = _c3d_bn_with_statistics(fused=True, backend=backend).eval().bfloat16()
    x = torch.randn(4, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        model(x)  # warm-up: kernels compiled, weights folded, "auto" has measured the stem
        h = x
        for name in model.layer_names:
            pool = getattr(model, model.pool_names[name]) if name in model.pool_names else None
            layer = (getattr(model, name), getattr(model, name + "_bn"), "relu", 0.0, pool)
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            out = model.chain(h, *layer)
            torch.cuda.synchronize()
            allocations = torch.cuda.memory_stats()["allocation.all.allocated"] - before
            assert allocations == 1, f"{name}: {allocations} allocations for one output"
            h = out
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()


def test_torch_compile_of_fused_model_matches_eager():
    """Compiled (fullgraph), the fused layers are the same custom ops: the conv features are eager's
    bit for bit. fc6-fc8 are Inductor's own code, which may split a bf16 addmm + ReLU into a matmul
    and a separate bias add (one more rounding), so the logits are held to the parity budget."""
    model = _c3d_bn_with_statistics(fused=True, backend="triton").eval().bfloat16()
    x = torch.randn(2, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    stock = copy.deepcopy(model)
    stock.fused = False
    with torch.no_grad():
        eager_features = model.features(x)
        compiled_features = torch.compile(model.features, fullgraph=True)(x)
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        reference = stock.double()(x.double())
    torch.testing.assert_close(compiled_features, eager_features, rtol=0, atol=0)
    assert_parity(compiled, eager, reference, torch.bfloat16, "logits of the compiled fused model")


def test_cuda_graphed_training_matches_eager():
    """``torch.cuda.make_graphed_callables`` of a fused model in training mode (forward and backward
    each one graph: no Python per layer, the remedy for host-bound steps, bench/host_time.py):
    three SGD steps with fresh batches give eager's parameters, running statistics and counters."""
    graphed_model = _c3d_bn_with_statistics(num_classes=10, width_mult=0.25, input_size=(16, 56, 56),
                                            fused=True, backend="triton").train()
    eager_model = copy.deepcopy(graphed_model)
    static_x = torch.randn(4, 3, 16, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    graphed = torch.cuda.make_graphed_callables(graphed_model, (static_x,))
    # the graphing warm-up ran training forwards: the eager twin starts from the same statistics
    eager_model.load_state_dict(graphed_model.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (graphed_model, eager_model)]
    for step in range(3):
        torch.manual_seed(100 + step)
        x = torch.randn_like(static_x)
        labels = torch.randint(0, 10, (4,), device="cuda")
        for model, optimizer in zip((graphed, eager_model), optimizers):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    # the same kernels on the same data (replayed or launched): equal up to the fc layers' cuBLAS
    for (name, a), b in zip(graphed_model.state_dict().items(), eager_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


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


# (name, C_in, C_out, D, H, W at a 16×112×112 input, pool after it): C3D's layers
C3D_LAYERS = [
    ("conv1", 3, 64, 16, 112, 112, ((1, 2, 2), (1, 2, 2), 0)),
    ("conv2", 64, 128, 16, 56, 56, ((2, 2, 2), (2, 2, 2), 0)),
    ("conv3a", 128, 256, 8, 28, 28, None),
    ("conv3b", 256, 256, 8, 28, 28, ((2, 2, 2), (2, 2, 2), 0)),
    ("conv4a", 256, 512, 4, 14, 14, None),
    ("conv5b", 512, 512, 2, 7, 7, ((2, 2, 2), (2, 2, 2), (0, 1, 1))),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layer", C3D_LAYERS, ids=lambda layer: layer[0])
def test_c3d_layer_training_on_gpu(layer, dtype):
    """Each C3D layer's training forward and Triton backward at its real size (batch 2): output,
    running statistics and every gradient within the parity budget, ReLU/pool ties masked."""
    from c3dzoo.ops import conv3d_bn_act
    from c3dzoo.ops.conv3d_bn_act import normalize_pool
    from parity import ambiguous_positions

    name, c_in, c_out, d, h, w, pool = layer
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(c_in, c_out, 3, padding=1).cuda().double()
    bn = torch.nn.BatchNorm3d(c_out).cuda().double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, c_in, d, h, w, device="cuda", dtype=torch.float64)
    p = normalize_pool(pool)
    with torch.no_grad():
        z_d = F.batch_norm(F.conv3d(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), padding=1),
                           None, None, bn.weight.to(dtype), bn.bias.to(dtype), True)
        z_r = F.batch_norm(conv(x), None, None, bn.weight, bn.bias, True)
    skip = ambiguous_positions(z_d, z_r, "relu", (p[0:3], p[3:6], p[6:9]) if p else None)

    def run(run_dtype, backend):
        c, b = copy.deepcopy(conv).to(run_dtype), copy.deepcopy(bn).to(run_dtype)
        xin = x.to(run_dtype).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
        if backend is None:
            out = F.relu(b(c(xin)))
            if p:
                out = F.max_pool3d(out, p[0:3], p[3:6], p[6:9])
        else:
            out = conv3d_bn_act(xin, c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var,
                                training=True, padding=1, pool=pool, num_batches_tracked=b.num_batches_tracked,
                                backend=backend)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * grad.cuda().masked_fill(skip, 0).to(run_dtype)).sum().backward()
        return {"out": out, "x.grad": xin.grad, "weight.grad": c.weight.grad, "bias.grad": c.bias.grad,
                "gamma.grad": b.weight.grad, "beta.grad": b.bias.grad, "running_mean": b.running_mean,
                "running_var": b.running_var}

    reference, stock, fused = run(torch.float64, None), run(dtype, None), run(dtype, "triton")
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    for key in reference:
        if key == "bias.grad":  # exactly 0 under batch statistics; stock's is rounding noise
            assert torch.count_nonzero(fused[key]) == 0
            continue
        assert_parity(fused[key], stock[key], reference[key], dtype, f"{name} {dtype}: {key}")


def test_auto_measures_and_picks_the_faster_stem():
    """C3D's conv1 can run on the CUDA stem kernel and on the Triton kernel: "auto" times both once
    and runs the faster; the whole fused model then matches the stock model."""
    if "cuda" not in c3dzoo.backends() or not c3dzoo.backends()["cuda"]["available"]:
        pytest.skip(f"the cuda backend is not available: {c3dzoo.backends().get('cuda')}")
    model = _c3d_bn_with_statistics(fused=True).eval().bfloat16()
    stock = copy.deepcopy(model)
    stock.fused = False
    x = torch.randn(4, 3, 16, 112, 112, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        ref = stock.double()(x.double())
        out_stock = stock.bfloat16()(x)
    stems = {cfg: times for cfg, times in c3dzoo.ops.backends.tuning().items() if "in_channels=3," in cfg}
    assert stems, c3dzoo.ops.backends.tuning()
    for times in stems.values():
        assert set(times) == {"cuda", "triton"} and all(t < float("inf") for t in times.values()), times
    assert_parity(out, out_stock, ref, torch.bfloat16, "logits with the auto-picked stem")


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_fused_steps_never_synchronise_with_the_host(backend):
    """After warm-up (Triton compilation, the stem measurement of "auto"), an inference call and a
    bf16-autocast SGD training step of the fused C3D-BN make no synchronising CUDA call
    (torch.cuda.set_sync_debug_mode("error") raises on the first one)."""
    model = _c3d_bn_with_statistics(fused=True, backend=backend, num_classes=10)
    model = model.to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 3, 16, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    target = torch.randint(0, 10, (2,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model.train()(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.eval()(x)

    for _ in range(2):
        train_step()
        infer()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()
        infer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
