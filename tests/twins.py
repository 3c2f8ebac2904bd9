"""Comparing a fused model (or layer) with its stock twin after the same calls."""

import copy

import torch


def assert_same_state(fused, stock, *, rtol, atol, grads=True, buffers=True):
    """``fused``'s parameter gradients (with ``grads``) and buffers (with ``buffers``) equal
    ``stock``'s, pair by pair in registration order (the twins have the same structure: a copy, a
    fused model of the same class, a traced or loaded module), named by stock's names."""
    if grads:
        for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)
    if buffers:
        for (name, b), c in zip(stock.named_buffers(), fused.buffers()):
            torch.testing.assert_close(c, b, rtol=rtol, atol=atol, msg=name)


def assert_same_eval_and_training_step(stock, fused, x, *, eval_mode: bool = True, seed: int = 2):
    """Twin zoo models (``fused`` a copy of ``stock`` with ``fused=True``): with ``eval_mode``, the
    same eval-mode output; then one training step on ``x`` (the output weighted per class) gives
    the same output, parameter gradients and running statistics within fp32 rounding.

    β gradients of a BatchNorm whose output reaches only training-mode BatchNorms through ReLUs
    that all pass (the models' conditioning) are analytically zero: there only rounding noise is
    compared, under a floor of 1e-6 of the model's largest gradient (as test_models_zoo's)."""
    if eval_mode:
        with torch.no_grad():
            torch.testing.assert_close(fused.eval()(x), stock.eval()(x), rtol=1e-4, atol=1e-5)
    stock.train(), fused.train()
    outputs = [model(x) for model in (stock, fused)]
    weights = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(seed))
    losses = [(out * weights).sum() for out in outputs]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for loss in losses:
        loss.backward()
    floor = 1e-6 * max(p.grad.abs().max().item() for p in stock.parameters())
    for (key, want), got in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-3, atol=1e-4 * want.grad.abs().max().item() + floor,
                                   msg=lambda m, k=key: f"{k}: {m}")
    for (key, want), got in zip(stock.named_buffers(), fused.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def assert_triton_twin_matches(stock, x, *, training: bool = True, atol: float = 1e-5):
    """``stock`` against a deep copy of it running fused on the Triton backend (under the
    interpreter on a CPU): nothing falls back, and the eval-mode output agrees (within ``atol``;
    with ``training`` a training step too, as ``assert_same_eval_and_training_step`` checks it)."""
    import c3dzoo

    fused = copy.deepcopy(stock)
    fused.fused, fused.backend = True, "triton"
    c3dzoo.ops.backends.clear_fallbacks()
    if training:
        assert_same_eval_and_training_step(stock, fused, x)
    else:
        with torch.no_grad():
            torch.testing.assert_close(fused.eval()(x), stock.eval()(x), rtol=1e-4, atol=atol)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
