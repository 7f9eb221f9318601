// The SSD (Mamba-2) scan on CPU: forward and checkpointed backward.
//
//   Δ_t = dt_t + bias (softplus'd if asked; clamped to dt_limit if one is given)
//   a_t = decay_scale · exp(Δ_t A_h)
//   H_t = a_t H_{t−1} + Δ_t x_t B_tᵀ        (H is [p, n] per (batch, head))
//   y_t = H_t C_t + D ⊙ x_t,  out_t = y_t · silu(z_t) if z is given
// with the state entering every chunk after the first rescaled to norm τ where it exceeds τ
// (state_norm_max).
//
// Why the recurrent form on CPU (and not the chunked matmul form the GPU wants): one (batch,
// head) pair is one OpenMP task that walks time with its [p, n] state in L1/L2 (32 KiB at p=64,
// n=128). A step is three fused FMA passes over the state (update, output, norm), ~3·p·n FMAs;
// the chunked algorithm does more arithmetic per step (intra-chunk C·Bᵀ and its product with X,
// chunk states, state-to-output: ~3.5·p·n + chunk·(p+n) multiply-adds at chunk 64) and only
// wins where the matmuls run on tensor cores. Chunks still matter here: they are the
// checkpoints of the backward pass and where state_norm_max acts, so results do not depend on
// chunk_size except through state_norm_max, as the contract says.
//
// Backward: the states entering each chunk are saved by the forward (O(b·h·p·n·l/chunk)); the
// backward walks chunks in reverse, recomputes the chunk's states from its checkpoint into a
// per-thread buffer, then runs the reverse-time recurrence for the state gradient
//   dH_{t−1} = a_t (dH_t + dy_t C_tᵀ)
// collecting dx, dz, dΔ (→ ddt, d bias), dA, dB, dC, dD and the initial-state gradient, and
// applies the Jacobian of the rescaling at chunk boundaries. dB/dC are written per head (the
// wrapper sums the heads of a group), so heads can run in parallel without atomics.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ssd_scan.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

// Fixed-width vectors (GCC/Clang vector extensions: AVX2 in the avx2 build, SSE pairs in the
// baseline). The row loops below carry reductions; written with "omp simd reduction", GCC keeps
// the partial sums in a stack array and measured ~1 cycle per state element; explicit vector
// accumulators run the same loops several times faster.
#if defined(__GNUC__)
#define CK_VEC 1
template <typename Acc> struct Vec {
  static constexpr int W = 32 / static_cast<int>(sizeof(Acc));
  typedef Acc type __attribute__((vector_size(32)));
};
template <typename V, typename Acc> inline V vload(const Acc* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename Acc> inline void vstore(Acc* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V, typename Acc> inline V vsplat(Acc a) { V v; for (size_t k = 0; k < sizeof(V) / sizeof(Acc); ++k) v[k] = a; return v; }
template <typename V, typename Acc> inline Acc vsum(V v) {
  Acc s = 0;
  for (size_t k = 0; k < sizeof(V) / sizeof(Acc); ++k) s += v[k];
  return s;
}
#endif

// One step of the forward recurrence for one state row: h = a·h + u·b; returns Σ h·c, adds Σ h² to
// ss when NORM (the per-step state norms cost one FMA per element, so they are skipped if unwanted).
template <typename Acc, bool NORM>
inline Acc row_forward(Acc* __restrict hr, const Acc* __restrict bt, const Acc* __restrict ct, int64_t n, Acc at,
                       Acc u, Acc& ss) {
  int64_t j = 0;
  Acc y = 0, s2 = 0;
#ifdef CK_VEC
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::W;
  const V va = vsplat<V>(at), vu = vsplat<V>(u);
  V vy = vsplat<V>(Acc(0)), vs = vy;
  for (; j + W <= n; j += W) {
    const V v = va * vload<V>(hr + j) + vu * vload<V>(bt + j);
    vstore(hr + j, v);
    vy += v * vload<V>(ct + j);
    if (NORM) vs += v * v;
  }
  y = vsum<V, Acc>(vy);
  s2 = vsum<V, Acc>(vs);
#endif
  for (; j < n; ++j) {
    const Acc v = at * hr[j] + u * bt[j];
    hr[j] = v;
    y += v * ct[j];
    if (NORM) s2 += v * v;
  }
  ss += s2;
  return y;
}

// Two consecutive steps for one state row in one pass over it (the same arithmetic as two
// row_forward calls, in the same order, with half the loads and stores of the state row):
// v1 = a1·h + u1·b1, y1 = Σ v1·c1; h = a2·v1 + u2·b2, y2 = Σ h·c2.
template <typename Acc, bool NORM>
inline void row_forward2(Acc* __restrict hr, const Acc* __restrict b1, const Acc* __restrict c1,
                         const Acc* __restrict b2, const Acc* __restrict c2, int64_t n, Acc a1, Acc u1, Acc a2,
                         Acc u2, Acc& y1, Acc& y2, Acc& ss1, Acc& ss2) {
  int64_t j = 0;
  Acc s_y1 = 0, s_y2 = 0, s_1 = 0, s_2 = 0;
#ifdef CK_VEC
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::W;
  const V va1 = vsplat<V>(a1), vu1 = vsplat<V>(u1), va2 = vsplat<V>(a2), vu2 = vsplat<V>(u2);
  V vy1 = vsplat<V>(Acc(0)), vy2 = vy1, vs1 = vy1, vs2 = vy1;
  for (; j + W <= n; j += W) {
    const V v1 = va1 * vload<V>(hr + j) + vu1 * vload<V>(b1 + j);
    vy1 += v1 * vload<V>(c1 + j);
    const V v2 = va2 * v1 + vu2 * vload<V>(b2 + j);
    vstore(hr + j, v2);
    vy2 += v2 * vload<V>(c2 + j);
    if (NORM) { vs1 += v1 * v1; vs2 += v2 * v2; }
  }
  s_y1 = vsum<V, Acc>(vy1);
  s_y2 = vsum<V, Acc>(vy2);
  if (NORM) { s_1 = vsum<V, Acc>(vs1); s_2 = vsum<V, Acc>(vs2); }
#endif
  for (; j < n; ++j) {
    const Acc v1 = a1 * hr[j] + u1 * b1[j];
    s_y1 += v1 * c1[j];
    const Acc v2 = a2 * v1 + u2 * b2[j];
    hr[j] = v2;
    s_y2 += v2 * c2[j];
    if (NORM) { s_1 += v1 * v1; s_2 += v2 * v2; }
  }
  y1 = s_y1;
  y2 = s_y2;
  ss1 += s_1;
  ss2 += s_2;
}

// The scaled-state form of one or two steps: with H = S·G, H_t = a_t H_{t−1} + u b becomes
// G += (u / S_t) b with S_t = S_{t−1} a_t, one FMA per element instead of a multiply and an FMA.
// Returns Σ G·c (the caller multiplies by S_t) and adds Σ G² to ss (times S_t² by the caller).
template <typename Acc, bool NORM, bool TWO>
inline void row_scaled(Acc* __restrict g, const Acc* __restrict b1, const Acc* __restrict c1,
                       const Acc* __restrict b2, const Acc* __restrict c2, int64_t n, Acc w1, Acc w2,
                       Acc& y1, Acc& y2, Acc& ss1, Acc& ss2) {
  int64_t j = 0;
  Acc s_y1 = 0, s_y2 = 0, s_1 = 0, s_2 = 0;
#ifdef CK_VEC
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::W;
  const V vw1 = vsplat<V>(w1), vw2 = vsplat<V>(w2);
  V vy1 = vsplat<V>(Acc(0)), vy2 = vy1, vs1 = vy1, vs2 = vy1;
  for (; j + W <= n; j += W) {
    V v = vload<V>(g + j) + vw1 * vload<V>(b1 + j);
    vy1 += v * vload<V>(c1 + j);
    if (NORM) vs1 += v * v;
    if (TWO) {
      v += vw2 * vload<V>(b2 + j);
      vy2 += v * vload<V>(c2 + j);
      if (NORM) vs2 += v * v;
    }
    vstore(g + j, v);
  }
  s_y1 = vsum<V, Acc>(vy1);
  if (TWO) s_y2 = vsum<V, Acc>(vy2);
  if (NORM) { s_1 = vsum<V, Acc>(vs1); if (TWO) s_2 = vsum<V, Acc>(vs2); }
#endif
  for (; j < n; ++j) {
    Acc v = g[j] + w1 * b1[j];
    s_y1 += v * c1[j];
    if (NORM) s_1 += v * v;
    if (TWO) {
      v += w2 * b2[j];
      s_y2 += v * c2[j];
      if (NORM) s_2 += v * v;
    }
    g[j] = v;
  }
  y1 = s_y1;
  y2 = s_y2;
  ss1 += s_1;
  ss2 += s_2;
}

// One reverse step for one state row (see backward_one): returns Σ_j v·hq and Σ_j v·b, where
// v = g + dy·c is dH_t's row; updates dC += hn·dy, dB += v·xi and g ← a·v.
template <typename Acc>
inline void row_backward(Acc* __restrict g, const Acc* __restrict hn, const Acc* __restrict hq,
                         const Acc* __restrict bt, const Acc* __restrict ct, Acc* __restrict dC, Acc* __restrict dB,
                         int64_t n, Acc at, Acc dy, Acc xi, Acc& da, Acc& r) {
  int64_t j = 0;
  Acc s_da = 0, s_r = 0;
#ifdef CK_VEC
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::W;
  const V va = vsplat<V>(at), vdy = vsplat<V>(dy), vx = vsplat<V>(xi);
  V vda = vsplat<V>(Acc(0)), vr = vda;
  for (; j + W <= n; j += W) {
    const V v = vload<V>(g + j) + vdy * vload<V>(ct + j);
    vstore(dC + j, vload<V>(dC + j) + vload<V>(hn + j) * vdy);
    vda += v * vload<V>(hq + j);
    vr += v * vload<V>(bt + j);
    vstore(dB + j, vload<V>(dB + j) + v * vx);
    vstore(g + j, va * v);
  }
  s_da = vsum<V, Acc>(vda);
  s_r = vsum<V, Acc>(vr);
#endif
  for (; j < n; ++j) {
    const Acc v = g[j] + dy * ct[j];
    dC[j] += hn[j] * dy;
    s_da += v * hq[j];
    s_r += v * bt[j];
    dB[j] += v * xi;
    g[j] = at * v;
  }
  da += s_da;
  r = s_r;
}

template <typename Acc> inline Acc softplus(Acc v) { return v > Acc(20) ? v : std::log1p(std::exp(v)); }
template <typename Acc> inline Acc sigmoid(Acc v) { return Acc(1) / (Acc(1) + std::exp(-v)); }

template <typename T, typename Acc>
struct Ctx {
  const SsdArgs& a;
  const T *x, *B, *C, *z;
  const Acc *dt, *A, *D, *bias, *init;
  Acc* ckpt; Acc* pre;
  int64_t K, hpg;  // chunks, heads per group
  explicit Ctx(const SsdArgs& s)
      : a(s), x(reinterpret_cast<const T*>(s.x)), B(reinterpret_cast<const T*>(s.B)),
        C(reinterpret_cast<const T*>(s.C)), z(reinterpret_cast<const T*>(s.z)),
        dt(reinterpret_cast<const Acc*>(s.dt)), A(reinterpret_cast<const Acc*>(s.A)),
        D(reinterpret_cast<const Acc*>(s.D)), bias(reinterpret_cast<const Acc*>(s.dt_bias)),
        init(reinterpret_cast<const Acc*>(s.init)), ckpt(reinterpret_cast<Acc*>(s.ckpt)),
        pre(reinterpret_cast<Acc*>(s.pre_norms)),
        K((s.l + s.chunk_size - 1) / s.chunk_size), hpg(s.h / s.g) {}

  // Δ before the softplus/clamp (for the backward) and after.
  inline void delta(int64_t bi, int64_t t, int64_t hi, Acc& raw, Acc& d) const {
    raw = dt[bi * a.dts[0] + t * a.dts[1] + hi * a.dts[2]] + (bias ? bias[hi] : Acc(0));
    d = a.dt_softplus ? softplus(raw) : raw;
    if (a.dt_clamp) d = std::min(std::max(d, static_cast<Acc>(a.dt_min)), static_cast<Acc>(a.dt_max));
  }
  // d Δ / d raw
  inline Acc delta_grad(Acc raw) const {
    Acc d = a.dt_softplus ? softplus(raw) : raw;
    if (a.dt_clamp && (d < static_cast<Acc>(a.dt_min) || d > static_cast<Acc>(a.dt_max))) return Acc(0);
    return a.dt_softplus ? (raw > Acc(20) ? Acc(1) : sigmoid(raw)) : Acc(1);
  }
  // (unit-stride rows already in the accumulation dtype are plain copies: the common fp32/fp64 case)
  inline void load_bc(int64_t bi, int64_t t, int64_t gi, Acc* bt, Acc* ct) const {
    const T* bp = B + bi * a.bs[0] + t * a.bs[1] + gi * a.bs[2];
    const T* cp = C + bi * a.cs[0] + t * a.cs[1] + gi * a.cs[2];
    if (std::is_same<T, Acc>::value && a.bs[3] == 1 && a.cs[3] == 1) {
      std::memcpy(bt, bp, a.n * sizeof(Acc));
      std::memcpy(ct, cp, a.n * sizeof(Acc));
      return;
    }
    for (int64_t j = 0; j < a.n; ++j) { bt[j] = to_acc<Acc>(bp[j * a.bs[3]]); ct[j] = to_acc<Acc>(cp[j * a.cs[3]]); }
  }
  inline void load_row(const T* base, const std::vector<int64_t>& s, int64_t bi, int64_t t, int64_t hi, Acc* v) const {
    const T* q = base + bi * s[0] + t * s[1] + hi * s[2];
    if (std::is_same<T, Acc>::value && s[3] == 1) {
      std::memcpy(v, q, a.p * sizeof(Acc));
      return;
    }
    for (int64_t i = 0; i < a.p; ++i) v[i] = to_acc<Acc>(q[i * s[3]]);
  }
  inline Acc* ckpt_at(int64_t bi, int64_t hi, int64_t k) const { return ckpt + ((bi * a.h + hi) * K + k) * a.p * a.n; }
};

template <typename Acc> inline Acc silu(Acc v) { return v * sigmoid(v); }

template <typename Acc> inline Acc sumsq(const Acc* v, int64_t m) {
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += v[j] * v[j];
  return s;
}

// The state entering chunk k (k >= 1): rescaled to norm τ where larger; its norm before is saved.
template <typename T, typename Acc>
inline void chunk_boundary(const Ctx<T, Acc>& c, int64_t bi, int64_t hi, int64_t k, Acc* H) {
  const int64_t pn = c.a.p * c.a.n;
  if (k > 0 && c.a.state_norm_max > 0) {
    const Acc nrm = std::sqrt(sumsq(H, pn));
    if (c.pre) c.pre[(bi * c.a.h + hi) * c.K + k] = nrm;
    const Acc tau = static_cast<Acc>(c.a.state_norm_max);
    if (nrm > tau) {
      const Acc f = tau / nrm;
      for (int64_t j = 0; j < pn; ++j) H[j] *= f;
    }
  }
  if (c.ckpt) std::copy(H, H + pn, c.ckpt_at(bi, hi, k));
}

template <typename T, typename Acc>
void forward_one(const Ctx<T, Acc>& c, int64_t bi, int64_t hi, T* out, Acc* fin, Acc* norms, std::vector<Acc>& work) {
  const SsdArgs& a = c.a;
  const int64_t p = a.p, n = a.n, pn = p * n, gi = hi / c.hpg;
  Acc* H = work.data();
  Acc* bt = H + pn; Acc* ct = bt + n; Acc* xv = ct + n; Acc* zv = xv + p;
  if (c.init) std::copy(c.init + (bi * a.h + hi) * pn, c.init + (bi * a.h + hi + 1) * pn, H);
  else std::fill(H, H + pn, Acc(0));
  const Acc Ah = c.A[hi], lam = static_cast<Acc>(a.decay_scale);
  const Acc* Dh = c.D ? c.D + hi * p : nullptr;
  // The per-step scalars and vectors, for steps t (slot 0) and t + 1 (slot 1).
  Acc* bt2 = zv + p; Acc* ct2 = bt2 + n; Acc* xv2 = ct2 + n; Acc* zv2 = xv2 + p;
  auto load_step = [&](int64_t t, Acc* b_, Acc* c_, Acc* x_, Acc* z_, Acc& at, Acc& d) {
    Acc raw;
    c.delta(bi, t, hi, raw, d);
    at = lam * std::exp(d * Ah);
    c.load_bc(bi, t, gi, b_, c_);
    c.load_row(c.x, a.xs, bi, t, hi, x_);
    if (c.z) c.load_row(c.z, a.zs, bi, t, hi, z_);
  };
  auto finish = [&](int64_t t, Acc y, int64_t i, const Acc* x_, const Acc* z_) {
    if (Dh) y += Dh[i] * x_[i];
    if (c.z) y *= silu(z_[i]);
    out[((bi * a.l + t) * a.h + hi) * p + i] = from_acc<T>(y);
  };
  // The state is kept as H = S·G (scalar S) while the decays are moderate: an update is then one
  // FMA per element (row_scaled). S is folded back into G (one pass) before it gets small (so
  // u/S stays bounded), at chunk boundaries (state_norm_max and checkpoints see the true state)
  // and at the end. Steps with a fast decay (a < kFastDecay) take the direct form.
  constexpr Acc kFastDecay = Acc(0.25), kMinScale = Acc(1e-3);
  Acc S = 1;
  auto fold = [&] {
    if (S != Acc(1)) {
      for (int64_t j = 0; j < pn; ++j) H[j] *= S;
      S = 1;
    }
  };
  for (int64_t t = 0; t < a.l;) {
    if (t % a.chunk_size == 0) {
      fold();
      chunk_boundary(c, bi, hi, t / a.chunk_size, H);
    }
    Acc at, d;
    load_step(t, bt, ct, xv, zv, at, d);
    // two steps per pass over the state unless t + 1 starts a chunk (a boundary acts between them)
    bool two = t + 1 < a.l && (t + 1) % a.chunk_size != 0;
    Acc at2 = 1, d2 = 0;
    if (two) load_step(t + 1, bt2, ct2, xv2, zv2, at2, d2);
    if (at >= kFastDecay && (!two || at2 >= kFastDecay)) {  // scaled form
      if (S * at * (two ? at2 : Acc(1)) < kMinScale) fold();
      const Acc s1 = S * at, s2 = s1 * at2;
      Acc ss1 = 0, ss2 = 0;
      for (int64_t i = 0; i < p; ++i) {
        Acc y1, y2;
        const Acc w1 = d * xv[i] / s1, w2 = two ? d2 * xv2[i] / s2 : Acc(0);
        if (two) {
          if (norms) row_scaled<Acc, true, true>(H + i * n, bt, ct, bt2, ct2, n, w1, w2, y1, y2, ss1, ss2);
          else row_scaled<Acc, false, true>(H + i * n, bt, ct, bt2, ct2, n, w1, w2, y1, y2, ss1, ss2);
          finish(t, s1 * y1, i, xv, zv);
          finish(t + 1, s2 * y2, i, xv2, zv2);
        } else {
          if (norms) row_scaled<Acc, true, false>(H + i * n, bt, ct, bt, ct, n, w1, w2, y1, y2, ss1, ss2);
          else row_scaled<Acc, false, false>(H + i * n, bt, ct, bt, ct, n, w1, w2, y1, y2, ss1, ss2);
          finish(t, s1 * y1, i, xv, zv);
        }
      }
      if (norms) {
        norms[(bi * a.l + t) * a.h + hi] = s1 * std::sqrt(ss1);
        if (two) norms[(bi * a.l + t + 1) * a.h + hi] = s2 * std::sqrt(ss2);
      }
      S = two ? s2 : s1;
      t += two ? 2 : 1;
      continue;
    }
    fold();  // direct form
    if (two) {
      Acc ss1 = 0, ss2 = 0;
      for (int64_t i = 0; i < p; ++i) {
        Acc y1, y2;
        if (norms) row_forward2<Acc, true>(H + i * n, bt, ct, bt2, ct2, n, at, d * xv[i], at2, d2 * xv2[i], y1, y2, ss1, ss2);
        else row_forward2<Acc, false>(H + i * n, bt, ct, bt2, ct2, n, at, d * xv[i], at2, d2 * xv2[i], y1, y2, ss1, ss2);
        finish(t, y1, i, xv, zv);
        finish(t + 1, y2, i, xv2, zv2);
      }
      if (norms) {
        norms[(bi * a.l + t) * a.h + hi] = std::sqrt(ss1);
        norms[(bi * a.l + t + 1) * a.h + hi] = std::sqrt(ss2);
      }
      t += 2;
      continue;
    }
    Acc ss = 0;
    for (int64_t i = 0; i < p; ++i) {
      Acc y = norms ? row_forward<Acc, true>(H + i * n, bt, ct, n, at, d * xv[i], ss)
                    : row_forward<Acc, false>(H + i * n, bt, ct, n, at, d * xv[i], ss);
      finish(t, y, i, xv, zv);
    }
    if (norms) norms[(bi * a.l + t) * a.h + hi] = std::sqrt(ss);
    t += 1;
  }
  fold();
  if (fin) std::copy(H, H + pn, fin + (bi * a.h + hi) * pn);
}

template <typename T, typename Acc>
void backward_one(const Ctx<T, Acc>& c, int64_t bi, int64_t hi, const T* dout, const std::vector<int64_t>& dos,
                  const Acc* dfinal, T* dx, T* dz, Acc* ddt, Acc* dA, Acc* dB, Acc* dC, Acc* dD, Acc* dinit,
                  std::vector<Acc>& work) {
  const SsdArgs& a = c.a;
  const int64_t p = a.p, n = a.n, pn = p * n, gi = hi / c.hpg, cs = a.chunk_size;
  Acc* S = work.data();                 // (cs + 1) states: entering the chunk, then after each step
  Acc* dH = S + (cs + 1) * pn;
  Acc* bt = dH + pn; Acc* ct = bt + n; Acc* xv = ct + n; Acc* zv = xv + p; Acc* gv = zv + p;
  Acc* dBacc = gv + p; Acc* dCacc = dBacc + n;
  Acc* araw = dCacc + n; Acc* adel = araw + cs; Acc* adec = adel + cs;
  const Acc Ah = c.A[hi], lam = static_cast<Acc>(a.decay_scale);
  const Acc* Dh = c.D ? c.D + hi * p : nullptr;
  Acc dAh = 0;
  Acc* dDh = dD ? dD + (bi * a.h + hi) * p : nullptr;
  if (dDh) std::fill(dDh, dDh + p, Acc(0));
  if (dfinal) std::copy(dfinal + (bi * a.h + hi) * pn, dfinal + (bi * a.h + hi + 1) * pn, dH);
  else std::fill(dH, dH + pn, Acc(0));
  for (int64_t k = c.K - 1; k >= 0; --k) {
    const int64_t t0 = k * cs, t1 = std::min(a.l, t0 + cs);
    std::copy(c.ckpt_at(bi, hi, k), c.ckpt_at(bi, hi, k) + pn, S);
    for (int64_t t = t0; t < t1; ++t) {  // recompute the chunk's states
      const int64_t j0 = t - t0;
      c.delta(bi, t, hi, araw[j0], adel[j0]);
      adec[j0] = lam * std::exp(adel[j0] * Ah);
      c.load_bc(bi, t, gi, bt, ct);
      c.load_row(c.x, a.xs, bi, t, hi, xv);
      const Acc* hp = S + j0 * pn;
      Acc* hn = S + (j0 + 1) * pn;
      const Acc at = adec[j0], d = adel[j0];
      for (int64_t i = 0; i < p; ++i) {
        const Acc u = d * xv[i];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) hn[i * n + j] = at * hp[i * n + j] + u * bt[j];
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {  // reverse-time recurrence
      const int64_t j0 = t - t0;
      const Acc* hp = S + j0 * pn;
      const Acc* hn = S + (j0 + 1) * pn;
      const Acc at = adec[j0], d = adel[j0];
      c.load_bc(bi, t, gi, bt, ct);
      c.load_row(c.x, a.xs, bi, t, hi, xv);
      c.load_row(dout, dos, bi, t, hi, gv);
      const int64_t row = ((bi * a.l + t) * a.h + hi) * p;
      if (c.z) {  // out = y · silu(z): dy = dout · silu(z), dz = dout · y · silu'(z)
        c.load_row(c.z, a.zs, bi, t, hi, zv);
        for (int64_t i = 0; i < p; ++i) {
          Acc y = 0;
          const Acc* hr = hn + i * n;
#pragma omp simd reduction(+ : y)
          for (int64_t j = 0; j < n; ++j) y += hr[j] * ct[j];
          if (Dh) y += Dh[i] * xv[i];
          const Acc s = sigmoid(zv[i]);
          dz[row + i] = from_acc<T>(gv[i] * y * s * (Acc(1) + zv[i] * (Acc(1) - s)));
          gv[i] *= zv[i] * s;
        }
      }
      std::fill(dBacc, dBacc + n, Acc(0));
      std::fill(dCacc, dCacc + n, Acc(0));
      Acc da = 0, dd = 0;
      for (int64_t i = 0; i < p; ++i) {
        Acc* g = dH + i * n;
        const Acc* hr = hn + i * n;
        const Acc* hq = hp + i * n;
        const Acc dy = gv[i], xi = xv[i];
        Acc r = 0;  // v = dH_t including this step's output; g becomes dH_{t−1} = a_t·v
        row_backward(g, hr, hq, bt, ct, dCacc, dBacc, n, at, dy, xi, da, r);
        dd += xi * r;
        Acc gx = d * r;
        if (Dh) { gx += dy * Dh[i]; dDh[i] += dy * xi; }
        dx[row + i] = from_acc<T>(gx);
      }
      Acc* dBrow = dB + ((bi * a.l + t) * a.h + hi) * n;
      Acc* dCrow = dC + ((bi * a.l + t) * a.h + hi) * n;
      for (int64_t j = 0; j < n; ++j) { dBrow[j] = d * dBacc[j]; dCrow[j] = dCacc[j]; }
      // a_t = λ exp(Δ A): ∂a/∂Δ = a·A, ∂a/∂A = a·Δ
      dd += da * at * Ah;
      dAh += da * at * d;
      ddt[(bi * a.l + t) * a.h + hi] = dd * c.delta_grad(araw[j0]);
    }
    if (k > 0 && a.state_norm_max > 0) {  // back through H ← H · min(1, τ/‖H‖) at the boundary
      const Acc nrm = c.pre[(bi * a.h + hi) * c.K + k];
      const Acc tau = static_cast<Acc>(a.state_norm_max);
      if (nrm > tau) {  // J v = (τ/‖H‖)(v − ĥ(ĥ·v)), ĥ = the rescaled state / τ
        Acc hv = 0;
        for (int64_t j = 0; j < pn; ++j) hv += S[j] * dH[j];
        const Acc f = tau / nrm, q = hv / (tau * tau);
        for (int64_t j = 0; j < pn; ++j) dH[j] = f * (dH[j] - S[j] * q);
      }
    }
  }
  dA[bi * a.h + hi] = dAh;
  if (dinit) std::copy(dH, dH + pn, dinit + (bi * a.h + hi) * pn);
}

// ------------------------------------------------------------------------------------------------
// The chunked (matmul) form of the forward (the SSD algorithm of the Mamba-2 paper). Per
// (batch, head) and chunk of Q steps starting at t0, with cs_t = Σ_{r=t0..t} log a_r and
// X̃_s = Δ_s x_s (rows of [Q, p]):
//   Y      = (C Bᵀ ∘ L) X̃ + diag(e^{cs}) C H_inᵀ,         L[t, s] = e^{cs_t − cs_s} (s ≤ t), else 0
//   H_out  = e^{cs_last} H_in + (e^{cs_last − cs} ∘ X̃)ᵀ B
// C Bᵀ is computed once per (batch, group, chunk) and shared by the group's heads. The three
// products run on one register-blocked micro-kernel (gemm_acc below); H_in is the state entering
// the chunk, rescaled by state_norm_max and saved as the backward's checkpoint exactly as the
// recurrent path does, so both paths feed the same backward.
// ------------------------------------------------------------------------------------------------

// The vector width of this instruction-set build (the recurrent path above keeps 32-byte vectors).
#if defined(__AVX512F__)
#define CK_GEMM_VBYTES 64
#define CK_GEMM_NV 4   // 4 zmm columns (64 floats) x 4 rows = 16 accumulators (of 32 registers)
#define CK_GEMM_MR 4
#elif defined(__AVX2__)
#define CK_GEMM_VBYTES 32
#define CK_GEMM_NV 2   // 2 ymm x 6 rows (16 registers: 12 accumulators, 2 loads, 1 broadcast)
#define CK_GEMM_MR 6
#else
#define CK_GEMM_VBYTES 16
#define CK_GEMM_NV 2   // SSE2: 16 xmm registers
#define CK_GEMM_MR 6
#endif

#ifdef CK_VEC
template <typename Acc> struct GVec {
  static constexpr int W = CK_GEMM_VBYTES / static_cast<int>(sizeof(Acc));
  typedef Acc type __attribute__((vector_size(CK_GEMM_VBYTES)));
};

// Cm[MR, NV·W] += Σ_k A(r, k) · Bm[k, :] with A(r, k) = A[r·a_si + k·a_sk] (broadcast) and Bm, Cm
// row-major (ldb, ldc): MR·NV accumulators stay in registers over the whole k loop.
template <typename Acc, int MR, int NV>
inline void ukernel(int64_t K, const Acc* __restrict A, int64_t a_si, int64_t a_sk, const Acc* __restrict Bm,
                    int64_t ldb, Acc* __restrict Cm, int64_t ldc) {
  using V = typename GVec<Acc>::type;
  constexpr int W = GVec<Acc>::W;
  // (fully unrolled so the accumulators live in registers; the scalar operand of av * bv is
  // broadcast by the compiler: one vbroadcast per row and k)
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = vload<V>(Cm + r * ldc + v * W);
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(Bm + k * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Acc av = A[r * a_si + k * a_sk];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(Cm + r * ldc + v * W, acc[r][v]);
}

// TRI: 0 dense; 1 A lower triangular (row block [i, i+MR) stops at k = i+MR); 2 A upper triangular
// (the block starts at k = i). The skipped entries must be stored as zeros for the block's rows.
template <typename Acc, int NV, int TRI>
inline void gemm_cols(int64_t M, int64_t K, const Acc* A, int64_t a_si, int64_t a_sk, const Acc* Bm, int64_t ldb,
                      Acc* Cm, int64_t ldc) {
  constexpr int MR = CK_GEMM_MR;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    const int64_t k0 = TRI == 2 ? std::min(i, K) : 0, k1 = TRI == 1 ? std::min(K, i + MR) : K;
    ukernel<Acc, MR, NV>(k1 - k0, A + i * a_si + k0 * a_sk, a_si, a_sk, Bm + k0 * ldb, ldb, Cm + i * ldc, ldc);
  }
  for (; i < M; ++i) {
    const int64_t k0 = TRI == 2 ? std::min(i, K) : 0, k1 = TRI == 1 ? std::min(K, i + 1) : K;
    ukernel<Acc, 1, NV>(k1 - k0, A + i * a_si + k0 * a_sk, a_si, a_sk, Bm + k0 * ldb, ldb, Cm + i * ldc, ldc);
  }
}
#endif

// Cm[M, N] += A · Bm (A(i, k) = A[i·a_si + k·a_sk]; Bm [K, N], Cm [M, N] row-major). TRI as gemm_cols.
template <typename Acc, int TRI>
void gemm_acc(int64_t M, int64_t N, int64_t K, const Acc* A, int64_t a_si, int64_t a_sk, const Acc* Bm, int64_t ldb,
              Acc* Cm, int64_t ldc) {
  int64_t j = 0;
#ifdef CK_VEC
  constexpr int W = GVec<Acc>::W, NV = CK_GEMM_NV;
  for (; j + NV * W <= N; j += NV * W) gemm_cols<Acc, NV, TRI>(M, K, A, a_si, a_sk, Bm + j, ldb, Cm + j, ldc);
  for (; j + W <= N; j += W) gemm_cols<Acc, 1, TRI>(M, K, A, a_si, a_sk, Bm + j, ldb, Cm + j, ldc);
#endif
  for (; j < N; ++j)
    for (int64_t i = 0; i < M; ++i) {
      Acc s = Cm[i * ldc + j];
      const int64_t k0 = TRI == 2 ? std::min(i, K) : 0, k1 = TRI == 1 ? std::min(K, i + 1) : K;
      for (int64_t k = k0; k < k1; ++k) s += A[i * a_si + k * a_sk] * Bm[k * ldb + j];
      Cm[i * ldc + j] = s;
    }
}

// C Bᵀ of every (batch, group, chunk): cb[(bi·g + gi)·K + k] is [Q, Q] row-major (lower part used).
template <typename T, typename Acc>
void chunk_cb(const Ctx<T, Acc>& c, Acc* cb, int nt) {
  const SsdArgs& a = c.a;
  const int64_t Q = a.chunk_size, n = a.n, tasks = a.b * a.g * c.K;
#pragma omp parallel num_threads(nt)
  {
    std::vector<Acc> bt(n * Q), cc(Q * n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t k = task % c.K, gi = (task / c.K) % a.g, bi = task / (c.K * a.g);
      const int64_t t0 = k * Q, q = std::min(Q, a.l - t0);
      for (int64_t s = 0; s < q; ++s) {
        const T* bp = c.B + bi * a.bs[0] + (t0 + s) * a.bs[1] + gi * a.bs[2];
        const T* cp = c.C + bi * a.cs[0] + (t0 + s) * a.cs[1] + gi * a.cs[2];
        for (int64_t j = 0; j < n; ++j) {
          bt[j * Q + s] = to_acc<Acc>(bp[j * a.bs[3]]);
          cc[s * n + j] = to_acc<Acc>(cp[j * a.cs[3]]);
        }
      }
      Acc* out = cb + task * Q * Q;
      std::fill(out, out + Q * Q, Acc(0));
      gemm_acc<Acc, 0>(q, q, n, cc.data(), n, 1, bt.data(), Q, out, Q);
    }
  }
}

template <typename T, typename Acc>
struct ChunkWork {
  std::vector<Acc> xt, xr, zr, bc, cc, m, y, y2, ht, cs, ecs, ecn;
  ChunkWork(int64_t Q, int64_t p, int64_t n)
      : xt(Q * p), xr(Q * p), zr(Q * p), bc(Q * n), cc(Q * n), m(Q * Q), y(Q * p), y2(Q * p), ht(n * p), cs(Q),
        ecs(Q), ecn(Q) {}
};

template <typename T, typename Acc>
void forward_chunked_one(const Ctx<T, Acc>& c, const Acc* cb, int64_t bi, int64_t hi, T* out, Acc* fin, Acc* H,
                         ChunkWork<T, Acc>& w) {
  const SsdArgs& a = c.a;
  const int64_t p = a.p, n = a.n, pn = p * n, gi = hi / c.hpg, Q = a.chunk_size;
  if (c.init) std::copy(c.init + (bi * a.h + hi) * pn, c.init + (bi * a.h + hi + 1) * pn, H);
  else std::fill(H, H + pn, Acc(0));
  bool hzero = !c.init;  // skip the state-to-output product while the state is exactly zero
  const Acc Ah = c.A[hi], loglam = std::log(static_cast<Acc>(a.decay_scale));
  const Acc* Dh = c.D ? c.D + hi * p : nullptr;
  for (int64_t k = 0; k < c.K; ++k) {
    const int64_t t0 = k * Q, q = std::min(Q, a.l - t0);
    chunk_boundary(c, bi, hi, k, H);
    // per-step decays (cumulative log within the chunk) and Δ·x
    Acc run = 0;
    for (int64_t s = 0; s < q; ++s) {
      Acc raw, d;
      c.delta(bi, t0 + s, hi, raw, d);
      run += d * Ah + loglam;
      w.cs[s] = run;
      w.ecs[s] = std::exp(run);
      w.ecn[s] = std::exp(-run);
      c.load_row(c.x, a.xs, bi, t0 + s, hi, w.xr.data() + s * p);
      if (c.z) c.load_row(c.z, a.zs, bi, t0 + s, hi, w.zr.data() + s * p);
      for (int64_t i = 0; i < p; ++i) w.xt[s * p + i] = d * w.xr[s * p + i];
    }
    // B and C rows of the chunk: read in place when they are already unit-stride rows of Acc,
    // else converted once into the work buffers
    const Acc *Bk, *Ck;
    int64_t ldb, ldc;
    if (std::is_same<T, Acc>::value && a.bs[3] == 1 && a.cs[3] == 1) {
      Bk = reinterpret_cast<const Acc*>(c.B + bi * a.bs[0] + t0 * a.bs[1] + gi * a.bs[2]);
      Ck = reinterpret_cast<const Acc*>(c.C + bi * a.cs[0] + t0 * a.cs[1] + gi * a.cs[2]);
      ldb = a.bs[1];
      ldc = a.cs[1];
    } else {
      for (int64_t s = 0; s < q; ++s) c.load_bc(bi, t0 + s, gi, w.bc.data() + s * n, w.cc.data() + s * n);
      Bk = w.bc.data();
      Ck = w.cc.data();
      ldb = ldc = n;
    }
    // intra-chunk: M = C Bᵀ ∘ L (lower triangle; zeros above), Y = M X̃. L[t, s] = e^{cs_t}·e^{−cs_s}
    // (two table look-ups instead of an exp per entry) while the chunk's decay range keeps both
    // factors far from overflow, else exp(cs_t − cs_s).
    const Acc* cbk = cb + ((bi * a.g + gi) * c.K + k) * Q * Q;
    const Acc range = std::fabs(w.cs[q - 1]);
    const bool factor = range < Acc(60) && std::isfinite(range);
    for (int64_t t = 0; t < q; ++t) {
      Acc* mr = w.m.data() + t * q;
      const Acc* cr = cbk + t * Q;
      if (factor) {
        const Acc et = w.ecs[t];
        for (int64_t s = 0; s <= t; ++s) mr[s] = cr[s] * (et * w.ecn[s]);
      } else {
        for (int64_t s = 0; s <= t; ++s) mr[s] = cr[s] * std::exp(w.cs[t] - w.cs[s]);
      }
      for (int64_t s = t + 1; s < q; ++s) mr[s] = 0;
    }
    std::fill(w.y.begin(), w.y.begin() + q * p, Acc(0));
    gemm_acc<Acc, 1>(q, p, q, w.m.data(), q, 1, w.xt.data(), p, w.y.data(), p);
    // state to output: Y += e^{cs} ∘ (C H_inᵀ)  (H_inᵀ copied once per chunk: [n, p])
    if (!hzero) {
      for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < n; ++j) w.ht[j * p + i] = H[i * n + j];
      std::fill(w.y2.begin(), w.y2.begin() + q * p, Acc(0));
      gemm_acc<Acc, 0>(q, p, n, Ck, ldc, 1, w.ht.data(), p, w.y2.data(), p);
      for (int64_t s = 0; s < q; ++s) {
        const Acc e = w.ecs[s];
        for (int64_t i = 0; i < p; ++i) w.y[s * p + i] += e * w.y2[s * p + i];
      }
    }
    // outputs: + D x, gate
    for (int64_t s = 0; s < q; ++s) {
      T* o = out + ((bi * a.l + t0 + s) * a.h + hi) * p;
      for (int64_t i = 0; i < p; ++i) {
        Acc y = w.y[s * p + i];
        if (Dh) y += Dh[i] * w.xr[s * p + i];
        if (c.z) y *= silu(w.zr[s * p + i]);
        o[i] = from_acc<T>(y);
      }
    }
    // state passing: H ← e^{cs_last} H + (e^{cs_last − cs} ∘ X̃)ᵀ B
    const Acc last = w.cs[q - 1], el = std::exp(last);
    if (!hzero)
      for (int64_t j = 0; j < pn; ++j) H[j] *= el;
    for (int64_t s = 0; s < q; ++s) {
      const Acc f = factor ? el * w.ecn[s] : std::exp(last - w.cs[s]);
      for (int64_t i = 0; i < p; ++i) w.xt[s * p + i] *= f;
    }
    gemm_acc<Acc, 0>(p, n, q, w.xt.data(), 1, p, Bk, ldb, H, n);
    hzero = false;
  }
  if (fin) std::copy(H, H + pn, fin + (bi * a.h + hi) * pn);
}

template <typename T, typename Acc>
void forward_chunked(const Ctx<T, Acc>& c, T* out, Acc* fin, int nt) {
  const SsdArgs& a = c.a;
  const int64_t Q = a.chunk_size;
  std::vector<Acc> cb(static_cast<size_t>(a.b * a.g * c.K) * Q * Q);
  chunk_cb(c, cb.data(), nt);
  const int64_t tasks = a.b * a.h;
#pragma omp parallel num_threads(nt)
  {
    ChunkWork<T, Acc> w(Q, a.p, a.n);
    std::vector<Acc> H(a.p * a.n);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task)
      forward_chunked_one(c, cb.data(), task / a.h, task % a.h, out, fin, H.data(), w);
  }
}

// The backward of the chunked form, per (batch, head), chunks in reverse, from the same
// checkpoints (H_in of every chunk) as the recurrent backward. With dY the gradient of the chunk's
// pre-gate output (minus D x), dH the gradient of the state leaving the chunk, P = dY X̃ᵀ ∘ L:
//   dX̃  = Mᵀ dY + diag(w) B dHᵀ                       (M = C Bᵀ ∘ L, w_s = e^{cs_last − cs_s})
//   dC  = P B + diag(e^{cs}) dY H_in,   dB = Pᵀ C + diag(w) X̃ dH
//   dH_in = e^{cs_last} dH + (diag(e^{cs}) dY)ᵀ C
//   dcs (→ d log a by a reverse cumulative sum): from L (rows − columns of P ∘ C Bᵀ), from
//   e^{cs} (dY · Y_off), from w and e^{cs_last} (the state passing)
// then the Jacobian of the state_norm_max rescaling at the chunk's start, as in backward_one.
template <typename T, typename Acc>
struct ChunkBwdWork {
  std::vector<Acc> xr, xt, xT, zr, dy, dys, yi, m, pm, tmp, dxt, dhT, dbb, dcb, tn, hin, dhin, bc, cc, cs, ecs,
      ecn, dcs, dl, raw;
  ChunkBwdWork(int64_t Q, int64_t p, int64_t n)
      : xr(Q * p), xt(Q * p), xT(p * Q), zr(Q * p), dy(Q * p), dys(Q * p), yi(Q * p), m(Q * Q), pm(Q * Q),
        tmp(Q * p), dxt(Q * p), dhT(n * p), dbb(Q * n), dcb(Q * n), tn(Q * n), hin(p * n), dhin(p * n), bc(Q * n),
        cc(Q * n), cs(Q), ecs(Q), ecn(Q), dcs(Q), dl(Q), raw(Q) {}
};

template <typename T, typename Acc>
void backward_chunked_one(const Ctx<T, Acc>& c, const Acc* cb, int64_t bi, int64_t hi, const T* dout,
                          const std::vector<int64_t>& dos, const Acc* dfinal, T* dx, T* dz, Acc* ddt, Acc* dA, Acc* dB,
                          Acc* dC, Acc* dD, Acc* dinit, Acc* dH, ChunkBwdWork<T, Acc>& w) {
  const SsdArgs& a = c.a;
  const int64_t p = a.p, n = a.n, pn = p * n, gi = hi / c.hpg, Q = a.chunk_size;
  const Acc Ah = c.A[hi], loglam = std::log(static_cast<Acc>(a.decay_scale));
  const Acc* Dh = c.D ? c.D + hi * p : nullptr;
  Acc dAh = 0;
  Acc* dDh = dD ? dD + (bi * a.h + hi) * p : nullptr;
  if (dDh) std::fill(dDh, dDh + p, Acc(0));
  if (dfinal) std::copy(dfinal + (bi * a.h + hi) * pn, dfinal + (bi * a.h + hi + 1) * pn, dH);
  else std::fill(dH, dH + pn, Acc(0));
  for (int64_t k = c.K - 1; k >= 0; --k) {
    const int64_t t0 = k * Q, q = std::min(Q, a.l - t0);
    const Acc* Hin = c.ckpt_at(bi, hi, k);
    Acc run = 0;
    for (int64_t s = 0; s < q; ++s) {
      Acc d;
      c.delta(bi, t0 + s, hi, w.raw[s], d);
      w.dl[s] = d;
      run += d * Ah + loglam;
      w.cs[s] = run;
      w.ecs[s] = std::exp(run);
      w.ecn[s] = std::exp(-run);
      c.load_row(c.x, a.xs, bi, t0 + s, hi, w.xr.data() + s * p);
      if (c.z) c.load_row(c.z, a.zs, bi, t0 + s, hi, w.zr.data() + s * p);
      c.load_row(dout, dos, bi, t0 + s, hi, w.dy.data() + s * p);
      for (int64_t i = 0; i < p; ++i) {
        w.xt[s * p + i] = d * w.xr[s * p + i];
        w.xT[i * q + s] = w.xt[s * p + i];
      }
      c.load_bc(bi, t0 + s, gi, w.bc.data() + s * n, w.cc.data() + s * n);
    }
    const Acc* Bk = w.bc.data();
    const Acc* Ck = w.cc.data();
    const Acc range = std::fabs(w.cs[q - 1]);
    const bool factor = range < Acc(60) && std::isfinite(range);
    const Acc last = w.cs[q - 1], el = w.ecs[q - 1];
    auto Lts = [&](int64_t t, int64_t s) { return factor ? w.ecs[t] * w.ecn[s] : std::exp(w.cs[t] - w.cs[s]); };
    // M = C Bᵀ ∘ L (lower triangle, zeros above)
    const Acc* cbk = cb + ((bi * a.g + gi) * c.K + k) * Q * Q;
    for (int64_t t = 0; t < q; ++t) {
      for (int64_t s = 0; s <= t; ++s) w.m[t * q + s] = cbk[t * Q + s] * Lts(t, s);
      for (int64_t s = t + 1; s < q; ++s) w.m[t * q + s] = 0;
    }
    // the gate needs y = M X̃ + e^{cs} C H_inᵀ + D x: dY = dout · silu(z), dz = dout · y · silu'(z)
    if (c.z) {
      for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < n; ++j) w.dhT[j * p + i] = Hin[i * n + j];  // (H_inᵀ; dhT reused below)
      std::fill(w.yi.begin(), w.yi.begin() + q * p, Acc(0));
      gemm_acc<Acc, 0>(q, p, n, Ck, n, 1, w.dhT.data(), p, w.yi.data(), p);
      for (int64_t s = 0; s < q; ++s)
        for (int64_t i = 0; i < p; ++i) w.yi[s * p + i] *= w.ecs[s];
      gemm_acc<Acc, 1>(q, p, q, w.m.data(), q, 1, w.xt.data(), p, w.yi.data(), p);
    }
    for (int64_t s = 0; s < q; ++s) {
      const int64_t row = ((bi * a.l + t0 + s) * a.h + hi) * p;
      for (int64_t i = 0; i < p; ++i) {
        Acc g = w.dy[s * p + i];
        if (c.z) {
          Acc y = w.yi[s * p + i];
          if (Dh) y += Dh[i] * w.xr[s * p + i];
          const Acc zv = w.zr[s * p + i], sg = sigmoid(zv);
          dz[row + i] = from_acc<T>(g * y * sg * (Acc(1) + zv * (Acc(1) - sg)));
          g *= zv * sg;
        }
        w.dy[s * p + i] = g;
        w.dys[s * p + i] = w.ecs[s] * g;
        if (dDh) dDh[i] += g * w.xr[s * p + i];
      }
    }
    // the state term of dC, diag(e^{cs}) dY H_in; its dot with C_t is dcs_t from e^{cs} in Y_off
    // (dY_t · e^{cs_t} C_t H_inᵀ), so Y_off is never recomputed
    std::fill(w.dcb.begin(), w.dcb.begin() + q * n, Acc(0));
    gemm_acc<Acc, 0>(q, n, p, w.dys.data(), p, 1, Hin, n, w.dcb.data(), n);
    for (int64_t s = 0; s < q; ++s) {
      Acc v = 0;
      const Acc* dr = w.dcb.data() + s * n;
      const Acc* cr = Ck + s * n;
#pragma omp simd reduction(+ : v)
      for (int64_t j = 0; j < n; ++j) v += dr[j] * cr[j];
      w.dcs[s] = v;
    }
    // P = dY X̃ᵀ ∘ L; dcs from L
    std::fill(w.pm.begin(), w.pm.begin() + q * q, Acc(0));
    gemm_acc<Acc, 0>(q, q, p, w.dy.data(), p, 1, w.xT.data(), q, w.pm.data(), q);
    for (int64_t t = 0; t < q; ++t) {
      for (int64_t s = 0; s <= t; ++s) {
        const Acc pl = w.pm[t * q + s] * Lts(t, s);
        w.pm[t * q + s] = pl;
        const Acc r = pl * cbk[t * Q + s];
        w.dcs[t] += r;
        w.dcs[s] -= r;
      }
      for (int64_t s = t + 1; s < q; ++s) w.pm[t * q + s] = 0;
    }
    // dC = P B + diag(e^{cs}) dY H_in ;  dB = Pᵀ C + diag(w) X̃ dH
    gemm_acc<Acc, 1>(q, n, q, w.pm.data(), q, 1, Bk, n, w.dcb.data(), n);
    std::fill(w.dbb.begin(), w.dbb.begin() + q * n, Acc(0));
    gemm_acc<Acc, 2>(q, n, q, w.pm.data(), 1, q, Ck, n, w.dbb.data(), n);
    std::fill(w.tn.begin(), w.tn.begin() + q * n, Acc(0));
    gemm_acc<Acc, 0>(q, n, p, w.xt.data(), p, 1, dH, n, w.tn.data(), n);
    // dX̃ = Mᵀ dY + diag(w) B dHᵀ ; dw_s = X̃_s · (B dHᵀ)_s
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < n; ++j) w.dhT[j * p + i] = dH[i * n + j];
    std::fill(w.dxt.begin(), w.dxt.begin() + q * p, Acc(0));
    gemm_acc<Acc, 2>(q, p, q, w.m.data(), 1, q, w.dy.data(), p, w.dxt.data(), p);
    std::fill(w.tmp.begin(), w.tmp.begin() + q * p, Acc(0));
    gemm_acc<Acc, 0>(q, p, n, Bk, n, 1, w.dhT.data(), p, w.tmp.data(), p);
    Acc dlast = 0;
    for (int64_t s = 0; s < q; ++s) {
      const Acc ws = factor ? el * w.ecn[s] : std::exp(last - w.cs[s]);
      Acc dw = 0;
      const Acc* xr_ = w.xt.data() + s * p;
      const Acc* tr_ = w.tmp.data() + s * p;
      Acc* gr_ = w.dxt.data() + s * p;
#pragma omp simd reduction(+ : dw)
      for (int64_t i = 0; i < p; ++i) {
        dw += xr_[i] * tr_[i];
        gr_[i] += ws * tr_[i];
      }
      dlast += ws * dw;
      w.dcs[s] -= ws * dw;
      const int64_t row = ((bi * a.l + t0 + s) * a.h + hi) * n;
      for (int64_t j = 0; j < n; ++j) {
        dB[row + j] = w.dbb[s * n + j] + ws * w.tn[s * n + j];
        dC[row + j] = w.dcb[s * n + j];
      }
    }
    // dH_in = e^{cs_last} dH + (diag(e^{cs}) dY)ᵀ C ; dcs_last from e^{cs_last} H_in
    Acc hd = 0;
    Acc* dhin = w.dhin.data();
#pragma omp simd reduction(+ : hd)
    for (int64_t j = 0; j < pn; ++j) {
      hd += dH[j] * Hin[j];
      dhin[j] = el * dH[j];
    }
    dlast += el * hd;
    w.dcs[q - 1] += dlast;
    gemm_acc<Acc, 0>(p, n, q, w.dys.data(), 1, p, Ck, n, w.dhin.data(), n);
    // per step: dx, dΔ, d log a (reverse cumulative sum of dcs), dA
    Acc rs = 0;
    for (int64_t s = q - 1; s >= 0; --s) {
      rs += w.dcs[s];
      const int64_t row = ((bi * a.l + t0 + s) * a.h + hi) * p;
      Acc dd = 0;
      const Acc* gr_ = w.dxt.data() + s * p;
      const Acc* xr_ = w.xr.data() + s * p;
#pragma omp simd reduction(+ : dd)
      for (int64_t i = 0; i < p; ++i) dd += gr_[i] * xr_[i];
      for (int64_t i = 0; i < p; ++i) {
        Acc v = w.dl[s] * gr_[i];
        if (Dh) v += Dh[i] * w.dy[s * p + i];
        dx[row + i] = from_acc<T>(v);
      }
      dd += rs * Ah;
      dAh += rs * w.dl[s];
      ddt[(bi * a.l + t0 + s) * a.h + hi] = dd * c.delta_grad(w.raw[s]);
    }
    std::copy(w.dhin.begin(), w.dhin.begin() + pn, dH);
    if (k > 0 && a.state_norm_max > 0) {  // back through H ← H · min(1, τ/‖H‖) at the boundary
      const Acc nrm = c.pre[(bi * a.h + hi) * c.K + k];
      const Acc tau = static_cast<Acc>(a.state_norm_max);
      if (nrm > tau) {
        Acc hv = 0;
#pragma omp simd reduction(+ : hv)
        for (int64_t j = 0; j < pn; ++j) hv += Hin[j] * dH[j];
        const Acc f = tau / nrm, qq = hv / (tau * tau);
        for (int64_t j = 0; j < pn; ++j) dH[j] = f * (dH[j] - Hin[j] * qq);
      }
    }
  }
  dA[bi * a.h + hi] = dAh;
  if (dinit) std::copy(dH, dH + pn, dinit + (bi * a.h + hi) * pn);
}

// The sliding-window state (window = W > 0), step by step: the state holds the last W inputs,
//   H_t = a_t H_{t−1} + Δ_t x_t B_tᵀ − P_t Δ_{t−W} x_{t−W} B_{t−W}ᵀ,   P_t = Π_{r=t−W+1..t} a_r
// (P_t from a running fp64 sum of log a). Forward only: the Python side gets differentiable
// outputs from two plain scans and asks this kernel for the per-step norms.
template <typename T, typename Acc>
void forward_window_one(const Ctx<T, Acc>& c, int64_t bi, int64_t hi, T* out, Acc* fin, Acc* norms,
                        std::vector<Acc>& work) {
  const SsdArgs& a = c.a;
  const int64_t p = a.p, n = a.n, pn = p * n, gi = hi / c.hpg, W = a.window;
  Acc* H = work.data();
  Acc* bt = H + pn; Acc* ct = bt + n; Acc* xv = ct + n; Acc* bo = xv + p; Acc* co = bo + n; Acc* xo = co + n;
  std::fill(H, H + pn, Acc(0));
  const Acc Ah = c.A[hi];
  const double loglam = std::log(a.decay_scale);
  double logP = 0;
  for (int64_t t = 0; t < a.l; ++t) {
    Acc raw, d;
    c.delta(bi, t, hi, raw, d);
    const Acc at = static_cast<Acc>(a.decay_scale) * std::exp(d * Ah);
    logP += static_cast<double>(d) * Ah + loglam;
    c.load_bc(bi, t, gi, bt, ct);
    c.load_row(c.x, a.xs, bi, t, hi, xv);
    Acc v0 = 0;
    if (t >= W) {
      Acc rawo, dold;
      c.delta(bi, t - W, hi, rawo, dold);
      logP -= static_cast<double>(dold) * Ah + loglam;
      c.load_bc(bi, t - W, gi, bo, co);
      c.load_row(c.x, a.xs, bi, t - W, hi, xo);
      v0 = static_cast<Acc>(std::exp(logP)) * dold;
    }
    Acc ss = 0;
    for (int64_t i = 0; i < p; ++i) {
      Acc* hr = H + i * n;
      const Acc u = d * xv[i], v = v0 * (t >= W ? xo[i] : Acc(0));
      Acc y = 0, s2 = 0;
#pragma omp simd reduction(+ : y, s2)
      for (int64_t j = 0; j < n; ++j) {
        const Acc hv = at * hr[j] + u * bt[j] - v * bo[j];
        hr[j] = hv;
        y += hv * ct[j];
        s2 += hv * hv;
      }
      ss += s2;
      out[((bi * a.l + t) * a.h + hi) * p + i] = from_acc<T>(y);
    }
    if (norms) norms[(bi * a.l + t) * a.h + hi] = std::sqrt(ss);
  }
  if (fin) std::copy(H, H + pn, fin + (bi * a.h + hi) * pn);
}

void check(const SsdArgs& a, const char* fn) {
  if (a.b < 0 || a.l < 0 || a.h < 1 || a.p < 0 || a.g < 1 || a.n < 0 || a.h % a.g != 0 || a.chunk_size < 1 ||
      a.xs.size() != 4 || a.dts.size() != 3 || a.bs.size() != 4 || a.cs.size() != 4 || (a.z && a.zs.size() != 4))
    throw std::invalid_argument(std::string("collapsekit._C.") + fn + ": bad sizes or strides");
}

}  // namespace

void ssd_scan_forward(const SsdArgs& a, uintptr_t out, uintptr_t final_state, uintptr_t norms) {
  check(a, "ssd_scan_forward");
  const int nt = clamp_threads(a.num_threads);
  dispatch_float(a.dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    const Ctx<T, Acc> c(a);
    const int64_t tasks = a.b * a.h;
    if (a.window > 0) {
      if (a.init || a.state_norm_max > 0 || a.D || a.z)
        throw std::invalid_argument("collapsekit._C.ssd_scan_forward: window takes no init, τ, D or z");
#pragma omp parallel num_threads(nt)
      {
        std::vector<Acc> work(a.p * a.n + 4 * a.n + 2 * a.p);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task)
          forward_window_one(c, task / a.h, task % a.h, reinterpret_cast<T*>(out), reinterpret_cast<Acc*>(final_state),
                             reinterpret_cast<Acc*>(norms), work);
      }
      return;
    }
    const int path = a.path ? a.path : ::collapsekit::choose_ssd_path(a, norms != 0);
    if (path == 2 && !norms && a.l > 0 && a.p > 0 && a.n > 0) {
      forward_chunked(c, reinterpret_cast<T*>(out), reinterpret_cast<Acc*>(final_state), nt);
      return;
    }
#pragma omp parallel num_threads(nt)
    {
      std::vector<Acc> work(a.p * a.n + 4 * a.n + 4 * a.p);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task)
        forward_one(c, task / a.h, task % a.h, reinterpret_cast<T*>(out), reinterpret_cast<Acc*>(final_state),
                    reinterpret_cast<Acc*>(norms), work);
    }
  });
}

void ssd_scan_backward(const SsdArgs& a, uintptr_t dout, const std::vector<int64_t>& dos, uintptr_t dfinal,
                       uintptr_t dx, uintptr_t dz, uintptr_t ddt, uintptr_t dA, uintptr_t dB, uintptr_t dC,
                       uintptr_t dD, uintptr_t dinit) {
  check(a, "ssd_scan_backward");
  if (!a.ckpt || dos.size() != 4 || (a.state_norm_max > 0 && !a.pre_norms))
    throw std::invalid_argument("collapsekit._C.ssd_scan_backward: checkpoints and dout strides are required");
  const int nt = clamp_threads(a.num_threads);
  dispatch_float(a.dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    const Ctx<T, Acc> c(a);
    const int64_t tasks = a.b * a.h, cs = a.chunk_size;
    const int path = a.path ? a.path : ::collapsekit::choose_ssd_path(a, false);
    if (path == 2 && a.l > 0 && a.p > 0 && a.n > 0) {
      std::vector<Acc> cb(static_cast<size_t>(a.b * a.g * c.K) * cs * cs);
      chunk_cb(c, cb.data(), nt);
#pragma omp parallel num_threads(nt)
      {
        ChunkBwdWork<T, Acc> w(cs, a.p, a.n);
        std::vector<Acc> dH(a.p * a.n);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task)
          backward_chunked_one(c, cb.data(), task / a.h, task % a.h, reinterpret_cast<const T*>(dout), dos,
                               reinterpret_cast<const Acc*>(dfinal), reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dz),
                               reinterpret_cast<Acc*>(ddt), reinterpret_cast<Acc*>(dA), reinterpret_cast<Acc*>(dB),
                               reinterpret_cast<Acc*>(dC), reinterpret_cast<Acc*>(dD), reinterpret_cast<Acc*>(dinit),
                               dH.data(), w);
      }
      return;
    }
#pragma omp parallel num_threads(nt)
    {
      std::vector<Acc> work((cs + 2) * a.p * a.n + 4 * a.n + 3 * a.p + 3 * cs);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task)
        backward_one(c, task / a.h, task % a.h, reinterpret_cast<const T*>(dout), dos,
                     reinterpret_cast<const Acc*>(dfinal), reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dz),
                     reinterpret_cast<Acc*>(ddt), reinterpret_cast<Acc*>(dA), reinterpret_cast<Acc*>(dB),
                     reinterpret_cast<Acc*>(dC), reinterpret_cast<Acc*>(dD), reinterpret_cast<Acc*>(dinit), work);
    }
  });
}

}  // namespace COLLAPSEKIT_ISA

#ifdef COLLAPSEKIT_ISA_BASE
int choose_ssd_path(const SsdArgs& a, bool want_norms) {
  // Per-step norms come from the recurrence (the chunked form has no cheap per-step ‖H_t‖);
  // otherwise chunked once there are enough chunks to amortise its fixed costs (the C·Bᵀ pass, a
  // second parallel region): measured at h=24 p=64 n=128 chunk 64 (docs/ssd_scan.md, "Choosing the
  // path"), recurrent up to l = 256 is as fast or faster, chunked 2.5x faster at l = 2048.
  if (want_norms) return 1;
  if (a.l < 4 * a.chunk_size || a.chunk_size < 16 || a.p < 8 || a.n < 8) return 1;
  return 2;
}
#endif
}  // namespace collapsekit
