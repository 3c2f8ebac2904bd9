// CUDA kernels of c3dzoo._C (first version):
//   * stem: direct Conv3d for C_in <= 4 + folded BatchNorm bias + activation + MaxPool3d, writing
//     only the pooled NDHWC output (the conv output never goes to memory);
//   * stem training forward: the raw conv output and per-block (mean, M2) batch statistics;
//   * BatchNorm statistics: Chan's combination of any training kernel's per-tile (mean, M2) partials
//     into the batch mean / biased var, and the running-statistics update;
//   * net2net gather / divide.
// The per-element math lives in stem_math.h (shared with the g++-built host module c3dzoo._C_host).
// Launchers take raw device pointers (uintptr_t) and a cudaStream_t passed as an integer: no
// libtorch linkage, so the module does not depend on the torch ABI.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "stem_math.h"

namespace c3dzoo {

namespace {

constexpr int kStemThreads = 256;
constexpr int kStemCPT = 8;  // output channels per thread (16-byte bf16/fp16 stores)

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error, or the next launch's check would report it again
    throw std::runtime_error(std::string("c3dzoo._C: ") + what + ": " + cudaGetErrorString(err));
  }
}

template <typename T, int CPT>
__device__ __forceinline__ void store_group(T* __restrict__ dst, const float* v, int valid, bool vec) {
  alignas(16) T tmp[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) from_float(v[j], &tmp[j]);
  constexpr int kBytes = CPT * (int)sizeof(T);
  if (vec && (kBytes % 16) == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(tmp);
    uint4* out = reinterpret_cast<uint4*>(dst);
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) out[k] = src[k];
  } else {
#pragma unroll
    for (int j = 0; j < CPT; ++j)
      if (j < valid) dst[j] = tmp[j];
  }
}

// One thread: CPT consecutive output channels of one pooled position; consecutive threads take
// consecutive channel groups of the same position, so stores are contiguous along channels.
// The folded weight ([taps*C_in][w_stride] fp32, rows padded with zeros to w_stride) and bias
// (w_stride fp32) are staged in shared memory when they fit, else read through the L1/texture path.
template <typename T, int CPT>
__global__ void __launch_bounds__(kStemThreads)
    stem_conv_bias_act_pool_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                   const float* __restrict__ bias, T* __restrict__ out, StemShape s,
                                   int w_stride, int groups, int64_t total, int w_elems, int use_smem,
                                   int vec_store) {
  extern __shared__ float smem[];
  const float* wp = w;
  const float* bp = bias;
  if (use_smem) {
    for (int i = threadIdx.x; i < w_elems; i += blockDim.x) smem[i] = __ldg(w + i);
    for (int i = threadIdx.x; i < w_stride; i += blockDim.x) smem[w_elems + i] = __ldg(bias + i);
    __syncthreads();
    wp = smem;
    bp = smem + w_elems;
  }
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
    const int grp = (int)(t % groups);
    const int64_t pos = t / groups;
    int64_t n;
    int yd, yh, yw;
    stem_unflatten(s, pos, &n, &yd, &yh, &yw);
    const int co0 = grp * CPT;
    float r[CPT];
    stem_pooled_point<CPT>(x, wp, bp, w_stride, s, n, yd, yh, yw, co0, r);
    store_group<T, CPT>(out + pos * s.cout + co0, r, s.cout - co0, vec_store != 0);
  }
}

// Training forward of the stem: the raw conv output y (NDHWC, type T) and per-block partial
// (mean, M2) of every output channel (see kStemStatsThreads in stem_math.h for the work split).
// Thread (r, grp) keeps CPT shifted sums; the block combines its rows' sums in shared memory.
template <typename T, int CPT>
__global__ void __launch_bounds__(kStemStatsThreads)
    stem_conv_stats_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                           T* __restrict__ y, float* __restrict__ part_mean, float* __restrict__ part_m2,
                           StemShape s, int w_stride, int groups, int rows, int64_t positions, int vec_store) {
  extern __shared__ ShiftedSums block_sums[];  // [rows][groups][CPT]
  const int tid = threadIdx.x;
  const bool active = tid < rows * groups;
  const int r = tid / groups, grp = tid % groups;
  ShiftedSums m[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) m[j] = ShiftedSums{0.f, 0.f, 0.f, 0.f};
  if (active) {
    const int co0 = grp * CPT;
    for (int it = 0; it < kStemStatsIters; ++it) {
      const int64_t pos = stem_stats_position(blockIdx.x, rows, r, it);
      if (pos >= positions) break;
      float v[CPT];
      stem_stats_point<CPT>(x, w, bias, w_stride, s, pos, co0, m, v);
      store_group<T, CPT>(y + pos * s.cout + co0, v, s.cout - co0, vec_store != 0);
    }
#pragma unroll
    for (int j = 0; j < CPT; ++j) block_sums[tid * CPT + j] = m[j];
  }
  __syncthreads();
  for (int c = tid; c < s.cout; c += blockDim.x) {
    const Moments total = stem_stats_combine(block_sums, rows, groups, CPT, c);
    part_mean[blockIdx.x * (int64_t)s.cout + c] = total.mean;
    part_m2[blockIdx.x * (int64_t)s.cout + c] = total.m2;
  }
}

template <typename T>
void launch_stem_stats_typed(const StemShape& s, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y,
                             uintptr_t part_mean, uintptr_t part_m2, int w_stride, cudaStream_t stream) {
  constexpr int CPT = kStemCPT;
  const int groups = (s.cout + CPT - 1) / CPT;
  const int rows = stem_stats_rows(s.cout, CPT);
  const int64_t positions = s.n * s.od * s.oh * (int64_t)s.ow;
  const int64_t per_block = (int64_t)rows * kStemStatsIters;
  const int64_t blocks = (positions + per_block - 1) / per_block;
  const size_t smem = (size_t)rows * groups * CPT * sizeof(ShiftedSums);
  const int vec = (s.cout % CPT) == 0 && (y % 16) == 0;
  stem_conv_stats_kernel<T, CPT><<<(unsigned)blocks, kStemStatsThreads, smem, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(bias),
      reinterpret_cast<T*>(y), reinterpret_cast<float*>(part_mean), reinterpret_cast<float*>(part_m2), s,
      w_stride, groups, rows, positions, vec);
  check(cudaGetLastError(), "stem statistics kernel launch");
}

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  if (dev < 64) cached[dev] = count;
  return count;
}

int max_smem_optin() {
  int dev = 0, bytes = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  return bytes;
}

template <typename T>
void launch_stem_typed(const StemShape& s, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out,
                       int w_stride, cudaStream_t stream) {
  constexpr int CPT = kStemCPT;
  auto kernel = stem_conv_bias_act_pool_kernel<T, CPT>;
  const int groups = (s.cout + CPT - 1) / CPT;
  const int64_t total = s.n * s.yd * s.yh * (int64_t)s.yw * groups;
  const int w_elems = s.kd * s.kh * s.kw * s.cin * w_stride;
  size_t smem = (size_t)(w_elems + w_stride) * sizeof(float);
  int use_smem = 1;
  if (smem > (size_t)max_smem_optin()) {
    use_smem = 0;
    smem = 0;
  }
  if (smem > 48 * 1024) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kStemThreads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm < 1) per_sm = 1;
  const int64_t needed = (total + kStemThreads - 1) / kStemThreads;
  const int64_t resident = (int64_t)sm_count() * per_sm;
  const int blocks = (int)(needed < resident ? needed : resident);
  const int vec = (s.cout % CPT) == 0 && (out % 16) == 0;
  kernel<<<blocks, kStemThreads, smem, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(bias),
      reinterpret_cast<T*>(out), s, w_stride, groups, total, w_elems, use_smem, vec);
  check(cudaGetLastError(), "stem kernel launch");
}

// BatchNorm batch statistics, step 1 (stem_math.h, "per-tile (mean, M2) partials"): block
// (blockIdx.x = channel chunk, blockIdx.y = split) -> workspace[split][c].
__global__ void __launch_bounds__(kChanThreads)
    bn_chan_partials_kernel(const float* __restrict__ part_mean, const float* __restrict__ part_m2, int C,
                            int64_t tiles, int64_t positions, int64_t block_m, int64_t per_split,
                            MomentsD* __restrict__ ws) {
  __shared__ MomentsD column[kChanRows * kChanLanes];
  const int lane = threadIdx.x % kChanLanes, r = threadIdx.x / kChanLanes;
  const int c = blockIdx.x * kChanLanes + lane;
  const int64_t begin = (int64_t)blockIdx.y * per_split;
  const int64_t end = begin + per_split < tiles ? begin + per_split : tiles;
  column[threadIdx.x] = c < C ? chan_fold_tiles(part_mean, part_m2, C, c, begin + r, end, tiles, positions, block_m)
                              : MomentsD{0.0, 0.0, 0.0};
  __syncthreads();
  for (int half = kChanRows / 2; half > 0; half /= 2) {
    chan_tree_level(&column[lane], r, half);
    __syncthreads();
  }
  if (r == 0 && c < C) ws[(int64_t)blockIdx.y * C + c] = column[lane];
}

// Step 2: block `chunk` folds the splits of its channels -> mean, biased var.
__global__ void __launch_bounds__(kChanThreads)
    bn_chan_combine_kernel(const MomentsD* __restrict__ ws, int C, int64_t splits, float* __restrict__ mean_out,
                           float* __restrict__ var_out) {
  __shared__ MomentsD column[kChanRows * kChanLanes];
  const int lane = threadIdx.x % kChanLanes, r = threadIdx.x / kChanLanes;
  const int c = blockIdx.x * kChanLanes + lane;
  column[threadIdx.x] = c < C ? chan_fold_splits(ws, C, c, r, splits) : MomentsD{0.0, 0.0, 0.0};
  __syncthreads();
  for (int half = kChanRows / 2; half > 0; half /= 2) {
    chan_tree_level(&column[lane], r, half);
    __syncthreads();
  }
  if (r == 0 && c < C) chan_write(column[lane], c, mean_out, var_out);
}

__global__ void bn_update_running_kernel(const float* __restrict__ mean, const float* __restrict__ var, int C,
                                         int64_t count, float momentum, int cumulative,
                                         const int64_t* __restrict__ num_batches_tracked,
                                         float* __restrict__ running_mean, float* __restrict__ running_var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float factor = bn_running_factor(cumulative, momentum, cumulative ? *num_batches_tracked : 1);
  bn_update_running_one(c, mean, var, count, factor, running_mean, running_var);
}

template <typename E>
__global__ void net2net_gather_kernel(const E* __restrict__ src, E* __restrict__ dst, const int64_t* g,
                                      Net2NetShape s, int64_t total) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += step) {
    int64_t j;
    dst[o] = src[net2net_source_index(s, g, o, &j)];
  }
}

template <typename T>
__global__ void net2net_divide_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* g,
                                      const int64_t* counts, int power, Net2NetShape s, int64_t total) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += step)
    net2net_apply(src, dst, g, counts, power, s, o);
}

int elementwise_blocks(int64_t total) {
  const int64_t needed = (total + 255) / 256;
  const int64_t cap = (int64_t)sm_count() * 16;
  return (int)(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16.
void launch_stem_forward(const StemShape& s, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out,
                         int dtype, int w_stride, uintptr_t stream) {
  if (w_stride < s.cout || w_stride % kStemCPT != 0)
    throw std::invalid_argument("c3dzoo._C: w_stride must be >= C_out and a multiple of 8");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_stem_typed<float>(s, x, w, bias, out, w_stride, st); break;
    case 1: launch_stem_typed<__half>(s, x, w, bias, out, w_stride, st); break;
    case 2: launch_stem_typed<__nv_bfloat16>(s, x, w, bias, out, w_stride, st); break;
    default: throw std::invalid_argument("c3dzoo._C: stem dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

// dtype: 0 float32, 1 float16, 2 bfloat16. Partial buffers: [stem_stats_blocks][C_out] fp32.
void launch_stem_conv_stats(const StemShape& s, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y,
                            uintptr_t part_mean, uintptr_t part_m2, int dtype, int w_stride, uintptr_t stream) {
  if (w_stride < s.cout || w_stride % kStemCPT != 0)
    throw std::invalid_argument("c3dzoo._C: w_stride must be >= C_out and a multiple of 8");
  if (stem_stats_rows(s.cout, kStemCPT) < 1)
    throw std::invalid_argument("c3dzoo._C: the stem statistics kernel takes at most 2048 output channels");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_stem_stats_typed<float>(s, x, w, bias, y, part_mean, part_m2, w_stride, st); break;
    case 1: launch_stem_stats_typed<__half>(s, x, w, bias, y, part_mean, part_m2, w_stride, st); break;
    case 2: launch_stem_stats_typed<__nv_bfloat16>(s, x, w, bias, y, part_mean, part_m2, w_stride, st); break;
    default: throw std::invalid_argument("c3dzoo._C: stem dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

int stem_channels_per_thread() { return kStemCPT; }

int64_t bn_chan_workspace_bytes(int64_t tiles, int C) {
  return chan_splits(tiles, C) * (int64_t)C * (int64_t)sizeof(MomentsD);
}

void launch_bn_chan_finalize(uintptr_t part_mean, uintptr_t part_m2, int64_t tiles, int C, int64_t positions,
                             int64_t block_m, uintptr_t workspace, uintptr_t mean_out, uintptr_t var_out,
                             uintptr_t stream) {
  if (C < 1 || tiles < 1 || block_m < 1 || positions < 1 || positions > tiles * block_m ||
      positions <= (tiles - 1) * block_m)
    throw std::invalid_argument("c3dzoo._C.bn_chan_finalize: tiles, block_m and positions disagree");
  const int64_t splits = chan_splits(tiles, C);
  const int64_t per_split = chan_tiles_per_split(tiles, splits);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto ws = reinterpret_cast<MomentsD*>(workspace);
  const dim3 grid1((unsigned)chan_chunks(C), (unsigned)splits);
  bn_chan_partials_kernel<<<grid1, kChanThreads, 0, st>>>(reinterpret_cast<const float*>(part_mean),
                                                         reinterpret_cast<const float*>(part_m2), C, tiles,
                                                         positions, block_m, per_split, ws);
  check(cudaGetLastError(), "bn_chan_partials kernel launch");
  bn_chan_combine_kernel<<<(unsigned)chan_chunks(C), kChanThreads, 0, st>>>(
      ws, C, splits, reinterpret_cast<float*>(mean_out), reinterpret_cast<float*>(var_out));
  check(cudaGetLastError(), "bn_chan_combine kernel launch");
}

void launch_bn_update_running(uintptr_t mean, uintptr_t var, int C, int64_t count, float momentum, int cumulative,
                              uintptr_t num_batches_tracked, uintptr_t running_mean, uintptr_t running_var,
                              uintptr_t stream) {
  if (C < 1) return;
  if (cumulative && !num_batches_tracked)
    throw std::invalid_argument("c3dzoo._C.bn_update_running: momentum=None needs num_batches_tracked");
  const int threads = 128;
  bn_update_running_kernel<<<(C + threads - 1) / threads, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(mean), reinterpret_cast<const float*>(var), C, count, momentum, cumulative,
      reinterpret_cast<const int64_t*>(num_batches_tracked), reinterpret_cast<float*>(running_mean),
      reinterpret_cast<float*>(running_var));
  check(cudaGetLastError(), "bn_update_running kernel launch");
}

void launch_net2net_gather(uintptr_t src, uintptr_t dst, int elem_size, uintptr_t g, const Net2NetShape& s,
                           uintptr_t stream) {
  const int64_t total = net2net_numel_out(s);
  if (total == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int blocks = elementwise_blocks(total);
  const int64_t* gp = reinterpret_cast<const int64_t*>(g);
  switch (elem_size) {
    case 1: net2net_gather_kernel<uint8_t><<<blocks, 256, 0, st>>>(reinterpret_cast<const uint8_t*>(src), reinterpret_cast<uint8_t*>(dst), gp, s, total); break;
    case 2: net2net_gather_kernel<uint16_t><<<blocks, 256, 0, st>>>(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), gp, s, total); break;
    case 4: net2net_gather_kernel<uint32_t><<<blocks, 256, 0, st>>>(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), gp, s, total); break;
    case 8: net2net_gather_kernel<uint64_t><<<blocks, 256, 0, st>>>(reinterpret_cast<const uint64_t*>(src), reinterpret_cast<uint64_t*>(dst), gp, s, total); break;
    default: throw std::invalid_argument("c3dzoo._C: net2net_gather element size must be 1, 2, 4 or 8");
  }
  check(cudaGetLastError(), "net2net_gather kernel launch");
}

// dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64.
void launch_net2net_divide(uintptr_t src, uintptr_t dst, int dtype, uintptr_t g, uintptr_t counts, int power,
                           const Net2NetShape& s, uintptr_t stream) {
  const int64_t total = net2net_numel_out(s);
  if (total == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int blocks = elementwise_blocks(total);
  const int64_t* gp = reinterpret_cast<const int64_t*>(g);
  const int64_t* cp = reinterpret_cast<const int64_t*>(counts);
  switch (dtype) {
    case 0: net2net_divide_kernel<float><<<blocks, 256, 0, st>>>(reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst), gp, cp, power, s, total); break;
    case 1: net2net_divide_kernel<__half><<<blocks, 256, 0, st>>>(reinterpret_cast<const __half*>(src), reinterpret_cast<__half*>(dst), gp, cp, power, s, total); break;
    case 2: net2net_divide_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(reinterpret_cast<const __nv_bfloat16*>(src), reinterpret_cast<__nv_bfloat16*>(dst), gp, cp, power, s, total); break;
    case 3: net2net_divide_kernel<double><<<blocks, 256, 0, st>>>(reinterpret_cast<const double*>(src), reinterpret_cast<double*>(dst), gp, cp, power, s, total); break;
    default: throw std::invalid_argument("c3dzoo._C: net2net_divide dtype must be 0..3");
  }
  check(cudaGetLastError(), "net2net_divide kernel launch");
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace c3dzoo
