"""Opt-in autotuning of the Triton conv launchers' tile configurations (``kernels/_autotune.py``).

On a GPU, the first launch of a shape times every candidate configuration and keeps the fastest. Here
(no GPU) the timer is replaced by a table and the device check is forced, so the launchers really run
every candidate under the interpreter: each one must compute the same convolution, and the launch
after tuning must use the one the timer called fastest without timing again."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from c3dzoo.kernels import _autotune  # noqa: E402
from c3dzoo.kernels import conv3d_bias_act_pool as K  # noqa: E402
from c3dzoo.kernels import conv3d_bn_stats as S  # noqa: E402
from c3dzoo.kernels import conv3d_wgrad as W  # noqa: E402

CUDA = torch.device("cuda")
# the launcher tests run the kernels: interpreted on CPU, compiled on a GPU machine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on, CUDA tunable without a GPU, no choices from other tests; the timer returns, for
    the i-th candidate timed, ``times[i]`` (after running it, as the real timer does)."""
    monkeypatch.setattr(_autotune, "_enabled", True)
    monkeypatch.setattr(_autotune, "_choices", {})
    monkeypatch.setattr(_autotune, "_timings", {})
    monkeypatch.setattr(_autotune, "_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build has none
    state = {"times": [], "calls": 0}

    def fake_time_ms(launch):
        launch()
        i = state["calls"]
        state["calls"] += 1
        t = state["times"][i % len(state["times"])]
        if t is None:
            raise RuntimeError("out of resources (simulated)")
        return t

    monkeypatch.setattr(_autotune, "time_ms", fake_time_ms)
    return state


def _pick(state, times, default="a", candidates=("a", "b", "c"), device=CUDA, key="k"):
    state["times"] = times
    launched = []
    choice = _autotune.pick("kernel", key, default, candidates, launched.append, device)
    return choice, launched


def test_pick_times_each_candidate_once_and_keeps_the_fastest(tuning):
    choice, launched = _pick(tuning, [3.0, 1.0, 2.0])
    assert choice == "b" and launched == ["a", "b", "c"]
    assert _autotune.timings() == {"kernel k": {"a": 3.0, "b": 1.0, "c": 2.0}}
    choice, launched = _pick(tuning, [0.1, 0.1, 0.1])  # tuned: no second measurement
    assert choice == "b" and launched == [] and tuning["calls"] == 3


def test_reset_forgets_choices_and_timings(tuning):
    from c3dzoo.ops.backends import reset_triton_autotune, triton_autotune_timings

    assert _pick(tuning, [3.0, 1.0, 2.0])[0] == "b"
    reset_triton_autotune()
    assert triton_autotune_timings() == {}
    choice, launched = _pick(tuning, [1.0, 3.0, 2.0])  # tuned again, from scratch
    assert choice == "a" and launched == ["a", "b", "c"] and tuning["calls"] == 6
    assert triton_autotune_timings() == {"kernel k": {"a": 1.0, "b": 3.0, "c": 2.0}}


def test_pick_keeps_the_rules_choice_on_ties_and_failures(tuning):
    assert _pick(tuning, [1.0, 1.0, 2.0], key="tie")[0] == "a"
    assert _pick(tuning, [None, 2.0, None], key="one works")[0] == "b"
    assert _pick(tuning, [None, None, None], key="none works")[0] == "a"
    assert _autotune.timings()["kernel none works"] == {"a": math.inf, "b": math.inf, "c": math.inf}


def test_pick_does_not_tune_off_gpu_disabled_or_while_capturing(tuning, monkeypatch):
    assert _pick(tuning, [3.0, 1.0, 2.0], device=torch.device("cpu")) == ("a", [])
    assert _pick(tuning, [3.0, 1.0, 2.0], candidates=("a",)) == ("a", [])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _pick(tuning, [3.0, 1.0, 2.0]) == ("a", [])  # a graph capture must not synchronise
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _pick(tuning, [3.0, 1.0, 2.0])[0] == "b"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _pick(tuning, [9.0])[0] == "b"  # a shape tuned before is captured with its choice
    monkeypatch.setattr(_autotune, "_enabled", False)
    assert not _autotune.applies(CUDA)
    assert tuning["calls"] == 3


def test_deterministic_algorithms_take_the_rules_choice(tuning, monkeypatch):
    """Under torch.use_deterministic_algorithms (or cudnn.deterministic) no configuration hangs on a
    timing, tuned before or not: the fp32 sums' order, and so the result's bits, must repeat."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert _pick(tuning, [3.0, 1.0, 2.0]) == ("a", [])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert _pick(tuning, [3.0, 1.0, 2.0])[0] == "b"
    with torch.backends.cudnn.flags(deterministic=True):
        assert _pick(tuning, [9.0]) == ("a", [])
    assert _pick(tuning, [9.0]) == ("b", [])
    assert tuning["calls"] == 3


def test_switch_and_environment_variable(monkeypatch):
    import c3dzoo

    monkeypatch.setattr(_autotune, "_enabled", False)
    assert c3dzoo.set_triton_autotune(True) is False and _autotune.enabled()
    assert c3dzoo.set_triton_autotune(False) is True and not _autotune.enabled()
    env = dict(os.environ, C3DZOO_TRITON_AUTOTUNE="1")
    code = "from c3dzoo.kernels import _autotune; print(_autotune.enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_flat_k_launches_have_one_candidate():
    default = K.FLAT_K_128x64x16
    assert K.tuning_candidates(default, K.HOPPER_CONFIGS, 3, torch.bfloat16, False) == (default,)


@pytest.mark.parametrize("in_c, expected", [
    (64, {"channel_blocks_128x128x64_w8_s3", "channel_blocks_128x128x32_w8_s4",
          "channel_blocks_128x64x64_w8_s3", "channel_blocks_64x64x64_w4_s3"}),
    (32, {"channel_blocks_128x128x32_w8_s4"}),  # 64-deep K steps would be half masked
])
def test_channel_block_candidates(in_c, expected):
    default = K.CHANNEL_BLOCKS_128x128x32
    names = {c.name for c in K.tuning_candidates(default, K.HOPPER_CONFIGS, in_c, torch.bfloat16, False)}
    assert names == expected


def _x(shape, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _close(actual, expected, what):
    err = (actual.float().cpu() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 2e-3 * scale + 1e-3, f"{what}: max error {err} (scale {scale})"


GEOMETRY = dict(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1))


def test_inference_launcher_tunes_once_and_launches_the_fastest(tuning):
    x, w = _x((1, 64, 2, 4, 4), 0), _x((16, 64, 3, 3, 3), 1) * 0.05
    bias = torch.randn(16)
    expected = F.max_pool3d(F.relu(F.conv3d(x.float(), w.float(), bias, padding=1)), (1, 2, 2))
    x, w, bias = x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE)
    kwargs = dict(GEOMETRY, activation="relu", negative_slope=0.0, pool=(1, 2, 2, 1, 2, 2, 0, 0, 0),
                  out_dtype=torch.float16)
    plan = K.plan_launch(x.shape, 16, dtype=x.dtype, device=x.device, has_bias=True,
                         **{k: v for k, v in kwargs.items() if k != "out_dtype"})
    candidates = K.tuning_candidates(plan.config, K.HOPPER_CONFIGS, 64, x.dtype, False)
    # the rule's choice (on CPU the interpreter's own config) and the four channel-block configs
    assert {c.name for c in candidates} >= {c.name for c in K.HOPPER_CONFIGS if not c.flat_k}
    tuning["times"] = [5.0, 4.0, 3.0, 2.0, 1.0][-len(candidates):]  # the last one is the fastest
    runs = []
    real_launch = K._launch
    K_launch = lambda plan, tensors: (runs.append(plan.config), real_launch(plan, tensors))  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(K, "_launch", K_launch)
        m.setattr(_autotune, "applies", lambda device: True)
        out = K.conv3d_bias_act_pool(x, K.pack_weight(w), bias, **kwargs)
        assert runs == [*candidates, candidates[-1]]  # each candidate timed, then the launch itself
        _close(out, expected, "tuned launch")
        for config in candidates:  # every candidate computes the same layer
            _close(K.conv3d_bias_act_pool(x, K.pack_weight(w), bias, config=config, **kwargs), expected, config.name)
        runs.clear()
        K.conv3d_bias_act_pool(x, K.pack_weight(w), bias, **kwargs)
        assert runs == [candidates[-1]] and tuning["calls"] == 5  # remembered, not timed again


def test_statistics_launcher_tunes_with_its_own_partials(tuning):
    x, w = _x((1, 64, 2, 4, 4), 2), _x((16, 64, 3, 3, 3), 3) * 0.05
    expected = F.conv3d(x.float(), w.float(), padding=1)
    x, w = x.to(DEVICE), w.to(DEVICE)
    default = S.plan_stats_launch(x.shape, 16, has_bias=False, dtype=x.dtype, device=x.device, **GEOMETRY).config
    candidates = K.tuning_candidates(default, K.HOPPER_CONFIGS, 64, x.dtype, False)
    tuning["times"] = [1.0, 2.0, 0.5, 3.0, 4.0][:len(candidates)]  # the third candidate is the fastest
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_autotune, "applies", lambda device: True)
        y, mean, var = S.conv3d_bn_stats(x, K.pack_weight(w), None, **GEOMETRY)
    (choice,) = _autotune._choices.values()
    assert choice == candidates[2] and tuning["calls"] == len(candidates)
    _close(y, expected, "conv output")
    y32 = y.float().cpu()
    _close(mean, y32.mean(dim=(0, 2, 3, 4)), "batch mean")
    _close(var, y32.var(dim=(0, 2, 3, 4), unbiased=False), "batch variance")


def test_weight_gradient_launcher_tunes(tuning):
    x, dy = _x((1, 64, 2, 4, 4), 4), _x((1, 16, 2, 4, 4), 5)
    expected = torch.nn.grad.conv3d_weight(x.float(), (16, 64, 3, 3, 3), dy.float(), padding=1)
    x, dy = x.to(DEVICE), dy.to(DEVICE)
    default = W.plan_wgrad_launch(x.shape, dy.shape, dtype=x.dtype, device=x.device, **GEOMETRY).config
    candidates = K.tuning_candidates(default, W.WGRAD_HOPPER_CONFIGS, 64, x.dtype, False,
                                     channel_step=lambda c: c.block_m)
    # the rule's choice, then the shipped configs whose 64 weight rows per tap C_in fills
    assert {W.WGRAD_64x128x64, W.WGRAD_64x64x64} <= set(candidates) and W.WGRAD_128x128x64 not in candidates
    tuning["times"] = [2.0, 1.0, 3.0][:len(candidates)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_autotune, "applies", lambda device: True)
        grad = W.conv3d_wgrad(x, dy, **GEOMETRY)
    (choice,) = _autotune._choices.values()
    assert choice == candidates[1] and tuning["calls"] == len(candidates)
    _close(grad, expected, "weight gradient")


# the depthwise kernels (CSN's and X3D's conv_b): the rule's config, then every shipped one
DEPTHWISE_GEOMETRY = dict(kernel_size=(3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1), dilation=(1, 1, 1))


def _depthwise_case(seed):
    from c3dzoo.kernels import conv3d_depthwise as DW

    x, w = _x((2, 24, 3, 6, 6), seed, torch.float32), _x((24, 1, 3, 3, 3), seed + 1, torch.float32)
    return DW, x.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("launcher", ["forward", "stats", "dgrad", "wgrad"])
def test_depthwise_launchers_tune_over_their_shipped_configs(tuning, launcher):
    """Each depthwise launcher times the rule's config and both shipped ones once per shape (the
    statistics and weight gradient with partials of each candidate's own tile count), keeps the
    fastest, launches it without timing again, and every candidate computes the same result."""
    DW, x, w = _depthwise_case({"forward": 6, "stats": 8, "dgrad": 10, "wgrad": 12}[launcher])
    packed = DW.pack_depthwise_weight(w)
    y = F.conv3d(x.float().cpu(), w.float().cpu(), groups=24, stride=(1, 2, 2), padding=1)
    dy = _x(tuple(y.shape), 14, torch.float32)
    run = {
        "forward": lambda config=None: DW.conv3d_depthwise(x, packed, None, activation="silu", config=config,
                                                           **DEPTHWISE_GEOMETRY),
        "stats": lambda config=None: DW.conv3d_depthwise_bn_stats(x, packed, None, config=config,
                                                                  **DEPTHWISE_GEOMETRY),
        "dgrad": lambda config=None: DW.conv3d_depthwise_dgrad(dy.to(DEVICE), packed, tuple(x.shape), config=config,
                                                               **DEPTHWISE_GEOMETRY),
        "wgrad": lambda config=None: DW.conv3d_depthwise_wgrad(x, dy.to(DEVICE), config=config, **DEPTHWISE_GEOMETRY),
    }[launcher]
    expected = {
        "forward": lambda: F.silu(y),
        "stats": lambda: (y, y.mean(dim=(0, 2, 3, 4)), y.var(dim=(0, 2, 3, 4), unbiased=False)),
        "dgrad": lambda: torch.nn.grad.conv3d_input(tuple(x.shape), w.float().cpu(), dy, groups=24, stride=(1, 2, 2),
                                                    padding=1),
        "wgrad": lambda: torch.nn.grad.conv3d_weight(x.float().cpu(), tuple(w.shape), dy, groups=24,
                                                     stride=(1, 2, 2), padding=1),
    }[launcher]()

    def check(result, what):
        for got, want in zip(result if isinstance(result, tuple) else (result,),
                             expected if isinstance(expected, tuple) else (expected,)):
            _close(got, want, what)

    tuning["times"] = [3.0, 1.0, 2.0]  # the second candidate (the first shipped config) is the fastest
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_autotune, "applies", lambda device: True)
        check(run(), "tuned launch")
        (choice,) = _autotune._choices.values()
        candidates = [name for name in next(iter(_autotune.timings().values()))]
        assert len(candidates) == 3 and candidates[1:] == [c.name for c in DW.HOPPER_CONFIGS]
        assert choice == DW.HOPPER_CONFIGS[0] and tuning["calls"] == 3
        check(run(), "launch after tuning")
        assert tuning["calls"] == 3  # remembered, not timed again
    for config in DW.HOPPER_CONFIGS:
        check(run(config), config.name)
