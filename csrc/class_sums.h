#pragma once
#include <cstdint>

#include "common.h"

namespace collapsekit {

constexpr int kPathAuto = 0, kPathSorted = 1, kPathDirect = 2, kPathRows = 3;
// Largest total of private [C, D] copies (bytes) for which the auto rule picks the rows path.
constexpr int64_t kRowsMaxPrivateBytes = int64_t(16) << 20;

// Arguments of class_sums (the labelled rows, see common.h, and the outputs).
struct ClassSumsArgs : LabeledRowsArgs {
  int64_t C = 0;                    // number of classes
  uintptr_t sums = 0;               // [C, D], accumulation dtype, contiguous
  uintptr_t counts = 0;             // [C], accumulation dtype
  int path = kPathAuto;             // kPath* above
  int num_threads = 1;
};

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { void class_sums(const ClassSumsArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA


int choose_class_sums_path(int64_t N, int64_t D, int64_t C, int num_threads, int64_t acc_bytes);

}  // namespace collapsekit
