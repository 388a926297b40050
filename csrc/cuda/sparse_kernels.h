// CUDA kernels of the sparse hot path: plain device pointers, sizes and a stream; no torch
// headers (the thin torch binding is binding_cuda.cpp).  Every function only enqueues work on
// `stream` and returns the launch status; device scratch comes from the caller.
//
// Results equal the CPU kernels': selections are written in ascending index order (two-pass
// count / scan / write, each tile's offsets from an exclusive scan), the sampled threshold is
// the same radix select, and scatter-adds apply sources one after another with the rounding
// of a separate multiply and add (__fmul_rn / __fadd_rn, no FMA contraction).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace commlib {
namespace cuda {

// ---- threshold selection ---------------------------------------------------------------------
// Elements per tile (one thread block): tile t covers [t * kSelectTile, (t + 1) * kSelectTile).
constexpr int64_t kSelectTile = 4096;
inline int64_t select_tiles(int64_t n) { return (n + kSelectTile - 1) / kSelectTile; }

// counts[t] = #{i in tile t : |x[i]| >= thr}.
cudaError_t select_count(const float* x, int64_t n, float thr, int64_t* counts, cudaStream_t stream);

// DGC momentum correction in place (Lin et al. 2018 §3.2; Nesterov: App. B), then counts[t] of
// |v| >= thr like select_count.
cudaError_t dgc_update_count(float* u, float* v, const float* g, int64_t n, float m, bool nesterov, float thr,
                             int64_t* counts, cudaStream_t stream);

// counts[0, tiles] <- exclusive prefix sums of counts[0, tiles); counts[tiles] = total.
cudaError_t scan_counts(int64_t* counts, int64_t tiles, cudaStream_t stream);

// Writes the selected (i, x[i]) in ascending i at the scanned tile offsets: indices to idx_out
// (int32), values converted to vcode (0 float32, 1 float16, 2 bfloat16) to val_out.  When
// mask_u is not null, also zeroes mask_u[i] and mask_v[i] at every selected i.
cudaError_t select_write(const float* x, int64_t n, float thr, const int64_t* offsets, int32_t* idx_out,
                         void* val_out, int vcode, float* mask_u, float* mask_v, cudaStream_t stream);

// u[idx[j]] = v[idx[j]] = 0 for j < k (momentum factor masking, Lin et al. 2018 §3.3).
cudaError_t zero_at(float* u, float* v, const int32_t* idx, int64_t k, cudaStream_t stream);

// ---- sampled thresholds (k-th largest magnitude by radix select) -----------------------------
// Scratch: bits[s] (uint32), hist[2048] (unsigned long long), flag[1] (int).  *result (device)
// receives the top-th largest |x[at(j) * xstride]|, j < s, or NaN if one is NaN, where
// at(j) = start + (j >> block_log2) * stride + (j & (2^block_log2 - 1)) (commlib/ops/torch_ops.py
// sample_plan: blocks of consecutive entries).
cudaError_t sampled_kth(const float* x, int64_t xstride, int64_t start, int64_t stride, int block_log2, int64_t s,
                        int64_t top, uint32_t* bits, unsigned long long* hist, int* flag, float* result,
                        cudaStream_t stream);

// The same on the v that dgc_update_count would produce, without writing u or v.
cudaError_t dgc_sampled_kth(const float* u, const float* v, const float* g, float m, bool nesterov, int64_t start,
                            int64_t stride, int block_log2, int64_t s, int64_t top, uint32_t* bits,
                            unsigned long long* hist, int* flag, float* result, cudaStream_t stream);

// ---- scatter-add ---------------------------------------------------------------------------------
// Scans a source: minmax[0] = min index, minmax[1] = max index (LLONG_MAX / LLONG_MIN when
// empty, preset by this call), flags[0] = 1 if indices are not strictly ascending; the value
// rule of commlib/wire.py (payload_format.h) with s = round_f32(scale), a = round_f32(alpha *
// scale): flags[1] = 1 if check_finite and float(val[j]) * s or float(val[j]) * a is not finite,
// flags[2] = 1 if |float(val[j]) * s| > max_abs.  Value codes: commlib's DCode.
cudaError_t scan_source(const void* idx, bool idx64, const void* val, int vcode, int64_t nnz, bool check_finite,
                        float s, float a, double max_abs, long long* minmax, int* flags, cudaStream_t stream);

// out[idx[j]] += float(val[j]) * a for j < nnz, in order (idx null: dense, idx[j] = j).
// unique_sorted: indices strictly ascending (one thread per entry); otherwise one thread walks
// the entries in order so that duplicates accumulate exactly as on the CPU.
cudaError_t apply_source(float* out, const void* idx, bool idx64, bool unique_sorted, const void* val, int vcode,
                         int64_t nnz, float a, cudaStream_t stream);

}  // namespace cuda
}  // namespace commlib
