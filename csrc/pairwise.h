#pragma once
#include <cstdint>

namespace collapsekit {

// Arguments of pairwise_tile_sums: one [ta, tb] Gram tile and the per-class terms of both sides.
struct PairwiseTileArgs {
  uintptr_t gram = 0; int gram_dtype = 0;   // [ta, tb], row stride gs0, unit column stride; fp32 or fp64
  int64_t ta = 0, tb = 0, gs0 = 0;
  uintptr_t norms2_a = 0, norms2_b = 0;     // [ta], [tb] fp64: squared norms of the centred means
  uintptr_t var_a = 0, var_b = 0;           // [ta], [tb] fp64 class variances, or 0 (no CDNV term)
  int strict_upper = 0;                     // 1: only b > a (a diagonal tile)
  double inv_k1 = 0;                        // 1 / (K - 1)
  uintptr_t out = 0;                        // [6] fp64, accumulated into
  int num_threads = 1;
};

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { void pairwise_tile_sums(const PairwiseTileArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
