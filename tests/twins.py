"""Comparing a fused model (or layer) with its stock twin after the same calls."""

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
