// Scatter-add of one or many payloads into a dense float32 output, deterministically.
//
// Results equal applying the sources one after another (per element: source order, then
// entry order).  Threads own disjoint ranges of `out`, so no two threads touch one element.
// When every source's indices are strictly ascending (what the selections produce), each
// thread walks its range in cache-sized blocks and applies all sources to a block before
// moving on: each output cache line is read and written once however many ranks there are.
// Otherwise each thread scans all entries and keeps those in its range.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels.h"
#include "parallel.h"

namespace commlib {
namespace cpu {
namespace {

constexpr int64_t kBlock = 8192;  // output floats per block (32 KiB)
constexpr int64_t kAhead = 32;    // entries prefetched ahead by the scatter loops

// Wire value -> float with torch's conversions (x.to(torch.float32)); doubles beyond float32's
// range become +-Inf (round_f32: a plain cast would be undefined behaviour).
template <typename V>
inline float load_as(const V* p, int64_t j) {
  if constexpr (std::is_same<V, c10::Half>::value || std::is_same<V, c10::BFloat16>::value) return float(p[j]);
  else if constexpr (std::is_same<V, double>::value) return round_f32(p[j]);
  else return static_cast<float>(p[j]);
}

// out[idx[j]] += float(val[j]) * a for j in [cur, end) while idx[j] < stop (idx[j] >= lo given).
// Returns the new cursor.  (-ffp-contract=off: a multiply then an add, as torch does it.)
template <typename I, typename V>
int64_t apply_until(float* out, const I* idx, const V* val, float a, int64_t cur, int64_t end, int64_t stop) {
  for (; cur < end && int64_t(idx[cur]) < stop; ++cur) {
    // Sparse entries are mostly a cache miss each: fetch the ones kAhead entries on early.
    __builtin_prefetch(out + idx[std::min(cur + kAhead, end - 1)], 1);
    out[idx[cur]] += load_as(val, cur) * a;
  }
  return cur;
}

template <typename V>
void apply_dense(float* out, const V* val, float a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) out[i] += load_as(val, i) * a;
}

template <typename I, typename V>
void apply_filtered(float* out, const I* idx, const V* val, float a, int64_t nnz, int64_t lo, int64_t hi) {
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t i = int64_t(idx[j]);
    if (i >= lo && i < hi) out[i] += load_as(val, j) * a;
  }
}

// Calls fn(typed index pointer, typed value pointer) for a source.
template <typename Fn>
void with_types(const Source& s, Fn fn) {
  auto by_val = [&](auto* ip) {
    switch (s.dcode) {
      case kF16: return fn(ip, static_cast<const c10::Half*>(s.val));
      case kBF16: return fn(ip, static_cast<const c10::BFloat16*>(s.val));
      case kF64: return fn(ip, static_cast<const double*>(s.val));
      case kI8: return fn(ip, static_cast<const int8_t*>(s.val));
      default: return fn(ip, static_cast<const float*>(s.val));
    }
  };
  if (s.idx64) by_val(static_cast<const int64_t*>(s.idx));
  else by_val(static_cast<const int32_t*>(s.idx));
}

template <typename I>
int64_t lower_bound_of(const I* idx, int64_t n, int64_t key) {
  return std::lower_bound(idx, idx + n, key, [](I a, int64_t k) { return int64_t(a) < k; }) - idx;
}

}  // namespace

std::vector<SourceScan> scan_sources(const std::vector<Source>& srcs, bool finite, double max_abs, int nthreads) {
  const bool bounded = !std::isinf(max_abs);
  constexpr int64_t kScanBlock = int64_t(1) << 18;
  std::vector<std::pair<size_t, int64_t>> blocks;  // (source, first entry)
  int64_t total = 0;
  for (size_t r = 0; r < srcs.size(); ++r) {
    total += srcs[r].nnz;
    for (int64_t b = 0; b < srcs[r].nnz; b += kScanBlock) blocks.emplace_back(r, b);
  }
  std::vector<SourceScan> part(blocks.size());
  const int team = team_for(total, nthreads, kMinEntriesPerThread, int64_t(blocks.size()));
#pragma omp parallel for num_threads(team) schedule(dynamic, 1) if (team > 1)
  for (size_t k = 0; k < blocks.size(); ++k) {
    const Source& src = srcs[blocks[k].first];
    const int64_t b = blocks[k].second, e = std::min(src.nnz, b + kScanBlock);
    SourceScan& out = part[k];
    with_types(src, [&](auto* ip, auto* vp) {
      if (src.idx) {  // branch-free (vectorised) min, max and "an entry <= its predecessor"
        int64_t lo = out.lo, hi = out.hi;
        for (int64_t j = b; j < e; ++j) {
          lo = std::min(lo, int64_t(ip[j]));
          hi = std::max(hi, int64_t(ip[j]));
        }
        int unsorted = 0;
        for (int64_t j = std::max<int64_t>(b, 1); j < e; ++j) unsorted |= int(int64_t(ip[j - 1]) >= int64_t(ip[j]));
        out.lo = lo;
        out.hi = hi;
        out.unsorted = unsorted != 0;
      }
      if (finite) {  // the value rule (payload_format.h), int8 included: 127 * scale can overflow
        int bad = 0;
        for (int64_t j = b; j < e; ++j) bad |= int(!value_finite(load_as(vp, j), src.s, src.a));
        out.nonfinite = bad != 0;
      }
      if (bounded) {
        int over = 0;
        for (int64_t j = b; j < e; ++j) over |= int(!value_within(load_as(vp, j), src.s, max_abs));
        out.over = over != 0;
      }
    });
  }
  std::vector<SourceScan> res(srcs.size());
  for (size_t k = 0; k < blocks.size(); ++k) {
    SourceScan& r = res[blocks[k].first];
    r.lo = std::min(r.lo, part[k].lo);
    r.hi = std::max(r.hi, part[k].hi);
    r.unsorted = r.unsorted || part[k].unsorted;
    r.nonfinite = r.nonfinite || part[k].nonfinite;
    r.over = r.over || part[k].over;
  }
  return res;
}

std::string range_error(const SourceScan& scan, int64_t n) {
  if (scan.lo >= 0 && scan.hi < n) return "";
  return "sparse index out of range [0, " + std::to_string(n) + "): min " + std::to_string(scan.lo) + ", max " +
         std::to_string(scan.hi);
}

void apply_sources(float* out, int64_t n, const std::vector<Source>& srcs, int nthreads) {
  int64_t work = 0;
  bool all_sorted = true;
  for (const Source& s : srcs) {
    work += s.idx ? s.nnz : n;
    all_sorted = all_sorted && (s.idx == nullptr || s.sorted);
  }
  if (work == 0 || n == 0) return;
  const size_t ns = srcs.size();
  if (all_sorted) {
    // Chunks of out, handed out dynamically; within a chunk, blocks of kBlock floats get every
    // source's entries (found by a cursor per source) before the next block.
    const int64_t chunks = chunks_of(n);
    const int team = team_for(work, nthreads, kMinPerThread, chunks);
#pragma omp parallel for num_threads(team) schedule(dynamic, 1) if (team > 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      std::vector<int64_t> cur(ns, 0), end(ns, 0);
      for (size_t r = 0; r < ns; ++r) {
        const Source& s = srcs[r];
        if (!s.idx) continue;
        with_types(s, [&](auto* ip, auto*) {
          cur[r] = lower_bound_of(ip, s.nnz, lo);
          end[r] = lower_bound_of(ip, s.nnz, hi);
        });
      }
      for (int64_t b = lo; b < hi; b += kBlock) {
        const int64_t bend = std::min(hi, b + kBlock);
        for (size_t r = 0; r < ns; ++r) {
          const Source& s = srcs[r];
          if (s.idx && cur[r] == end[r]) continue;
          with_types(s, [&](auto* ip, auto* vp) {
            if (!s.idx) apply_dense(out, vp, s.a, b, bend);
            else cur[r] = apply_until(out, ip, vp, s.a, cur[r], end[r], bend);
          });
        }
      }
    }
    return;
  }
  // Unsorted or repeated indices: each thread owns a range of out and scans every entry.
  const int team = team_for(work, nthreads);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    const auto [lo, hi] = share(n, omp_get_num_threads(), omp_get_thread_num());
    for (const Source& s : srcs) {
      if (lo >= hi) break;
      with_types(s, [&](auto* ip, auto* vp) {
        if (!s.idx) apply_dense(out, vp, s.a, lo, hi);
        else apply_filtered(out, ip, vp, s.a, s.nnz, lo, hi);
      });
    }
  }
}

uint32_t crc32(uint32_t crc, const uint8_t* p, int64_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;  // reflected IEEE 802.3
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = crc ^ 0xFFFFFFFFu;
  for (int64_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

}  // namespace cpu
}  // namespace commlib
