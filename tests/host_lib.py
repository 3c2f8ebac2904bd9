"""``c3dzoo._C``'s functions, served on CPU by ``c3dzoo._C_host`` (the g++ build of the same
per-element math, fp32/fp64), so that the cuda backend's tensor bookkeeping — weight packing, BN
folding, layouts, output and partial-buffer shapes, the statistics finalize (for every training
backend) and running-statistics update, the normalise step, the Net2Net remap arguments — runs in CPU
tests, not first on a GPU.

``use_host_extension(monkeypatch)`` points ``c3dzoo.ops.cuda_impl`` at it for one test.
"""

from __future__ import annotations

import ctypes
import importlib

_FP32, _FP64 = 0, 3


class HostExtension:
    """The subset of ``c3dzoo._C`` that ``cuda_impl`` and ``net2net_remap`` call, same signatures."""

    def __init__(self):
        self.host = importlib.import_module("c3dzoo._C_host")
        self.MAX_STEM_CIN = self.host.MAX_STEM_CIN
        self.calls = []  # names of the functions called, in order

    def _fp32_only(self, name, dtype):
        self.calls.append(name)
        if dtype != _FP32:
            raise NotImplementedError(f"{name}: the host build runs fp32 only (dtype code {dtype})")

    def stem_forward(self, x, w, bias, out, dtype, n, d, h, w_size, cin, cout, kernel, stride, padding, dilation,
                     pool_kernel, pool_stride, pool_padding, activation, negative_slope, w_stride, stream):
        self._fp32_only("stem_forward", dtype)
        assert stream == 0
        self.host.stem_forward_host(x, w, bias, out, n, d, h, w_size, cin, cout, kernel, stride, padding, dilation,
                                    pool_kernel, pool_stride, pool_padding, activation, negative_slope, w_stride)

    def stem_conv_stats(self, x, w, bias, y, part_mean, part_m2, dtype, n, d, h, w_size, cin, cout, kernel,
                        stride, padding, dilation, w_stride, stream):
        self._fp32_only("stem_conv_stats", dtype)
        assert stream == 0
        self.host.stem_conv_stats_host(x, w, bias, y, part_mean, part_m2, n, d, h, w_size, cin, cout, kernel,
                                       stride, padding, dilation, 8, w_stride)

    def stem_stats_positions_per_block(self, cout):
        return self.host.stem_stats_positions_per_block(cout)

    def bn_chan_workspace_bytes(self, tiles, c):
        return self.host.bn_chan_workspace_bytes(tiles, c)

    def bn_chan_finalize(self, part_mean, part_m2, tiles, c, positions, block_m, workspace, mean, var, stream):
        self.calls.append("bn_chan_finalize")
        assert stream == 0
        self.host.bn_chan_finalize_host(part_mean, part_m2, tiles, c, positions, block_m, workspace, mean, var)

    def bn_update_running(self, mean, var, c, count, momentum, cumulative, num_batches_tracked, running_mean,
                          running_var, stream):
        self.calls.append("bn_update_running")
        assert stream == 0
        # the device kernel reads num_batches_tracked from device memory; the host function takes its value
        nbt = ctypes.c_int64.from_address(num_batches_tracked).value if num_batches_tracked else 1
        self.host.bn_update_running_host(mean, var, c, count, momentum, cumulative, nbt, running_mean, running_var)

    def net2net_gather(self, src, dst, elem_size, g, outer, old_size, inner, new_units, group, stream):
        self.calls.append("net2net_gather")
        assert stream == 0
        self.host.net2net_gather_host(src, dst, elem_size, g, outer, old_size, inner, new_units, group)

    def net2net_divide(self, src, dst, dtype, g, counts, power, outer, old_size, inner, new_units, group, stream):
        self.calls.append("net2net_divide")
        assert stream == 0
        if dtype not in (_FP32, _FP64):
            raise NotImplementedError(f"net2net_divide: the host build runs fp32/fp64 only (dtype code {dtype})")
        self.host.net2net_divide_host(src, dst, dtype, g, counts, power, outer, old_size, inner, new_units, group)


def use_host_extension(monkeypatch) -> HostExtension:
    """Make ``c3dzoo.ops.cuda_impl`` call the host build on CPU tensors for the rest of the test (the
    BatchNorm statistics of every backend included: ``c3dzoo.ops.batch_statistics``)."""
    from c3dzoo.ops import cuda_impl

    ext = HostExtension()
    monkeypatch.setattr(cuda_impl, "extension", lambda: ext)
    monkeypatch.setattr(cuda_impl, "DEVICE_TYPE", "cpu")
    return ext
