// The Payload wire layout of commlib/wire.py, for native code (no torch headers: the CUDA
// binding and the CPU kernels both use it).
//
//   0  4s  magic "CLPL"      16 u64 numel     40 f64 scale
//   4  u16 version (1)       24 u64 nnz       48 u32 body bytes
//   6  u8  kind              32 u64 seed      52 u32 crc (valid when flags & CHECKSUM)
//   7  u8  dtype code        56 u64 reserved (0)
//   8  u32 flags   12 u32 slot
//   body: int32 indices[nnz] (SPARSE only) padded to 8, then values[nnz] padded to 8.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace commlib {

static_assert(sizeof(double) == 8 && sizeof(float) == 4, "IEEE float sizes expected");
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "commlib's wire format is little-endian; this native code assumes a little-endian host"
#endif

constexpr int64_t kHeaderBytes = 64;
constexpr uint16_t kVersion = 1;
constexpr uint64_t kMaxNumel = uint64_t(1) << 40;  // wire.MAX_NUMEL

enum Kind : uint8_t { kDense = 0, kSparse = 1, kRandK = 2, kSkip = 3 };
// Value dtype codes: the order of wire.DTYPES.
enum DCode : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kI8 = 4, kNumDCodes = 5 };
constexpr uint32_t kFlagReset = 1;
constexpr uint32_t kFlagChecksum = 2;
constexpr uint32_t kAllFlags = kFlagReset | kFlagChecksum;
constexpr int64_t kCrcAt = 52;  // the crc field; the checksum covers the header with it zeroed

// Error classes a payload check reports (mapped to commlib.errors in Python).
enum ErrCode : int { kOk = 0, kPayloadError = 1, kNonFinite = 2 };

inline int64_t align8(int64_t n) { return (n + 7) & ~int64_t(7); }

// ---- the value rule of commlib/wire.py (native receivers add in float32) ----------------------
// The smallest magnitude that IEEE round-to-nearest sends to +-Inf in float32: 2^128 - 2^103.
constexpr double kF32Overflow = 340282356779733661637539395458142568448.0;
constexpr double kF32MinNormal = 1.17549435082228750797e-38;  // FLT_MIN

// round_f32(x): IEEE round-to-nearest of a double into float32, overflow -> +-Inf, NaN stays
// NaN (a plain float(x) of an out-of-range double is undefined behaviour in C++).
inline float round_f32(double x) {
  if (std::isnan(x)) return float(x);
  if (std::fabs(x) >= kF32Overflow) return x > 0 ? HUGE_VALF : -HUGE_VALF;
  return float(x);
}

// The scale half of the rule for a receiver adding alpha * payload into float32: scale finite,
// > 0, round_f32(scale) a finite normal float, round_f32(alpha * scale) finite.  "" when
// acceptable; *code: kNonFinite (non-finite or overflowing) or kPayloadError.
inline std::string check_scale(double scale, double alpha, int* code) {
  *code = kNonFinite;
  if (!std::isfinite(scale)) return "payload scale is not finite";
  *code = kPayloadError;
  if (!(scale > 0)) return "payload scale must be > 0";
  const float s = round_f32(scale);
  *code = kNonFinite;
  if (!std::isfinite(s)) return "payload scale overflows float32";
  *code = kPayloadError;
  if (double(s) < kF32MinNormal) return "payload scale is not a normal float32 number";
  *code = kNonFinite;
  if (!std::isfinite(round_f32(alpha * scale))) return "alpha * scale overflows float32";
  *code = kOk;
  return "";
}

// The per-value half, for one value already rounded to float32 (v), s = round_f32(scale) and
// a = round_f32(alpha * scale): the decoded value v * s and the addend v * a must be finite
// (value_finite), and |v * s| <= max_abs when a bound is set (value_within).  Float products
// (built with -ffp-contract=off / --fmad=false): the exact product rounded once, as torch does.
inline bool value_finite(float v, float s, float a) { return std::isfinite(v * s) && std::isfinite(v * a); }
inline bool value_within(float v, float s, double max_abs) { return std::fabs(double(v * s)) <= max_abs; }

inline int64_t itemsize(uint8_t code) {
  switch (code) {
    case kF32: return 4;
    case kF16: return 2;
    case kBF16: return 2;
    case kF64: return 8;
    case kI8: return 1;
    default: return 0;
  }
}

inline int64_t body_bytes(uint8_t kind, int64_t nnz, uint8_t code) {
  const int64_t idx = kind == kSparse ? align8(4 * nnz) : 0;
  return idx + align8(nnz * itemsize(code));
}

struct Header {
  uint16_t version = kVersion;
  uint8_t kind = kSparse;
  uint8_t dtype = kF32;
  uint32_t flags = 0;
  uint32_t slot = 0;
  uint64_t numel = 0;
  uint64_t nnz = 0;
  uint64_t seed = 0;
  double scale = 1.0;
  uint32_t body = 0;
  uint32_t crc = 0;
  uint64_t reserved = 0;
  bool magic_ok = true;  // only meaningful after read_header
};

template <typename T>
inline void put(uint8_t* p, int64_t at, T v) { std::memcpy(p + at, &v, sizeof(T)); }
template <typename T>
inline T get(const uint8_t* p, int64_t at) {
  T v;
  std::memcpy(&v, p + at, sizeof(T));
  return v;
}

inline void write_header(uint8_t* p, const Header& h) {
  std::memcpy(p, "CLPL", 4);
  put<uint16_t>(p, 4, h.version);
  put<uint8_t>(p, 6, h.kind);
  put<uint8_t>(p, 7, h.dtype);
  put<uint32_t>(p, 8, h.flags);
  put<uint32_t>(p, 12, h.slot);
  put<uint64_t>(p, 16, h.numel);
  put<uint64_t>(p, 24, h.nnz);
  put<uint64_t>(p, 32, h.seed);
  put<double>(p, 40, h.scale);
  put<uint32_t>(p, 48, h.body);
  put<uint32_t>(p, 52, h.crc);
  put<uint64_t>(p, 56, h.reserved);
}

inline Header read_header(const uint8_t* p) {
  Header h;
  h.magic_ok = std::memcmp(p, "CLPL", 4) == 0;
  h.version = get<uint16_t>(p, 4);
  h.kind = get<uint8_t>(p, 6);
  h.dtype = get<uint8_t>(p, 7);
  h.flags = get<uint32_t>(p, 8);
  h.slot = get<uint32_t>(p, 12);
  h.numel = get<uint64_t>(p, 16);
  h.nnz = get<uint64_t>(p, 24);
  h.seed = get<uint64_t>(p, 32);
  h.scale = get<double>(p, 40);
  h.body = get<uint32_t>(p, 48);
  h.crc = get<uint32_t>(p, 52);
  h.reserved = get<uint64_t>(p, 56);
  return h;
}

// Where the parts of a SPARSE payload of nnz values (dtype code vcode) lie, written at offset.
struct SparseLayout {
  int64_t idx_at, val_at;        // byte offsets of the indices and of the values
  int64_t idx_bytes, val_bytes;  // unpadded sizes
  int64_t body, end;             // body bytes (padded) and the offset just past the payload
};
inline SparseLayout sparse_layout(int64_t offset, int64_t nnz, uint8_t vcode) {
  SparseLayout l;
  l.idx_at = offset + kHeaderBytes;
  l.idx_bytes = 4 * nnz;
  l.val_at = l.idx_at + align8(l.idx_bytes);
  l.val_bytes = nnz * itemsize(vcode);
  l.body = align8(l.idx_bytes) + align8(l.val_bytes);
  l.end = l.val_at + align8(l.val_bytes);
  return l;
}

// The header of a SPARSE payload (no checksum: collectives' transports check integrity).
inline Header sparse_header(int64_t numel, int64_t nnz, int64_t slot, double scale, int64_t flags, uint8_t vcode) {
  Header h;
  h.kind = kSparse;
  h.dtype = vcode;
  h.flags = uint32_t(flags) & ~kFlagChecksum;
  h.slot = uint32_t(slot);
  h.numel = uint64_t(numel);
  h.nnz = uint64_t(nnz);
  h.scale = scale;
  h.body = uint32_t(body_bytes(kSparse, nnz, vcode));
  return h;
}

// One rank's payload as unpack found it: code kOk / kPayloadError / kNonFinite, or -1 when the
// caller skipped the rank; end = offset past the payload (-1 unless accepted).
struct Verdict {
  int64_t end = -1, nnz = 0, flags = 0;
  int code = -1;
  std::string msg;
};

// Layout checks of Payload.decode_from for a payload at `offset` of a buffer of `capacity`
// bytes.  Returns "" when the header is well formed, the body lies inside the buffer and the
// flags are consistent, else the reason (a PayloadError).  Fills *out.  The checksum itself
// (when flags has kFlagChecksum) is the caller's to verify: it needs the body.
inline std::string check_layout(const uint8_t* buf, int64_t offset, int64_t capacity, bool require_checksum,
                                Header* out) {
  if (offset < 0 || offset + kHeaderBytes > capacity)
    return "truncated payload: " + std::to_string(capacity - offset) + " bytes left, header needs 64";
  if (offset % 8) return "payload offset must be 8-byte aligned";
  const Header h = read_header(buf + offset);
  *out = h;
  if (!h.magic_ok) return "bad payload magic";
  if (h.version != kVersion)
    return "unsupported payload version " + std::to_string(h.version) + " (this commlib speaks 1)";
  if (h.kind > kSkip) return "unknown payload kind " + std::to_string(h.kind);
  if (h.dtype >= kNumDCodes) return "unknown dtype code " + std::to_string(h.dtype);
  if (h.reserved != 0) return "reserved payload header field is not zero";
  if (h.numel > kMaxNumel || h.nnz > kMaxNumel)
    return "implausible sizes numel=" + std::to_string(h.numel) + " nnz=" + std::to_string(h.nnz);
  const int64_t expect = body_bytes(h.kind, int64_t(h.nnz), h.dtype);
  if (int64_t(h.body) != expect)
    return "payload body is " + std::to_string(h.body) + " bytes, its header implies " + std::to_string(expect);
  if (offset + kHeaderBytes + expect > capacity)
    return "truncated payload: body needs " + std::to_string(expect) + " bytes, " +
           std::to_string(capacity - offset - kHeaderBytes) + " left";
  if (h.flags & ~kAllFlags) return "unknown payload flags " + std::to_string(h.flags);
  if (!(h.flags & kFlagChecksum)) {
    if (h.crc != 0) return "payload carries a checksum but its flag is cleared";
    if (require_checksum) return "payload has no checksum and this receiver requires one";
  }
  return "";
}

// Checks of Payload.validate that need no body scan, against the receiver's expectations
// (`numel` entries; slot < 0 accepts any slot; it adds alpha * payload in float32).  "" when
// acceptable; *code is the error class.
inline std::string check_meaning(const Header& h, int64_t numel, int64_t slot, double alpha, int* code) {
  *code = kPayloadError;
  if (int64_t(h.numel) != numel)
    return "payload for slot " + std::to_string(h.slot) + " has numel " + std::to_string(h.numel) +
           ", expected " + std::to_string(numel);
  if (slot >= 0 && int64_t(h.slot) != slot)
    return "payload slot " + std::to_string(h.slot) + ", expected " + std::to_string(slot);
  if (h.kind == kDense && h.nnz != h.numel)
    return "dense payload carries " + std::to_string(h.nnz) + " values for numel " + std::to_string(h.numel);
  if ((h.kind == kSparse || h.kind == kRandK) && h.nnz > h.numel)
    return "payload carries " + std::to_string(h.nnz) + " values but numel is " + std::to_string(h.numel);
  if (h.kind == kSkip && h.nnz != 0) return "skip payload carries values";
  if (h.kind == kSkip && h.dtype == kI8) return "int8 skip payload";
  std::string err = check_scale(h.scale, alpha, code);
  if (!err.empty()) return err;
  *code = kPayloadError;
  if (h.kind == kRandK)
    return "RANDK payloads are not unpacked here (decode them with Payload.decode_from)";
  *code = kOk;
  return "";
}

}  // namespace commlib
