"""``auto`` between several capable backends (the stem: CUDA C++ and Triton) picks the faster one,
measured once per configuration; preference order decides when measuring is off or not allowed."""

from __future__ import annotations

import contextlib

import pytest
import torch

from c3dzoo.ops import backends
from c3dzoo.ops._registry import _can_time_now, time_forward_ms


def _cfg(in_channels=3):
    return backends.ConvBNActConfig("running", "relu", (1, 1, 1), (1, 1, 1), (1, 1, 1), (3, 3, 3),
                                    (1, 2, 2, 1, 2, 2, 0, 0, 0), "torch.bfloat16", "cpu", in_channels, 64)


@pytest.fixture
def two_contenders(monkeypatch):
    """'slow' (preferred) and 'fast' both run every configuration; timings from a table; restores
    the registry, preference and timer afterwards."""
    registry = dict(backends._REGISTRY)
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "PREFERENCE", ("slow", "fast", "reference"))
    for name in ("slow", "fast"):
        backends.register(backends.Backend(name, lambda: None, lambda cfg: None, lambda: None))
    calls = []
    times = {"slow": 2.0, "fast": 1.0}

    def timer(name, cfg):
        calls.append((name, cfg))
        return times[name]

    allowed = {"now": True}
    old_timer, old_can = backends._timer, backends._can_measure
    backends.set_timer(timer, lambda: allowed["now"])
    yield calls, times, allowed
    backends.set_timer(old_timer, old_can)


def test_auto_takes_the_measured_faster_backend_once(two_contenders, monkeypatch):
    calls, _, _ = two_contenders
    monkeypatch.delenv(backends.AUTOTUNE_ENV_VAR, raising=False)
    assert backends.resolve("auto", _cfg()) == "fast"
    assert backends.resolve("auto", _cfg()) == "fast"
    assert sorted(name for name, _ in calls) == ["fast", "slow"], "measured once per configuration"
    assert backends.tuning() == {str(_cfg()): {"slow": 2.0, "fast": 1.0}}
    backends.resolve("auto", _cfg(in_channels=4))  # another configuration is measured on its own
    assert len(calls) == 4


def test_an_explicit_backend_is_never_second_guessed(two_contenders):
    calls, _, _ = two_contenders
    assert backends.resolve("slow", _cfg()) == "slow"
    assert calls == []


def test_preference_order_when_measuring_is_off_or_not_allowed(two_contenders, monkeypatch):
    calls, _, allowed = two_contenders
    monkeypatch.setenv(backends.AUTOTUNE_ENV_VAR, "0")
    assert backends.resolve("auto", _cfg()) == "slow"
    monkeypatch.delenv(backends.AUTOTUNE_ENV_VAR)
    allowed["now"] = False  # e.g. a CUDA graph is being captured
    assert backends.resolve("auto", _cfg()) == "slow"
    assert calls == []
    allowed["now"] = True
    assert backends.resolve("auto", _cfg()) == "fast"


@contextlib.contextmanager
def _deterministic(how):
    if how == "cudnn":
        with torch.backends.cudnn.flags(deterministic=True):
            yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("how", ["use_deterministic_algorithms", "cudnn"])
def test_deterministic_algorithms_take_the_preference_order(two_contenders, monkeypatch, how):
    """A timing differs between runs and the backends' sums differ in their last bits: a user who
    asks torch for reproducible results gets the preference order, measured before or not."""
    calls, _, _ = two_contenders
    monkeypatch.delenv(backends.AUTOTUNE_ENV_VAR, raising=False)
    with _deterministic(how):
        assert backends.resolve("auto", _cfg()) == "slow"
    assert calls == []
    assert backends.resolve("auto", _cfg()) == "fast"  # measured now
    with _deterministic(how):
        assert backends.resolve("auto", _cfg()) == "slow"
    assert backends.resolve("auto", _cfg()) == "fast"
    assert len(calls) == 2


def test_a_contender_that_fails_to_run_is_not_chosen(two_contenders):
    _, times, _ = two_contenders
    times["fast"] = float("inf")
    assert backends.resolve("auto", _cfg()) == "slow"


def test_builtin_timer_does_not_measure_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU: the real timing is exercised by the GPU session's benchmarks")
    assert time_forward_ms("reference", _cfg()) == float("inf")
    assert _can_time_now() is False


def test_auto_records_a_decline_only_when_it_falls_back_to_reference(monkeypatch):
    """The stem-only CUDA backend declines C3D's other layers and Triton runs them: that is no
    fallback. Only when every available GPU backend declines and "reference" runs is each reason kept."""
    registry = dict(backends._REGISTRY)
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "PREFERENCE", ("stem", "general", "reference"))
    backends.register(backends.Backend("stem", lambda: None,
                                       lambda cfg: None if cfg.in_channels <= 4 else "stem layers only",
                                       lambda: None))
    backends.register(backends.Backend("general", lambda: None,
                                       lambda cfg: None if cfg.in_channels % 2 == 0 else "even C_in only",
                                       lambda: None))
    monkeypatch.setenv(backends.AUTOTUNE_ENV_VAR, "0")  # preference order, no measuring
    backends.clear_fallbacks()
    try:
        assert backends.resolve("auto", _cfg(in_channels=64)) == "general"
        assert backends.fallbacks() == {}
        assert backends.resolve("auto", _cfg(in_channels=65)) == "reference"
        assert sorted(backends.fallbacks().values()) == ["even C_in only", "stem layers only"]
    finally:
        backends.clear_fallbacks()
