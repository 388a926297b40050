// The ops of csrc/ops_api.h for CUDA tensors (compiled only in CUDA builds, WITH_CUDA): argument
// checks, scratch from torch's caching allocator, the kernels of sparse_kernels.cu on the
// current stream.  Truncation to max_nnz uses torch's stable sort (rare path); headers are
// checked on the host with the same code as the CPU path (payload_format.h).
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <limits>
#include <tuple>

#include "../binding_util.h"
#include "../cpu/kernels.h"
#include "../ops_api.h"
#include "sparse_kernels.h"

namespace commlib {
namespace cuda_ops {
namespace {

using at::Tensor;
namespace kern = commlib::cuda;

void ok(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "commlib CUDA kernel failed: ", cudaGetErrorString(e)); }
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct Counted {   // per-tile output offsets (exclusive scan) and the total, on the host
  Tensor offsets;  // int64 [tiles + 1]
  int64_t total;
};

Counted scanned(Tensor counts) {
  const int64_t tiles = counts.numel() - 1;
  ok(kern::scan_counts(counts.data_ptr<int64_t>(), tiles, stream()));
  return {counts, counts[tiles].item<int64_t>()};
}

Tensor new_counts(const Tensor& like) {
  return at::empty({kern::select_tiles(like.numel()) + 1}, like.options().dtype(at::kLong));
}

Counted count_select(const Tensor& x, float thr) {
  Tensor c = new_counts(x);
  ok(kern::select_count(x.data_ptr<float>(), x.numel(), thr, c.data_ptr<int64_t>(), stream()));
  return scanned(c);
}

Counted count_dgc(Tensor& u, Tensor& v, const Tensor& g, float m, bool nesterov, float thr) {
  Tensor c = new_counts(v);
  ok(kern::dgc_update_count(u.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(), v.numel(), m, nesterov,
                            thr, c.data_ptr<int64_t>(), stream()));
  return scanned(c);
}

// The selected (i, x[i]) as new tensors (float32 values); mask_u/mask_v zeroed there if given.
std::tuple<Tensor, Tensor> write_tensors(const Tensor& x, float thr, const Counted& c, float* mask_u,
                                         float* mask_v) {
  Tensor idx = at::empty({c.total}, x.options().dtype(at::kInt));
  Tensor val = at::empty({c.total}, x.options());
  ok(kern::select_write(x.data_ptr<float>(), x.numel(), thr, c.offsets.data_ptr<int64_t>(), idx.data_ptr<int32_t>(),
                        val.data_ptr<float>(), kF32, mask_u, mask_v, stream()));
  return {idx, val};
}

// The max_nnz largest |values| of a selection (ties: lower index), in index order.
std::tuple<Tensor, Tensor> keep_largest(const Tensor& idx, const Tensor& val, int64_t max_nnz) {
  if (max_nnz < 0 || val.numel() <= max_nnz) return {idx, val};
  Tensor order = std::get<1>(at::sort(val.abs(), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  order = std::get<0>(at::sort(order.narrow(0, 0, max_nnz)));
  return {idx.index_select(0, order), val.index_select(0, order)};
}

// Writes the header and zero padding of a SPARSE payload of nnz values at buf[offset:];
// false (nothing written) when it does not fit.
bool begin_payload(Tensor& buf, int64_t offset, int64_t numel, int64_t nnz, int64_t slot, double scale,
                   int64_t flags, int64_t vcode, SparseLayout* l) {
  *l = sparse_layout(offset, nnz, uint8_t(vcode));
  if (l->end > buf.numel() || l->body > int64_t(std::numeric_limits<uint32_t>::max())) return false;
  Tensor hdr = at::empty({kHeaderBytes}, at::kByte);
  write_header(hdr.data_ptr<uint8_t>(), sparse_header(numel, nnz, slot, scale, flags, uint8_t(vcode)));
  buf.narrow(0, offset, kHeaderBytes).copy_(hdr);
  buf.narrow(0, l->idx_at + l->idx_bytes, l->val_at - l->idx_at - l->idx_bytes).zero_();
  buf.narrow(0, l->val_at + l->val_bytes, l->end - l->val_at - l->val_bytes).zero_();
  return true;
}

// Copies (idx, float32 values) into the body; copy_ converts values with round to nearest even.
void fill_payload(Tensor& buf, const SparseLayout& l, const Tensor& idx, const Tensor& val, int64_t vcode) {
  buf.narrow(0, l.idx_at, l.idx_bytes).view(at::kInt).copy_(idx);
  const at::ScalarType vt = vcode == kF16 ? at::kHalf : vcode == kBF16 ? at::kBFloat16 : at::kFloat;
  buf.narrow(0, l.val_at, l.val_bytes).view(vt).copy_(val);
}

struct KthScratch {
  Tensor bits, hist, flag, result;
  explicit KthScratch(const Tensor& like, int64_t s)
      : bits(at::empty({s}, like.options().dtype(at::kInt))),
        hist(at::empty({2048}, like.options().dtype(at::kLong))),
        flag(at::empty({1}, like.options().dtype(at::kInt))),
        result(at::empty({1}, like.options().dtype(at::kFloat))) {}
  uint32_t* bits_ptr() { return reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()); }
  unsigned long long* hist_ptr() { return reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()); }
};

}  // namespace

std::tuple<Tensor, Tensor> threshold_select(const Tensor& x, double thr) {
  check_f32(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const float t = float(thr);
  return write_tensors(x, t, count_select(x, t), nullptr, nullptr);
}

std::tuple<int64_t, int64_t> pack_threshold(Tensor buf, int64_t offset, const Tensor& x, double thr,
                                            int64_t max_nnz, int64_t slot, double scale, int64_t flags,
                                            int64_t vcode) {
  check_value_code(vcode);
  check_buf(buf, offset);
  check_f32(x, "x");
  TORCH_CHECK(buf.device() == x.device(), "buf and x must be on one device");
  c10::cuda::CUDAGuard guard(x.device());
  const float t = float(thr);
  const Counted c = count_select(x, t);
  SparseLayout l;
  if (max_nnz >= 0 && c.total > max_nnz) {
    Tensor idx, val;
    std::tie(idx, val) = write_tensors(x, t, c, nullptr, nullptr);
    std::tie(idx, val) = keep_largest(idx, val, max_nnz);
    if (!begin_payload(buf, offset, x.numel(), idx.numel(), slot, scale, flags, vcode, &l)) return {-1, idx.numel()};
    fill_payload(buf, l, idx, val, vcode);
    return {l.end, idx.numel()};
  }
  if (!begin_payload(buf, offset, x.numel(), c.total, slot, scale, flags, vcode, &l)) return {-1, c.total};
  uint8_t* p = buf.data_ptr<uint8_t>();
  ok(kern::select_write(x.data_ptr<float>(), x.numel(), t, c.offsets.data_ptr<int64_t>(),
                        reinterpret_cast<int32_t*>(p + l.idx_at), p + l.val_at, int(vcode), nullptr, nullptr,
                        stream()));
  return {l.end, c.total};
}

double sampled_threshold(const Tensor& x, int64_t start, int64_t stride, int64_t s, int64_t top,
                         int64_t block_log2) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1, "x must be a 1-D float32 tensor");
  check_sample(x.numel(), start, stride, s, top, block_log2);
  c10::cuda::CUDAGuard guard(x.device());
  KthScratch k(x, s);
  ok(kern::sampled_kth(x.data_ptr<float>(), x.stride(0), start, stride, int(block_log2), s, top, k.bits_ptr(),
                       k.hist_ptr(), k.flag.data_ptr<int>(), k.result.data_ptr<float>(), stream()));
  return k.result.item<float>();
}

double dgc_threshold(const Tensor& u, const Tensor& v, const Tensor& g, double m, bool nesterov, int64_t start,
                     int64_t stride, int64_t s, int64_t top, int64_t block_log2) {
  check_state(u, v, g);
  check_sample(v.numel(), start, stride, s, top, block_log2);
  c10::cuda::CUDAGuard guard(v.device());
  KthScratch k(v, s);
  ok(kern::dgc_sampled_kth(u.data_ptr<float>(), v.data_ptr<float>(), g.data_ptr<float>(), float(m), nesterov, start,
                           stride, int(block_log2), s, top, k.bits_ptr(), k.hist_ptr(), k.flag.data_ptr<int>(),
                           k.result.data_ptr<float>(), stream()));
  return k.result.item<float>();
}

std::tuple<Tensor, Tensor> dgc_update_select(Tensor u, Tensor v, const Tensor& g, double m, bool nesterov,
                                             double thr, int64_t max_nnz) {
  check_state(u, v, g);
  c10::cuda::CUDAGuard guard(v.device());
  const float t = float(thr);
  const Counted c = count_dgc(u, v, g, float(m), nesterov, t);
  if (max_nnz < 0 || c.total <= max_nnz)  // all sent: mask in the writing pass
    return write_tensors(v, t, c, u.data_ptr<float>(), v.data_ptr<float>());
  Tensor idx, val;
  std::tie(idx, val) = write_tensors(v, t, c, nullptr, nullptr);
  std::tie(idx, val) = keep_largest(idx, val, max_nnz);
  ok(kern::zero_at(u.data_ptr<float>(), v.data_ptr<float>(), idx.data_ptr<int32_t>(), idx.numel(), stream()));
  return {idx, val};
}

std::tuple<int64_t, int64_t> dgc_update_pack(Tensor buf, int64_t offset, Tensor u, Tensor v, const Tensor& g,
                                             double m, bool nesterov, double thr, int64_t max_nnz, int64_t slot,
                                             double scale, int64_t flags, int64_t vcode) {
  check_value_code(vcode);
  check_buf(buf, offset);
  check_state(u, v, g);
  TORCH_CHECK(buf.device() == v.device(), "buf and the state must be on one device");
  c10::cuda::CUDAGuard guard(v.device());
  const float t = float(thr);
  const Counted c = count_dgc(u, v, g, float(m), nesterov, t);
  SparseLayout l;
  if (max_nnz < 0 || c.total <= max_nnz) {
    // Masked only when the payload fits: values that are not sent stay in v.
    if (!begin_payload(buf, offset, v.numel(), c.total, slot, scale, flags, vcode, &l)) return {-1, c.total};
    uint8_t* p = buf.data_ptr<uint8_t>();
    ok(kern::select_write(v.data_ptr<float>(), v.numel(), t, c.offsets.data_ptr<int64_t>(),
                          reinterpret_cast<int32_t*>(p + l.idx_at), p + l.val_at, int(vcode), u.data_ptr<float>(),
                          v.data_ptr<float>(), stream()));
    return {l.end, c.total};
  }
  Tensor idx, val;
  std::tie(idx, val) = write_tensors(v, t, c, nullptr, nullptr);
  std::tie(idx, val) = keep_largest(idx, val, max_nnz);
  if (!begin_payload(buf, offset, v.numel(), idx.numel(), slot, scale, flags, vcode, &l)) return {-1, idx.numel()};
  fill_payload(buf, l, idx, val, vcode);
  ok(kern::zero_at(u.data_ptr<float>(), v.data_ptr<float>(), idx.data_ptr<int32_t>(), idx.numel(), stream()));
  return {l.end, idx.numel()};
}

std::string scatter_add(Tensor out, const Tensor& idx, const Tensor& val, double alpha) {
  check_scatter(out, idx, val);
  c10::cuda::CUDAGuard guard(out.device());
  const bool idx64 = idx.scalar_type() == at::kLong;
  const int vcode = dcode_of(val.scalar_type());
  Tensor mm = at::empty({2}, out.options().dtype(at::kLong));
  Tensor fl = at::empty({3}, out.options().dtype(at::kInt));
  ok(kern::scan_source(idx.data_ptr(), idx64, val.data_ptr(), vcode, idx.numel(), false, 1.0f, 1.0f, HUGE_VAL,
                       reinterpret_cast<long long*>(mm.data_ptr<int64_t>()), fl.data_ptr<int>(), stream()));
  const Tensor mmc = mm.cpu(), flc = fl.cpu();
  const int64_t lo = mmc.data_ptr<int64_t>()[0], hi = mmc.data_ptr<int64_t>()[1];
  if (idx.numel() && (lo < 0 || hi >= out.numel()))
    return "sparse index out of range [0, " + std::to_string(out.numel()) + "): min " + std::to_string(lo) +
           ", max " + std::to_string(hi);
  ok(kern::apply_source(out.data_ptr<float>(), idx.data_ptr(), idx64, flc.data_ptr<int>()[0] == 0, val.data_ptr(),
                        vcode, idx.numel(), float(alpha), stream()));
  return "";
}

std::vector<Verdict> unpack_scatter_add(Tensor out, const Tensor& bufs, const Tensor& offsets, double alpha,
                                        int64_t slot, bool finite, double max_abs, bool require_checksum,
                                        bool skip_errors) {
  check_unpack(out, bufs, offsets);
  c10::cuda::CUDAGuard guard(out.device());
  const int64_t ranks = bufs.size(0), cap = bufs.size(1), numel = out.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<Verdict> vs(static_cast<size_t>(ranks));
  struct Src {
    int64_t rank, nnz;
    const uint8_t *idx, *val;
    int vcode;
    float a, s;
    uint32_t slot;
  };
  std::vector<Src> srcs;
  const uint8_t* dev = bufs.data_ptr<uint8_t>();
  // Every rank's header to the host in one copy (device-to-device gathers, then one sync).
  auto header_fits = [&](int64_t r) { return off[r] >= 0 && off[r] % 8 == 0 && off[r] + kHeaderBytes <= cap; };
  Tensor heads = at::empty({ranks, kHeaderBytes}, bufs.options());  // rows that do not fit stay unread
  for (int64_t r = 0; r < ranks; ++r)
    if (header_fits(r)) heads[r].copy_(bufs[r].narrow(0, off[r], kHeaderBytes));
  const Tensor heads_host = heads.cpu();
  // Headers (and checksummed bodies) are checked on the host, like the CPU path does.
  for (int64_t r = 0; r < ranks; ++r) {
    if (off[r] < 0) continue;
    Verdict& v = vs[r];
    v.code = kPayloadError;
    if (off[r] % 8) {
      v.msg = "payload offset must be 8-byte aligned";
      continue;
    }
    if (off[r] + kHeaderBytes > cap) {
      v.msg = "truncated payload: " + std::to_string(cap - off[r]) + " bytes left, header needs 64";
      continue;
    }
    const uint8_t* hdr = heads_host.data_ptr<uint8_t>() + r * kHeaderBytes;
    Header h;
    v.msg = check_layout(hdr, 0, cap - off[r], require_checksum, &h);
    if (!v.msg.empty()) continue;
    if (h.flags & kFlagChecksum) {
      const Tensor body = bufs[r].narrow(0, off[r] + kHeaderBytes, h.body).cpu();
      uint8_t zeroed[kHeaderBytes];
      std::memcpy(zeroed, hdr, kHeaderBytes);
      std::memset(zeroed + kCrcAt, 0, 4);
      if (cpu::crc32(cpu::crc32(0, zeroed, kHeaderBytes), body.data_ptr<uint8_t>(), h.body) != h.crc) {
        v.msg = "payload checksum mismatch";
        continue;
      }
    }
    int code = kOk;
    v.msg = check_meaning(h, numel, slot, alpha, &code);
    v.code = code;
    if (!v.msg.empty()) continue;
    v.end = off[r] + kHeaderBytes + int64_t(h.body);
    v.nnz = int64_t(h.nnz);
    v.flags = int64_t(h.flags & ~kFlagChecksum);
    if (h.kind == kSkip || h.nnz == 0) continue;
    const uint8_t* body = dev + r * cap + off[r] + kHeaderBytes;
    const bool sparse = h.kind == kSparse;
    srcs.push_back({r, int64_t(h.nnz), sparse ? body : nullptr, sparse ? body + align8(4 * int64_t(h.nnz)) : body,
                    int(h.dtype), round_f32(alpha * h.scale), round_f32(h.scale), h.slot});
  }
  // Index range, order and finiteness of every source on the device, one copy back.
  const int64_t ns = int64_t(srcs.size());
  std::vector<bool> sorted(srcs.size(), true);
  if (ns) {
    Tensor mm = at::empty({ns, 2}, out.options().dtype(at::kLong));
    Tensor fl = at::empty({ns, 3}, out.options().dtype(at::kInt));
    for (int64_t i = 0; i < ns; ++i)
      ok(kern::scan_source(srcs[i].idx, false, srcs[i].val, srcs[i].vcode, srcs[i].nnz, finite, srcs[i].s,
                           srcs[i].a, max_abs, reinterpret_cast<long long*>(mm.data_ptr<int64_t>()) + 2 * i,
                           fl.data_ptr<int>() + 3 * i, stream()));
    const Tensor mmc = mm.cpu(), flc = fl.cpu();
    for (int64_t i = 0; i < ns; ++i) {
      Verdict& v = vs[srcs[i].rank];
      const int64_t lo = mmc.data_ptr<int64_t>()[2 * i], hi = mmc.data_ptr<int64_t>()[2 * i + 1];
      const int* f = flc.data_ptr<int>() + 3 * i;
      sorted[i] = f[0] == 0;
      if (srcs[i].idx && (lo < 0 || hi >= numel)) {
        v.code = kPayloadError;
        v.msg = "sparse index out of range [0, " + std::to_string(numel) + "): min " + std::to_string(lo) +
                ", max " + std::to_string(hi);
      } else if (srcs[i].idx && !sorted[i]) {
        v.code = kPayloadError;
        v.msg = "sparse indices must be strictly ascending (no duplicates)";
      } else if (finite && f[1]) {
        v.code = kNonFinite;
        v.msg = "payload holds a value that is not finite in float32 after scale and cast";
      } else if (f[2]) {
        v.code = kPayloadError;
        v.msg = "payload holds a decoded value over max_abs";
      }
      if (v.code != kOk) v.end = -1;
    }
  }
  bool bad = false;
  for (const Verdict& v : vs) bad = bad || v.code > kOk;
  if (bad && !skip_errors) return vs;
  for (int64_t i = 0; i < ns; ++i)  // rank order: deterministic, equal to the CPU path
    if (vs[srcs[i].rank].code == kOk)
      ok(kern::apply_source(out.data_ptr<float>(), srcs[i].idx, false, sorted[i], srcs[i].val, srcs[i].vcode,
                            srcs[i].nnz, srcs[i].a, stream()));
  return vs;
}

}  // namespace cuda_ops
}  // namespace commlib
