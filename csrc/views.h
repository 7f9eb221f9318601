// Strided views of the canonical op arguments, shared by the kernel files. Compiled inside the
// per-instruction-set namespace (see CMakeLists.txt), like the kernels that use them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {


template <typename T, typename Acc>
struct FeatureView {
  using value_type = T;
  using acc_type = Acc;
  const T* data; int64_t s0, s1, D;
  inline void prefetch_row(int64_t row, int64_t d0, int64_t n) const {
#if defined(__GNUC__)
    const char* p = reinterpret_cast<const char*>(data + row * s0 + d0 * s1);
    const int64_t bytes = n * s1 * static_cast<int64_t>(sizeof(T));
    if (s1 == 1)
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 0);
#endif
  }
  // acc[0:n] += w * features[row, d0:d0+n]
  inline void axpy_row(Acc* __restrict acc, int64_t row, int64_t d0, int64_t n, Acc w) const {
    const T* __restrict p = data + row * s0 + d0 * s1;
    if (s1 == 1) {
      for (int64_t j = 0; j < n; ++j) acc[j] += w * to_acc<Acc>(p[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) acc[j] += w * to_acc<Acc>(p[j * s1]);
    }
  }
};

template <typename L, typename Acc>
struct EntryView {
  const L* labels; int64_t ls0, ls1, K;
  const Acc* weights; int64_t ws0, ws1;  // weights == nullptr -> every weight is 1
  inline int64_t label(int64_t i, int64_t k) const { return static_cast<int64_t>(labels[i * ls0 + k * ls1]); }
  inline Acc weight(int64_t i, int64_t k) const { return weights ? weights[i * ws0 + k * ws1] : Acc(1); }
};

// Dispatch on the feature and label dtype codes and call f(fv, ev) with the typed views: the
// entry-point boilerplate every kernel file shares. Inside f, the types are
// typename std::decay_t<decltype(fv)>::value_type / ::acc_type.
template <typename F>
void with_views(uintptr_t features, int feature_dtype, int64_t D, int64_t fs0, int64_t fs1,
                uintptr_t labels, int label_dtype, int64_t K, int64_t ls0, int64_t ls1,
                uintptr_t weights, int64_t ws0, int64_t ws1, F&& f) {
  dispatch_float(feature_dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    dispatch_index(label_dtype, [&](auto l_tag) {
      using L = decltype(l_tag);
      const FeatureView<T, Acc> fv{reinterpret_cast<const T*>(features), fs0, fs1, D};
      const EntryView<L, Acc> ev{reinterpret_cast<const L*>(labels), ls0, ls1, K,
                                 reinterpret_cast<const Acc*>(weights), ws0, ws1};
      f(fv, ev);
    });
  });
}

// The same for the labelled rows of an argument struct (common.h).
template <typename F>
void with_views(const LabeledRowsArgs& a, F&& f) {
  with_views(a.features, a.feature_dtype, a.D, a.fs0, a.fs1, a.labels, a.label_dtype, a.K, a.ls0, a.ls1,
             a.weights, a.ws0, a.ws1, static_cast<F&&>(f));
}

// sum_d (features[row, d] - mean[d])^2 in Acc, vectorisable without -ffast-math: 16 independent
// partial sums (two AVX2 registers of fp32) instead of one serial chain.
template <typename T, typename Acc>
inline Acc squared_distance(const FeatureView<T, Acc>& fv, int64_t row, const Acc* __restrict mean) {
  constexpr int kLanes = 16;
  const int64_t D = fv.D;
  const T* __restrict p = fv.data + row * fv.s0;
  Acc part[kLanes] = {};
  int64_t j = 0;
  if (fv.s1 == 1) {
    for (; j + kLanes <= D; j += kLanes)
      for (int u = 0; u < kLanes; ++u) {
        const Acc t = to_acc<Acc>(p[j + u]) - mean[j + u];
        part[u] += t * t;
      }
  }
  Acc tail = 0;
  for (; j < D; ++j) {
    const Acc t = to_acc<Acc>(p[j * fv.s1]) - mean[j];
    tail += t * t;
  }
  Acc total = 0;
  for (int u = 0; u < kLanes; ++u) total += part[u];
  return total + tail;
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
