// Shared helpers for the collapsekit CPU kernels: dtype codes, scalar conversions, threading.
//
// _C never links libtorch. Python passes raw data pointers (as integers), sizes, strides in
// elements and the dtype codes below; it has validated every argument before the call.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef COLLAPSEKIT_OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace collapsekit {

// Must match python/collapsekit/_dispatch.py.
enum FloatCode : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };
enum IndexCode : int { I32 = 0, I64 = 1 };

struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE binary16 -> binary32 without branches, so loops over D vectorise with baseline SIMD.
// Normal and subnormal halves: move exponent+mantissa into place and rescale by 2^(127-15);
// the multiply turns a half subnormal into the right normal float. Inf/NaN get exponent 255.
static inline float to_float(half_t h) {
  uint32_t em = h.bits & 0x7fffu;
  uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t mag_bits; std::memcpy(&mag_bits, &mag, 4);
  uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);
  uint32_t out = (em >= 0x7c00u ? special : mag_bits) | sign;
  return bits_to_float(out);
}
static inline float to_float(bfloat16_t h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }
static inline float to_float(float x) { return x; }
static inline double to_float(double x) { return x; }

template <typename Acc, typename T> static inline Acc to_acc(T x) { return static_cast<Acc>(to_float(x)); }

// binary32 -> binary16 / bfloat16, round to nearest even (NaN stays NaN, overflow -> inf): for
// kernels that write outputs in the input's half type directly.
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline half_t to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return half_t{static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (x >= 0x477ff000u) return half_t{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24 (rint: ties to even)
    const float m = std::nearbyint(bits_to_float(x) * 16777216.0f);
    return half_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(m))};
  }
  x -= 112u << 23;  // rebias the exponent (127 -> 15)
  x += 0xfffu + ((x >> 13) & 1u);
  return half_t{static_cast<uint16_t>(sign | (x >> 13))};
}
static inline bfloat16_t to_bfloat16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{static_cast<uint16_t>((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);
  return bfloat16_t{static_cast<uint16_t>(x >> 16)};
}
template <typename T> struct FromAcc;
template <> struct FromAcc<float> { template <typename A> static float of(A v) { return static_cast<float>(v); } };
template <> struct FromAcc<double> { template <typename A> static double of(A v) { return static_cast<double>(v); } };
template <> struct FromAcc<half_t> { template <typename A> static half_t of(A v) { return to_half(static_cast<float>(v)); } };
template <> struct FromAcc<bfloat16_t> {
  template <typename A> static bfloat16_t of(A v) { return to_bfloat16(static_cast<float>(v)); }
};
template <typename T, typename A> static inline T from_acc(A v) { return FromAcc<T>::of(v); }

// Ask for transparent huge pages on a large buffer that has not been touched yet. Fresh 4 KiB
// pages are faulted in one by one on first write, which costs more than the kernel's own work
// for outputs of 100+ MB (measured: 154 MB of zeros 45 ms -> 9 ms on a 2-core VM with THP in
// "madvise" mode). Harmless where THP is off or the memory is already resident.
static inline void advise_huge_pages(void* p, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  if (nbytes < 2 * huge) return;
  uintptr_t a = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  uintptr_t e = (reinterpret_cast<uintptr_t>(p) + nbytes) & ~(huge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p; (void)nbytes;
#endif
}

static inline int clamp_threads(int n) { return n < 1 ? 1 : n; }

// Inside a parallel region: this thread's index and the team size (0 and 1 without OpenMP).
static inline int thread_index() {
#ifdef COLLAPSEKIT_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
static inline int team_size() {
#ifdef COLLAPSEKIT_OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

static inline int max_threads() {
#ifdef COLLAPSEKIT_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Kernel arguments travel as one named struct per entry point (ClassSumsArgs, SsdArgs, ...),
// declared in the family's header outside the per-ISA namespaces (one Python class serves every
// build), bound field by field in bindings.cpp and filled from Python by
// collapsekit._cargs.fill_args, which rejects unknown and missing fields. Pointers are addresses
// (0 = absent), strides are in elements.
//
// The labelled feature rows shared by class_sums and within_class_variance: features [N, D] in
// feature_dtype (FloatCode), labels [N, K] in label_dtype (IndexCode), weights [N, K] in the
// accumulation dtype or 0 (every weight 1), each with its own strides.
struct LabeledRowsArgs {
  uintptr_t features = 0; int feature_dtype = 0; int64_t N = 0, D = 0, fs0 = 0, fs1 = 0;
  uintptr_t labels = 0; int label_dtype = 0; int64_t K = 0, ls0 = 0, ls1 = 0;
  uintptr_t weights = 0; int64_t ws0 = 0, ws1 = 0;
};

[[noreturn]] static inline void bad_code(const char* what, int code) {
  throw std::invalid_argument(std::string("collapsekit._C: unsupported ") + what + " code " + std::to_string(code));
}

// Calls f(T{}, Acc{}) with the storage type T of a float code and its accumulation type Acc
// (fp32 for fp16/bf16/fp32, fp64 for fp64).
template <typename F> static inline void dispatch_float(int code, F&& f) {
  switch (code) {
    case F32: f(float{}, float{}); break;
    case F64: f(double{}, double{}); break;
    case F16: f(half_t{}, float{}); break;
    case BF16: f(bfloat16_t{}, float{}); break;
    default: bad_code("float dtype", code);
  }
}

template <typename F> static inline void dispatch_index(int code, F&& f) {
  switch (code) {
    case I32: f(int32_t{}); break;
    case I64: f(int64_t{}); break;
    default: bad_code("index dtype", code);
  }
}

}  // namespace collapsekit
