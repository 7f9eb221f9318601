#pragma once
#include <cstdint>

namespace collapsekit {

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void within_class_variance(uintptr_t features, int feature_dtype, int64_t N, int64_t D, int64_t fs0, int64_t fs1, \
                           uintptr_t labels, int label_dtype, int64_t K, int64_t ls0, int64_t ls1, \
                           uintptr_t weights, int64_t ws0, int64_t ws1, \
                           int64_t C, uintptr_t means, uintptr_t out, int num_threads); \
void center_rows(uintptr_t features, int feature_dtype, int64_t R, int64_t D, int64_t fs0, int64_t fs1, \
                 uintptr_t labels, int label_dtype, int64_t ls0, uintptr_t weights, int64_t ws0, \
                 int64_t C, uintptr_t means, uintptr_t out, uintptr_t out_weights, int num_threads); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
