// CUDA kernels of the sparse hot path (see sparse_kernels.h).  No torch headers: compiled by
// nvcc alone in the tests (`nvcc -c`), linked into commlib._native by setup.py when torch is
// a CUDA build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "sparse_kernels.h"

namespace commlib {
namespace cuda {
namespace {

constexpr int kThreads = 256;                    // threads per selection block
constexpr int kRows = int(kSelectTile / kThreads);  // 16 rows of 256 contiguous elements per tile
static_assert(kSelectTile % kThreads == 0, "a tile is whole rows");
constexpr int kWarps = kThreads / 32;

// |x| >= thr, false for NaN (as torch's x.abs() >= thr).
__device__ __forceinline__ bool selected(float x, float thr) { return fabsf(x) >= thr; }

// DGC momentum correction of one element; returns the new v (u updated in place by the caller).
__device__ __forceinline__ float dgc_step(float u, float v, float g, float m, bool nesterov, float* u_new) {
  float uu, vv;
  if (nesterov) {
    uu = __fmul_rn(__fadd_rn(u, g), m);  // Lin et al. 2018, App. B: u <- (u + g)·m
    vv = __fadd_rn(__fadd_rn(v, uu), g);  //                          v <- v + u + g
  } else {
    uu = __fadd_rn(__fmul_rn(m, u), g);  // §3.2 momentum correction: u <- m·u + g
    vv = __fadd_rn(v, uu);               //                           v <- v + u
  }
  *u_new = uu;
  return vv;
}

__device__ __forceinline__ uint32_t mag_bits(float f) { return __float_as_uint(f) & 0x7fffffffu; }

__device__ __forceinline__ float load_value(const void* p, int vcode, int64_t j) {
  switch (vcode) {
    case 1: return __half2float(static_cast<const __half*>(p)[j]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[j]);
    case 3: return __double2float_rn(static_cast<const double*>(p)[j]);  // round to nearest (overflow: Inf), as torch
    case 4: return float(static_cast<const int8_t*>(p)[j]);
    default: return static_cast<const float*>(p)[j];
  }
}

__device__ __forceinline__ void store_value(void* p, int vcode, int64_t j, float f) {
  switch (vcode) {
    case 1: static_cast<__half*>(p)[j] = __float2half_rn(f); break;
    case 2: static_cast<__nv_bfloat16*>(p)[j] = __float2bfloat16_rn(f); break;
    default: static_cast<float*>(p)[j] = f; break;
  }
}

__device__ __forceinline__ int64_t load_index(const void* p, bool idx64, int64_t j) {
  return idx64 ? static_cast<const int64_t*>(p)[j] : int64_t(static_cast<const int32_t*>(p)[j]);
}

// ---- selection: count, scan, write ---------------------------------------------------------------
__global__ void count_kernel(const float* __restrict__ x, int64_t n, float thr, int64_t* __restrict__ counts) {
  const int64_t base = int64_t(blockIdx.x) * kSelectTile;
  int c = 0;
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;  // coalesced rows
    c += __syncthreads_count(i < n && selected(x[i], thr));
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = c;
}

__global__ void dgc_count_kernel(float* __restrict__ u, float* __restrict__ v, const float* __restrict__ g,
                                 int64_t n, float m, bool nesterov, float thr, int64_t* __restrict__ counts) {
  const int64_t base = int64_t(blockIdx.x) * kSelectTile;
  int c = 0;
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;
    bool sel = false;
    if (i < n) {
      float uu;
      const float vv = dgc_step(u[i], v[i], g[i], m, nesterov, &uu);
      u[i] = uu;
      v[i] = vv;
      sel = selected(vv, thr);
    }
    c += __syncthreads_count(sel);
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = c;
}

// Exclusive scan of counts[0, tiles) in one block; counts[tiles] = total.
__global__ void scan_kernel(int64_t* counts, int64_t tiles) {
  __shared__ int64_t part[1024];
  const int t = threadIdx.x, nt = blockDim.x;
  const int64_t per = (tiles + nt - 1) / nt;
  const int64_t lo = min(tiles, per * t), hi = min(tiles, lo + per);
  int64_t s = 0;
  for (int64_t j = lo; j < hi; ++j) s += counts[j];
  part[t] = s;
  __syncthreads();
  if (t == 0) {
    int64_t run = 0;
    for (int k = 0; k < nt; ++k) {
      const int64_t v = part[k];
      part[k] = run;
      run += v;
    }
    counts[tiles] = run;
  }
  __syncthreads();
  int64_t run = part[t];
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t v = counts[j];
    counts[j] = run;
    run += v;
  }
}

// Writes tile blockIdx.x's selection row by row; within a row a thread's rank is the number of
// selected lanes before it (warp ballots, then the warps before it).
// x may alias mask_v (DGC masks the v it selects from): no __restrict__ on those.
__global__ void write_kernel(const float* x, int64_t n, float thr, const int64_t* __restrict__ offsets,
                             int32_t* __restrict__ idx_out, void* __restrict__ val_out, int vcode, float* mask_u,
                             float* mask_v) {
  __shared__ int warp_total[2][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t base = int64_t(blockIdx.x) * kSelectTile;
  int64_t at = offsets[blockIdx.x];
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;
    float xv = 0.0f;
    bool sel = false;
    if (i < n) {
      xv = x[i];
      sel = selected(xv, thr);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, sel);
    const int buf = r & 1;  // double-buffered: one barrier per row
    if (lane == 0) warp_total[buf][warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u)), row_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_total[buf][w];
      before += w < warp ? c : 0;
      row_total += c;
    }
    if (sel) {
      const int64_t o = at + before;
      idx_out[o] = int32_t(i);
      store_value(val_out, vcode, o, xv);
      if (mask_u) {
        mask_u[i] = 0.0f;  // Lin et al. 2018 §3.3 momentum factor masking
        mask_v[i] = 0.0f;
      }
    }
    at += row_total;
  }
}

__global__ void zero_at_kernel(float* u, float* v, const int32_t* idx, int64_t k) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    u[idx[j]] = 0.0f;
    v[idx[j]] = 0.0f;
  }
}

// ---- radix select --------------------------------------------------------------------------
// Digits, most significant first: bits 31..21, 20..10, 9..0 (as csrc/cpu/kth.cpp).
constexpr int kBins = 2048;

// Position of sample j (commlib/ops/torch_ops.py sample_plan: blocks of consecutive entries).
struct SampleLayout {
  int64_t start, stride;
  int block_log2;
  __device__ int64_t at(int64_t j) const {
    return start + (j >> block_log2) * stride + (j & ((int64_t(1) << block_log2) - 1));
  }
};

struct PlainSample {
  const float* x;
  int64_t xstride;
  SampleLayout layout;
  __device__ float operator()(int64_t j) const { return x[layout.at(j) * xstride]; }
};

struct DgcSample {
  const float *u, *v, *g;
  float m;
  bool nesterov;
  SampleLayout layout;
  __device__ float operator()(int64_t j) const {
    const int64_t i = layout.at(j);
    float uu;
    return dgc_step(u[i], v[i], g[i], m, nesterov, &uu);
  }
};

template <typename Sample>
__global__ void gather_hist_kernel(Sample sample, int64_t s, uint32_t* bits, unsigned long long* hist, int* nan_flag) {
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  bool nan = false;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < s; j += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t b = mag_bits(sample(j));
    nan |= b > 0x7f800000u;
    bits[j] = b;
    atomicAdd(&local[b >> 21], 1u);
  }
  if (nan) atomicOr(nan_flag, 1);
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], (unsigned long long)local[b]);
}

// Bucket of the k-th largest in hist (k 1-based); *k becomes the rank inside it.  One thread.
__device__ int pick_bucket(const unsigned long long* hist, int top_bin, long long* k) {
  long long above = 0;
  int b = top_bin;
  for (; b > 0; --b) {
    if (above + (long long)hist[b] >= *k) break;
    above += (long long)hist[b];
  }
  *k -= above;
  return b;
}

__global__ void radix_finish_kernel(const uint32_t* bits, int64_t s, long long k, const unsigned long long* hist0,
                                    const int* nan_flag, float* result) {
  __shared__ unsigned long long hist[kBins];
  __shared__ int bucket;
  __shared__ long long rank;
  __shared__ uint32_t prefix;
  if (threadIdx.x == 0) {
    rank = k;
    bucket = pick_bucket(hist0, kBins - 1, &rank);
    prefix = uint32_t(bucket) << 21;
  }
  __syncthreads();
  const int shifts[2] = {10, 0};
  const uint32_t masks[2] = {0x7ffu, 0x3ffu};
  for (int level = 0; level < 2; ++level) {
    const int sh = shifts[level];
    const uint32_t keep_mask = ~((masks[level] << sh) | ((1u << sh) - 1u));  // digits already fixed
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t want = prefix;
    for (int64_t j = threadIdx.x; j < s; j += blockDim.x) {
      const uint32_t b = bits[j];
      if ((b & keep_mask) == want) atomicAdd(&hist[(b >> sh) & masks[level]], 1ull);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long r = rank;
      bucket = pick_bucket(hist, int(masks[level]), &r);
      rank = r;
      prefix |= uint32_t(bucket) << sh;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *result = *nan_flag ? __int_as_float(0x7fc00000) : __uint_as_float(prefix);
}

template <typename Sample>
cudaError_t kth(Sample sample, int64_t s, int64_t top, uint32_t* bits, unsigned long long* hist, int* flag,
                float* result, cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(hist, 0, kBins * sizeof(unsigned long long), stream);
  if (e == cudaSuccess) e = cudaMemsetAsync(flag, 0, sizeof(int), stream);
  if (e != cudaSuccess) return e;
  const int blocks = int(std::min<int64_t>(1024, (s + 255) / 256));
  gather_hist_kernel<<<blocks, 256, 0, stream>>>(sample, s, bits, hist, flag);
  radix_finish_kernel<<<1, 1024, 0, stream>>>(bits, s, top, hist, flag, result);
  return cudaGetLastError();
}

// ---- scatter-add -------------------------------------------------------------------------------
__global__ void scan_source_kernel(const void* idx, bool idx64, const void* val, int vcode, int64_t nnz,
                                   bool check_finite, float s, float a, double max_abs, long long* minmax,
                                   int* flags) {
  long long lo = LLONG_MAX, hi = LLONG_MIN;
  bool unsorted = false, nonfinite = false, over = false;
  const bool bounded = !isinf(max_abs);
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nnz; j += int64_t(gridDim.x) * blockDim.x) {
    if (idx) {
      const long long i = load_index(idx, idx64, j);
      lo = min(lo, i);
      hi = max(hi, i);
      unsorted |= j > 0 && load_index(idx, idx64, j - 1) >= i;
    }
    if (check_finite || bounded) {  // the value rule: products rounded once (__fmul_rn), as on the CPU
      const float v = load_value(val, vcode, j);
      const float d = __fmul_rn(v, s);
      if (check_finite) nonfinite |= !isfinite(d) || !isfinite(__fmul_rn(v, a));
      if (bounded) over |= !(fabs(double(d)) <= max_abs);
    }
  }
  if (idx) {
    atomicMin(&minmax[0], lo);
    atomicMax(&minmax[1], hi);
  }
  if (unsorted) atomicOr(&flags[0], 1);
  if (nonfinite) atomicOr(&flags[1], 1);
  if (over) atomicOr(&flags[2], 1);
}

__global__ void preset_scan_kernel(long long* minmax, int* flags) {
  minmax[0] = LLONG_MAX;
  minmax[1] = LLONG_MIN;
  flags[0] = 0;
  flags[1] = 0;
  flags[2] = 0;
}

__global__ void apply_unique_kernel(float* __restrict__ out, const void* idx, bool idx64, const void* val, int vcode,
                                    int64_t nnz, float a) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nnz; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx ? load_index(idx, idx64, j) : j;
    out[i] = __fadd_rn(out[i], __fmul_rn(load_value(val, vcode, j), a));
  }
}

__global__ void apply_serial_kernel(float* out, const void* idx, bool idx64, const void* val, int vcode, int64_t nnz,
                                    float a) {
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t i = load_index(idx, idx64, j);
    out[i] = __fadd_rn(out[i], __fmul_rn(load_value(val, vcode, j), a));
  }
}

int grid_for(int64_t n, int threads) {
  return int(std::min<int64_t>(65535, std::max<int64_t>(1, (n + threads - 1) / threads)));
}

}  // namespace

cudaError_t select_count(const float* x, int64_t n, float thr, int64_t* counts, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  count_kernel<<<unsigned(select_tiles(n)), kThreads, 0, stream>>>(x, n, thr, counts);
  return cudaGetLastError();
}

cudaError_t dgc_update_count(float* u, float* v, const float* g, int64_t n, float m, bool nesterov, float thr,
                             int64_t* counts, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  dgc_count_kernel<<<unsigned(select_tiles(n)), kThreads, 0, stream>>>(u, v, g, n, m, nesterov, thr, counts);
  return cudaGetLastError();
}

cudaError_t scan_counts(int64_t* counts, int64_t tiles, cudaStream_t stream) {
  scan_kernel<<<1, 1024, 0, stream>>>(counts, tiles);
  return cudaGetLastError();
}

cudaError_t select_write(const float* x, int64_t n, float thr, const int64_t* offsets, int32_t* idx_out,
                         void* val_out, int vcode, float* mask_u, float* mask_v, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  write_kernel<<<unsigned(select_tiles(n)), kThreads, 0, stream>>>(x, n, thr, offsets, idx_out, val_out, vcode,
                                                                    mask_u, mask_v);
  return cudaGetLastError();
}

cudaError_t zero_at(float* u, float* v, const int32_t* idx, int64_t k, cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  zero_at_kernel<<<grid_for(k, 256), 256, 0, stream>>>(u, v, idx, k);
  return cudaGetLastError();
}

cudaError_t sampled_kth(const float* x, int64_t xstride, int64_t start, int64_t stride, int block_log2, int64_t s,
                        int64_t top, uint32_t* bits, unsigned long long* hist, int* flag, float* result,
                        cudaStream_t stream) {
  return kth(PlainSample{x, xstride, {start, stride, block_log2}}, s, top, bits, hist, flag, result, stream);
}

cudaError_t dgc_sampled_kth(const float* u, const float* v, const float* g, float m, bool nesterov, int64_t start,
                            int64_t stride, int block_log2, int64_t s, int64_t top, uint32_t* bits,
                            unsigned long long* hist, int* flag, float* result, cudaStream_t stream) {
  return kth(DgcSample{u, v, g, m, nesterov, {start, stride, block_log2}}, s, top, bits, hist, flag, result, stream);
}

cudaError_t scan_source(const void* idx, bool idx64, const void* val, int vcode, int64_t nnz, bool check_finite,
                        float s, float a, double max_abs, long long* minmax, int* flags, cudaStream_t stream) {
  preset_scan_kernel<<<1, 1, 0, stream>>>(minmax, flags);
  if (nnz > 0)
    scan_source_kernel<<<grid_for(nnz, 256), 256, 0, stream>>>(idx, idx64, val, vcode, nnz, check_finite, s, a,
                                                              max_abs, minmax, flags);
  return cudaGetLastError();
}

cudaError_t apply_source(float* out, const void* idx, bool idx64, bool unique_sorted, const void* val, int vcode,
                         int64_t nnz, float a, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  if (idx == nullptr || unique_sorted)
    apply_unique_kernel<<<grid_for(nnz, 256), 256, 0, stream>>>(out, idx, idx64, val, vcode, nnz, a);
  else
    apply_serial_kernel<<<1, 1, 0, stream>>>(out, idx, idx64, val, vcode, nnz, a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace commlib
