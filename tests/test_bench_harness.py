"""bench/_harness.py's session planning: which benchmarks run first, which are skipped and why, how
long each is expected to take, and that a failed benchmark leaves nothing allocated behind it."""

from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("pytest_benchmark")  # the harness's module uses pytest-benchmark's mark
import torch  # noqa: E402

from bench_modules import load_bench_module  # noqa: E402

H = load_bench_module("_harness.py")
GPU = {c.name: c for c in H.contestants("cuda")}
GPU_BASELINE = H.baseline_for("cuda")


def _gpu_session_order():
    """(kind, target, mode, contestant) of a GPU session's benchmarks, in the order they run."""
    cases = [("model", m) for m in H.MODELS] + [("layer", f"conv{n}") for n in ("1", "2", "3a", "5b")]
    items = [(kind, target, mode, name) for kind, target in cases for mode in H.MODES for name in GPU]
    return sorted(items, key=lambda i: H.run_order(i[0], i[1], GPU[i[3]], GPU_BASELINE))


def test_gpu_session_measures_what_the_issues_compare_first():
    order = _gpu_session_order()
    # issue 4: whole C3D-BN inference vs torch.compile, and conv1 vs stock eager bf16; issue 5: a
    # training step vs torch.compile and its memory (the recompute contestant); issue 6: the stem
    # (cuda, and auto picking it) on conv1. Every fused contestant of the whole model comes along
    # (those that do not apply skip at once: cuda on a whole model, recompute in inference)
    fused = [name for name, c in GPU.items() if c.backend not in (None, "reference")]
    wanted = {("model", "c3d_bn", mode, name) for mode in H.MODES
              for name in (GPU_BASELINE, "compile-bf16-cl", *fused)}
    wanted |= {("layer", "conv1", mode, name) for mode in H.MODES
               for name in ("eager-bf16", GPU_BASELINE, "c3dzoo-auto-bf16-cl", "c3dzoo-triton-bf16-cl",
                            "c3dzoo-cuda-bf16-cl")}
    head, rest = order[:len(wanted)], order[len(wanted):]
    assert set(head) == wanted
    # within those, the eager and fused ones before torch.compile (minutes of compiling when cold)
    assert [name for *_, name in head[-len(H.MODES):]] == ["compile-bf16-cl"] * len(H.MODES)
    # then the other eager and fused runs, models before layers; torch.compile on the rest, models
    # before layers; max-autotune last
    keys = [(GPU[name].compile_tier, kind == "layer") for kind, _, _, name in rest]
    assert keys == sorted(keys) and keys[-1][0] == 2


def test_budget_estimates_trust_warm_caches_for_what_was_warmed():
    model = H.Case("model", "c3d_bn", "train", (32, 3, 16, 112, 112), 1, lambda backend: None)
    compiled, maxat = GPU["compile-bf16-cl"], GPU["compile-maxat-bf16-cl"]
    tuned, eager = GPU["c3dzoo-triton-bf16-cl-autotune"], GPU[GPU_BASELINE]
    cold = {c.name: H._expected_seconds(model, c, prewarmed=False) for c in (compiled, maxat, tuned, eager)}
    warm = {c.name: H._expected_seconds(model, c, prewarmed=True) for c in (compiled, maxat, tuned, eager)}
    assert warm[compiled.name] < cold[compiled.name] / 2 and warm[tuned.name] < cold[tuned.name] / 2
    # the warm-up compiles neither max-autotune nor anything for eager
    assert warm[maxat.name] == cold[maxat.name] and warm[eager.name] == cold[eager.name]
    assert cold[eager.name] < cold[tuned.name] < cold[compiled.name] < cold[maxat.name]


def test_cuda_backend_is_measured_on_stems_only(monkeypatch):
    cuda = GPU["c3dzoo-cuda-bf16-cl"]
    states = {name: {"available": True, "reason": None} for name in ("cuda", "triton", "reference")}
    monkeypatch.setattr(H.c3dzoo, "backends", lambda: states)
    stem = H.Case("layer", "conv1", "inference", (2, 3, 16, 32, 32), 1, lambda backend: None, first=True)
    inner = H.Case("layer", "conv2", "inference", (2, 8, 16, 16, 16), 1, lambda backend: None, first=False)
    model = H.Case("model", "c3d_bn", "inference", (2, 3, 16, 32, 32), 1, lambda backend: None)
    for case in (inner, model):
        assert "stem convs only" in H.skip_reason(cuda, case)
    assert H.skip_reason(cuda, stem) is None
    states["cuda"] = {"available": False, "reason": "no CUDA device"}  # unavailable: that reason first
    assert H.skip_reason(cuda, model) == "c3dzoo backend 'cuda' is unavailable: no CUDA device"


def test_auto_contestant_skips_where_it_would_be_reference(monkeypatch):
    auto = GPU["c3dzoo-auto-bf16-cl"]
    states = {"cuda": {"available": False, "reason": "no CUDA device"},
              "triton": {"available": False, "reason": "no triton"},
              "reference": {"available": True, "reason": None}}
    monkeypatch.setattr(H.c3dzoo, "backends", lambda: states)
    reason = H.skip_reason(auto)
    assert "'auto' would run everything on 'reference'" in reason and "no triton" in reason
    states["triton"] = {"available": True, "reason": None}
    assert H.skip_reason(auto) is None


class _Benchmark:
    """What run() touches of pytest-benchmark's fixture before it times anything."""

    disabled = False
    group = None


def test_a_failed_benchmark_leaves_nothing_allocated_behind():
    """pytest keeps a failure's traceback until the next one; its frames must not keep the case's
    tensors alive (they would count in the next benchmarks' device memory)."""
    held = []

    def build(backend):
        activations = torch.empty(1024, device="meta")
        held.append(weakref.ref(activations))
        raise RuntimeError("kernel failed (simulated)")

    case = H.Case("model", "failing", "inference", (1, 3, 4, 8, 8), 1, build)
    with pytest.raises(RuntimeError, match="simulated") as failure:
        H.run(_Benchmark(), None, case, H.Contestant("eager-fp32", "fp32"))
    gc.collect()
    assert failure.value.__traceback__ is not None  # the traceback is still there, as pytest keeps it
    assert held and held[0]() is None


def test_gpu_state_is_read_while_the_device_is_busy(monkeypatch):
    """Clocks read after the timed rounds would be an idle GPU's: read them with calls queued."""
    events = []
    monkeypatch.setattr(H, "CUDA", True)
    monkeypatch.setattr(H, "device_timer", lambda: events.append("sync"))
    monkeypatch.setattr(H, "gpu_state", lambda: events.append("read") or {"sm_clock_mhz": 1980})
    state = H.gpu_state_under_load(lambda: events.append("call"), t_call=0.01, busy_s=0.05)
    assert state == {"sm_clock_mhz": 1980}
    assert events == ["sync"] + ["call"] * 5 + ["read", "sync"]
