// CPU kernels of the sparse hot path (plain pointers; OpenMP inside).  The torch binding
// (csrc/binding.cpp) checks arguments and calls these.
//
// Selections are collected in one pass over the input, cut into chunks that OpenMP threads
// take dynamically; each chunk's candidates go to its own run (`Candidates`, kept per calling
// thread and reused across calls: grown, never reallocated per call).  The runs are then
// written in index order straight into the caller's destination (tensor or packed buffer).
#pragma once

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "../payload_format.h"

namespace commlib {
namespace cpu {

// ---- instruction set of the selection kernels ---------------------------------------------
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
Isa best_isa();                   // the best this CPU (and OS) supports
Isa active_isa();                 // the one in use (COMMLIB_NATIVE_ISA may lower it)
Isa set_active_isa(Isa want);     // clamps to best_isa(); returns the ISA now active
const char* isa_name(Isa isa);

// ---- scratch ---------------------------------------------------------------------------------
template <typename T>
class RawBuf {  // malloc'd array: grows keeping its contents, shrinks only on release()
 public:
  RawBuf() = default;
  RawBuf(const RawBuf&) = delete;
  RawBuf& operator=(const RawBuf&) = delete;
  RawBuf(RawBuf&& o) noexcept : p_(o.p_), cap_(o.cap_) { o.p_ = nullptr; o.cap_ = 0; }
  ~RawBuf() { std::free(p_); }
  T* data() { return p_; }
  const T* data() const { return p_; }
  int64_t capacity() const { return cap_; }
  bool reserve(int64_t n) {  // false when out of memory (never throws: used inside OpenMP regions)
    if (n <= cap_) return true;
    const int64_t c = n > 2 * cap_ ? n : 2 * cap_;
    void* q = std::realloc(p_, size_t(c) * sizeof(T));
    if (!q) return false;
    p_ = static_cast<T*>(q);
    cap_ = c;
    return true;
  }
  void release() {
    std::free(p_);
    p_ = nullptr;
    cap_ = 0;
  }

 private:
  T* p_ = nullptr;
  int64_t cap_ = 0;
};

struct Run {  // one chunk's candidates, ascending
  RawBuf<int32_t> idx;
  RawBuf<float> val;
  int64_t n = 0;
  bool ensure(int64_t extra) { return idx.reserve(n + extra) && val.reserve(n + extra); }
};

struct Candidates {  // the runs of one selection (one per chunk of the input), in index order
  std::vector<Run> runs;
  int used = 0;            // runs[0, used) hold this selection
  RawBuf<uint32_t> bits;   // magnitudes for the k-th largest searches
  int64_t total() const {
    int64_t t = 0;
    for (int r = 0; r < used; ++r) t += runs[r].n;
    return t;
  }
};
Candidates& scratch();   // the calling thread's (thread_local)
void release_scratch();  // frees the calling thread's scratch

// ---- selection -----------------------------------------------------------------------------
// Appends (i, x[i]) for i in [b, e) with |x[i]| >= thr (NaN never selected), ascending.
// The run must have room for e - b + 16 more entries.
void select_range(Isa isa, const float* x, int64_t b, int64_t e, float thr, Run& run);

// Selects over all of x[0, n) into cand.  Returns the candidate count, -1 when out of memory.
int64_t select_all(Candidates& cand, const float* x, int64_t n, float thr, int nthreads);

// DGC momentum correction fused with the selection (Lin et al. 2018, Alg. 1 lines 7-9 / §3.2):
//   plain:    u <- m*u + g;      v <- v + u
//   Nesterov: u <- (u + g)*m;    v <- (v + u) + g
// then candidates |v| >= thr.  mask_inline: zero u and v at every candidate in the same pass.
int64_t dgc_update_select_all(Candidates& cand, float* u, float* v, const float* g, int64_t n, float m,
                              bool nesterov, float thr, bool mask_inline, int nthreads);

// ---- truncation to the largest magnitudes -------------------------------------------------
struct Keep {  // which candidates survive: all, or the max_nnz largest |value| (ties: lower index)
  bool all = true;
  uint32_t tbits = 0;           // |value| bit pattern of the max_nnz-th largest
  std::vector<int64_t> ties;    // per run: how many candidates with |value| == tbits to keep
  std::vector<int64_t> start;   // per run: first output position
  int64_t total = 0;
};
Keep plan_keep(Candidates& cand, int64_t max_nnz, int nthreads);

// Writes the kept candidates in index order: indices to idx_out (may be null), values
// converted to dcode (kF32, kF16, kBF16) to val_out.
void write_kept(const Candidates& cand, const Keep& keep, int32_t* idx_out, void* val_out, uint8_t dcode,
                int nthreads);
// Zeroes u and v at the kept candidates (DGC momentum factor masking, Lin et al. 2018 §3.2).
void mask_kept(const Candidates& cand, const Keep& keep, float* u, float* v, int nthreads);

// ---- k-th largest magnitude -----------------------------------------------------------------
// Bit pattern of the k-th largest (1-based) of n non-NaN magnitude bit patterns; destroys bits.
uint32_t kth_largest_bits(uint32_t* bits, int64_t n, int64_t k);

// DGC's threshold sample (commlib/ops/torch_ops.py sample_plan): entry j < s sits at
// start + (j >> block_log2) * stride + (j & (2^block_log2 - 1)): blocks of consecutive entries.
struct SampleLayout {
  int64_t start, stride;
  int block_log2;
  int64_t at(int64_t j) const {
    return start + (j >> block_log2) * stride + (j & ((int64_t(1) << block_log2) - 1));
  }
};

// DGC threshold estimate (Lin et al. 2018 §3.1): the top-th largest of |x[at(j) * xstride]|,
// j < s; NaN when the sample holds a NaN.
float sampled_kth(const float* x, int64_t xstride, SampleLayout sample, int64_t s, int64_t top, int nthreads);
// The same estimate on the v that dgc_update_select_all would produce, without writing u or v.
float dgc_sampled_kth(const float* u, const float* v, const float* g, float m, bool nesterov, SampleLayout sample,
                      int64_t s, int64_t top, int nthreads);

// ---- scatter-add and unpack ---------------------------------------------------------------
struct Source {             // one payload's contribution: out[idx[j]] += float(val[j]) * a
  const void* idx = nullptr;  // null: dense (idx[j] = j)
  bool idx64 = false;
  const void* val = nullptr;
  uint8_t dcode = kF32;
  int64_t nnz = 0;
  float a = 1.0f;
  float s = 1.0f;             // round_f32(scale): the value rule's decoded value is float(val[j]) * s
  bool sorted = true;         // indices strictly ascending (no duplicates): set from a scan
};
struct SourceScan {  // what scan_sources found in one source
  int64_t lo = INT64_MAX, hi = INT64_MIN;  // index range (untouched for dense sources)
  bool unsorted = false;                   // some index <= its predecessor
  bool nonfinite = false;                  // some value breaks value_finite (when asked)
  bool over = false;                       // some value breaks value_within (when a bound is set)
};
// Scans all sources in one parallel pass: index range and order, and the value rule of
// payload_format.h (with `finite`: value_finite; with max_abs < Inf: value_within).  Writes nothing.
std::vector<SourceScan> scan_sources(const std::vector<Source>& srcs, bool finite, double max_abs, int nthreads);
// "" when every index of the scan lies in [0, n), else the reason.
std::string range_error(const SourceScan& scan, int64_t n);
// out[0, n) += each source in order (per element: source order, then entry order; identical to
// applying them one after another).  Parallel over blocks of out.
void apply_sources(float* out, int64_t n, const std::vector<Source>& srcs, int nthreads);

// zlib's crc32(crc, p, n): start from 0; crc32(crc32(0, a), b) is the CRC of a then b.
uint32_t crc32(uint32_t crc, const uint8_t* p, int64_t n);

}  // namespace cpu
}  // namespace commlib
