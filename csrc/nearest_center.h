#pragma once
#include <cstdint>

namespace collapsekit {

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void argmin_tile_update(uintptr_t dots, int dtype, int64_t R, int64_t T, int64_t ds0, uintptr_t norms2, \
                        double alpha, int64_t col0, uintptr_t best, uintptr_t best_idx, int num_threads); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
