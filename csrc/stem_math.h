// Per-element math shared by the CUDA kernels (csrc/stem.cu, compiled by nvcc) and the host
// reference loops (csrc/host_bindings.cpp, compiled by g++ only), so CPU tests exercise exactly the
// arithmetic the GPU runs.
//
// Layouts: activations are NDHWC (channels_last_3d). The folded conv weight is fp32, laid out
// tap-major with output channels innermost: w[((kd*KH + kh)*KW + kw)*C_in + ci][co] with a row
// stride `w_stride` >= C_out (the device pads rows to a multiple of the channels per thread).
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define C3DZOO_HD __host__ __device__
#define C3DZOO_INLINE __forceinline__
#else
#define C3DZOO_HD
#define C3DZOO_INLINE inline
#endif

namespace c3dzoo {

enum Activation : int { kActNone = 0, kActRelu = 1, kActLeakyRelu = 2 };

constexpr int kMaxStemCin = 4;

// ------------------------------------------------------------------------------------------------
// element conversions (fp32 accumulation)
// ------------------------------------------------------------------------------------------------
C3DZOO_HD C3DZOO_INLINE float to_float(float v) { return v; }
C3DZOO_HD C3DZOO_INLINE float to_float(double v) { return static_cast<float>(v); }
C3DZOO_HD C3DZOO_INLINE void from_float(float v, float* out) { *out = v; }
C3DZOO_HD C3DZOO_INLINE void from_float(float v, double* out) { *out = static_cast<double>(v); }
#ifdef __CUDACC__
__device__ C3DZOO_INLINE float to_float(__half v) { return __half2float(v); }
__device__ C3DZOO_INLINE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ C3DZOO_INLINE void from_float(float v, __half* out) { *out = __float2half_rn(v); }
__device__ C3DZOO_INLINE void from_float(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }
#endif

C3DZOO_HD C3DZOO_INLINE float neg_inf() { return -__builtin_huge_valf(); }

// ------------------------------------------------------------------------------------------------
// stem: direct conv (C_in <= 4) + folded-BN bias + activation + MaxPool3d
// ------------------------------------------------------------------------------------------------
struct StemShape {
  int64_t n;            // batch
  int d, h, w, cin;     // input NDHWC
  int cout;             // output channels
  int kd, kh, kw;       // conv kernel
  int sd, sh, sw;       // conv stride
  int pd, ph, pw;       // conv padding
  int dd, dh, dw;       // conv dilation
  int od, oh, ow;       // conv output size
  int qkd, qkh, qkw;    // pool kernel (1,1,1 when no pool)
  int qsd, qsh, qsw;    // pool stride
  int qpd, qph, qpw;    // pool padding (padded taps count as -inf)
  int yd, yh, yw;       // pooled output size
  int activation;       // Activation
  float negative_slope;
};

C3DZOO_HD C3DZOO_INLINE int conv_out_size(int in, int k, int s, int p, int d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

C3DZOO_HD C3DZOO_INLINE int pool_out_size(int in, int k, int s, int p) { return (in + 2 * p - k) / s + 1; }

C3DZOO_HD C3DZOO_INLINE float activate(float v, int activation, float negative_slope) {
  if (activation == kActRelu) return v < 0.f ? 0.f : v;  // NaN stays NaN, as in torch.relu
  if (activation == kActLeakyRelu) return v > 0.f ? v : v * negative_slope;
  return v;
}

// acc[j] += Σ_taps Σ_ci x[n, id, ih, iw, ci] · w[tap, ci][co0 + j] for j < CPT, over the taps of
// conv output (n, zd, zh, zw) that fall inside the input (zero padding). `w` rows have `w_stride`
// floats; the caller guarantees co0 + CPT <= w_stride.
template <int CPT, typename T>
C3DZOO_HD C3DZOO_INLINE void stem_conv_accumulate(const T* __restrict__ x, const float* __restrict__ w,
                                                  int w_stride, const StemShape& s, int64_t n, int zd,
                                                  int zh, int zw, int co0, float* acc) {
  const int cin = s.cin;
  for (int a = 0; a < s.kd; ++a) {
    const int id = zd * s.sd - s.pd + a * s.dd;
    if (id < 0 || id >= s.d) continue;
    for (int b = 0; b < s.kh; ++b) {
      const int ih = zh * s.sh - s.ph + b * s.dh;
      if (ih < 0 || ih >= s.h) continue;
      const int64_t row = ((n * s.d + id) * s.h + ih) * (int64_t)s.w;
      for (int c = 0; c < s.kw; ++c) {
        const int iw = zw * s.sw - s.pw + c * s.dw;
        if (iw < 0 || iw >= s.w) continue;
        const T* px = x + (row + iw) * cin;
        const float* pw = w + (int64_t)(((a * s.kh + b) * s.kw + c) * cin) * w_stride + co0;
#pragma unroll
        for (int ci = 0; ci < kMaxStemCin; ++ci) {
          if (ci < cin) {
            const float xv = to_float(px[ci]);
            const float* pwc = pw + ci * w_stride;
#pragma unroll
            for (int j = 0; j < CPT; ++j) acc[j] = fmaf(xv, pwc[j], acc[j]);
          }
        }
      }
    }
  }
}

// out[j] = max over the pool window of act(conv(x)[.., co0 + j] + bias[co0 + j]) for pooled output
// (n, yd, yh, yw); window taps outside the conv output are -inf (MaxPool3d padding). The activation
// is applied before the max, so it need not be monotone.
template <int CPT, typename T>
C3DZOO_HD C3DZOO_INLINE void stem_pooled_point(const T* __restrict__ x, const float* __restrict__ w,
                                               const float* __restrict__ bias, int w_stride,
                                               const StemShape& s, int64_t n, int yd, int yh, int yw,
                                               int co0, float* out) {
  float b[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    b[j] = bias[co0 + j];
    out[j] = neg_inf();
  }
  for (int a = 0; a < s.qkd; ++a) {
    const int zd = yd * s.qsd - s.qpd + a;
    if (zd < 0 || zd >= s.od) continue;
    for (int bb = 0; bb < s.qkh; ++bb) {
      const int zh = yh * s.qsh - s.qph + bb;
      if (zh < 0 || zh >= s.oh) continue;
      for (int c = 0; c < s.qkw; ++c) {
        const int zw = yw * s.qsw - s.qpw + c;
        if (zw < 0 || zw >= s.ow) continue;
        float acc[CPT];
#pragma unroll
        for (int j = 0; j < CPT; ++j) acc[j] = b[j];
        stem_conv_accumulate<CPT>(x, w, w_stride, s, n, zd, zh, zw, co0, acc);
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const float v = activate(acc[j], s.activation, s.negative_slope);
          out[j] = (v > out[j] || v != v) ? v : out[j];  // NaN wins, as in MaxPool3d
        }
      }
    }
  }
}

// Decompose a flat pooled NDHW position.
C3DZOO_HD C3DZOO_INLINE void stem_unflatten(const StemShape& s, int64_t pos, int64_t* n, int* yd, int* yh,
                                            int* yw) {
  *yw = (int)(pos % s.yw);
  pos /= s.yw;
  *yh = (int)(pos % s.yh);
  pos /= s.yh;
  *yd = (int)(pos % s.yd);
  *n = pos / s.yd;
}

// Conv output position (n, zd, zh, zw) of flat index `pos` over the un-pooled conv output.
C3DZOO_HD C3DZOO_INLINE void conv_unflatten(const StemShape& s, int64_t pos, int64_t* n, int* zd, int* zh,
                                            int* zw) {
  *zw = (int)(pos % s.ow);
  pos /= s.ow;
  *zh = (int)(pos % s.oh);
  pos /= s.oh;
  *zd = (int)(pos % s.od);
  *n = pos / s.od;
}

// y[j] = conv(x)[n, zd, zh, zw, co0 + j] + bias[co0 + j]: the raw conv output (training forward).
template <int CPT, typename T>
C3DZOO_HD C3DZOO_INLINE void stem_conv_point(const T* __restrict__ x, const float* __restrict__ w,
                                             const float* __restrict__ bias, int w_stride, const StemShape& s,
                                             int64_t n, int zd, int zh, int zw, int co0, float* y) {
#pragma unroll
  for (int j = 0; j < CPT; ++j) y[j] = bias[co0 + j];
  stem_conv_accumulate<CPT>(x, w, w_stride, s, n, zd, zh, zw, co0, y);
}

// ------------------------------------------------------------------------------------------------
// batch statistics of the stem's training forward: per thread, sums of deviations from the thread's
// first value (no division in the loop: an IEEE division is a called subroutine on the GPU, whose
// calling convention spills the live accumulators); then (count, mean, M2) per thread, combined
// across the threads of a block by Chan's formula, so |mean| >> std costs no precision (the shift
// is a sample of the data, and no sum of raw squares is ever formed)
// ------------------------------------------------------------------------------------------------
struct ShiftedSums {
  float count, shift, s1, s2;
};

template <typename S>
struct MomentsOf {
  S count, mean, m2;
};
using Moments = MomentsOf<float>;

C3DZOO_HD C3DZOO_INLINE void shifted_add(ShiftedSums* a, float v) {
  if (a->count == 0.f) a->shift = v;
  const float d = v - a->shift;
  a->s1 += d;
  a->s2 = fmaf(d, d, a->s2);
  a->count += 1.f;
}

// (count, mean − k, M2) of a thread's sums, relative to a shift k near its values: a mean of
// |mean| >> std is never rounded at its own magnitude before the block's combination is done.
C3DZOO_HD C3DZOO_INLINE Moments shifted_moments(const ShiftedSums& a, float k) {
  if (a.count == 0.f) return Moments{0.f, 0.f, 0.f};
  const float correction = a.s1 / a.count;  // mean − shift
  const float m2 = a.s2 - a.s1 * correction;
  return Moments{a.count, (a.shift - k) + correction, m2 < 0.f ? 0.f : m2};  // NaN propagates
}

// Chan's pairwise update: a <- a ∪ b.
template <typename S>
C3DZOO_HD C3DZOO_INLINE void moments_merge(MomentsOf<S>* a, const MomentsOf<S>& b) {
  if (b.count == S(0)) return;
  if (a->count == S(0)) {
    *a = b;
    return;
  }
  const S n = a->count + b.count;
  const S delta = b.mean - a->mean;
  a->mean += delta * (b.count / n);
  a->m2 += b.m2 + delta * delta * (a->count * b.count / n);
  a->count = n;
}

// The training-forward stem's work split, shared by the device kernel and the host loop so both
// produce the same partials: a block of kStemStatsThreads threads is `rows` positions x `groups`
// channel groups (CPT channels each); it walks kStemStatsIters steps of `rows` consecutive conv
// positions, so block b covers positions [b*P, (b+1)*P) with P = rows * kStemStatsIters, and
// writes one (mean, M2) partial row of C_out values.
constexpr int kStemStatsThreads = 256;
constexpr int kStemStatsIters = 16;

C3DZOO_HD C3DZOO_INLINE int stem_stats_rows(int cout, int cpt) {
  const int groups = (cout + cpt - 1) / cpt;
  return groups > kStemStatsThreads ? 0 : kStemStatsThreads / groups;
}

// Flat conv position of step `it` of row `r` in block `b` (see kStemStatsThreads).
C3DZOO_HD C3DZOO_INLINE int64_t stem_stats_position(int64_t b, int rows, int r, int it) {
  return (b * kStemStatsIters + it) * rows + r;
}

// One position of one thread: the conv output's CPT values, rounded to the stored type T (the
// statistics are those of the values stored, which the normalisation then reads), added to the
// thread's sums `a[CPT]`; returned in `v` for the caller to store.
template <int CPT, typename T>
C3DZOO_HD C3DZOO_INLINE void stem_stats_point(const T* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ bias, int w_stride, const StemShape& s,
                                              int64_t pos, int co0, ShiftedSums* a, float* v) {
  int64_t n;
  int zd, zh, zw;
  conv_unflatten(s, pos, &n, &zd, &zh, &zw);
  stem_conv_point<CPT>(x, w, bias, w_stride, s, n, zd, zh, zw, co0, v);
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    T stored;
    from_float(v[j], &stored);
    v[j] = to_float(stored);
    shifted_add(&a[j], v[j]);
  }
}

// Channel c's (mean, M2) over a block: Chan's combination of the block's rows in row order, from
// the threads' sums laid out [rows][groups][CPT], in offsets from row 0's shift (so the merges work
// at the data's spread, not at |mean|); the mean gets that shift back once, at the end.
C3DZOO_HD C3DZOO_INLINE Moments stem_stats_combine(const ShiftedSums* thread_sums, int rows, int groups, int cpt,
                                                   int c) {
  const int grp = c / cpt, j = c % cpt;
  const float k = thread_sums[grp * cpt + j].shift;
  Moments acc{0.f, 0.f, 0.f};
  for (int r = 0; r < rows; ++r) moments_merge(&acc, shifted_moments(thread_sums[(r * groups + grp) * cpt + j], k));
  acc.mean += k;
  return acc;
}

// Host-side builder (validates and derives output sizes). Returns false with *err set when invalid.
inline bool make_stem_shape(int64_t n, int d, int h, int w, int cin, int cout, const int* kernel,
                            const int* stride, const int* padding, const int* dilation, const int* pool_kernel,
                            const int* pool_stride, const int* pool_padding, int activation,
                            float negative_slope, StemShape* s, const char** err) {
  if (n < 1 || d < 1 || h < 1 || w < 1 || cout < 1) { *err = "empty input or output"; return false; }
  if (cin < 1 || cin > kMaxStemCin) { *err = "the stem kernel needs 1 <= C_in <= 4"; return false; }
  if (activation < kActNone || activation > kActLeakyRelu) { *err = "unknown activation"; return false; }
  for (int i = 0; i < 3; ++i) {
    if (kernel[i] < 1 || stride[i] < 1 || dilation[i] < 1 || padding[i] < 0 || pool_kernel[i] < 1 ||
        pool_stride[i] < 1 || pool_padding[i] < 0 || 2 * pool_padding[i] > pool_kernel[i]) {
      *err = "invalid kernel/stride/padding/dilation or pool parameters";
      return false;
    }
  }
  s->n = n; s->d = d; s->h = h; s->w = w; s->cin = cin; s->cout = cout;
  s->kd = kernel[0]; s->kh = kernel[1]; s->kw = kernel[2];
  s->sd = stride[0]; s->sh = stride[1]; s->sw = stride[2];
  s->pd = padding[0]; s->ph = padding[1]; s->pw = padding[2];
  s->dd = dilation[0]; s->dh = dilation[1]; s->dw = dilation[2];
  s->od = conv_out_size(d, s->kd, s->sd, s->pd, s->dd);
  s->oh = conv_out_size(h, s->kh, s->sh, s->ph, s->dh);
  s->ow = conv_out_size(w, s->kw, s->sw, s->pw, s->dw);
  s->qkd = pool_kernel[0]; s->qkh = pool_kernel[1]; s->qkw = pool_kernel[2];
  s->qsd = pool_stride[0]; s->qsh = pool_stride[1]; s->qsw = pool_stride[2];
  s->qpd = pool_padding[0]; s->qph = pool_padding[1]; s->qpw = pool_padding[2];
  s->yd = pool_out_size(s->od, s->qkd, s->qsd, s->qpd);
  s->yh = pool_out_size(s->oh, s->qkh, s->qsh, s->qph);
  s->yw = pool_out_size(s->ow, s->qkw, s->qsw, s->qpw);
  s->activation = activation;
  s->negative_slope = negative_slope;
  if (s->od < 1 || s->oh < 1 || s->ow < 1 || s->yd < 1 || s->yh < 1 || s->yw < 1) {
    *err = "the conv or pool output is empty";
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// BatchNorm batch statistics from per-tile (mean, M2) partials, the format every training-forward
// kernel emits ([tiles][C] fp32; every tile holds block_m positions but the last, which holds the
// rest, so counts follow from the shape and nothing is read back), combined by Chan's formula in
// double (no Σy² is formed, so |mean| >> std costs no precision):
//   step 1: block (chunk, split) takes kChanLanes consecutive channels (coalesced row reads) and the
//           tiles of its split; its kChanRows threads per channel stride those tiles, then a tree
//           over the kChanRows partial results -> one (count, mean, M2) per (split, channel);
//   step 2: block `chunk` folds the splits the same way -> batch mean and biased variance (fp32).
// ------------------------------------------------------------------------------------------------
using MomentsD = MomentsOf<double>;
constexpr int kChanLanes = 32;
constexpr int kChanRows = 8;
constexpr int kChanThreads = kChanLanes * kChanRows;
constexpr int64_t kChanMinTilesPerSplit = 128;  // >= 16 tiles per thread: the fold, not the tree, dominates
constexpr int64_t kChanMaxBlocks = 1024;        // a few waves on a Hopper-sized GPU

C3DZOO_HD C3DZOO_INLINE int chan_chunks(int C) { return (C + kChanLanes - 1) / kChanLanes; }

C3DZOO_HD C3DZOO_INLINE int64_t chan_splits(int64_t tiles, int C) {
  const int64_t by_tiles = (tiles + kChanMinTilesPerSplit - 1) / kChanMinTilesPerSplit;
  const int64_t by_blocks = kChanMaxBlocks / chan_chunks(C);
  int64_t s = by_tiles < by_blocks ? by_tiles : by_blocks;
  return s < 1 ? 1 : s;
}

C3DZOO_HD C3DZOO_INLINE int64_t chan_tiles_per_split(int64_t tiles, int64_t splits) {
  return (tiles + splits - 1) / splits;
}

C3DZOO_HD C3DZOO_INLINE double chan_tile_count(int64_t r, int64_t tiles, int64_t positions, int64_t block_m) {
  return (double)(r == tiles - 1 ? positions - (tiles - 1) * block_m : block_m);
}

// Step 1, one thread: channel c over tiles begin, begin + kChanRows, ... < end.
C3DZOO_HD C3DZOO_INLINE MomentsD chan_fold_tiles(const float* part_mean, const float* part_m2, int C, int c,
                                                 int64_t begin, int64_t end, int64_t tiles, int64_t positions,
                                                 int64_t block_m) {
  MomentsD acc{0.0, 0.0, 0.0};
  for (int64_t r = begin; r < end; r += kChanRows) {
    const MomentsD tile{chan_tile_count(r, tiles, positions, block_m), (double)part_mean[r * C + c],
                        (double)part_m2[r * C + c]};
    moments_merge(&acc, tile);
  }
  return acc;
}

// Step 2, one thread: channel c over splits begin, begin + kChanRows, ... < splits of the workspace
// ([splits][C] MomentsD).
C3DZOO_HD C3DZOO_INLINE MomentsD chan_fold_splits(const MomentsD* ws, int C, int c, int64_t begin, int64_t splits) {
  MomentsD acc{0.0, 0.0, 0.0};
  for (int64_t s = begin; s < splits; s += kChanRows) moments_merge(&acc, ws[s * C + c]);
  return acc;
}

// One level of a block's tree: row r (< half) of a lane's column absorbs row r + half. The column is
// `kChanRows` entries kChanLanes apart (a [kChanRows][kChanLanes] shared array); levels half = 4, 2, 1
// follow each other (a barrier apart on the device).
C3DZOO_HD C3DZOO_INLINE void chan_tree_level(MomentsD* column, int r, int half) {
  if (r < half) moments_merge(&column[r * kChanLanes], column[(r + half) * kChanLanes]);
}

C3DZOO_HD C3DZOO_INLINE void chan_write(const MomentsD& m, int c, float* mean_out, float* var_out) {
  mean_out[c] = (float)m.mean;
  var_out[c] = m.count > 0.0 ? (float)(m.m2 / m.count) : 0.f;
}

// ------------------------------------------------------------------------------------------------
// Running statistics, as nn.BatchNorm3d in training mode: running = (1 − f)·running + f·batch with
// the unbiased variance var·count/(count − 1); f = momentum, or 1/num_batches_tracked (already
// incremented) for momentum=None (a cumulative average).
// ------------------------------------------------------------------------------------------------
C3DZOO_HD C3DZOO_INLINE float bn_running_factor(int cumulative, float momentum, int64_t num_batches_tracked) {
  if (cumulative) return 1.0f / (float)(num_batches_tracked > 0 ? num_batches_tracked : 1);
  return momentum;
}

C3DZOO_HD C3DZOO_INLINE void bn_update_running_one(int c, const float* mean, const float* var, int64_t count,
                                                   float factor, float* running_mean, float* running_var) {
  const int64_t denom = count - 1 > 1 ? count - 1 : 1;
  const float unbiased = var[c] * (float)((double)count / (double)denom);
  running_mean[c] = running_mean[c] * (1.0f - factor) + mean[c] * factor;
  running_var[c] = running_var[c] * (1.0f - factor) + unbiased * factor;
}

// ------------------------------------------------------------------------------------------------
// Net2Net remap index math. A tensor is viewed as (outer, size_old, inner) along the remapped
// dimension; `group` consecutive entries form one unit (channel). The output is
// (outer, new_units * group, inner) and output unit j copies old unit g[j].
// ------------------------------------------------------------------------------------------------
struct Net2NetShape {
  int64_t outer;
  int64_t old_size;   // old_units * group
  int64_t inner;
  int64_t new_units;  // len(g)
  int64_t group;
};

C3DZOO_HD C3DZOO_INLINE int64_t net2net_numel_out(const Net2NetShape& s) {
  return s.outer * s.new_units * s.group * s.inner;
}

// Flat source index of flat output index `o`; *unit receives the new unit index j.
C3DZOO_HD C3DZOO_INLINE int64_t net2net_source_index(const Net2NetShape& s, const int64_t* g, int64_t o,
                                                     int64_t* unit) {
  const int64_t i = o % s.inner;
  int64_t r = o / s.inner;
  const int64_t new_size = s.new_units * s.group;
  const int64_t k = r % new_size;
  const int64_t outer = r / new_size;
  const int64_t j = k / s.group;
  const int64_t q = k % s.group;
  *unit = j;
  return (outer * s.old_size + g[j] * s.group + q) * s.inner + i;
}

// Divisor counts[g[j]] ** power (power 0: no division).
C3DZOO_HD C3DZOO_INLINE double net2net_divisor(const int64_t* g, const int64_t* counts, int64_t j, int power) {
  const double c = (double)counts[g[j]];
  double d = 1.0;
  for (int p = 0; p < power; ++p) d *= c;
  return d;
}

C3DZOO_HD C3DZOO_INLINE float net2net_div(float v, double d) { return v / (float)d; }
C3DZOO_HD C3DZOO_INLINE double net2net_div(double v, double d) { return v / d; }
#ifdef __CUDACC__
__device__ C3DZOO_INLINE __half net2net_div(__half v, double d) {
  __half dh, r;
  from_float((float)d, &dh);  // the divisor is rounded to the tensor's dtype, as the reference does
  from_float(to_float(v) / to_float(dh), &r);
  return r;
}
__device__ C3DZOO_INLINE __nv_bfloat16 net2net_div(__nv_bfloat16 v, double d) {
  __nv_bfloat16 dh, r;
  from_float((float)d, &dh);
  from_float(to_float(v) / to_float(dh), &r);
  return r;
}
#endif

// dst[o] = src[source(o)] (power < 0: plain gather) or src[source(o)] / counts[g[j]] ** power.
template <typename T>
C3DZOO_HD C3DZOO_INLINE void net2net_apply(const T* __restrict__ src, T* __restrict__ dst, const int64_t* g,
                                           const int64_t* counts, int power, const Net2NetShape& s,
                                           int64_t o) {
  int64_t j;
  const int64_t idx = net2net_source_index(s, g, o, &j);
  if (power < 0) {
    dst[o] = src[idx];
  } else {
    dst[o] = net2net_div(src[idx], net2net_divisor(g, counts, j, power));
  }
}

}  // namespace c3dzoo
