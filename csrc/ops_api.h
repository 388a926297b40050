// The torch-level ops each device implements: csrc/cpu/binding_cpu.cpp (namespace cpu_ops) and,
// in CUDA builds, csrc/cuda/binding_cuda.cpp (namespace cuda_ops).  csrc/binding.cpp picks one
// by the tensors' device.  Arguments are as commlib/ops/native.py passes them; value dtype codes
// are commlib::DCode; max_nnz < 0 keeps every selected entry.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "payload_format.h"

#define COMMLIB_OPS_API                                                                                        \
  std::tuple<at::Tensor, at::Tensor> threshold_select(const at::Tensor& x, double thr);                         \
  std::tuple<int64_t, int64_t> pack_threshold(at::Tensor buf, int64_t offset, const at::Tensor& x, double thr, \
                                              int64_t max_nnz, int64_t slot, double scale, int64_t flags,      \
                                              int64_t vcode);                                                  \
  double sampled_threshold(const at::Tensor& x, int64_t start, int64_t stride, int64_t s, int64_t top,         \
                           int64_t block_log2);                                                                \
  double dgc_threshold(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, double m, bool nesterov, \
                       int64_t start, int64_t stride, int64_t s, int64_t top, int64_t block_log2);             \
  std::tuple<at::Tensor, at::Tensor> dgc_update_select(at::Tensor u, at::Tensor v, const at::Tensor& g,        \
                                                       double m, bool nesterov, double thr, int64_t max_nnz);  \
  std::tuple<int64_t, int64_t> dgc_update_pack(at::Tensor buf, int64_t offset, at::Tensor u, at::Tensor v,     \
                                               const at::Tensor& g, double m, bool nesterov, double thr,       \
                                               int64_t max_nnz, int64_t slot, double scale, int64_t flags,     \
                                               int64_t vcode);                                                 \
  std::string scatter_add(at::Tensor out, const at::Tensor& idx, const at::Tensor& val, double alpha);         \
  std::vector<Verdict> unpack_scatter_add(at::Tensor out, const at::Tensor& bufs, const at::Tensor& offsets,   \
                                          double alpha, int64_t slot, bool finite, double max_abs,             \
                                          bool require_checksum, bool skip_errors);

namespace commlib {
namespace cpu_ops {
COMMLIB_OPS_API
}  // namespace cpu_ops
#ifdef WITH_CUDA
namespace cuda_ops {
COMMLIB_OPS_API
}  // namespace cuda_ops
#endif
}  // namespace commlib
