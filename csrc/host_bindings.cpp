// pybind11 module c3dzoo._C_host: host reference loops over the per-element math of stem_math.h,
// compiled by g++ only (no CUDA), so CPU tests exercise exactly the arithmetic the GPU kernels run.
// Buffers are raw pointers to contiguous CPU memory (numpy arrays or CPU torch tensors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <vector>
#include <stdexcept>
#include <string>

#include "stem_math.h"

namespace py = pybind11;
using I3 = std::array<int, 3>;

namespace {

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Same thread decomposition as the device kernel: CPT = 1 per step, over all channels.
void stem_forward_host(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t n, int d, int h, int wd,
                       int cin, int cout, I3 kernel, I3 stride, I3 padding, I3 dilation, I3 pool_kernel,
                       I3 pool_stride, I3 pool_padding, int activation, float negative_slope, int w_stride) {
  c3dzoo::StemShape s;
  const char* err = nullptr;
  if (!c3dzoo::make_stem_shape(n, d, h, wd, cin, cout, kernel.data(), stride.data(), padding.data(),
                               dilation.data(), pool_kernel.data(), pool_stride.data(), pool_padding.data(),
                               activation, negative_slope, &s, &err))
    throw std::invalid_argument(std::string("c3dzoo._C_host.stem_forward_host: ") + err);
  if (w_stride < cout) throw std::invalid_argument("c3dzoo._C_host.stem_forward_host: w_stride < C_out");
  const float* xp = cptr<float>(x);
  const float* wp = cptr<float>(w);
  const float* bp = cptr<float>(bias);
  float* op = mptr<float>(out);
  const int64_t positions = s.n * s.yd * s.yh * (int64_t)s.yw;
  py::gil_scoped_release release;
  for (int64_t pos = 0; pos < positions; ++pos) {
    int64_t nn;
    int yd, yh, yw;
    c3dzoo::stem_unflatten(s, pos, &nn, &yd, &yh, &yw);
    for (int co = 0; co < cout; ++co) {
      float r[1];
      c3dzoo::stem_pooled_point<1>(xp, wp, bp, w_stride, s, nn, yd, yh, yw, co, r);
      op[pos * cout + co] = r[0];
    }
  }
}

// The training-forward stem's y and (mean, M2) partials, block by block and thread by thread in the
// device kernel's order (stem_math.h), so the partials are the device's up to rounding: nvcc fuses
// a*b+c into FMAs (--fmad=true, its default) where the host compiler does not.
void stem_conv_stats_host(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y, uintptr_t part_mean,
                          uintptr_t part_m2, int64_t n, int d, int h, int wd, int cin, int cout, I3 kernel, I3 stride,
                          I3 padding, I3 dilation, int cpt, int w_stride) {
  c3dzoo::StemShape s;
  const char* err = nullptr;
  const I3 one{1, 1, 1}, zero{0, 0, 0};
  if (!c3dzoo::make_stem_shape(n, d, h, wd, cin, cout, kernel.data(), stride.data(), padding.data(),
                               dilation.data(), one.data(), one.data(), zero.data(), c3dzoo::kActNone, 0.f, &s, &err))
    throw std::invalid_argument(std::string("c3dzoo._C_host.stem_conv_stats_host: ") + err);
  if (cpt != 8) throw std::invalid_argument("c3dzoo._C_host.stem_conv_stats_host: the device kernel uses 8 channels a thread");
  if (w_stride < cout || w_stride % cpt) throw std::invalid_argument("c3dzoo._C_host.stem_conv_stats_host: bad w_stride");
  constexpr int CPT = 8;
  const int groups = (cout + CPT - 1) / CPT;
  const int rows = c3dzoo::stem_stats_rows(cout, CPT);
  const int64_t positions = s.n * s.od * s.oh * (int64_t)s.ow;
  const int64_t per_block = (int64_t)rows * c3dzoo::kStemStatsIters;
  const int64_t blocks = (positions + per_block - 1) / per_block;
  std::vector<c3dzoo::ShiftedSums> sums((size_t)rows * groups * CPT);
  py::gil_scoped_release release;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int r = 0; r < rows; ++r) {
      for (int grp = 0; grp < groups; ++grp) {
        c3dzoo::ShiftedSums* m = &sums[((size_t)r * groups + grp) * CPT];
        for (int j = 0; j < CPT; ++j) m[j] = c3dzoo::ShiftedSums{0.f, 0.f, 0.f, 0.f};
        for (int it = 0; it < c3dzoo::kStemStatsIters; ++it) {
          const int64_t pos = c3dzoo::stem_stats_position(b, rows, r, it);
          if (pos >= positions) break;
          float v[CPT];
          c3dzoo::stem_stats_point<CPT>(cptr<float>(x), cptr<float>(w), cptr<float>(bias), w_stride, s, pos,
                                        grp * CPT, m, v);
          for (int j = 0; j < CPT && grp * CPT + j < cout; ++j) mptr<float>(y)[pos * cout + grp * CPT + j] = v[j];
        }
      }
    }
    for (int c = 0; c < cout; ++c) {
      const c3dzoo::Moments total = c3dzoo::stem_stats_combine(sums.data(), rows, groups, CPT, c);
      mptr<float>(part_mean)[b * cout + c] = total.mean;
      mptr<float>(part_m2)[b * cout + c] = total.m2;
    }
  }
}

int64_t bn_chan_workspace_bytes(int64_t tiles, int C) {
  return c3dzoo::chan_splits(tiles, C) * (int64_t)C * (int64_t)sizeof(c3dzoo::MomentsD);
}

// The device's two steps, block by block and thread by thread in its order (the trees included), so
// the results are the device's up to FMA contraction (nvcc's default, not the host compiler's).
// `workspace` as on the device ([splits][C] MomentsD).
void bn_chan_finalize_host(uintptr_t part_mean, uintptr_t part_m2, int64_t tiles, int C, int64_t positions,
                           int64_t block_m, uintptr_t workspace, uintptr_t mean_out, uintptr_t var_out) {
  using c3dzoo::kChanLanes;
  using c3dzoo::kChanRows;
  using c3dzoo::MomentsD;
  if (C < 1 || tiles < 1 || block_m < 1 || positions < 1 || positions > tiles * block_m ||
      positions <= (tiles - 1) * block_m)
    throw std::invalid_argument("c3dzoo._C_host.bn_chan_finalize_host: tiles, block_m and positions disagree");
  const int64_t splits = c3dzoo::chan_splits(tiles, C);
  const int64_t per_split = c3dzoo::chan_tiles_per_split(tiles, splits);
  MomentsD* ws = mptr<MomentsD>(workspace);
  std::vector<MomentsD> column(kChanRows * kChanLanes);
  py::gil_scoped_release release;
  const auto tree = [&]() {
    for (int half = kChanRows / 2; half > 0; half /= 2)
      for (int lane = 0; lane < kChanLanes; ++lane)
        for (int r = 0; r < kChanRows; ++r) c3dzoo::chan_tree_level(&column[lane], r, half);
  };
  for (int chunk = 0; chunk < c3dzoo::chan_chunks(C); ++chunk) {
    for (int64_t split = 0; split < splits; ++split) {
      const int64_t begin = split * per_split;
      const int64_t end = begin + per_split < tiles ? begin + per_split : tiles;
      for (int t = 0; t < kChanRows * kChanLanes; ++t) {
        const int lane = t % kChanLanes, r = t / kChanLanes, c = chunk * kChanLanes + lane;
        column[t] = c < C ? c3dzoo::chan_fold_tiles(cptr<float>(part_mean), cptr<float>(part_m2), C, c, begin + r,
                                                    end, tiles, positions, block_m)
                          : MomentsD{0.0, 0.0, 0.0};
      }
      tree();
      for (int lane = 0; lane < kChanLanes; ++lane)
        if (chunk * kChanLanes + lane < C) ws[split * C + chunk * kChanLanes + lane] = column[lane];
    }
  }
  for (int chunk = 0; chunk < c3dzoo::chan_chunks(C); ++chunk) {
    for (int t = 0; t < kChanRows * kChanLanes; ++t) {
      const int lane = t % kChanLanes, r = t / kChanLanes, c = chunk * kChanLanes + lane;
      column[t] = c < C ? c3dzoo::chan_fold_splits(ws, C, c, r, splits) : MomentsD{0.0, 0.0, 0.0};
    }
    tree();
    for (int lane = 0; lane < kChanLanes; ++lane)
      if (chunk * kChanLanes + lane < C)
        c3dzoo::chan_write(column[lane], chunk * kChanLanes + lane, mptr<float>(mean_out), mptr<float>(var_out));
  }
}

void bn_update_running_host(uintptr_t mean, uintptr_t var, int C, int64_t count, float momentum, int cumulative,
                            int64_t num_batches_tracked, uintptr_t running_mean, uintptr_t running_var) {
  const float factor = c3dzoo::bn_running_factor(cumulative, momentum, num_batches_tracked);
  for (int c = 0; c < C; ++c)
    c3dzoo::bn_update_running_one(c, cptr<float>(mean), cptr<float>(var), count, factor, mptr<float>(running_mean),
                                  mptr<float>(running_var));
}

template <typename E>
void gather_loop(uintptr_t src, uintptr_t dst, const int64_t* g, const c3dzoo::Net2NetShape& s) {
  const int64_t total = c3dzoo::net2net_numel_out(s);
  for (int64_t o = 0; o < total; ++o) {
    int64_t j;
    mptr<E>(dst)[o] = cptr<E>(src)[c3dzoo::net2net_source_index(s, g, o, &j)];
  }
}

void net2net_gather_host(uintptr_t src, uintptr_t dst, int elem_size, uintptr_t g, int64_t outer, int64_t old_size,
                         int64_t inner, int64_t new_units, int64_t group) {
  c3dzoo::Net2NetShape s{outer, old_size, inner, new_units, group};
  const int64_t* gp = cptr<int64_t>(g);
  switch (elem_size) {
    case 1: gather_loop<uint8_t>(src, dst, gp, s); break;
    case 2: gather_loop<uint16_t>(src, dst, gp, s); break;
    case 4: gather_loop<uint32_t>(src, dst, gp, s); break;
    case 8: gather_loop<uint64_t>(src, dst, gp, s); break;
    default: throw std::invalid_argument("net2net_gather_host: element size must be 1, 2, 4 or 8");
  }
}

// dtype 0 float32, 3 float64 (the device module also takes 1 fp16 / 2 bf16).
void net2net_divide_host(uintptr_t src, uintptr_t dst, int dtype, uintptr_t g, uintptr_t counts, int power,
                         int64_t outer, int64_t old_size, int64_t inner, int64_t new_units, int64_t group) {
  c3dzoo::Net2NetShape s{outer, old_size, inner, new_units, group};
  const int64_t total = c3dzoo::net2net_numel_out(s);
  const int64_t* gp = cptr<int64_t>(g);
  const int64_t* cp = cptr<int64_t>(counts);
  if (dtype == 0) {
    for (int64_t o = 0; o < total; ++o) c3dzoo::net2net_apply(cptr<float>(src), mptr<float>(dst), gp, cp, power, s, o);
  } else if (dtype == 3) {
    for (int64_t o = 0; o < total; ++o) c3dzoo::net2net_apply(cptr<double>(src), mptr<double>(dst), gp, cp, power, s, o);
  } else {
    throw std::invalid_argument("net2net_divide_host: dtype must be 0 (float32) or 3 (float64)");
  }
}

}  // namespace

PYBIND11_MODULE(_C_host, m) {
  m.doc() = "Host (g++) reference loops over c3dzoo's CUDA per-element math (csrc/stem_math.h), float32";
  m.attr("MAX_STEM_CIN") = c3dzoo::kMaxStemCin;
  m.def("stem_conv_stats_host", &stem_conv_stats_host,
        "Training-forward stem on the host: y = conv(x) + bias (NDHWC fp32) and per-block (mean, M2) "
        "partials [blocks][C_out] in the device kernel's work split.",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("part_mean"), py::arg("part_m2"),
        py::arg("n"), py::arg("d"), py::arg("h"), py::arg("w_size"), py::arg("cin"), py::arg("cout"),
        py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("cpt"),
        py::arg("w_stride"));
  m.def("stem_stats_positions_per_block", [](int cout) {
    return c3dzoo::stem_stats_rows(cout, 8) * c3dzoo::kStemStatsIters;
  });
  m.def("stem_forward_host", &stem_forward_host,
        "Pooled NDHWC fp32 output of conv(C_in<=4)+bias+act+maxpool; x NDHWC fp32, w fp32 "
        "[kd*kh*kw*C_in][w_stride] (C_out innermost), bias fp32 [>= C_out].",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("n"), py::arg("d"), py::arg("h"),
        py::arg("w_size"), py::arg("cin"), py::arg("cout"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("pool_kernel"), py::arg("pool_stride"), py::arg("pool_padding"),
        py::arg("activation"), py::arg("negative_slope"), py::arg("w_stride"));
  m.def("bn_chan_workspace_bytes", &bn_chan_workspace_bytes, py::arg("tiles"), py::arg("C"));
  m.def("bn_chan_splits", &c3dzoo::chan_splits, py::arg("tiles"), py::arg("C"));
  m.def("bn_chan_finalize_host", &bn_chan_finalize_host,
        "Batch mean and biased variance from per-tile (mean, M2) partials, in the device kernels' order.",
        py::arg("part_mean"), py::arg("part_m2"), py::arg("tiles"), py::arg("C"), py::arg("positions"),
        py::arg("block_m"), py::arg("workspace"), py::arg("mean_out"), py::arg("var_out"));
  m.def("bn_update_running_host", &bn_update_running_host, py::arg("mean"), py::arg("var"), py::arg("C"),
        py::arg("count"), py::arg("momentum"), py::arg("cumulative"), py::arg("num_batches_tracked"),
        py::arg("running_mean"), py::arg("running_var"));
  m.def("net2net_gather_host", &net2net_gather_host, py::arg("src"), py::arg("dst"), py::arg("elem_size"),
        py::arg("g"), py::arg("outer"), py::arg("old_size"), py::arg("inner"), py::arg("new_units"),
        py::arg("group"));
  m.def("net2net_divide_host", &net2net_divide_host, py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("g"),
        py::arg("counts"), py::arg("power"), py::arg("outer"), py::arg("old_size"), py::arg("inner"),
        py::arg("new_units"), py::arg("group"));
}
