#pragma once
#include <cstdint>

namespace collapsekit {

// Arguments of normalize_rows: features [R, D] in feature_dtype (any strides); out and inv_norms
// in the accumulation dtype, contiguous.
struct NormalizeRowsArgs {
  uintptr_t features = 0; int feature_dtype = 0; int64_t R = 0, D = 0, fs0 = 0, fs1 = 0;
  double eps = 0, scale = 1;
  uintptr_t out = 0;                        // [R, D]
  uintptr_t inv_norms = 0;                  // [R], or 0 (not wanted)
  int num_threads = 1;
};

// Arguments of normalize_rows_backward: the same features; grad [R, D] (accumulation dtype,
// contiguous) is transformed in place.
struct NormalizeRowsBackwardArgs {
  uintptr_t features = 0; int feature_dtype = 0; int64_t R = 0, D = 0, fs0 = 0, fs1 = 0;
  double eps = 0;
  uintptr_t grad = 0;
  int num_threads = 1;
};

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void normalize_rows(const NormalizeRowsArgs& a); \
void normalize_rows_backward(const NormalizeRowsBackwardArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
