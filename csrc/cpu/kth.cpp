// k-th largest magnitude by radix select on IEEE bit patterns (|x| as uint32 orders like the
// float for every non-NaN value), and DGC's sampled threshold built on it.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "parallel.h"

namespace commlib {
namespace cpu {
namespace {

constexpr uint32_t kAbs = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;

inline uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Digits of the radix select, most significant first: bits 31..21, 20..10, 9..0.
constexpr int kShift[3] = {21, 10, 0};
constexpr uint32_t kMask[3] = {0x7ff, 0x7ff, 0x3ff};

// Finds the digit bucket holding the k-th largest; k becomes the rank inside that bucket.
int pick_bucket(const int64_t* hist, uint32_t mask, int64_t* k) {
  int64_t above = 0;
  int b = int(mask);
  for (; b > 0; --b) {
    if (above + hist[b] >= *k) break;
    above += hist[b];
  }
  *k -= above;
  return b;
}

// The sample's k-th largest (1-based; 1 <= k <= s) magnitude from a gather function that
// returns the magnitude bit pattern of sample j; NaN in the sample -> NaN.  The gather and the
// first digit's histogram run in one parallel loop over dynamic chunks (no barrier inside);
// the two remaining digits are resolved on the members of one first-digit bucket, usually a
// few hundred entries.
template <typename Gather>
float kth_of_sample(int64_t s, int64_t k, int nthreads, Gather gather) {
  constexpr int64_t kSampleChunk = int64_t(1) << 16;
  Candidates& cand = scratch();
  if (!cand.bits.reserve(s)) throw std::bad_alloc();
  uint32_t* bits = cand.bits.data();
  const int64_t chunks = (s + kSampleChunk - 1) / kSampleChunk;
  const int team = team_for(s, nthreads, kMinSamplesPerThread, chunks);
  std::vector<int64_t> hist(size_t(team) * 2048, 0);
  std::atomic<bool> nan{false};
#pragma omp parallel for num_threads(team) schedule(dynamic, 1) if (team > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t* h = hist.data() + size_t(omp_get_thread_num()) * 2048;
    const int64_t lo = c * kSampleChunk, hi = std::min(s, lo + kSampleChunk);
    bool saw_nan = false;
    auto visit = [&](int64_t j) {
      const uint32_t b = gather(j);
      saw_nan |= b > kInfBits;
      bits[j] = b;
      ++h[b >> kShift[0]];
    };
    // Four interleaved strided streams: more misses (and page walks) in flight than one
    // (1.3-1.6x faster than a single stream here).
    const int64_t q = (hi - lo) / 4;
    for (int64_t j = 0; j < q; ++j) {
      visit(lo + j);
      visit(lo + q + j);
      visit(lo + 2 * q + j);
      visit(lo + 3 * q + j);
    }
    for (int64_t j = lo + 4 * q; j < hi; ++j) visit(j);
    if (saw_nan) nan.store(true);
  }
  if (nan.load()) return std::numeric_limits<float>::quiet_NaN();
  for (int t = 1; t < team; ++t)
    for (int d = 0; d < 2048; ++d) hist[d] += hist[size_t(t) * 2048 + d];
  int64_t kk = k;
  const int b0 = pick_bucket(hist.data(), kMask[0], &kk);
  // The members of bucket b0 (the sample is in cache now: one thread).
  int64_t m = 0;
  for (int64_t j = 0; j < s; ++j)
    if (int(bits[j] >> kShift[0]) == b0) bits[m++] = bits[j];
  uint32_t prefix = uint32_t(b0) << kShift[0];
  for (int level = 1; level < 3; ++level) {
    int64_t h[2048] = {0};
    for (int64_t j = 0; j < m; ++j) ++h[(bits[j] >> kShift[level]) & kMask[level]];
    const int b = pick_bucket(h, kMask[level], &kk);
    prefix |= uint32_t(b) << kShift[level];
    int64_t w = 0;
    for (int64_t j = 0; j < m; ++j)
      if (((bits[j] >> kShift[level]) & kMask[level]) == uint32_t(b)) bits[w++] = bits[j];
    m = w;
  }
  return float_of(prefix);
}

}  // namespace

uint32_t kth_largest_bits(uint32_t* bits, int64_t n, int64_t k) {
  uint32_t prefix = 0;
  int64_t m = n;
  for (int level = 0; level < 3; ++level) {
    int64_t h[2048] = {0};
    for (int64_t j = 0; j < m; ++j) ++h[(bits[j] >> kShift[level]) & kMask[level]];
    const int b = pick_bucket(h, kMask[level], &k);
    prefix |= uint32_t(b) << kShift[level];
    int64_t w = 0;
    for (int64_t j = 0; j < m; ++j)
      if (((bits[j] >> kShift[level]) & kMask[level]) == uint32_t(b)) bits[w++] = bits[j];
    m = w;
  }
  return prefix;
}

// Sample blocks usually lie on different pages, out of the hardware prefetcher's reach: each
// block's first visit prefetches the block kPrefetchBlocks ahead (clamped to the sample).
constexpr int64_t kPrefetchBlocks = 8;

inline int64_t ahead(const SampleLayout& sample, int64_t j, int64_t s) {
  return sample.at(std::min(j + (kPrefetchBlocks << sample.block_log2), s - 1));
}

inline bool block_start(const SampleLayout& sample, int64_t j) {
  return (j & ((int64_t(1) << sample.block_log2) - 1)) == 0;
}

float sampled_kth(const float* x, int64_t xstride, SampleLayout sample, int64_t s, int64_t top, int nthreads) {
  return kth_of_sample(s, top, nthreads, [=](int64_t j) {
    if (block_start(sample, j)) __builtin_prefetch(x + ahead(sample, j, s) * xstride);
    return bits_of(x[sample.at(j) * xstride]) & kAbs;
  });
}

float dgc_sampled_kth(const float* u, const float* v, const float* g, float m, bool nesterov, SampleLayout sample,
                      int64_t s, int64_t top, int nthreads) {
  // The v of Lin et al. 2018 §3.2 (Nesterov: App. B) after this step's update, at the sample.
  return kth_of_sample(s, top, nthreads, [=](int64_t j) {
    if (block_start(sample, j)) {
      const int64_t a = ahead(sample, j, s);
      __builtin_prefetch(u + a);
      __builtin_prefetch(v + a);
      __builtin_prefetch(g + a);
    }
    const int64_t i = sample.at(j);
    float vv;
    if (nesterov) {
      const float uu = (u[i] + g[i]) * m;
      vv = (v[i] + uu) + g[i];
    } else {
      const float uu = m * u[i] + g[i];
      vv = v[i] + uu;
    }
    return bits_of(vv) & kAbs;
  });
}

}  // namespace cpu
}  // namespace commlib
