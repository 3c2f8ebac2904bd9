"""The Triton BatchNorm statistics kernels (``kernels.batch_norm_statistics``): the finalize (Chan's
combination of per-tile partials in float64, two launches) against the exact combination and the
data, and the running-statistics update against ``nn.BatchNorm3d``; and that the training path
takes them where they run (``ops.batch_statistics``). Under the interpreter on CPU; on a GPU the
compiled kernels (skipped without one)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from interpreter import skip_unless_triton_runs_cpu_tensors
from statistics_checks import assert_finalized, column_data, tile_partials

pytest.importorskip("triton")

from c3dzoo.kernels import batch_norm_statistics as K  # noqa: E402
from c3dzoo.ops import batch_statistics  # noqa: E402

CUDA = torch.cuda.is_available()


def _device():
    if CUDA:
        return "cuda"
    skip_unless_triton_runs_cpu_tensors()
    return "cpu"


# (positions, channels, block_m): one tile; a short last tile; several splits with a partial
# channel block (2,188 tiles → 9 splits, 40 channels); more splits than the second fold takes at once
# (8,501 tiles of 2 positions, the last of 1 → 34 splits > BLOCK_S = 32)
SHAPES = [(64, 3, 64), (1000, 5, 64), (70000, 40, 32), (17001, 5, 2)]


@pytest.mark.parametrize("big_mean", [False, True], ids=["centred", "mean1e5std"])
@pytest.mark.parametrize("positions,channels,block_m", SHAPES)
def test_finalize_matches_the_exact_combination_and_the_data(positions, channels, block_m, big_mean):
    device = _device()
    y = column_data(positions, channels, big_mean)
    part_mean, part_m2 = tile_partials(y, block_m)
    tiles = part_mean.shape[0]
    mean, var = K.finalize_statistics(part_mean.to(device), part_m2.to(device), positions, block_m)
    assert_finalized(mean, var, y, part_mean, part_m2, positions, block_m, big_mean)
    if tiles > K.MIN_TILES_PER_SPLIT:
        assert K.splits_for(tiles, channels) > 1  # the case exercises the second fold
    if positions == 17001:
        assert K.splits_for(tiles, channels) > K.BLOCK_T  # ... and its loop over blocks of splits


def test_finalize_rejects_what_it_cannot_combine():
    device = _device()
    part = torch.zeros(4, 3, device=device)
    for positions in (3 * 8, 4 * 8 + 1):  # the last tile empty; more than 4 tiles of 8 hold
        with pytest.raises(ValueError, match="disagree"):
            K.finalize_statistics(part, part, positions, 8)
    with pytest.raises(ValueError, match="float32"):
        K.finalize_statistics(part.double(), part.double(), 32, 8)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_update_matches_batchnorm3d(momentum):
    """Three training steps of ``nn.BatchNorm3d`` against the update kernel fed the same batch
    statistics (num_batches_tracked incremented first, as the caller does)."""
    device = _device()
    channels = 37  # two channel blocks, the second partial
    bn = nn.BatchNorm3d(channels, momentum=momentum).to(device)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(channels, generator=g))
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    for _ in range(3):
        x = (torch.randn(2, channels, 3, 4, 5, generator=g) * 2 + 1).to(device)
        bn.train()(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
        nbt.add_(1)
        K.update_running_stats_(running_mean, running_var, nbt, mean, var, x.numel() // channels, momentum)
    assert int(nbt) == int(bn.num_batches_tracked) == 3
    # stock's own kernel rounds its sums differently: agreement to fp32 rounding of the statistics
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(running_var, bn.running_var, rtol=2e-6, atol=2e-7)


def test_running_update_rejects_what_it_does_not_take():
    device = _device()
    v = torch.ones(4, device=device)
    with pytest.raises(ValueError, match="running_mean must be a contiguous float32"):
        K.update_running_stats_(v.double(), v.clone(), None, v, v, 10, 0.1)
    with pytest.raises(ValueError, match="mean must be a contiguous float32 vector of 4"):
        K.update_running_stats_(v.clone(), v.clone(), None, torch.ones(5, device=device), v, 10, 0.1)
    with pytest.raises(ValueError, match="momentum=None"):
        K.update_running_stats_(v.clone(), v.clone(), None, v, v, 10, None)


def test_the_triton_training_path_takes_them(monkeypatch):
    """A triton-backend training step: its statistics come from these kernels (not the torch ops)
    where they run, and the layer still matches stock; ``C3DZOO_TRITON_STATISTICS=0`` restores the
    torch ops. (Without the CUDA extension's statistics: on a GPU with ``c3dzoo._C`` those run.)"""
    from c3dzoo.nn import Conv3dBNAct
    from c3dzoo.ops import cuda_impl

    device = _device()
    monkeypatch.setenv(cuda_impl.STATISTICS_ENV_VAR, "0")
    assert batch_statistics.implementation(torch.empty(0, device=device)) == "triton"
    calls = []
    for name in ("finalize_statistics", "update_running_stats_"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    torch.manual_seed(0)
    layer = Conv3dBNAct(3, 5, 3, padding=1, pool=nn.MaxPool3d((1, 2, 2)), backend="triton", momentum=None).to(device)
    stock = nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), nn.ReLU(), nn.MaxPool3d((1, 2, 2)))
    x = torch.randn(2, 3, 4, 6, 6, device=device)
    for _ in range(2):
        torch.testing.assert_close(layer.train()(x), stock.train()(x), rtol=1e-5, atol=1e-5)
    assert calls == ["finalize_statistics", "update_running_stats_"] * 2
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer.bn, name), getattr(stock[1], name), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(batch_statistics.TRITON_ENV_VAR, "0")
    assert batch_statistics.implementation(torch.empty(0, device=device)) == "torch"
    layer(x)
    assert len(calls) == 4
