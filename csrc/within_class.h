#pragma once
#include <cstdint>

#include "common.h"

namespace collapsekit {

// Arguments of within_class_variance (the labelled rows, see common.h, the means and the output).
struct WithinClassArgs : LabeledRowsArgs {
  int64_t C = 0;                    // number of classes
  uintptr_t means = 0;              // [C, D], accumulation dtype, contiguous
  uintptr_t out = 0;                // [C], accumulation dtype
  int num_threads = 1;
};

// Arguments of center_rows: one tile of R rows with one label each.
struct CenterRowsArgs {
  uintptr_t features = 0; int feature_dtype = 0; int64_t R = 0, D = 0, fs0 = 0, fs1 = 0;  // [R, D]
  uintptr_t labels = 0; int label_dtype = 0; int64_t ls0 = 0;                            // [R]
  uintptr_t weights = 0; int64_t ws0 = 0;         // [R], accumulation dtype, or 0 (weight 1)
  int64_t C = 0;
  uintptr_t means = 0;              // [C, D], accumulation dtype, contiguous
  uintptr_t out = 0;                // [R, D], accumulation dtype, contiguous
  uintptr_t out_weights = 0;        // [R], accumulation dtype
  int num_threads = 1;
};

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void within_class_variance(const WithinClassArgs& a); \
void center_rows(const CenterRowsArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
