#pragma once
#include <cstdint>

namespace collapsekit {

// Arguments of argmin_tile_update: one [R, T] tile of dots, all in the score dtype (fp32 or fp64).
struct ArgminTileArgs {
  uintptr_t dots = 0; int dtype = 0;        // [R, T], row stride ds0, unit column stride
  int64_t R = 0, T = 0, ds0 = 0;
  uintptr_t offsets = 0;                    // [T]: the tile's per-column offsets
  double alpha = 0;                         // score = offsets[j] + alpha * dots[r, j]
  int64_t col0 = 0;                         // class index of the tile's first column
  uintptr_t best = 0;                       // [R] running best score, updated in place
  uintptr_t best_idx = 0;                   // [R] int64 running arg-min, updated in place
  int num_threads = 1;
};

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { void argmin_tile_update(const ArgminTileArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
