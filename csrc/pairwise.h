#pragma once
#include <cstdint>

namespace collapsekit {

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void pairwise_tile_sums(uintptr_t gram, int gram_dtype, int64_t ta, int64_t tb, int64_t gs0, \
                        uintptr_t norms2_a, uintptr_t norms2_b, uintptr_t var_a, uintptr_t var_b, \
                        int strict_upper, double inv_k1, uintptr_t out, int num_threads); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
