// One decode step of a Mamba-1 / Mamba-2 selective state space model (mamba-ssm's
// selective_state_update), in place on the state:
//
//   dt    = softplus(dt + dt_bias) (or not)                     per (b, h, p)
//   dA    = decay_scale * exp(dt * A[h, p, :])                  per (b, h, p, n)
//   s     = s * dA + (dt * x) * B[b, group(h), :]               the state row s = state[row(b), h, p, :]
//   out   = <s, C[b, group(h), :]> + D[h, p] * x  (* silu(z))
//
// Work unit: one (batch row, head) and all its p rows; B and C of the head's group are converted
// once into small buffers. The state row is updated in place when it is fp32/fp64 with unit stride
// over n (the normal case), else through a buffer. When A, dt and dt_bias are constant over (p, n)
// -- HF's stride-0 expansions of per-head values -- the decay is one scalar per head, computed once
// (no exponential per element). Otherwise exp runs on whole rows with a branch-free polynomial
// that the compiler vectorises (within 2 ulp of expf over the normal range; fp64 uses libm).
//
// A decode step is tens of microseconds of work, so one thread is used below 2^19 state elements:
// a team woken between steps costs more than it saves (measured on the shared 2-core VM: a
// (1, 24, 64, 128) step with 2 threads took 1.5 ms through the public call, against 0.35 ms with
// one, because the sleeping team must be rescheduled after each call's Python part).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "state_update.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

// exp for fp32, written so that a loop over it vectorises: Cody-Waite range reduction and a
// degree-6 polynomial; below exp(-87.3) -> 0, above 88.72 -> inf, NaN -> NaN.
inline float exp_poly(float x) {
  const float hi = 88.72283935546875f, lo = -87.3365447504019f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float kf = xc * 1.44269504088896341f + 12582912.0f;
  kf = kf - 12582912.0f;
  float r = xc - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * (r * r) + r + 1.0f;
  const float k1 = kf > 127.0f ? 127.0f : kf;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k1) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  float res = e * scale * (kf - k1 + 1.0f);
  res = x < lo ? 0.0f : res;
  res = x > hi ? std::numeric_limits<float>::infinity() : res;
  return x != x ? x : res;
}
inline double exp_poly(double x) { return std::exp(x); }

// softplus with torch's threshold (v > 20 -> v): max(v, 0) + log1p(exp(-|v|)), log1p(e) for
// e in (0, 1] by the series 2s(1 + s^2/3 + ... + s^14/15), s = e / (2 + e) <= 1/3 (rel. error < 1e-8).
inline float softplus_poly(float v) {
  const float e = exp_poly(v < 0.0f ? v : -v);
  const float s = e / (e + 2.0f), q = s * s;
  float p = 1.0f / 15;
  p = p * q + 1.0f / 13;
  p = p * q + 1.0f / 11;
  p = p * q + 1.0f / 9;
  p = p * q + 1.0f / 7;
  p = p * q + 1.0f / 5;
  p = p * q + 1.0f / 3;
  p = p * q + 1.0f;
  const float r = (v > 0.0f ? v : 0.0f) + 2.0f * s * p;
  return v > 20.0f ? v : r;
}
inline double softplus_poly(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }

template <typename F> inline void with_type(int code, F&& f) {
  switch (code) {
    case F32: f(float{}); break;
    case F64: f(double{}); break;
    case F16: f(half_t{}); break;
    case BF16: f(bfloat16_t{}); break;
    default: bad_code("float dtype", code);
  }
}

template <typename Acc> inline Acc load1(uintptr_t p, int code, int64_t off) {
  switch (code) {
    case F32: return static_cast<Acc>(reinterpret_cast<const float*>(p)[off]);
    case F64: return static_cast<Acc>(reinterpret_cast<const double*>(p)[off]);
    case F16: return to_acc<Acc>(reinterpret_cast<const half_t*>(p)[off]);
    default: return to_acc<Acc>(reinterpret_cast<const bfloat16_t*>(p)[off]);
  }
}

template <typename Acc> inline void store1(uintptr_t p, int code, int64_t off, Acc v) {
  switch (code) {
    case F32: reinterpret_cast<float*>(p)[off] = static_cast<float>(v); break;
    case F64: reinterpret_cast<double*>(p)[off] = static_cast<double>(v); break;
    case F16: reinterpret_cast<half_t*>(p)[off] = from_acc<half_t>(v); break;
    default: reinterpret_cast<bfloat16_t*>(p)[off] = from_acc<bfloat16_t>(v); break;
  }
}

// dst[0:n] = src[off + i * st] as Acc
template <typename Acc> void load_vec(uintptr_t p, int code, int64_t off, int64_t st, int64_t n, Acc* dst) {
  with_type(code, [&](auto tag) {
    using T = decltype(tag);
    const T* q = reinterpret_cast<const T*>(p) + off;
    if (st == 1)
      for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<Acc>(q[i]);
    else
      for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<Acc>(q[i * st]);
  });
}

template <typename Acc> void store_vec(uintptr_t p, int code, int64_t off, int64_t st, int64_t n, const Acc* src) {
  with_type(code, [&](auto tag) {
    using T = decltype(tag);
    T* q = reinterpret_cast<T*>(p) + off;
    for (int64_t i = 0; i < n; ++i) q[i * st] = from_acc<T>(src[i]);
  });
}

constexpr int LANES = 32;  // independent partial sums of <s, C>: 4 AVX2 accumulators, no FMA latency chain

// One state row: s = s * dA + c * Bv, returns <s, Cv>. dA is a scalar (dAv == nullptr) or a row.
template <typename Acc, bool ROW>
inline Acc update_row_t(Acc* __restrict s, const Acc* __restrict dAv, Acc dA, Acc c, const Acc* __restrict Bv,
                        const Acc* __restrict Cv, int64_t n) {
  Acc part[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) {
      const Acc v = s[i + j] * (ROW ? dAv[i + j] : dA) + c * Bv[i + j];
      s[i + j] = v;
      part[j] += v * Cv[i + j];
    }
  for (; i + LANES / 2 <= n; i += LANES / 2)  // Mamba-1's n = 16
    for (int j = 0; j < LANES / 2; ++j) {
      const Acc v = s[i + j] * (ROW ? dAv[i + j] : dA) + c * Bv[i + j];
      s[i + j] = v;
      part[j] += v * Cv[i + j];
    }
  for (; i < n; ++i) {
    const Acc v = s[i] * (ROW ? dAv[i] : dA) + c * Bv[i];
    s[i] = v;
    part[0] += v * Cv[i];
  }
  for (int w = LANES / 2; w >= 1; w /= 2)  // pairwise tree: a short dependency chain
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

#if defined(__GNUC__) && defined(__AVX2__)
// fp32 in the AVX2 build: four 8-lane accumulators and a vector reduction (the generic loop's
// 32 partial sums were reduced with scalar extracts, which cost more than the update itself).
typedef float v8f __attribute__((vector_size(32)));
inline v8f ld8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

template <bool ROW>
inline float update_row_v(float* __restrict s, const float* __restrict dAv, float dA, float c,
                          const float* __restrict Bv, const float* __restrict Cv, int64_t n) {
  const v8f dAs = v8f{} + dA, cs = v8f{} + c;
  v8f acc[4] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k) {
      const int64_t o = i + 8 * k;
      const v8f v = ld8(s + o) * (ROW ? ld8(dAv + o) : dAs) + cs * ld8(Bv + o);
      st8(s + o, v);
      acc[k] += v * ld8(Cv + o);
    }
  for (; i + 8 <= n; i += 8) {
    const v8f v = ld8(s + i) * (ROW ? ld8(dAv + i) : dAs) + cs * ld8(Bv + i);
    st8(s + i, v);
    acc[0] += v * ld8(Cv + i);
  }
  const v8f t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float y = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
  for (; i < n; ++i) {
    const float v = s[i] * (ROW ? dAv[i] : dA) + c * Bv[i];
    s[i] = v;
    y += v * Cv[i];
  }
  return y;
}
inline float update_row(float* s, const float* dAv, float dA, float c, const float* Bv, const float* Cv, int64_t n) {
  return dAv ? update_row_v<true>(s, dAv, dA, c, Bv, Cv, n) : update_row_v<false>(s, dAv, dA, c, Bv, Cv, n);
}
inline double update_row(double* s, const double* dAv, double dA, double c, const double* Bv, const double* Cv,
                         int64_t n) {
  return dAv ? update_row_t<double, true>(s, dAv, dA, c, Bv, Cv, n)
             : update_row_t<double, false>(s, dAv, dA, c, Bv, Cv, n);
}
#else
template <typename Acc>
inline Acc update_row(Acc* s, const Acc* dAv, Acc dA, Acc c, const Acc* Bv, const Acc* Cv, int64_t n) {
  return dAv ? update_row_t<Acc, true>(s, dAv, dA, c, Bv, Cv, n) : update_row_t<Acc, false>(s, dAv, dA, c, Bv, Cv, n);
}
#endif

void check(const StateUpdateArgs& a) {
  auto bad = [](const std::string& what) {
    throw std::invalid_argument("collapsekit._C.selective_state_update: " + what);
  };
  if (a.b < 0 || a.h < 1 || a.p < 0 || a.n < 0 || a.g < 1 || a.h % a.g || a.rows < 0) bad("bad sizes");
  if (a.acc != F32 && a.acc != F64) bad("bad accumulation dtype");
  if (!a.state || !a.x || !a.dt || !a.A || !a.B || !a.C || !a.out) {
    if (a.b * a.h * a.p * a.n != 0 || (a.b * a.h * a.p != 0 && (!a.x || !a.out))) bad("missing pointer");
  }
  auto need = [&](const std::vector<int64_t>& s, size_t k, const char* name) {
    if (s.size() != k) bad(std::string("strides of ") + name + " must have " + std::to_string(k) + " entries");
  };
  need(a.ss, 4, "state"); need(a.xs, 3, "x"); need(a.dts, 3, "dt"); need(a.As, 3, "A"); need(a.bs, 3, "B");
  need(a.cs, 3, "C"); need(a.os, 3, "out");
  if (a.D) need(a.Ds, 2, "D");
  if (a.z) need(a.zs, 3, "z");
  if (a.dt_bias) need(a.dbs, 2, "dt_bias");
  if (a.idx && a.idx_code != I32 && a.idx_code != I64) bad("state_batch_indices must be int32 or int64");
  if (!a.idx && a.rows < a.b) bad("state has fewer rows than the batch");
}

template <typename Acc> void run(const StateUpdateArgs& a) {
  const int64_t n = a.n, P = a.p, hpg = a.h / a.g;
  // rows of the state cache, checked before anything is written: no out-of-bounds write ever
  std::vector<int64_t> row(static_cast<size_t>(a.b));
  for (int64_t i = 0; i < a.b; ++i) {
    int64_t r = i;
    if (a.idx)
      r = a.idx_code == I64 ? reinterpret_cast<const int64_t*>(a.idx)[i * a.idx_s]
                            : reinterpret_cast<const int32_t*>(a.idx)[i * a.idx_s];
    if (a.idx && r == a.pad_slot_id) r = -1;  // padding: no state read or write
    else if (r < 0 || r >= a.rows)
      throw std::invalid_argument("collapsekit._C.selective_state_update: state_batch_indices[" + std::to_string(i) +
                                  "] = " + std::to_string(r) + " is outside [0, " + std::to_string(a.rows) +
                                  ") (the rows of state)");
    row[static_cast<size_t>(i)] = r;
  }
  const bool in_place = (a.state_code == (std::is_same_v<Acc, float> ? F32 : F64)) && a.ss[3] == 1;
  // decay constant over (p, n) of a head: one exponential per head
  const bool head_const = a.As[1] == 0 && a.As[2] == 0 && a.dts[2] == 0 && (!a.dt_bias || a.dbs[1] == 0);
  const Acc ds = static_cast<Acc>(a.decay_scale);
  const int64_t tasks = a.b * a.h;
  int nt = clamp_threads(a.num_threads);
  if (a.b * a.h * P * n < (int64_t(1) << 19)) nt = 1;
  nt = static_cast<int>(std::min<int64_t>(nt, std::max<int64_t>(tasks, 1)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<Acc> work(static_cast<size_t>(4 * n + 5 * P + 8));
    Acc* Bv = work.data();
    Acc* Cv = Bv + n;
    Acc* dAv = Cv + n;
    Acc* sb = dAv + n;
    Acc* dtb = sb + n;
    Acc* xb = dtb + P;
    Acc* yb = xb + P;
    Acc* zb = yb + P;
    Acc* Db = zb + P;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bi = task / a.h, hi = task % a.h, gi = hi / hpg;
      const int64_t r = row[static_cast<size_t>(bi)];
      load_vec(a.B, a.B_code, bi * a.bs[0] + gi * a.bs[1], a.bs[2], n, Bv);
      load_vec(a.C, a.C_code, bi * a.cs[0] + gi * a.cs[1], a.cs[2], n, Cv);
      // dt over the head's p rows (bias, softplus): one vectorisable pass
      for (int64_t q = 0; q < (head_const ? 1 : P); ++q) {
        Acc v = load1<Acc>(a.dt, a.dt_code, bi * a.dts[0] + hi * a.dts[1] + q * a.dts[2]);
        if (a.dt_bias) v += load1<Acc>(a.dt_bias, a.dt_bias_code, hi * a.dbs[0] + q * a.dbs[1]);
        dtb[q] = v;
      }
      const int64_t nq = head_const ? 1 : P;
      if (a.dt_softplus)
        for (int64_t q = 0; q < nq; ++q) dtb[q] = softplus_poly(dtb[q]);
      load_vec(a.x, a.x_code, bi * a.xs[0] + hi * a.xs[1], a.xs[2], P, xb);
      Acc dA_head = 0;
      if (head_const) dA_head = ds * exp_poly(dtb[0] * load1<Acc>(a.A, a.A_code, hi * a.As[0]));
      for (int64_t q = 0; q < P; ++q) {
        const Acc dtv = head_const ? dtb[0] : dtb[q], xv = xb[q];
        const Acc* dArow = nullptr;
        Acc dA = dA_head;
        if (!head_const) {
          if (a.As[2] == 0) {
            dA = ds * exp_poly(dtv * load1<Acc>(a.A, a.A_code, hi * a.As[0] + q * a.As[1]));
          } else {
            load_vec(a.A, a.A_code, hi * a.As[0] + q * a.As[1], a.As[2], n, dAv);
            for (int64_t i = 0; i < n; ++i) dAv[i] = ds * exp_poly(dtv * dAv[i]);
            dArow = dAv;
          }
        }
        Acc* s = sb;
        const int64_t soff = r * a.ss[0] + hi * a.ss[1] + q * a.ss[2];
        if (r < 0) std::fill(sb, sb + n, Acc(0));
        else if (in_place) s = reinterpret_cast<Acc*>(a.state) + soff;
        else load_vec(a.state, a.state_code, soff, a.ss[3], n, sb);
        yb[q] = update_row(s, dArow, dA, dtv * xv, Bv, Cv, n);
        if (r >= 0 && !in_place) store_vec(a.state, a.state_code, soff, a.ss[3], n, sb);
      }
      // skip connection and gate over the head's rows at once (vectorised)
      if (a.D) {
        load_vec(a.D, a.D_code, hi * a.Ds[0], a.Ds[1], P, Db);
        for (int64_t q = 0; q < P; ++q) yb[q] += Db[q] * xb[q];
      }
      if (a.z) {
        load_vec(a.z, a.z_code, bi * a.zs[0] + hi * a.zs[1], a.zs[2], P, zb);
        for (int64_t q = 0; q < P; ++q) yb[q] *= zb[q] / (Acc(1) + exp_poly(-zb[q]));
      }
      store_vec(a.out, a.out_code, bi * a.os[0] + hi * a.os[1], a.os[2], P, yb);
    }
  }
}

}  // namespace

void selective_state_update(const StateUpdateArgs& a) {
  check(a);
  if (a.b == 0 || a.p == 0) return;
  if (a.acc == F64) run<double>(a);
  else run<float>(a);
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
