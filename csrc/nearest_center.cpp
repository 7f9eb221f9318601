// The running arg-min behind nearest_class_center and the NC4 classifier decision.
//
// Given dots[r, j] = h_r · v_{col0 + j} for a [R, T] tile (the product comes from BLAS) and a
// per-column offset, update, for every row, the best score offsets[j] + alpha · dots[r, j] seen
// so far and its column: one fused pass over the tile, strict comparisons so that on equal
// scores the earlier (lower) class keeps its place. best/best_idx persist across the tiles of a
// row block (best starts at +inf).
//   nearest class center: v = μ, offsets = ‖μ‖², alpha = −2   (argmin ‖h − μ‖²)
//   classifier decision:  v = w, offsets = −b,    alpha = −1   (argmax w·h + b)
#include <limits>

#include "common.h"
#include "nearest_center.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

template <typename S>
void update(const S* dots, int64_t R, int64_t T, int64_t ds0, const S* n2, S alpha, int64_t col0, S* best,
            int64_t* best_idx, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const S* row = dots + r * ds0;
    S b = best[r];
    int64_t bi = best_idx[r];
    for (int64_t j = 0; j < T; ++j) {
      const S s = n2[j] + alpha * row[j];
      if (s < b) { b = s; bi = col0 + j; }
    }
    best[r] = b;
    best_idx[r] = bi;
  }
}

}  // namespace

void argmin_tile_update(const ArgminTileArgs& a) {
  const int64_t R = a.R, T = a.T, ds0 = a.ds0, col0 = a.col0;
  if (R < 0 || T < 0) throw std::invalid_argument("collapsekit._C.argmin_tile_update: bad sizes");
  const int nt = clamp_threads(a.num_threads);
  auto* bi = reinterpret_cast<int64_t*>(a.best_idx);
  if (a.dtype == F32)
    update(reinterpret_cast<const float*>(a.dots), R, T, ds0, reinterpret_cast<const float*>(a.offsets),
           static_cast<float>(a.alpha), col0, reinterpret_cast<float*>(a.best), bi, nt);
  else if (a.dtype == F64)
    update(reinterpret_cast<const double*>(a.dots), R, T, ds0, reinterpret_cast<const double*>(a.offsets), a.alpha,
           col0, reinterpret_cast<double*>(a.best), bi, nt);
  else
    bad_code("score dtype (fp32 or fp64 only)", a.dtype);
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
