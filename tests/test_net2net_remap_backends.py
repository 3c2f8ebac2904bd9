"""Net2Net's remap primitives on every backend: the Triton kernel (interpreter on CPU) and the CUDA
extension (GPU only; its host build is tested in test_csrc_host.py) against PyTorch indexing, bit for
bit — same index map, one rounding of the division — and the backend choice and its fallbacks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import c3dzoo
from c3dzoo import net2net
from c3dzoo.ops import net2net_remap as remap
from interpreter import skip_unless_triton_runs_cpu_tensors

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

# (shape, dim, group): a conv weight's output / input channels, a Linear fed by a flattened 4×(2·3·3)
# map (group 18), a bias, Adam state of a 1-D parameter
LAYOUTS = [
    ((6, 4, 3, 3, 3), 0, 1),
    ((5, 6, 3, 3, 3), 1, 1),
    ((7, 4 * 18), 1, 18),
    ((6,), 0, 1),
    ((3, 6, 2), 1, 2),
]


def _mapping(old_units: int, new_units: int, device="cpu"):
    g = remap.replica_mapping(old_units, new_units, torch.Generator().manual_seed(old_units + new_units))
    return g.to(device), remap.replica_counts(g, old_units).to(device)


@pytest.fixture(autouse=True)
def _fresh_fallbacks():
    c3dzoo.ops.backends.clear_fallbacks()
    yield
    c3dzoo.ops.backends.clear_fallbacks()


def _check_backend(backend: str, device: str, dtype: torch.dtype, layout, power: int):
    shape, dim, group = layout
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3).to(device, dtype)
    old_units = shape[dim] // group
    g, counts = _mapping(old_units, old_units + 3, device)
    if power == 0:
        expected = remap.gather_units(t, g, dim, backend="reference") if group == 1 else None
        if expected is None:
            pytest.skip("gather_units has no group argument (a producer's units are never grouped)")
        got = remap.gather_units(t, g, dim, backend=backend)
    else:
        expected = remap.divide_incoming(t, g, counts, dim, group, power=power, backend="reference")
        got = remap.divide_incoming(t, g, counts, dim, group, power=power, backend=backend)
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    assert got.dtype == t.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("power", [0, 1, 2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}-dim{layout[1]}-group{layout[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_triton_remap_equals_reference(dtype, layout, power):
    _check_backend("triton", "cuda" if CUDA else "cpu", dtype, layout, power)


def test_triton_gathers_bf16_under_the_interpreter_and_refuses_bf16_division():
    skip_unless_triton_runs_cpu_tensors()
    t = torch.randn(6, 4, dtype=torch.bfloat16)
    g, counts = _mapping(6, 9)
    assert torch.equal(remap.gather_units(t, g, 0, backend="triton"), remap.gather_units(t, g, 0, backend="reference"))
    assert not c3dzoo.fallbacks()
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        out = remap.divide_incoming(t.t(), g, counts, 1, backend="triton")
    assert torch.equal(out, remap.divide_incoming(t.t(), g, counts, 1, backend="reference"))
    assert any("bfloat16" in reason for reason in c3dzoo.fallbacks().values())


def test_triton_remaps_cpu_tensors_only_under_the_interpreter(monkeypatch):
    """On a GPU machine the triton backend is available but its kernel is compiled for the GPU: a
    CPU tensor asked to remap on triton goes to the reference, saying why, rather than reaching a
    compiled launch with host pointers."""
    pytest.importorskip("triton")
    from c3dzoo.kernels import net2net_remap as kernel_module

    monkeypatch.setattr(c3dzoo.ops.backends, "_unavailable_reason", lambda name: None)  # as with a GPU
    t = torch.randn(6, 4)
    g, _ = _mapping(6, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in remap._unsupported_reason("triton", t, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernel_module, "runs_interpreted", lambda: False)
    with pytest.warns(RuntimeWarning, match="after the Triton kernels were imported"):
        out = remap.gather_units(t, g, 0, backend="triton")
    assert torch.equal(out, remap.gather_units(t, g, 0, backend="reference"))


def test_cuda_backend_on_cpu_tensors_falls_back_and_says_why():
    t = torch.randn(6, 4)
    g, counts = _mapping(6, 8)
    with pytest.warns(RuntimeWarning, match="cuda"):
        out = remap.divide_incoming(t.t(), g, counts, 1, backend="cuda")
    assert torch.equal(out, remap.divide_incoming(t.t(), g, counts, 1, backend="reference"))
    (key, reason), = c3dzoo.fallbacks().items()
    assert key.startswith("cuda: net2net remap") and ("CUDA" in reason or "not built" in reason)


def test_auto_uses_the_reference_on_cpu_without_fallbacks():
    t = torch.randn(6, 4)
    g, _ = _mapping(6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remap.gather_units(t, g, 0)
    assert not c3dzoo.fallbacks()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown c3dzoo backend 'tpu'"):
        remap.gather_units(torch.randn(3), torch.tensor([0, 1, 2, 1]), 0, backend="tpu")


def test_wider_through_the_triton_backend_equals_the_reference(monkeypatch):
    """A whole Net2Net-wider (weights, BN, next layer, SGD momentum) with every remap on Triton."""
    skip_unless_triton_runs_cpu_tensors()
    torch.manual_seed(0)
    model = c3dzoo.c3d_bn(num_classes=5, width_mult=0.125, input_size=(16, 32, 32))
    x = torch.randn(2, 3, 16, 32, 32)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("C3DZOO_BACKEND", backend)
        grown = copy.deepcopy(model)
        optimizer = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
        grown(x).sum().backward()
        optimizer.step()
        net2net.wider(grown, "conv3a", 48, generator=torch.Generator().manual_seed(1), optimizer=optimizer)
        results[backend] = (grown.state_dict(), [optimizer.state[p]["momentum_buffer"] for p in grown.parameters()
                                                 if p in optimizer.state])
    assert not c3dzoo.fallbacks(), c3dzoo.fallbacks()
    ref_state, ref_momenta = results["reference"]
    tri_state, tri_momenta = results["triton"]
    assert ref_state.keys() == tri_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], tri_state[key]), key
    assert len(ref_momenta) == len(tri_momenta)
    for a, b in zip(ref_momenta, tri_momenta):
        assert torch.equal(a, b)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("power", [0, 1, 2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}-dim{layout[1]}-group{layout[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_remap_equals_reference(backend, dtype, layout, power):
    if backend == "cuda" and c3dzoo.backends()["cuda"]["reason"]:
        pytest.skip(f"cuda backend unavailable: {c3dzoo.backends()['cuda']['reason']}")
    _check_backend(backend, "cuda", dtype, layout, power)


_DIVISION_PTX = textwrap.dedent("""
    import re, triton
    from triton.backends.compiler import GPUTarget
    from c3dzoo.kernels.net2net_remap import net2net_remap_kernel as kernel
    signature = {"src_ptr": "*fp32", "dst_ptr": "*fp32", "g_ptr": "*i64", "counts_ptr": "*i64", "total": "i32",
                 "inner": "i32", "old_size": "i32", "new_size": "i32", "group": "i32",
                 "POWER": "constexpr", "COMPUTE_FP64": "constexpr", "BLOCK": "constexpr"}
    for power in (1, 2):
        compiled = triton.compile(triton.compiler.ASTSource(
            fn=kernel, signature=signature, constexprs={"POWER": power, "COMPUTE_FP64": False, "BLOCK": 1024}),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        print(" ".join(sorted(set(re.findall(r"\\bdiv\\.[a-z0-9.]+", compiled.asm["ptx"])))))
""")


def test_remap_division_rounds_correctly_on_sm90():
    """The GPU remap must divide as torch does (the tests above compare bit for bit), but the
    interpreter divides exactly whatever the kernel asks for: check the sm_90 PTX instead. Triton's
    fp32 "/" is div.full.f32 (up to 2 ulp off); the kernel asks for div.rn.f32."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    done = subprocess.run([sys.executable, "-c", _DIVISION_PTX], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")[:2]
    for power, line in zip((1, 2), lines):
        divisions = set(line.split())
        assert "div.rn.f32" in divisions and not any(d.startswith(("div.full", "div.approx")) for d in divisions), (
            f"power {power}: {divisions}")
