"""The per-element math of the CUDA kernels (csrc/stem_math.h), run on the host through the g++-built
``c3dzoo._C_host`` module, against stock PyTorch: the stem conv + folded BN + activation + MaxPool3d
(held to the parity budget of tests/parity.py in fp32, float64 reference), the BatchNorm finalize
statistics (Chan's combination of per-tile partials against float64, the running-statistics update
against ``nn.BatchNorm3d``), and the Net2Net gather/divide against
``c3dzoo.ops.net2net_remap``. No GPU and no build step needed (the module is built by pip install).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from c3dzoo.ops import net2net_remap as remap
from c3dzoo.ops import reference
from c3dzoo.ops.backends import LayerParams
from c3dzoo.ops.cuda_impl import pack_stem_weight
from parity import assert_parity
from statistics_checks import assert_finalized, column_data, tile_partials

host = pytest.importorskip(
    "c3dzoo._C_host",
    reason="c3dzoo._C_host is not built (reinstall with pybind11 importable: pip install -e . --no-build-isolation)",
)

ACT = {"none": 0, "relu": 1, "leaky_relu": 2}


def _params(c_in, c_out, kernel, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    fan_in = c_in * kernel[0] * kernel[1] * kernel[2]
    return dict(
        weight=torch.randn(c_out, c_in, *kernel, generator=g, dtype=torch.float64) / fan_in**0.5,
        bias=(torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1) if bias else None,
        bn_weight=1 + 0.2 * torch.randn(c_out, generator=g, dtype=torch.float64),
        bn_bias=0.1 * torch.randn(c_out, generator=g, dtype=torch.float64),
        running_mean=0.1 * torch.randn(c_out, generator=g, dtype=torch.float64),
        running_var=0.5 + torch.rand(c_out, generator=g, dtype=torch.float64),
    )


def _run_host(x, w_folded, b_folded, *, stride, padding, dilation, pool, activation, negative_slope):
    n, c_in, d, h, w = x.shape
    c_out = w_folded.shape[0]
    packed, bias, w_stride = pack_stem_weight(w_folded.float(), b_folded.float())
    xc = x.float().permute(0, 2, 3, 4, 1).contiguous()  # NDHWC
    if pool:
        pk, ps, pp = list(pool[0:3]), list(pool[3:6]), list(pool[6:9])
    else:
        pk, ps, pp = [1, 1, 1], [1, 1, 1], [0, 0, 0]
    conv = [(s + 2 * p - dl * (k - 1) - 1) // st + 1
            for s, k, st, p, dl in zip((d, h, w), w_folded.shape[2:], stride, padding, dilation)]
    size = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip(conv, pk, ps, pp)]
    out = torch.empty(n, *size, c_out, dtype=torch.float32)
    host.stem_forward_host(
        xc.data_ptr(), packed.data_ptr(), bias.data_ptr(), out.data_ptr(), n, d, h, w, c_in, c_out,
        list(w_folded.shape[2:]), list(stride), list(padding), list(dilation), pk, ps, pp,
        ACT[activation], float(negative_slope), w_stride,
    )
    return out.permute(0, 4, 1, 2, 3)


def _pool9(pool):
    if pool is None:
        return ()
    k, s, p = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * 3 for v in pool)
    return k + s + p


CASES = {
    # name: (N, C_in, (D, H, W), C_out, kernel, stride, padding, dilation, pool, activation, slope, norm)
    "c3d_conv1_pool1": (2, 3, (4, 12, 14), 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1),
                        ((1, 2, 2), (1, 2, 2), 0), "relu", 0.01, "running"),
    "r3d_stem": (1, 3, (4, 15, 17), 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), (1, 1, 1), None, "relu", 0.01, "running"),
    "r2plus1d_stem": (2, 3, (3, 13, 11), 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), (1, 1, 1), None, "relu", 0.01,
                      "running"),
    "odd_sizes_leaky": (1, 2, (5, 7, 9), 13, (2, 3, 3), (2, 1, 3), (1, 1, 2), (1, 2, 1),
                        ((2, 3, 2), (2, 2, 1), (1, 1, 0)), "leaky_relu", 0.1, "running"),
    "pool5_padding_no_bn": (2, 4, (4, 6, 6), 16, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1),
                            ((2, 2, 2), (2, 2, 2), (0, 1, 1)), "none", 0.01, "none"),
    "overlapping_pool_negative_slope": (1, 1, (5, 9, 8), 9, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1),
                                        ((3, 3, 3), (2, 2, 2), 1), "leaky_relu", -0.5, "running"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stem_matches_stock(name):
    n, c_in, spatial, c_out, kernel, stride, padding, dilation, pool, act, slope, norm = CASES[name]
    p = _params(c_in, c_out, kernel, seed=hash(name) % 1000)
    x64 = torch.randn(n, c_in, *spatial, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pool9 = _pool9(pool)

    def run_reference(dtype):
        t = {k: (None if v is None else v.to(dtype)) for k, v in p.items()}
        out, *_ = reference.forward(
            x64.to(dtype), t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], t["running_mean"],
            t["running_var"], LayerParams.of(norm, 1e-5, stride, padding, dilation, act, slope, pool9),
        )
        return out

    ref = run_reference(torch.float64)
    stock = run_reference(torch.float32)
    if norm == "running":
        wf, bf = reference.fold_batch_norm(p["weight"].float(), p["bias"].float(), p["bn_weight"].float(),
                                           p["bn_bias"].float(), p["running_mean"].float(),
                                           p["running_var"].float(), 1e-5)
    else:
        wf, bf = p["weight"].float(), p["bias"].float()
    fused = _run_host(x64.float(), wf, bf, stride=stride, padding=padding, dilation=dilation, pool=pool9,
                      activation=act, negative_slope=slope)
    assert_parity(fused, stock, ref, torch.float32, f"stem {name}")


def test_stem_rejects_bad_shapes():
    x = torch.zeros(1, 1, 1, 1, 5)
    w = torch.zeros(1, 8)
    b = torch.zeros(8)
    out = torch.zeros(8)
    with pytest.raises(ValueError, match="C_in"):
        host.stem_forward_host(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), 1, 1, 1, 1, 5, 1,
                               [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0], 1, 0.0, 8)


def _chan_finalize_host(part_mean, part_m2, positions, block_m):
    tiles, c = part_mean.shape
    workspace = torch.empty(host.bn_chan_workspace_bytes(tiles, c), dtype=torch.uint8)
    mean, var = torch.full((c,), float("nan")), torch.full((c,), float("nan"))
    host.bn_chan_finalize_host(part_mean.data_ptr(), part_m2.data_ptr(), tiles, c, positions, block_m,
                               workspace.data_ptr(), mean.data_ptr(), var.data_ptr())
    return mean, var


# positions, C, block_m: one tile; a short last tile; channels not a multiple of the 32 lanes; enough
# tiles for several splits (and a split count that does not divide them); one channel
CHAN_CASES = [(7, 3, 16), (1000, 5, 64), (4100, 70, 16), (70_001, 33, 8), (513, 1, 4)]


@pytest.mark.parametrize("big_mean", [False, True], ids=["unit", "mean_1e3_std_1e-2"])
@pytest.mark.parametrize("positions,C,block_m", CHAN_CASES)
def test_chan_finalize_matches_float64(positions, C, block_m, big_mean):
    """The device's two-step Chan combination (host build, same order) against float64 statistics of
    the data, and against the torch-ops finalize the other paths use, when |mean| ≫ std too."""
    y = column_data(positions, C, big_mean)
    part_mean, part_m2 = tile_partials(y, block_m)
    tiles = part_mean.shape[0]
    assert host.bn_chan_splits(tiles, C) == max(1, min(-(-tiles // 128), 1024 // -(-C // 32)))
    mean, var = _chan_finalize_host(part_mean, part_m2, positions, block_m)
    assert_finalized(mean, var, y, part_mean, part_m2, positions, block_m, big_mean)


def test_chan_finalize_rejects_inconsistent_counts():
    part = torch.zeros(4, 3)
    for positions in (0, 3 * 8, 4 * 8 + 1):  # empty; the last tile empty; more than 4 tiles hold
        with pytest.raises(ValueError, match="disagree"):
            _chan_finalize_host(part, part, positions, 8)


def _update_host(mean, var, count, momentum, nbt, running_mean, running_var):
    host.bn_update_running_host(mean.data_ptr(), var.data_ptr(), mean.numel(), count,
                                0.0 if momentum is None else momentum, int(momentum is None), nbt,
                                running_mean.data_ptr(), running_var.data_ptr())


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_update_matches_batchnorm3d(momentum):
    C = 7
    bn = nn.BatchNorm3d(C, momentum=momentum)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(C, generator=g))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):  # several steps: the cumulative average depends on num_batches_tracked
        y = torch.randn(3, C, 2, 5, 4, generator=g) * (1 + torch.arange(C).view(1, C, 1, 1, 1)) + 0.5
        bn.train()(y)
        var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3, 4), correction=0)
        _update_host(mean64.float(), var64.float(), y.numel() // C, momentum, int(bn.num_batches_tracked), rm, rv)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-6)


def test_running_update_matches_reference_update():
    C = 5
    g = torch.Generator().manual_seed(4)
    mean, var = torch.randn(C, generator=g), torch.rand(C, generator=g)
    rm, rv = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    reference.update_running_stats(rm2, rv2, None, mean, var, 40, 0.1)
    _update_host(mean, var, 40, 0.1, 0, rm, rv)
    torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-7)


def _view_sizes(shape, dim):
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = 1
    for s in shape[dim + 1:]:
        inner *= s
    return outer, shape[dim], inner


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.float16])
@pytest.mark.parametrize("shape,dim", [((6, 3, 3, 3, 3), 0), ((6, 5, 2), 1), ((4,), 0), ((3, 5, 7), 2)])
def test_net2net_gather(dtype, shape, dim):
    g_ = torch.Generator().manual_seed(5)
    old = shape[dim]
    g = remap.replica_mapping(old, old + 3, g_)
    t = (torch.randn(*shape, generator=g_) * 10).to(dtype)
    expected = remap.gather_units(t, g, dim)
    out = torch.empty_like(expected)
    outer, size, inner = _view_sizes(shape, dim)
    host.net2net_gather_host(t.data_ptr(), out.data_ptr(), t.element_size(), g.data_ptr(), outer, size, inner,
                             g.numel(), 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("shape,dim,group", [((8, 6, 3, 3, 3), 1, 1), ((5, 24), 1, 4), ((6, 4), 0, 1), ((2, 3, 10), 2, 5)])
def test_net2net_divide(dtype, power, shape, dim, group):
    g_ = torch.Generator().manual_seed(6)
    old_units = shape[dim] // group
    g = remap.replica_mapping(old_units, old_units + 4, g_)
    counts = remap.replica_counts(g, old_units)
    t = torch.randn(*shape, generator=g_).to(dtype)
    expected = remap.divide_incoming(t, g, counts, dim=dim, group=group, power=power)
    out = torch.empty_like(expected)
    outer, size, inner = _view_sizes(shape, dim)
    host.net2net_divide_host(t.data_ptr(), out.data_ptr(), 0 if dtype == torch.float32 else 3, g.data_ptr(),
                             counts.data_ptr(), power, outer, size, inner, g.numel(), group)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# (N, D, H, W, C_in, C_out, kernel, stride, padding, conv bias offset): C3D's conv1, the r3d stem,
# R(2+1)D's 45-channel first stem conv (no multiple of the 8 channels a thread), and |mean| >> std
STEM_STATS_CASES = {
    "c3d_conv1": (2, 4, 10, 10, 3, 16, (3, 3, 3), (1, 1, 1), (1, 1, 1), 0.0),
    "r3d_stem": (1, 3, 14, 14, 3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), 0.0),
    "r2plus1d_45": (2, 3, 9, 9, 3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), 0.0),
    "mean_dominates": (2, 4, 10, 10, 3, 16, (3, 3, 3), (1, 1, 1), (1, 1, 1), 1000.0),
}


@pytest.mark.parametrize("name", sorted(STEM_STATS_CASES))
def test_stem_conv_stats_matches_stock(name):
    """The training-forward stem on the host: y = conv(x) + b, and per-block (mean, M2) partials
    whose Chan combination (``kernels._statistics``) is the batch mean and biased variance."""
    from c3dzoo.kernels._statistics import finalize_statistics

    n, d, h, w, c_in, c_out, kernel, stride, padding, offset = STEM_STATS_CASES[name]
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(n, c_in, d, h, w, generator=g, dtype=torch.float64)
    weight64 = torch.randn(c_out, c_in, *kernel, generator=g, dtype=torch.float64) / (c_in * kernel[0] * kernel[1] * kernel[2]) ** 0.5
    bias64 = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1 + offset
    x, weight, bias = x64.float(), weight64.float(), bias64.float()
    w_packed, b_packed, w_stride = pack_stem_weight(weight, bias)
    y_ref = torch.nn.functional.conv3d(x64, weight64, bias64, stride, padding)
    positions = y_ref.numel() // c_out
    per_block = host.stem_stats_positions_per_block(c_out)
    blocks = -(-positions // per_block)
    y = torch.empty(y_ref.shape, memory_format=torch.channels_last_3d)
    part_mean, part_m2 = torch.empty(blocks, c_out), torch.empty(blocks, c_out)
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    host.stem_conv_stats_host(xc.data_ptr(), w_packed.data_ptr(), b_packed.data_ptr(), y.data_ptr(),
                              part_mean.data_ptr(), part_m2.data_ptr(), n, d, h, w, c_in, c_out, list(kernel),
                              list(stride), list(padding), [1, 1, 1], 8, w_stride)
    y_stock = torch.nn.functional.conv3d(x, weight, bias, stride, padding)
    assert_parity(y, y_stock, y_ref, torch.float32, f"{name}: conv output")
    mean, var = finalize_statistics(part_mean, part_m2, positions, per_block)
    # the statistics of the values stored (fp32 here), against float64 over those values, and
    # stock's own fp32 statistics as the budget
    var_ref, mean_ref = torch.var_mean(y.double(), dim=(0, 2, 3, 4), correction=0)
    var_stock, mean_stock = torch.var_mean(y, dim=(0, 2, 3, 4), correction=0)
    assert_parity(mean, mean_stock, mean_ref, torch.float32, f"{name}: mean")
    assert_parity(var, var_stock, var_ref, torch.float32, f"{name}: var")
    # the partials are per block of per_block consecutive positions, as finalize assumes
    flat = y.permute(0, 2, 3, 4, 1).reshape(positions, c_out).double()
    first = flat[:per_block]
    torch.testing.assert_close(part_mean[0].double(), first.mean(0), rtol=1e-5, atol=1e-5 * (1 + offset))
    torch.testing.assert_close(part_m2[0].double(), first.var(0, correction=0) * first.shape[0], rtol=1e-4, atol=1e-4)
