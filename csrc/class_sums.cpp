// class_sums: per-class weighted sums of feature rows and per-class weight totals.
//
//   sums[c, :] = sum over entries (i, k) with labels[i, k] == c of w[i, k] * features[i, :]
//   counts[c]  = sum over the same entries of w[i, k]                     (w = 1 when absent)
//
// Hard labels are the K = 1 case of soft labels [N, K]. Entries whose label lies outside
// [0, C) are skipped (Python rejects them unless check=False), so nothing is written out of
// bounds. Outputs are in the accumulation dtype (fp32, or fp64 for fp64 features), contiguous.
//
// Three paths (path = 0 auto, 1 sorted, 2 direct, 3 rows; auto: choose_class_sums_path):
//  * sorted: a counting sort of the entries by label, then each class's run of rows is reduced
//    into its output row, which is written once. The sorted order is cut into equal-size
//    segments (one per work item) so a huge class cannot serialise the work; the classes cut by
//    a segment boundary are summed from small per-segment partials at the end. Traffic is one
//    read of the features and one write of [C, D]: this is what makes large C (the [C, D]
//    accumulator far bigger than cache) fast.
//  * rows: each thread streams a contiguous block of rows into a private [C, D] accumulator
//    (thread 0 into the output) and the copies are summed: every row read once, in order; best
//    while the (T-1) copies are small.
//  * direct: each thread owns a range of classes (balanced by entry count), scans the rows in
//    memory order and adds its own into the output: no private copies, for large C*D.
#include <algorithm>
#include <type_traits>
#include <memory>
#include <vector>

#include "common.h"
#include "class_sums.h"
#include "views.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

constexpr int64_t kColumnBlock = 1024;  // accumulator columns kept hot in L1 while rows stream by
constexpr int64_t kPrefetchRows = 4;    // gathered rows fetched ahead in the sorted path

// counts[c] = sum of weights with label c (sequential: O(N*K) scalar work, negligible next to N*D).
template <typename L, typename Acc>
void count_entries(const EntryView<L, Acc>& ev, int64_t N, int64_t C, Acc* counts, std::vector<int64_t>* hist) {
  std::fill(counts, counts + C, Acc(0));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < ev.K; ++k) {
      int64_t c = ev.label(i, k);
      if (c < 0 || c >= C) continue;
      counts[c] += ev.weight(i, k);
      if (hist) (*hist)[c + 1] += 1;
    }
}

template <typename T, typename L, typename Acc>
void sums_sorted(const FeatureView<T, Acc>& fv, const EntryView<L, Acc>& ev, int64_t N, int64_t C,
                 Acc* sums, Acc* counts, int nt) {
  const int64_t D = fv.D, K = ev.K;
  // Counting sort of the valid entries by label: off[c]..off[c+1] is class c's run in perm.
  std::vector<int64_t> off(C + 1, 0);
  count_entries(ev, N, C, counts, &off);
  for (int64_t c = 0; c < C; ++c) off[c + 1] += off[c];
  const int64_t M = off[C];
  std::vector<int64_t> perm(M), cursor(off.begin(), off.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < K; ++k) {
      int64_t c = ev.label(i, k);
      if (c >= 0 && c < C) perm[cursor[c]++] = i * K + k;
    }

  // Absent classes get zero rows (their only write).
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < C; ++c)
    if (off[c] == off[c + 1]) std::fill(sums + c * D, sums + (c + 1) * D, Acc(0));
  if (M == 0 || D == 0) return;

  // Equal-size segments of the sorted order; a segment holds at most two partial classes
  // (its first and its last), kept in partial[s][slot] and merged below.
  const int64_t S = std::min<int64_t>(M, static_cast<int64_t>(nt) * 8);
  std::vector<Acc> partial(static_cast<size_t>(S) * 2 * D, Acc(0));
  std::vector<int64_t> partial_class(static_cast<size_t>(S) * 2, -1);

  auto reduce_run = [&](Acc* dst, int64_t pos, int64_t end) {
    for (int64_t d0 = 0; d0 < D; d0 += kColumnBlock) {
      const int64_t n = std::min(kColumnBlock, D - d0);
      Acc* acc = dst + d0;
      std::fill(acc, acc + n, Acc(0));
      for (int64_t r = pos; r < end; ++r) {
        const int64_t e = perm[r];
        const int64_t i = K == 1 ? e : e / K, k = K == 1 ? 0 : e % K;
        // Rows arrive in label order, not memory order: fetch the row after next ahead of use,
        // which the hardware prefetcher cannot predict.
        if (r + kPrefetchRows < M) fv.prefetch_row(perm[r + kPrefetchRows] / K, d0, n);
        fv.axpy_row(acc, i, d0, n, ev.weight(i, k));
      }
    }
  };

#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t s = 0; s < S; ++s) {
    int64_t pos = M * s / S;
    const int64_t end = M * (s + 1) / S;
    // The class whose run contains pos: the last c with off[c] <= pos.
    int64_t c = std::upper_bound(off.begin(), off.end(), pos) - off.begin() - 1;
    int slot = 0;
    while (pos < end) {
      while (off[c + 1] <= pos) ++c;  // skip absent classes
      const int64_t stop = std::min(off[c + 1], end);
      if (pos == off[c] && stop == off[c + 1]) {
        reduce_run(sums + c * D, pos, stop);  // whole run inside this segment: write once
      } else {
        reduce_run(partial.data() + (s * 2 + slot) * D, pos, stop);
        partial_class[s * 2 + slot] = c;
        ++slot;
      }
      pos = stop;
    }
  }

  // Merge the partials of the classes cut by segment boundaries (in class order).
  int64_t last = -1;
  for (int64_t p = 0; p < S * 2; ++p) {
    const int64_t c = partial_class[p];
    if (c < 0) continue;
    Acc* row = sums + c * D;
    const Acc* src = partial.data() + p * D;
    if (c != last) { std::copy(src, src + D, row); last = c; }
    else for (int64_t d = 0; d < D; ++d) row[d] += src[d];
  }
}

template <typename T, typename L, typename Acc>
void sums_direct(const FeatureView<T, Acc>& fv, const EntryView<L, Acc>& ev, int64_t N, int64_t C,
                 Acc* sums, Acc* counts, int nt) {
  // Each thread owns a range of classes holding about M / T entries, scans every label in memory
  // order and adds only its own rows into its slice of the output. No private copies and no
  // reduction pass (both cost more than the scatter on a 2-core machine), rows stream in order,
  // and each row is read by exactly one thread.
  const int64_t D = fv.D, K = ev.K;
  std::vector<int64_t> off(C + 1, 0);
  count_entries(ev, N, C, counts, &off);
  for (int64_t c = 0; c < C; ++c) off[c + 1] += off[c];
  const int64_t M = off[C];
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, C)));
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_index(), T_ = team_size();
    // classes [lo, hi): the first class whose run starts at or after M*t/T, up to the next one
    const int64_t lo = t == 0 ? 0 : std::lower_bound(off.begin(), off.end(), M * t / T_) - off.begin();
    const int64_t hi = t == T_ - 1 ? C : std::lower_bound(off.begin(), off.end(), M * (t + 1) / T_) - off.begin();
    if (hi > lo) {
      std::fill(sums + lo * D, sums + hi * D, Acc(0));
      for (int64_t i = 0; i < N; ++i)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t c = ev.label(i, k);
          if (c < lo || c >= hi) continue;
          fv.axpy_row(sums + c * D, i, 0, D, ev.weight(i, k));
        }
    }
  }
}

template <typename T, typename L, typename Acc>
void sums_rows(const FeatureView<T, Acc>& fv, const EntryView<L, Acc>& ev, int64_t N, int64_t C,
               Acc* sums, Acc* counts, int nt) {
  // Each thread streams a contiguous block of rows into its own [C, D] accumulator (thread 0
  // straight into the output), then the accumulators are summed. Every row is read once, in
  // order, by one thread; the price is (T-1) private copies and one reduction pass.
  const int64_t D = fv.D, K = ev.K, CD = C * D;
  count_entries<L, Acc>(ev, N, C, counts, nullptr);
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, N)));
  std::unique_ptr<Acc[]> priv(nt > 1 ? new Acc[static_cast<size_t>(nt - 1) * CD] : nullptr);
  if (nt > 1) advise_huge_pages(priv.get(), static_cast<size_t>(nt - 1) * CD * sizeof(Acc));
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_index(), T_ = team_size();
    Acc* acc = t == 0 ? sums : priv.get() + (t - 1) * CD;
    std::fill(acc, acc + CD, Acc(0));
    const int64_t lo = N * t / T_, hi = N * (t + 1) / T_;
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = ev.label(i, k);
        if (c < 0 || c >= C) continue;
        fv.axpy_row(acc + c * D, i, 0, D, ev.weight(i, k));
      }
#pragma omp barrier
    if (T_ > 1) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < CD; ++j) {
        Acc v = sums[j];
        for (int u = 0; u < T_ - 1; ++u) v += priv[u * CD + j];
        sums[j] = v;
      }
    }
  }
}

}  // namespace

void class_sums(const ClassSumsArgs& a) {
  const int64_t N = a.N, D = a.D, K = a.K, C = a.C;
  if (N < 0 || D < 0 || K < 1 || C < 1) throw std::invalid_argument("collapsekit._C.class_sums: bad sizes");
  const int nt = clamp_threads(a.num_threads);
  int path = a.path;
  with_views(a, [&](const auto& fv, const auto& ev) {
    using Acc = typename std::decay_t<decltype(fv)>::acc_type;
    Acc* out = reinterpret_cast<Acc*>(a.sums);
    Acc* cnt = reinterpret_cast<Acc*>(a.counts);
    advise_huge_pages(out, static_cast<size_t>(C) * D * sizeof(Acc));
    if (path == kPathAuto) path = ::collapsekit::choose_class_sums_path(N * K, D, C, nt, sizeof(Acc));
    if (path == kPathDirect) sums_direct(fv, ev, N, C, out, cnt, nt);
    else if (path == kPathRows) sums_rows(fv, ev, N, C, out, cnt, nt);
    else sums_sorted(fv, ev, N, C, out, cnt, nt);
  });
}

}  // namespace COLLAPSEKIT_ISA

#ifdef COLLAPSEKIT_ISA_BASE
int choose_class_sums_path(int64_t N, int64_t D, int64_t C, int num_threads, int64_t acc_bytes) {
  // Measured with interleaved repetitions on a 2-core EPYC VM (docs/class_sums.md), ms:
  //                          rows   direct  sorted  (eager index_add_)
  //   N=200k D=512  C=8192   21.5   28.9    32.0    41.8
  //   N=1M   D=64   C=1000   11.2   23.2    22.9    31.8
  //   N=100k D=768  C=50257  54.3   33.9    36.0    63.4
  //   N=10k  D=128  C=16384   1.06   0.45    0.51    0.45
  // rows (private accumulators) wins while the copies stay small; direct (class ownership)
  // after that; with fewer entries than about two per class, sorted/direct tie and sorted
  // skips scanning past empty classes.
  if (N < 2 * C) return kPathSorted;
  const int64_t private_bytes = C * D * acc_bytes * (std::max(1, num_threads) - 1);
  return private_bytes <= kRowsMaxPrivateBytes ? kPathRows : kPathDirect;
}

#endif

}  // namespace collapsekit
