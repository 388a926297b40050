// Argument checks shared by the CPU and CUDA torch bindings.  The user-facing checks (with
// commlib's error classes) are in commlib/ops; these guard the kernels against misuse.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

#include "payload_format.h"

namespace commlib {

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() <= std::numeric_limits<int32_t>::max(), name, " has more entries than int32 indices reach");
}

inline void check_state(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g) {
  check_f32(u, "u");
  check_f32(v, "v");
  check_f32(g, "g");
  TORCH_CHECK(u.numel() == v.numel() && v.numel() == g.numel(), "u, v and g must have the same size");
  TORCH_CHECK(u.device() == v.device() && v.device() == g.device(), "u, v and g must be on one device");
}

inline void check_buf(const at::Tensor& buf, int64_t offset) {
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.dim() == 1 && buf.is_contiguous(), "buf must be flat uint8");
  TORCH_CHECK(offset >= 0 && offset % 8 == 0, "payload offset must be 8-byte aligned and >= 0");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(buf.data_ptr()) % 8 == 0, "buf must start 8-byte aligned");
}

inline void check_value_code(int64_t vcode) {
  TORCH_CHECK(vcode == kF32 || vcode == kF16 || vcode == kBF16, "value dtype must be float32, float16 or bfloat16");
}

// DGC's threshold sample: entry j at start + (j >> block_log2) * stride + (j & (block - 1)), j < s
// (commlib/ops/torch_ops.py sample_plan).
inline void check_sample(int64_t n, int64_t start, int64_t stride, int64_t s, int64_t top, int64_t block_log2) {
  TORCH_CHECK(block_log2 >= 0 && block_log2 < 31, "sample block_log2 must be in [0, 30]");
  const int64_t block = int64_t(1) << block_log2;
  TORCH_CHECK(s >= 1 && start >= 0 && (s <= block || stride >= block), "sample blocks must not overlap");
  // last entry start + blocks * stride + tail < n, written so that nothing overflows
  const int64_t blocks = (s - 1) >> block_log2, tail = (s - 1) & (block - 1);
  TORCH_CHECK(start < n && tail < n - start && (blocks == 0 || stride <= (n - 1 - start - tail) / blocks),
              "sample outside the tensor");
  TORCH_CHECK(top >= 1 && top <= s, "top must be in [1, s]");
}

inline void check_scatter(const at::Tensor& out, const at::Tensor& idx, const at::Tensor& val) {
  check_f32(out, "out");
  const bool int_idx = idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong;
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() && int_idx, "indices must be contiguous int32 or int64");
  TORCH_CHECK(val.dim() == 1 && val.is_contiguous() && val.numel() == idx.numel(), "one contiguous value per index");
  TORCH_CHECK(idx.device() == out.device() && val.device() == out.device(), "out, indices, values on one device");
}

inline void check_unpack(const at::Tensor& out, const at::Tensor& bufs, const at::Tensor& offsets) {
  check_f32(out, "out");
  TORCH_CHECK(bufs.scalar_type() == at::kByte && bufs.dim() == 2 && bufs.is_contiguous(),
              "bufs must be (ranks, capacity) uint8");
  TORCH_CHECK(bufs.size(1) % 8 == 0 && reinterpret_cast<uintptr_t>(bufs.data_ptr()) % 8 == 0,
              "rows must be 8-byte aligned");
  TORCH_CHECK(bufs.device() == out.device(), "out and bufs must be on one device");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() == bufs.size(0) &&
                  offsets.is_contiguous() && offsets.device().is_cpu(),
              "offsets must be a CPU int64 tensor with one entry per rank");
}

inline uint8_t dcode_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    case at::kChar: return kI8;
    default: break;
  }
  TORCH_CHECK(false, "unsupported value dtype ", t);
}

}  // namespace commlib
