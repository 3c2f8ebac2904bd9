"""bench/host_time.py: the host side of fused steps on the triton backend, Triton launches counted
instead of run. The launch counts are the contract checked here (times are measured, not asserted):
each launch costs host time and a GPU kernel start, so a change that adds one to every layer shows."""

from __future__ import annotations

import pytest

from bench_modules import load_bench_module
from interpreter import skip_unless_triton_runs_cpu_tensors


@pytest.fixture(scope="module")
def host_time():
    skip_unless_triton_runs_cpu_tensors()
    return load_bench_module("host_time.py")


def test_c3d_bn_launches_per_step(host_time):
    model, x = host_time.build("c3d_bn")
    results = host_time.measure(model, x, repeats=2)
    # inference: one kernel per conv → BN → ReLU (→ pool) chain, the 8 convs of C3D-BN
    assert results["eval"]["launches"] == {"conv3d_bias_act_pool_kernel": 8}
    # training, per chain: conv + statistics, their two-step finalize, normalise/act/pool, the
    # running-statistics update; backward: act/pool backward with the BN sums, BN's input gradient,
    # wgrad, and the input gradient (the forward kernel on the flipped weight) — conv1's input needs
    # none, and conv1 recomputes its cheap conv instead
    assert results["train"]["launches"] == {
        "conv3d_bn_stats_kernel": 8, "chan_fold_tiles_kernel": 8, "chan_fold_splits_kernel": 8,
        "bn_act_pool_kernel": 8, "running_stats_update_kernel": 8, "act_pool_backward_reduce_kernel": 8,
        "bn_backward_kernel": 8, "conv3d_wgrad_kernel": 8, "conv3d_bias_act_pool_kernel": 8,
    }


def test_counting_restores_the_interpreter(host_time):
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.run
    with host_time.counted_launches():
        assert interpreter.InterpretedFunction.run is not original
    assert interpreter.InterpretedFunction.run is original


def test_cli_rejects_unknown_models(host_time, capsys):
    with pytest.raises(SystemExit):
        host_time.main(["--models", "c3d_bn,nope"])
    assert "unknown model(s) nope" in capsys.readouterr().err
