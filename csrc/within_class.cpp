// Within-class statistics against given class means.
//
//   within_class_variance:  V[c] = sum over entries (i, k) with labels[i, k] == c of
//                                   w[i, k] * ||features[i, :] - means[c, :]||^2
//
// One fused pass: each row is streamed once, its class's mean row gathered (the [C, D] means
// are read, never written), the squared distance reduced over D in registers and added to the
// class. No [N, D] temporary. Threads take contiguous row blocks and keep a private [C] total,
// summed at the end. Entries with labels outside [0, C) are skipped. means and out are in the
// accumulation dtype (fp32, or fp64 for fp64 features), contiguous.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "views.h"
#include "within_class.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

template <typename T, typename L, typename Acc>
void variance_rows(const FeatureView<T, Acc>& fv, const EntryView<L, Acc>& ev, int64_t N, int64_t C,
                   const Acc* means, Acc* out, int nt) {
  const int64_t D = fv.D, K = ev.K;
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
  std::vector<Acc> priv(static_cast<size_t>(nt) * C, Acc(0));
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_index(), T_ = team_size();
    Acc* v = priv.data() + static_cast<int64_t>(t) * C;
    const int64_t lo = N * t / T_, hi = N * (t + 1) / T_;
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = ev.label(i, k);
        if (c < 0 || c >= C) continue;
        v[c] += ev.weight(i, k) * squared_distance(fv, i, means + c * D);
      }
  }
  for (int64_t c = 0; c < C; ++c) {
    Acc s = 0;
    for (int t = 0; t < nt; ++t) s += priv[static_cast<size_t>(t) * C + c];
    out[c] = s;
  }
}

}  // namespace

void within_class_variance(const WithinClassArgs& a) {
  if (a.N < 0 || a.D < 0 || a.K < 1 || a.C < 1)
    throw std::invalid_argument("collapsekit._C.within_class_variance: bad sizes");
  const int nt = clamp_threads(a.num_threads);
  with_views(a, [&](const auto& fv, const auto& ev) {
    using Acc = typename std::decay_t<decltype(fv)>::acc_type;
    variance_rows(fv, ev, a.N, a.C, reinterpret_cast<const Acc*>(a.means), reinterpret_cast<Acc*>(a.out), nt);
  });
}

void center_rows(const CenterRowsArgs& a) {
  // out[r, :] = features[r, :] - means[labels[r], :] and out_weights[r] = weights[r] (1 if none);
  // rows whose label is outside [0, C) get a zero row and weight 0. One tile of the centred Gram.
  const int64_t R = a.R, D = a.D, C = a.C, fs0 = a.fs0, fs1 = a.fs1;
  if (R < 0 || D < 0 || C < 1) throw std::invalid_argument("collapsekit._C.center_rows: bad sizes");
  const int nt = clamp_threads(a.num_threads);
  with_views(a.features, a.feature_dtype, D, fs0, fs1, a.labels, a.label_dtype, 1, a.ls0, 0, a.weights, a.ws0, 0,
             [&](const auto& fv, const auto& ev) {
    using T = typename std::decay_t<decltype(fv)>::value_type;
    using Acc = typename std::decay_t<decltype(fv)>::acc_type;
    const Acc* mu = reinterpret_cast<const Acc*>(a.means);
    Acc* o = reinterpret_cast<Acc*>(a.out);
    Acc* ow = reinterpret_cast<Acc*>(a.out_weights);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t c = ev.label(r, 0);
      Acc* dst = o + r * D;
      if (c < 0 || c >= C) {
        std::fill(dst, dst + D, Acc(0));
        ow[r] = Acc(0);
        continue;
      }
      const Acc* m = mu + c * D;
      const T* p = fv.data + r * fs0;
      for (int64_t d = 0; d < D; ++d) dst[d] = to_acc<Acc>(p[d * fs1]) - m[d];
      ow[r] = ev.weight(r, 0);
    }
  });
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
