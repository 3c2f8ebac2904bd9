// pybind11 module c3dzoo._C: the CUDA launchers of stem.cu over raw device pointers (uintptr_t) and a
// cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream). No torch headers and
// no libtorch linkage: compiled by the host compiler, linked with stem.cu's object and static cudart.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>

#include "stem_math.h"

namespace py = pybind11;
using I3 = std::array<int, 3>;

namespace c3dzoo {
void launch_stem_forward(const StemShape& s, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int dtype,
                         int w_stride, uintptr_t stream);
int stem_channels_per_thread();
void launch_stem_conv_stats(const StemShape& s, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y,
                            uintptr_t part_mean, uintptr_t part_m2, int dtype, int w_stride, uintptr_t stream);
int64_t bn_chan_workspace_bytes(int64_t tiles, int C);
void launch_bn_chan_finalize(uintptr_t part_mean, uintptr_t part_m2, int64_t tiles, int C, int64_t positions,
                             int64_t block_m, uintptr_t workspace, uintptr_t mean_out, uintptr_t var_out,
                             uintptr_t stream);
void launch_bn_update_running(uintptr_t mean, uintptr_t var, int C, int64_t count, float momentum, int cumulative,
                              uintptr_t num_batches_tracked, uintptr_t running_mean, uintptr_t running_var,
                              uintptr_t stream);
void launch_net2net_gather(uintptr_t src, uintptr_t dst, int elem_size, uintptr_t g, const Net2NetShape& s,
                           uintptr_t stream);
void launch_net2net_divide(uintptr_t src, uintptr_t dst, int dtype, uintptr_t g, uintptr_t counts, int power,
                           const Net2NetShape& s, uintptr_t stream);
int cuda_runtime_version();
}  // namespace c3dzoo

namespace {

c3dzoo::StemShape stem_shape(int64_t n, int d, int h, int w, int cin, int cout, const I3& kernel, const I3& stride,
                             const I3& padding, const I3& dilation, const I3& pool_kernel, const I3& pool_stride,
                             const I3& pool_padding, int activation, float negative_slope) {
  c3dzoo::StemShape s;
  const char* err = nullptr;
  if (!c3dzoo::make_stem_shape(n, d, h, w, cin, cout, kernel.data(), stride.data(), padding.data(),
                               dilation.data(), pool_kernel.data(), pool_stride.data(), pool_padding.data(),
                               activation, negative_slope, &s, &err))
    throw std::invalid_argument(std::string("c3dzoo._C.stem_forward: ") + err);
  return s;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "c3dzoo CUDA kernels (stem conv+BN+act+pool, BN statistics, Net2Net remap) over raw device pointers";
  m.attr("STEM_CHANNELS_PER_THREAD") = c3dzoo::stem_channels_per_thread();
  m.attr("MAX_STEM_CIN") = c3dzoo::kMaxStemCin;
  m.def("cuda_runtime_version", &c3dzoo::cuda_runtime_version);
  m.def(
      "stem_forward",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int dtype, int64_t n, int d, int h, int wd,
         int cin, int cout, I3 kernel, I3 stride, I3 padding, I3 dilation, I3 pool_kernel, I3 pool_stride,
         I3 pool_padding, int activation, float negative_slope, int w_stride, uintptr_t stream) {
        const auto s = stem_shape(n, d, h, wd, cin, cout, kernel, stride, padding, dilation, pool_kernel,
                                  pool_stride, pool_padding, activation, negative_slope);
        py::gil_scoped_release release;
        c3dzoo::launch_stem_forward(s, x, w, bias, out, dtype, w_stride, stream);
      },
      "Pooled NDHWC output of conv(C_in<=4)+bias+act+maxpool. x: NDHWC (dtype 0 fp32/1 fp16/2 bf16); "
      "w: fp32 [kd*kh*kw*C_in][w_stride] (C_out innermost, zero-padded); bias: fp32 [w_stride].",
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("dtype"), py::arg("n"), py::arg("d"),
      py::arg("h"), py::arg("w_size"), py::arg("cin"), py::arg("cout"), py::arg("kernel"), py::arg("stride"),
      py::arg("padding"), py::arg("dilation"), py::arg("pool_kernel"), py::arg("pool_stride"),
      py::arg("pool_padding"), py::arg("activation"), py::arg("negative_slope"), py::arg("w_stride"),
      py::arg("stream"));
  m.def(
      "stem_conv_stats",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y, uintptr_t part_mean, uintptr_t part_m2, int dtype,
         int64_t n, int d, int h, int wd, int cin, int cout, I3 kernel, I3 stride, I3 padding, I3 dilation,
         int w_stride, uintptr_t stream) {
        const I3 one{1, 1, 1}, zero{0, 0, 0};
        const auto s = stem_shape(n, d, h, wd, cin, cout, kernel, stride, padding, dilation, one, one, zero,
                                  c3dzoo::kActNone, 0.f);
        py::gil_scoped_release release;
        c3dzoo::launch_stem_conv_stats(s, x, w, bias, y, part_mean, part_m2, dtype, w_stride, stream);
      },
      "Training forward of the stem: y = conv(x) + bias (NDHWC, dtype 0 fp32/1 fp16/2 bf16) and per-block "
      "fp32 (mean, M2) partials [blocks][C_out], blocks = ceil(positions / stem_stats_positions_per_block(C_out)).",
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("part_mean"), py::arg("part_m2"),
      py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("h"), py::arg("w_size"), py::arg("cin"), py::arg("cout"),
      py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("w_stride"),
      py::arg("stream"));
  m.def("stem_stats_positions_per_block", [](int cout) {
    return c3dzoo::stem_stats_rows(cout, c3dzoo::stem_channels_per_thread()) * c3dzoo::kStemStatsIters;
  });
  m.def("bn_chan_workspace_bytes", &c3dzoo::bn_chan_workspace_bytes,
        "Bytes of device workspace bn_chan_finalize needs for `tiles` partial rows of C channels.",
        py::arg("tiles"), py::arg("C"));
  m.def(
      "bn_chan_finalize",
      [](uintptr_t part_mean, uintptr_t part_m2, int64_t tiles, int C, int64_t positions, int64_t block_m,
         uintptr_t workspace, uintptr_t mean_out, uintptr_t var_out, uintptr_t stream) {
        c3dzoo::launch_bn_chan_finalize(part_mean, part_m2, tiles, C, positions, block_m, workspace, mean_out,
                                        var_out, stream);
      },
      "Batch mean and biased variance (fp32 [C]) from per-tile fp32 (mean, M2) partials [tiles][C] of "
      "block_m positions each (the last tile: the rest of `positions`), by Chan's combination in double.",
      py::arg("part_mean"), py::arg("part_m2"), py::arg("tiles"), py::arg("C"), py::arg("positions"),
      py::arg("block_m"), py::arg("workspace"), py::arg("mean_out"), py::arg("var_out"), py::arg("stream"));
  m.def(
      "bn_update_running",
      [](uintptr_t mean, uintptr_t var, int C, int64_t count, float momentum, int cumulative, uintptr_t nbt,
         uintptr_t running_mean, uintptr_t running_var, uintptr_t stream) {
        c3dzoo::launch_bn_update_running(mean, var, C, count, momentum, cumulative, nbt, running_mean, running_var,
                                         stream);
      },
      "In place, as nn.BatchNorm3d: running = (1-f)*running + f*batch (unbiased var over `count` values); "
      "f = momentum, or 1/num_batches_tracked (int64 on device, already incremented) when cumulative=1.",
      py::arg("mean"), py::arg("var"), py::arg("C"), py::arg("count"), py::arg("momentum"), py::arg("cumulative"),
      py::arg("num_batches_tracked"), py::arg("running_mean"), py::arg("running_var"), py::arg("stream"));
  m.def(
      "net2net_gather",
      [](uintptr_t src, uintptr_t dst, int elem_size, uintptr_t g, int64_t outer, int64_t old_size, int64_t inner,
         int64_t new_units, int64_t group, uintptr_t stream) {
        c3dzoo::Net2NetShape s{outer, old_size, inner, new_units, group};
        c3dzoo::launch_net2net_gather(src, dst, elem_size, g, s, stream);
      },
      py::arg("src"), py::arg("dst"), py::arg("elem_size"), py::arg("g"), py::arg("outer"), py::arg("old_size"),
      py::arg("inner"), py::arg("new_units"), py::arg("group"), py::arg("stream"));
  m.def(
      "net2net_divide",
      [](uintptr_t src, uintptr_t dst, int dtype, uintptr_t g, uintptr_t counts, int power, int64_t outer,
         int64_t old_size, int64_t inner, int64_t new_units, int64_t group, uintptr_t stream) {
        c3dzoo::Net2NetShape s{outer, old_size, inner, new_units, group};
        c3dzoo::launch_net2net_divide(src, dst, dtype, g, counts, power, s, stream);
      },
      "dtype 0 fp32, 1 fp16, 2 bf16, 3 fp64; g and counts int64.", py::arg("src"), py::arg("dst"),
      py::arg("dtype"), py::arg("g"), py::arg("counts"), py::arg("power"), py::arg("outer"), py::arg("old_size"),
      py::arg("inner"), py::arg("new_units"), py::arg("group"), py::arg("stream"));
}
