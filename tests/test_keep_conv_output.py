"""A training-mode fused layer keeps its raw conv output for the backward instead of recomputing the
conv (issue #5: the forward writes that tensor anyway, so keeping it spares the backward a whole
conv for the memory of one activation); a stem recomputes on a GPU (cheap conv, largest activation)
and keeps it on the CPU (where oneDNN's 3-channel conv is not cheap).

* the backward with the kept output gives exactly what the recomputing backward gives: outputs,
  every gradient and the running statistics are equal bit for bit, per backend (reference, and
  triton under the interpreter on CPU), with pools, without, with an input prologue;
* the policy: kept only in training-mode BN, only when a backward can follow, never in a stem on a
  GPU by default, always/never when asked; the saved bytes show it;
* the fake implementation agrees with the real op under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import sys

import pytest
import torch

import c3dzoo
from c3dzoo.ops import conv3d_bn_act, keeps_conv_output

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["reference", "triton"]
POOL_122 = ((1, 2, 2), (1, 2, 2), (0, 0, 0))
OPS = sys.modules["c3dzoo.ops.conv3d_bn_act"]


def _layer(c_in: int, c_out: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fp32 = dict(dtype=torch.float32)
    t = dict(
        conv_weight=torch.randn(c_out, c_in, 3, 3, 3, generator=g, dtype=dtype) * (c_in * 27) ** -0.5,
        conv_bias=torch.randn(c_out, generator=g, dtype=dtype) * 0.1,
        bn_weight=torch.rand(c_out, generator=g, **fp32) + 0.5,
        bn_bias=torch.randn(c_out, generator=g, **fp32) * 0.1,
    )
    return {k: v.to(DEVICE).requires_grad_() for k, v in t.items()}


def _run(backend, keep, dtype, *, pool, activation="relu", prologue=False):
    """Forward + backward of one layer (two with ``prologue``: the first deferred into the second);
    returns everything the run produced."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 4, 6, 6, generator=g, dtype=dtype) + 2.0).to(DEVICE).requires_grad_()
    stats = dict(running_mean=torch.zeros(6, device=DEVICE), running_var=torch.ones(6, device=DEVICE),
                 num_batches_tracked=torch.zeros((), dtype=torch.long, device=DEVICE))
    first = _layer(5, 6, dtype)
    common = dict(training=True, padding=1, backend=backend, keep_conv_output=keep, activation=activation)
    out = conv3d_bn_act(x, **first, **stats, pool=None if prologue else pool, defer=prologue, **common)
    tensors = dict(x=x, **first)
    if prologue:
        second = _layer(6, 7, dtype, seed=2)
        out = conv3d_bn_act(out, **second, pool=pool, **common)
        tensors.update({f"second.{k}": v for k, v in second.items()})
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype).to(DEVICE)
    out.backward(grad_out)
    result = {"out": out.detach()}
    result.update({f"grad {k}": v.grad for k, v in tensors.items()})
    result.update(stats)
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", [  # fp16 once: the kept tensor is the same either way
    ("pool", torch.float32), ("no_pool", torch.float32), ("leaky_relu", torch.float32),
    ("prologue", torch.float32), ("prologue", torch.float16)], ids=str)
def test_kept_conv_output_gives_the_recomputed_results_bit_for_bit(backend, dtype, case, monkeypatch):
    if dtype == torch.float16 and backend == "reference" and not CUDA:
        pytest.skip("CPU has no fp16 conv3d in stock PyTorch (the reference backend's ops)")
    # two runs compared bit for bit: cuDNN's backward algorithms may use atomics unless told not to
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    kwargs = dict(pool=None if case == "no_pool" else POOL_122,
                  activation="leaky_relu" if case == "leaky_relu" else "relu", prologue=case == "prologue")
    recomputed = _run(backend, False, dtype, **kwargs)
    kept = _run(backend, True, dtype, **kwargs)
    assert recomputed.keys() == kept.keys()
    for name in recomputed:
        assert recomputed[name] is not None, name
        assert torch.equal(recomputed[name], kept[name]), f"{backend} {case}: {name} differs"
    assert kept["num_batches_tracked"].item() == 1


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


@pytest.mark.parametrize("c_in", [3, 8])
def test_what_is_saved_follows_the_policy(c_in):
    x = torch.randn(2, c_in, 4, 8, 8, device=DEVICE, requires_grad=True)
    p = _layer(c_in, 16, torch.float32)
    conv_output_bytes = 2 * 16 * 4 * 8 * 8 * 4  # (N, C_out, D, H, W) fp32, padding 1
    argmax_bytes = 2 * 16 * 4 * 4 * 4 * 4  # the pool's argmax, kept with it: int32 at the pooled shape

    def run(keep, training=True):
        return lambda: conv3d_bn_act(x, **p, training=training, padding=1, pool=POOL_122, backend="reference",
                                     keep_conv_output=keep)

    never, default, always = (_saved_bytes(run(k)) for k in (False, None, True))
    assert always - never == conv_output_bytes + argmax_bytes
    assert default == (always if c_in > OPS.RECOMPUTE_MAX_IN_CHANNELS or DEVICE == "cpu" else never)
    # eval-mode BN is folded: no conv output is written, none is kept, whatever is asked
    running = dict(running_mean=torch.zeros(16, device=DEVICE), running_var=torch.ones(16, device=DEVICE))
    folded = [_saved_bytes(lambda: conv3d_bn_act(x, **p, **running, training=False, padding=1, pool=POOL_122,
                                                 backend="reference", keep_conv_output=k)) for k in (False, True)]
    assert folded[0] == folded[1]


def test_policy():
    assert keeps_conv_output(None, "batch", 64, True)
    assert not keeps_conv_output(None, "batch", 3, True)  # a stem recomputes on a GPU
    assert not keeps_conv_output(None, "batch", 3, True, "cuda")
    assert keeps_conv_output(None, "batch", 3, True, "cpu")  # and keeps it on the CPU
    assert not keeps_conv_output(False, "batch", 3, True, "cpu") and not keeps_conv_output(None, "stats", 3, True, "cpu")
    assert keeps_conv_output(True, "batch", 3, True) and not keeps_conv_output(False, "batch", 64, True)
    for norm in ("running", "none", "stats"):  # nothing to keep: folded, no BN, or deferred (out is y)
        assert not keeps_conv_output(True, norm, 64, True)
    assert not keeps_conv_output(True, "batch", 64, False)  # no backward can follow


def test_model_keeps_all_none_or_all_but_the_stem_with_the_same_gradients():
    kwargs = dict(num_classes=5, width_mult=0.125, input_size=(16, 32, 32))
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(**kwargs, fused=True, backend="reference").to(DEVICE).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 32, 32, device=DEVICE)
    saved, grads = {}, {}
    for keep in (False, None, True):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model.keep_conv_outputs = keep
        saved[keep] = _saved_bytes(lambda: model(x))
        model.load_state_dict(state)
        model(x).square().mean().backward()
        grads[keep] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert saved[False] < saved[None] <= saved[True]
    assert (saved[None] == saved[True]) == (DEVICE == "cpu")  # the stem's conv output: kept on the CPU only
    for keep in (None, True):
        for name, grad in grads[False].items():
            assert torch.equal(grad, grads[keep][name]), f"keep_conv_outputs={keep}: {name}"


def test_torch_compile_fullgraph_with_a_kept_conv_output():
    p = _layer(8, 16, torch.float32)
    x = torch.randn(2, 8, 4, 8, 8, device=DEVICE, requires_grad=True)

    def step(x, keep):
        return conv3d_bn_act(x, **p, training=True, padding=1, pool=POOL_122, backend="reference",
                             keep_conv_output=keep)

    eager = step(x, True)
    eager.sum().backward()
    expected = [x.grad.clone()] + [t.grad.clone() for t in p.values()]
    for t in [x, *p.values()]:
        t.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, True)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip([x.grad] + [t.grad for t in p.values()], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
