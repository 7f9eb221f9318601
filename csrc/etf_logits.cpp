// The prologue and the backward epilogue of etf_logits = scale · normalize(h) @ Eᵀ.
//
// The product itself is a BLAS GEMM on row tiles (python/collapsekit/ops/etf_logits.py); these
// kernels make the tile it reads and fix up the tile it produced, so no normalised copy of h (and
// no [N, D] temporary) ever exists:
//   normalize_rows:          out[r, :] = scale · h_r / max(‖h_r‖, eps),  inv_norms[r] = 1 / max(‖h_r‖, eps)
//   normalize_rows_backward: grad[r, :] ← ∂(h_r / max(‖h_r‖, eps))ᵀ · grad[r, :], in place, i.e.
//                            (g − ĥ (ĥ·g)) / ‖h‖ where ‖h‖ > eps, and g / eps where the clamp is active.
// Row norms accumulate in fp64 (one D-long sum per row: free next to the GEMM, and exact enough
// that the fp32 result only carries its own rounding).
#include <cmath>
#include <stdexcept>

#include "common.h"
#include "etf_logits.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

template <typename T>
inline double row_sumsq(const T* p, int64_t D, int64_t s1) {
  double ss = 0.0;
  if (s1 == 1) {
    for (int64_t d = 0; d < D; ++d) { const double x = to_float(p[d]); ss += x * x; }
  } else {
    for (int64_t d = 0; d < D; ++d) { const double x = to_float(p[d * s1]); ss += x * x; }
  }
  return ss;
}

}  // namespace

void normalize_rows(const NormalizeRowsArgs& a) {
  const int64_t R = a.R, D = a.D, fs0 = a.fs0, fs1 = a.fs1;
  const double eps = a.eps, scale = a.scale;
  if (R < 0 || D < 0 || !(eps > 0.0)) throw std::invalid_argument("collapsekit._C.normalize_rows: bad sizes or eps");
  const int nt = clamp_threads(a.num_threads);
  dispatch_float(a.feature_dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    const T* h = reinterpret_cast<const T*>(a.features);
    Acc* o = reinterpret_cast<Acc*>(a.out);
    Acc* inv = reinterpret_cast<Acc*>(a.inv_norms);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T* p = h + r * fs0;
      const double in = 1.0 / std::fmax(std::sqrt(row_sumsq(p, D, fs1)), eps);
      if (inv) inv[r] = static_cast<Acc>(in);
      const Acc f = static_cast<Acc>(scale * in);
      Acc* dst = o + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = f * to_acc<Acc>(p[d * fs1]);
    }
  });
}

void normalize_rows_backward(const NormalizeRowsBackwardArgs& a) {
  const int64_t R = a.R, D = a.D, fs0 = a.fs0, fs1 = a.fs1;
  const double eps = a.eps;
  if (R < 0 || D < 0 || !(eps > 0.0))
    throw std::invalid_argument("collapsekit._C.normalize_rows_backward: bad sizes or eps");
  const int nt = clamp_threads(a.num_threads);
  dispatch_float(a.feature_dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    const T* h = reinterpret_cast<const T*>(a.features);
    Acc* g = reinterpret_cast<Acc*>(a.grad);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T* p = h + r * fs0;
      Acc* gr = g + r * D;
      const double norm = std::sqrt(row_sumsq(p, D, fs1));
      if (!(norm > eps)) {  // the clamp is active: h / eps is linear in h
        const Acc f = static_cast<Acc>(1.0 / eps);
        for (int64_t d = 0; d < D; ++d) gr[d] *= f;
        continue;
      }
      const double in = 1.0 / norm;
      double hg = 0.0;  // ĥ · g
      for (int64_t d = 0; d < D; ++d) hg += static_cast<double>(to_float(p[d * fs1])) * gr[d];
      const Acc a = static_cast<Acc>(in);
      const Acc b = static_cast<Acc>(hg * in * in * in);  // (ĥ·g)/‖h‖ · ĥ = (h·g) h / ‖h‖³
      for (int64_t d = 0; d < D; ++d) gr[d] = a * gr[d] - b * to_acc<Acc>(p[d * fs1]);
    }
  });
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
