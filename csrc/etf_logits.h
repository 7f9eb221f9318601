#pragma once
#include <cstdint>

namespace collapsekit {

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void normalize_rows(uintptr_t features, int feature_dtype, int64_t R, int64_t D, int64_t fs0, int64_t fs1, \
                    double eps, double scale, uintptr_t out, uintptr_t inv_norms, int num_threads); \
void normalize_rows_backward(uintptr_t features, int feature_dtype, int64_t R, int64_t D, int64_t fs0, \
                             int64_t fs1, double eps, uintptr_t grad, int num_threads); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
