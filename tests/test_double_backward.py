"""backward(create_graph=True) through fused layers — gradient penalties (WGAN-GP, R1), Hessian-vector
products, MAML — gives the second-order gradients stock PyTorch gives. The backends' backward
computes values without a graph; with create_graph the op differentiates a stock recomputation of
the layer instead, so no term is dropped silently (as it would be if the first-order gradients
carried no graph)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import c3dzoo
from c3dzoo.nn import Conv3dBNAct, stock_conv_bn_act
from parity import assert_parity

CASES = {
    "train_bn_pool": (dict(pool=((1, 2, 2), (1, 2, 2), 0)), "train"),
    "eval_bn": (dict(), "eval"),
    "frozen_bn_in_training_model": (dict(pool=((2, 2, 2), (2, 2, 2), 0)), "frozen"),
    "no_bn_leaky_relu": (dict(batch_norm=False, activation="leaky_relu", negative_slope=0.2), "train"),
    "train_bn_leaky_overlapping_pool": (dict(activation="leaky_relu", negative_slope=0.1,
                                             pool=((3, 3, 3), (2, 2, 2), (1, 1, 1))), "train"),
}


def _layer(kwargs, mode, dtype, backend="reference"):
    torch.manual_seed(0)
    layer = Conv3dBNAct(3, 5, 3, padding=1, backend=backend, **kwargs).to(dtype)
    if layer.bn is not None:
        if layer.bn.running_mean is not None:
            layer.bn.running_mean.uniform_(-0.3, 0.3)
            layer.bn.running_var.uniform_(0.5, 1.5)
        layer.bn.weight.data.uniform_(0.5, 1.5)
        layer.bn.bias.data.uniform_(-0.3, 0.3)
    layer.train(mode != "eval")
    if mode == "frozen":
        layer.bn.eval()
    return layer


def _stock(layer):
    return lambda x: stock_conv_bn_act(x, layer.conv, layer.bn, layer.activation, layer.negative_slope, layer.pool)


def _penalised_step(forward, params, x):
    """A loss with a gradient penalty on the input and on the conv weight; returns what its
    backward leaves: the input's and every parameter's gradient."""
    x = x.clone().requires_grad_(True)
    out = forward(x)
    grad_x, grad_w = torch.autograd.grad(out.square().sum(), (x, params[0]), create_graph=True)
    loss = out.mean() + grad_x.square().sum() + 0.1 * grad_w.square().sum()
    loss.backward()
    return [x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("case", list(CASES))
def test_second_order_gradients_match_stock_float64(case):
    kwargs, mode = CASES[case]
    fused = _layer(kwargs, mode, torch.float64)
    stock = copy.deepcopy(fused)
    x = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    got = _penalised_step(fused, list(fused.parameters()), x)
    want = _penalised_step(_stock(stock), list(stock.parameters()), x)
    # absolute tolerance on the problem's scale: under a training BN the conv bias' true gradient is
    # 0, and both sides give rounding noise around it
    atol = 1e-12 * max(w.abs().max().item() for w in want)
    for name, g, w in zip(["x"] + [n for n, _ in fused.named_parameters()], got, want):
        assert g is not None, name
        torch.testing.assert_close(g, w, rtol=1e-9, atol=atol, msg=lambda m: f"{name}: {m}")
    for (name, b), w in zip(fused.named_buffers(), stock.buffers()):
        torch.testing.assert_close(b, w, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")


def test_second_order_gradients_through_the_custom_op_path():
    """Under a dispatch mode (as with tensor subclasses) the fused layer runs as the custom ops; their
    registered backward takes the same differentiable route."""

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    kwargs, mode = CASES["train_bn_pool"]
    layers = [_layer(kwargs, mode, torch.float64) for _ in range(2)]
    x = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    results = []
    for layer, context in zip(layers, (contextlib.nullcontext(), PassThrough())):
        with context:
            results.append(_penalised_step(layer, list(layer.parameters()), x))
    for eager, dispatched in zip(*results):
        torch.testing.assert_close(eager, dispatched, rtol=1e-12, atol=0)


def test_gradient_penalty_on_a_fused_model_matches_stock():
    """A WGAN-GP-style penalty on the input of a whole train-mode C3D-BN (its conv3a/4a/5a hand their
    BatchNorm to the next conv's input prologue), float64."""
    torch.manual_seed(0)
    fused = c3dzoo.c3d_bn(width_mult=0.0625, input_size=(16, 32, 32), num_classes=3, fused=True).double().train()
    for module in fused.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    stock = copy.deepcopy(fused)
    stock.fused = False
    x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64)

    def step(model):
        xx = x.clone().requires_grad_(True)
        logits = model(xx)
        (grad_x,) = torch.autograd.grad(logits[:, 0].sum(), xx, create_graph=True)
        penalty = (grad_x.flatten(1).norm(dim=1) - 1).square().mean()
        (logits.mean() + penalty).backward()
        return {"x": xx.grad, **{n: p.grad for n, p in model.named_parameters()}}

    got, want = step(fused), step(stock)
    atol = 1e-11 * max(w.abs().max().item() for w in want.values())  # as above: conv biases under BN
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=atol, msg=lambda m: f"{name}: {m}")


def test_second_order_gradients_triton_within_the_parity_budget():
    """The first-order forward on the Triton kernels (the interpreter on CPU), fp32: within the
    parity budget of stock fp32 against float64."""
    from interpreter import skip_unless_triton_runs_cpu_tensors

    skip_unless_triton_runs_cpu_tensors()
    kwargs, mode = CASES["train_bn_pool"]
    fused = _layer(kwargs, mode, torch.float32, backend="triton")
    stock = copy.deepcopy(fused)
    reference = copy.deepcopy(fused).double()
    x = torch.randn(2, 3, 4, 6, 6)
    got = _penalised_step(fused, list(fused.parameters()), x)
    want = _penalised_step(_stock(stock), list(stock.parameters()), x)
    ref = _penalised_step(_stock(reference), list(reference.parameters()), x.double())
    for name, g, w, r in zip(["x"] + [n for n, _ in fused.named_parameters()], got, want, ref):
        assert_parity(g, w, r, torch.float32, name)
    assert not c3dzoo.fallbacks()


def test_torch_func_grad_matches_stock():
    """torch.func.grad (functional_call over the parameters: influence functions, meta-learning)
    through an eval-mode fused model, whose grad transform differentiates with create_graph."""
    torch.manual_seed(0)
    fused = c3dzoo.c3d_bn(width_mult=0.0625, input_size=(16, 32, 32), num_classes=3, fused=True).double().eval()
    stock = copy.deepcopy(fused)
    stock.fused = False
    params = {name: p.detach() for name, p in fused.named_parameters()}
    x = torch.randn(2, 3, 16, 32, 32, dtype=torch.float64)

    def grads(model):
        loss = lambda p: torch.func.functional_call(model, p, (x,)).square().sum()  # noqa: E731
        return torch.func.grad(loss)(params)

    got, want = grads(fused), grads(stock)
    atol = 1e-11 * max(w.abs().max().item() for w in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=atol, msg=lambda m: f"{name}: {m}")


def test_torch_func_grad_of_a_train_mode_model_is_refused_as_stock_refuses_it():
    """In train mode BatchNorm updates its running statistics in place, which torch.func refuses for
    a stock model too (num_batches_tracked.add_): the fused model raises the same error, no answer."""
    for fused in (True, False):
        torch.manual_seed(0)
        model = c3dzoo.c3d_bn(width_mult=0.0625, input_size=(16, 32, 32), num_classes=3, fused=fused).train()
        params = {name: p.detach() for name, p in model.named_parameters()}
        x = torch.randn(2, 3, 16, 32, 32)
        loss = lambda p: torch.func.functional_call(model, p, (x,)).square().sum()  # noqa: E731
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            torch.func.grad(loss)(params)


FUNC_CASES = {  # (layer kwargs, mode): vmap folds eval into the batch, loops over train slices
    "eval_bn_pool": (dict(pool=((1, 2, 2), (1, 2, 2), 0)), "eval"),
    "train_bn_no_running_stats": (dict(track_running_stats=False), "train"),
    "no_bn_leaky_relu": (dict(batch_norm=False, activation="leaky_relu", negative_slope=0.2), "train"),
}


@pytest.mark.parametrize("case", list(FUNC_CASES))
def test_torch_func_transforms_match_stock(case):
    """torch.func.vmap, vjp, jacrev, jvp, jacfwd and hessian (per-sample outputs, input
    sensitivities, curvature) through a fused layer match stock in float64. vmap and forward-mode AD
    used to be refused; vjp and jacrev with respect to the input silently gave zero (the create_graph
    backward's autograd.grad saw no path from the saved input at the transform's level)."""
    fused = _layer(*FUNC_CASES[case], torch.float64)
    stock = _stock(fused)
    x = torch.randn(4, 2, 3, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.func.vmap(fused)(x), torch.func.vmap(stock)(x), rtol=1e-10, atol=1e-12)

    out, pullback = torch.func.vjp(fused, x[0])
    out_stock, pullback_stock = torch.func.vjp(stock, x[0])
    torch.testing.assert_close(out, out_stock, rtol=1e-10, atol=1e-12)
    cotangent = torch.randn_like(out)
    torch.testing.assert_close(pullback(cotangent)[0], pullback_stock(cotangent)[0], rtol=1e-10, atol=1e-12)

    small = x[0, :, :, :2, :4, :4]  # jacrev: one vjp per output value
    torch.testing.assert_close(torch.func.jacrev(fused)(small), torch.func.jacrev(stock)(small),
                               rtol=1e-10, atol=1e-12)
    tiny = x[0, :, :, :2, :3, :3]  # Hessians of a scalar: reverse over reverse, forward over reverse

    def hessian(f):
        return torch.func.jacrev(torch.func.jacrev(lambda t: f(t).square().sum()))(tiny)
    torch.testing.assert_close(hessian(fused), hessian(stock), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.hessian(lambda t: fused(t).square().sum())(tiny),
                               torch.func.hessian(lambda t: stock(t).square().sum())(tiny), rtol=1e-10, atol=1e-12)

    # forward-mode AD: jvp and jacfwd (the op's jvp rule)
    tangent = torch.randn_like(x[0])
    torch.testing.assert_close(torch.func.jvp(fused, (x[0],), (tangent,))[1],
                               torch.func.jvp(stock, (x[0],), (tangent,))[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(fused)(small), torch.func.jacfwd(stock)(small),
                               rtol=1e-10, atol=1e-12)
    tangents = []
    for f in (fused, stock):  # and torch.autograd.forward_ad's dual tensors, outside torch.func
        with torch.autograd.forward_ad.dual_level():
            dual = f(torch.autograd.forward_ad.make_dual(x[0], tangent))
            tangents.append(torch.autograd.forward_ad.unpack_dual(dual).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_match_stock():
    """vmap(grad(loss)) over the samples, the torch.func recipe for per-sample gradients (DP-SGD,
    influence functions), through an eval-mode fused model."""
    torch.manual_seed(0)
    fused = c3dzoo.c3d_bn(width_mult=0.0625, input_size=(16, 32, 32), num_classes=3, fused=True).double().eval()
    stock = copy.deepcopy(fused)
    stock.fused = False
    params = {name: p.detach() for name, p in fused.named_parameters()}
    buffers = dict(fused.named_buffers())
    x = torch.randn(3, 3, 16, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])

    def per_sample(model):
        def loss(p, b, xi, yi):
            out = torch.func.functional_call(model, (p, b), (xi.unsqueeze(0),))
            return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, y)

    got, want = per_sample(fused), per_sample(stock)
    for name in want:
        assert got[name].shape == (3, *params[name].shape)
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_vmap_of_a_train_mode_batch_norm_is_refused_as_stock_refuses_it():
    """Under vmap a training-mode BatchNorm cannot update its unbatched running statistics in place:
    stock raises, and so does the fused layer (no answer)."""
    fused = _layer(dict(), "train", torch.float64)
    x = torch.randn(3, 2, 3, 4, 6, 6, dtype=torch.float64)
    for layer in (fused, _stock(fused)):
        with pytest.raises(RuntimeError):
            torch.func.vmap(layer)(x)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vmapped_ensemble_matches_stock(backend, mode):
    """Model ensembling the torch.func way: vmap over stacked parameters and buffers
    (``stack_module_state``), the input shared. The weights are batched, x is not: one call per
    model; in train mode each model's running statistics update in its own slice."""
    if backend == "triton":
        from interpreter import skip_unless_triton_runs_cpu_tensors
        skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    layers = [Conv3dBNAct(3, 4, 3, padding=1, pool=((1, 2, 2), (1, 2, 2), 0), backend=backend).train(mode == "train")
              for _ in range(3)]
    stock = [torch.nn.Sequential(m.conv, m.bn, torch.nn.ReLU(), m.pool) for m in copy.deepcopy(layers)]
    x = torch.randn(2, 3, 4, 6, 6)
    results = []
    for models in (stock, layers):
        params, buffers = torch.func.stack_module_state(models)
        skeleton = copy.deepcopy(models[0]).to("meta")
        out = torch.func.vmap(lambda p, b, x: torch.func.functional_call(skeleton, (p, b), (x,)),
                              in_dims=(0, 0, None))(params, buffers, x)
        results.append((out, list(buffers.values())))
    (expected, stock_buffers), (got, buffers) = results
    assert got.shape == (3, 2, 4, 4, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for b, c in zip(stock_buffers, buffers):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "enable_grad"])
@pytest.mark.parametrize("case", ["eval_bn", "frozen_params_pool", "residual"])
def test_forward_ad_tangents_pass_without_autograd(backend, grad_mode, case):
    """``torch.autograd.forward_ad`` carries a dual tensor's tangent through stock ops whatever the
    grad mode and whether or not any parameter requires a gradient (a jvp of a frozen model under
    no_grad, say). A fused eval layer does the same, also the kernels' inference paths (the residual
    epilogue's too) and a call repeated after it kept an inference plan: the triton backend used to
    return no tangent there."""
    if backend == "triton":
        from interpreter import skip_unless_triton_runs_cpu_tensors

        skip_unless_triton_runs_cpu_tensors()
    kwargs = dict(pool=((1, 2, 2), (1, 2, 2), 0)) if case == "frozen_params_pool" else {}
    layer = _layer(kwargs, "eval", torch.float32, backend)
    if case == "frozen_params_pool":
        layer.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    x, tangent = torch.randn(2, 3, 4, 6, 6, generator=g), torch.randn(2, 3, 4, 6, 6, generator=g)
    shortcut = torch.randn(2, 5, 4, 6, 6, generator=g) if case == "residual" else None
    forward_ad = torch.autograd.forward_ad

    def stock(t):
        out = layer.bn(layer.conv(t))
        if shortcut is not None:
            out = out + shortcut
        out = torch.relu(out)
        return layer.pool(out) if layer.pool is not None else out

    def fused(t):
        from c3dzoo.nn.conv_bn_act import conv_bn_act

        return conv_bn_act(t, layer.conv, layer.bn, "relu", 0.0, layer.pool, backend, residual=shortcut)

    results = {}
    with torch.no_grad():
        fused(x)  # an eager inference call first: it keeps the plan a plain call like it would run
    for name, f in (("stock", stock), ("fused", fused), ("fused again", fused)):
        with forward_ad.dual_level(), (torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()):
            out, out_tangent = forward_ad.unpack_dual(f(forward_ad.make_dual(x, tangent)))
        assert out_tangent is not None, f"{name}: the tangent was dropped"
        results[name] = (out, out_tangent)
    for name in ("fused", "fused again"):
        torch.testing.assert_close(results[name][0], results["stock"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[name][1], results["stock"][1], rtol=1e-4, atol=1e-5)
