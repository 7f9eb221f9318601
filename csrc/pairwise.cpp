// Pairwise class geometry: the reduction of one Gram tile of centred class means.
//
// Given G[a, b] = μ̃_a · μ̃_b for a tile of class pairs (the product itself comes from BLAS),
// the squared norms ‖μ̃‖² of both sides and, optionally, the class variances σ², add in fp64:
//   out[0] += number of pairs          out[1] += Σ cos          out[2] += Σ cos²
//   out[3] += Σ |cos + 1/(K−1)|        out[4] += Σ log(1/‖u_a − u_b‖) = Σ −½ log(2 − 2 cos)
//   out[5] += Σ (σ_a² + σ_b²) / (2 ‖μ_a − μ_b‖²)           (CDNV; only when variances are given)
// where cos = G / (‖μ̃_a‖ ‖μ̃_b‖) and ‖μ_a − μ_b‖² = ‖μ̃_a‖² + ‖μ̃_b‖² − 2G. strict_upper keeps only
// b > a (a diagonal tile of the upper triangle). One pass over the tile, every term fused.
#include <cmath>

#include "common.h"
#include "pairwise.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

template <typename G>
void tile_sums(const G* gram, int64_t ta, int64_t tb, int64_t gs0, const double* n2a, const double* n2b,
               const double* va, const double* vb, bool strict_upper, double inv_k1, double* out, int nt) {
  double s_pairs = 0, s_cos = 0, s_cos2 = 0, s_coh = 0, s_log = 0, s_cdnv = 0;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16) \
    reduction(+ : s_pairs, s_cos, s_cos2, s_coh, s_log, s_cdnv)
  for (int64_t a = 0; a < ta; ++a) {
    const G* row = gram + a * gs0;
    const double na = std::sqrt(n2a[a]);
    const int64_t b0 = strict_upper ? a + 1 : 0;
    for (int64_t b = b0; b < tb; ++b) {
      const double g = static_cast<double>(row[b]);
      const double cos = g / (na * std::sqrt(n2b[b]));
      s_cos += cos;
      s_cos2 += cos * cos;
      s_coh += std::fabs(cos + inv_k1);
      s_log += -0.5 * std::log(std::fmax(2.0 - 2.0 * cos, 1e-300));
      if (va) {
        const double d2 = std::fmax(n2a[a] + n2b[b] - 2.0 * g, 0.0);
        s_cdnv += (va[a] + vb[b]) / (2.0 * d2);
      }
    }
    s_pairs += static_cast<double>(tb > b0 ? tb - b0 : 0);
  }
  out[0] += s_pairs; out[1] += s_cos; out[2] += s_cos2; out[3] += s_coh; out[4] += s_log; out[5] += s_cdnv;
}

}  // namespace

void pairwise_tile_sums(const PairwiseTileArgs& a) {
  const int64_t ta = a.ta, tb = a.tb, gs0 = a.gs0;
  if (ta < 0 || tb < 0) throw std::invalid_argument("collapsekit._C.pairwise_tile_sums: bad sizes");
  const auto* n2a = reinterpret_cast<const double*>(a.norms2_a);
  const auto* n2b = reinterpret_cast<const double*>(a.norms2_b);
  const auto* va = reinterpret_cast<const double*>(a.var_a);
  const auto* vb = reinterpret_cast<const double*>(a.var_b);
  auto* o = reinterpret_cast<double*>(a.out);
  const int nt = clamp_threads(a.num_threads);
  const bool su = a.strict_upper != 0;
  if (a.gram_dtype == F32)
    tile_sums(reinterpret_cast<const float*>(a.gram), ta, tb, gs0, n2a, n2b, va, vb, su, a.inv_k1, o, nt);
  else if (a.gram_dtype == F64)
    tile_sums(reinterpret_cast<const double*>(a.gram), ta, tb, gs0, n2a, n2b, va, vb, su, a.inv_k1, o, nt);
  else
    bad_code("gram dtype (fp32 or fp64 only)", a.gram_dtype);
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
