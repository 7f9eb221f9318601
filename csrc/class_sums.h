#pragma once
#include <cstdint>

namespace collapsekit {

constexpr int kPathAuto = 0, kPathSorted = 1, kPathDirect = 2, kPathRows = 3;
// Largest total of private [C, D] copies (bytes) for which the auto rule picks the rows path.
constexpr int64_t kRowsMaxPrivateBytes = int64_t(16) << 20;

// One definition per instruction-set build (namespaces base, avx2); bindings.cpp picks at run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void class_sums(uintptr_t features, int feature_dtype, int64_t N, int64_t D, int64_t fs0, int64_t fs1, \
                uintptr_t labels, int label_dtype, int64_t K, int64_t ls0, int64_t ls1, \
                uintptr_t weights, int64_t ws0, int64_t ws1, \
                int64_t C, uintptr_t sums, uintptr_t counts, int path, int num_threads); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA


int choose_class_sums_path(int64_t N, int64_t D, int64_t C, int num_threads, int64_t acc_bytes);

}  // namespace collapsekit
