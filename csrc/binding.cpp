// commlib._native: the Python module.  Each op runs the CPU or the CUDA implementation
// (csrc/ops_api.h) by the device of its tensors, with the GIL released.
//
// The wrappers in commlib/ops/native.py validate arguments and route here only the tensors
// this build supports (float32 data on the CPU, or on CUDA when built with CUDA).
#include <torch/extension.h>

#include <string>

#include "cpu/kernels.h"
#include "ops_api.h"

namespace py = pybind11;
using at::Tensor;
using namespace commlib;

namespace {

// Bumped whenever a signature here changes; commlib/ops/native.py refuses a stale build.
constexpr int kAbiVersion = 2;

#ifdef WITH_CUDA
constexpr bool kHasCuda = true;
#define COMMLIB_DISPATCH(on_cuda, op, ...) \
  ((on_cuda) ? cuda_ops::op(__VA_ARGS__) : cpu_ops::op(__VA_ARGS__))
#else
constexpr bool kHasCuda = false;
[[noreturn]] void no_cuda() { TORCH_CHECK(false, "commlib._native was built without CUDA"); }
#define COMMLIB_DISPATCH(on_cuda, op, ...) \
  ((on_cuda) ? (no_cuda(), cpu_ops::op(__VA_ARGS__)) : cpu_ops::op(__VA_ARGS__))
#endif

std::tuple<Tensor, Tensor> threshold_select(const Tensor& x, double thr) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(x.is_cuda(), threshold_select, x, thr);
}

std::tuple<int64_t, int64_t> pack_threshold(Tensor buf, int64_t offset, const Tensor& x, double thr,
                                            int64_t max_nnz, int64_t slot, double scale, int64_t flags,
                                            int64_t vcode) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(x.is_cuda(), pack_threshold, buf, offset, x, thr, max_nnz, slot, scale, flags, vcode);
}

double sampled_threshold(const Tensor& x, int64_t start, int64_t stride, int64_t s, int64_t top,
                         int64_t block_log2) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(x.is_cuda(), sampled_threshold, x, start, stride, s, top, block_log2);
}

double dgc_threshold(const Tensor& u, const Tensor& v, const Tensor& g, double m, bool nesterov, int64_t start,
                     int64_t stride, int64_t s, int64_t top, int64_t block_log2) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(v.is_cuda(), dgc_threshold, u, v, g, m, nesterov, start, stride, s, top, block_log2);
}

std::tuple<Tensor, Tensor> dgc_update_select(Tensor u, Tensor v, const Tensor& g, double m, bool nesterov,
                                             double thr, int64_t max_nnz) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(v.is_cuda(), dgc_update_select, u, v, g, m, nesterov, thr, max_nnz);
}

std::tuple<int64_t, int64_t> dgc_update_pack(Tensor buf, int64_t offset, Tensor u, Tensor v, const Tensor& g,
                                             double m, bool nesterov, double thr, int64_t max_nnz, int64_t slot,
                                             double scale, int64_t flags, int64_t vcode) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(v.is_cuda(), dgc_update_pack, buf, offset, u, v, g, m, nesterov, thr, max_nnz, slot, scale,
                          flags, vcode);
}

std::string scatter_add(Tensor out, const Tensor& idx, const Tensor& val, double alpha) {
  py::gil_scoped_release nogil;
  return COMMLIB_DISPATCH(out.is_cuda(), scatter_add, out, idx, val, alpha);
}

// Returns (ends, nnz, flags, codes, messages), one entry per rank; see ops_api.h / Verdict.
py::tuple unpack_scatter_add(Tensor out, const Tensor& bufs, const Tensor& offsets, double alpha, int64_t slot,
                             bool finite, double max_abs, bool require_checksum, bool skip_errors) {
  std::vector<Verdict> verdicts;
  {
    py::gil_scoped_release nogil;
    verdicts = COMMLIB_DISPATCH(out.is_cuda(), unpack_scatter_add, out, bufs, offsets, alpha, slot, finite,
                                max_abs, require_checksum, skip_errors);
  }
  py::list ends, nnz, flags, codes, msgs;
  for (const Verdict& v : verdicts) {
    const bool ok = v.code == kOk;
    ends.append(ok ? v.end : -1);
    nnz.append(ok ? v.nnz : 0);
    flags.append(ok ? v.flags : 0);
    codes.append(v.code);
    msgs.append(v.msg);
  }
  return py::make_tuple(ends, nnz, flags, codes, msgs);
}

std::string set_isa(const std::string& name) {
  cpu::Isa want = cpu::Isa::kAvx512;
  if (name == "scalar") want = cpu::Isa::kScalar;
  else if (name == "avx2") want = cpu::Isa::kAvx2;
  else TORCH_CHECK(name == "avx512", "isa must be scalar, avx2 or avx512");
  return cpu::isa_name(cpu::set_active_isa(want));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "commlib's native sparse hot path (documented in commlib/ops/native.py and commlib/ops/__init__.py)";
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("has_cuda", [] { return kHasCuda; });
  m.def("isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); }, "ISA of the CPU selection kernels");
  m.def("best_isa", [] { return std::string(cpu::isa_name(cpu::best_isa())); });
  m.def("set_isa", &set_isa, "lower (or restore) the CPU kernels' ISA; returns the one now active");
  m.def("release_scratch", [] { cpu::release_scratch(); }, "free the calling thread's selection scratch");
  m.def("threshold_select", &threshold_select);
  m.def("pack_threshold", &pack_threshold);
  m.def("sampled_threshold", &sampled_threshold);
  m.def("dgc_threshold", &dgc_threshold);
  m.def("dgc_update_select", &dgc_update_select);
  m.def("dgc_update_pack", &dgc_update_pack);
  m.def("scatter_add", &scatter_add);
  m.def("unpack_scatter_add", &unpack_scatter_add);
}
