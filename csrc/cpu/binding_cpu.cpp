// The ops of csrc/ops_api.h for CPU tensors: argument checks, then the kernels of kernels.h.
// Called with the GIL released (csrc/binding.cpp).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <limits>
#include <new>

#include "../binding_util.h"
#include "../ops_api.h"
#include "kernels.h"

namespace commlib {
namespace cpu_ops {
namespace {

using at::Tensor;

int threads() { return at::get_num_threads(); }

int64_t checked(int64_t count) {
  if (count < 0) throw std::bad_alloc();
  return count;
}

// Writes the kept candidates as a SPARSE payload at buf[offset:]; (end, nnz), end = -1 when
// it does not fit (nothing written).
std::tuple<int64_t, int64_t> write_payload(cpu::Candidates& cand, const cpu::Keep& keep, Tensor& buf,
                                           int64_t offset, int64_t numel, int64_t slot, double scale,
                                           int64_t flags, int64_t vcode) {
  const int64_t nnz = keep.total;
  const SparseLayout l = sparse_layout(offset, nnz, uint8_t(vcode));
  if (l.end > buf.numel() || l.body > int64_t(std::numeric_limits<uint32_t>::max())) return {-1, nnz};
  uint8_t* p = buf.data_ptr<uint8_t>();
  write_header(p + offset, sparse_header(numel, nnz, slot, scale, flags, uint8_t(vcode)));
  std::memset(p + l.idx_at + l.idx_bytes, 0, size_t(l.val_at - l.idx_at - l.idx_bytes));  // index padding
  std::memset(p + l.val_at + l.val_bytes, 0, size_t(l.end - l.val_at - l.val_bytes));    // value padding
  cpu::write_kept(cand, keep, reinterpret_cast<int32_t*>(p + l.idx_at), p + l.val_at, uint8_t(vcode), threads());
  return {l.end, nnz};
}

std::tuple<Tensor, Tensor> to_tensors(cpu::Candidates& cand, const cpu::Keep& keep, const Tensor& like) {
  Tensor idx = at::empty({keep.total}, like.options().dtype(at::kInt));
  Tensor val = at::empty({keep.total}, like.options());
  cpu::write_kept(cand, keep, idx.data_ptr<int32_t>(), val.data_ptr<float>(), kF32, threads());
  return {idx, val};
}

// Checks one rank's payload header at `offset` of its row (layout, checksum, meaning) and
// fills its Source (has_src: it carries values); the body is scanned later with the others.
Verdict check_header(const uint8_t* row, int64_t cap, int64_t offset, int64_t numel, int64_t slot,
                     bool require_checksum, double alpha, cpu::Source* src, bool* has_src) {
  Verdict v;
  *has_src = false;
  Header h;
  v.code = kPayloadError;
  v.msg = check_layout(row, offset, cap, require_checksum, &h);
  if (!v.msg.empty()) return v;
  const uint8_t* body = row + offset + kHeaderBytes;
  if (h.flags & kFlagChecksum) {
    uint8_t zeroed[kHeaderBytes];
    std::memcpy(zeroed, row + offset, kHeaderBytes);
    std::memset(zeroed + kCrcAt, 0, 4);
    if (cpu::crc32(cpu::crc32(0, zeroed, kHeaderBytes), body, h.body) != h.crc) {
      v.msg = "payload checksum mismatch";
      return v;
    }
  }
  int code = kOk;
  v.msg = check_meaning(h, numel, slot, alpha, &code);
  v.code = code;
  if (!v.msg.empty()) return v;
  v.end = offset + kHeaderBytes + int64_t(h.body);
  v.nnz = int64_t(h.nnz);
  v.flags = int64_t(h.flags & ~kFlagChecksum);
  if (h.kind == kSkip || h.nnz == 0) return v;
  src->idx = h.kind == kSparse ? body : nullptr;
  src->idx64 = false;
  src->val = h.kind == kSparse ? body + align8(4 * int64_t(h.nnz)) : body;
  src->dcode = h.dtype;
  src->nnz = int64_t(h.nnz);
  src->a = round_f32(alpha * h.scale);  // finite and scale normal: check_meaning
  src->s = round_f32(h.scale);
  *has_src = true;
  return v;
}

}  // namespace

std::tuple<Tensor, Tensor> threshold_select(const Tensor& x, double thr) {
  check_f32(x, "x");
  cpu::Candidates& cand = cpu::scratch();
  checked(cpu::select_all(cand, x.data_ptr<float>(), x.numel(), float(thr), threads()));
  return to_tensors(cand, cpu::plan_keep(cand, -1, threads()), x);
}

std::tuple<int64_t, int64_t> pack_threshold(Tensor buf, int64_t offset, const Tensor& x, double thr,
                                            int64_t max_nnz, int64_t slot, double scale, int64_t flags,
                                            int64_t vcode) {
  check_value_code(vcode);
  check_buf(buf, offset);
  check_f32(x, "x");
  cpu::Candidates& cand = cpu::scratch();
  checked(cpu::select_all(cand, x.data_ptr<float>(), x.numel(), float(thr), threads()));
  const cpu::Keep keep = cpu::plan_keep(cand, max_nnz, threads());
  return write_payload(cand, keep, buf, offset, x.numel(), slot, scale, flags, vcode);
}

double sampled_threshold(const Tensor& x, int64_t start, int64_t stride, int64_t s, int64_t top,
                         int64_t block_log2) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1, "x must be a 1-D float32 tensor");
  check_sample(x.numel(), start, stride, s, top, block_log2);
  return cpu::sampled_kth(x.data_ptr<float>(), x.stride(0), {start, stride, int(block_log2)}, s, top, threads());
}

double dgc_threshold(const Tensor& u, const Tensor& v, const Tensor& g, double m, bool nesterov, int64_t start,
                     int64_t stride, int64_t s, int64_t top, int64_t block_log2) {
  check_state(u, v, g);
  check_sample(v.numel(), start, stride, s, top, block_log2);
  return cpu::dgc_sampled_kth(u.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(), float(m), nesterov,
                              {start, stride, int(block_log2)}, s, top, threads());
}

std::tuple<Tensor, Tensor> dgc_update_select(Tensor u, Tensor v, const Tensor& g, double m, bool nesterov,
                                             double thr, int64_t max_nnz) {
  check_state(u, v, g);
  cpu::Candidates& cand = cpu::scratch();
  const bool inline_mask = max_nnz < 0;  // every candidate is sent: mask in the same pass
  checked(cpu::dgc_update_select_all(cand, u.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(), v.numel(),
                                     float(m), nesterov, float(thr), inline_mask, threads()));
  const cpu::Keep keep = cpu::plan_keep(cand, max_nnz, threads());
  auto out = to_tensors(cand, keep, v);
  if (!inline_mask) cpu::mask_kept(cand, keep, u.data_ptr<float>(), v.data_ptr<float>(), threads());
  return out;
}

std::tuple<int64_t, int64_t> dgc_update_pack(Tensor buf, int64_t offset, Tensor u, Tensor v, const Tensor& g,
                                             double m, bool nesterov, double thr, int64_t max_nnz, int64_t slot,
                                             double scale, int64_t flags, int64_t vcode) {
  check_value_code(vcode);
  check_buf(buf, offset);
  check_state(u, v, g);
  cpu::Candidates& cand = cpu::scratch();
  // Masking waits until the payload is known to fit: values that are not sent stay in v.
  checked(cpu::dgc_update_select_all(cand, u.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(), v.numel(),
                                     float(m), nesterov, float(thr), false, threads()));
  const cpu::Keep keep = cpu::plan_keep(cand, max_nnz, threads());
  auto res = write_payload(cand, keep, buf, offset, v.numel(), slot, scale, flags, vcode);
  if (std::get<0>(res) >= 0) cpu::mask_kept(cand, keep, u.data_ptr<float>(), v.data_ptr<float>(), threads());
  return res;
}

std::string scatter_add(Tensor out, const Tensor& idx, const Tensor& val, double alpha) {
  check_scatter(out, idx, val);
  std::vector<cpu::Source> srcs(1);
  cpu::Source& s = srcs[0];
  s.idx = idx.data_ptr();
  s.idx64 = idx.scalar_type() == at::kLong;
  s.val = val.data_ptr();
  s.dcode = dcode_of(val.scalar_type());
  s.nnz = idx.numel();
  s.a = float(alpha);
  const cpu::SourceScan scan = cpu::scan_sources(srcs, false, HUGE_VAL, threads())[0];
  if (s.nnz) {
    std::string err = cpu::range_error(scan, out.numel());
    if (!err.empty()) return err;
  }
  s.sorted = !scan.unsorted;
  cpu::apply_sources(out.data_ptr<float>(), out.numel(), srcs, threads());
  return "";
}

std::vector<Verdict> unpack_scatter_add(Tensor out, const Tensor& bufs, const Tensor& offsets, double alpha,
                                        int64_t slot, bool finite, double max_abs, bool require_checksum,
                                        bool skip_errors) {
  check_unpack(out, bufs, offsets);
  const int64_t ranks = bufs.size(0), cap = bufs.size(1), numel = out.numel();
  std::vector<Verdict> verdicts(static_cast<size_t>(ranks));
  std::vector<cpu::Source> srcs;
  std::vector<int64_t> owner;  // rank of each source
  const int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t r = 0; r < ranks; ++r) {
    if (off[r] < 0) continue;  // skipped by the caller (an earlier payload of this rank was bad)
    cpu::Source s;
    bool has = false;
    verdicts[r] = check_header(bufs.data_ptr<uint8_t>() + r * cap, cap, off[r], numel, slot, require_checksum,
                               alpha, &s, &has);
    if (has) {
      srcs.push_back(s);
      owner.push_back(r);
    }
  }
  // Every body in one parallel pass: index range and order, the value rule.
  const std::vector<cpu::SourceScan> scans = cpu::scan_sources(srcs, finite, max_abs, threads());
  std::vector<cpu::Source> good;
  bool bad = false;
  for (size_t i = 0; i < srcs.size(); ++i) {
    Verdict& v = verdicts[size_t(owner[i])];
    if (srcs[i].idx) v.msg = cpu::range_error(scans[i], numel);
    if (v.msg.empty() && srcs[i].idx && scans[i].unsorted)
      v.msg = "sparse indices must be strictly ascending (no duplicates)";
    if (!v.msg.empty()) {
      v.code = kPayloadError;
    } else if (finite && scans[i].nonfinite) {
      v.code = kNonFinite;
      v.msg = "payload holds a value that is not finite in float32 after scale and cast";
    } else if (scans[i].over) {
      v.code = kPayloadError;
      v.msg = "payload holds a decoded value over max_abs";
    }
    if (v.code != kOk) {
      v.end = -1;
      continue;
    }
    srcs[i].sorted = !scans[i].unsorted;
    good.push_back(srcs[i]);
  }
  for (const Verdict& v : verdicts) bad = bad || v.code > kOk;
  if (!bad || skip_errors) cpu::apply_sources(out.data_ptr<float>(), numel, good, threads());
  return verdicts;
}

}  // namespace cpu_ops
}  // namespace commlib
