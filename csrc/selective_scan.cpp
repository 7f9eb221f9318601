// Mamba-1 selective scan on the CPU: forward, and the backward from checkpointed states.
//
//   dt_t = softplus(delta_t + bias) (or not),  x_t = exp(dt_t A) * x_{t-1} + dt_t u_t B_t,
//   y_t = <x_t, C_t> + D u_t,  out_t = y_t * silu(z_t)
//
// Work unit (one OpenMP task): one batch row and a block of CB = 16 channels that share their B
// and C group. The 16 channels are the SIMD lanes: the state x is an [N][16] tile (L1, never
// written to memory except at checkpoints), every inner loop runs over the 16 lanes with B_t[n]
// and C_t[n] broadcast (time-varying B/C are shared by the channels of a group), so the output
// y_t = sum_n x_t[n] C_t[n] is a lane-wise multiply-add, never a horizontal reduction. Inputs are
// read CHUNK time steps at a time into small transposed [T][16] buffers (any strides and dtypes,
// converted once); nothing of size (batch, dim, L, N) exists.
//
// exp(dt*A) -- N exponentials per channel and step, the bulk of the work -- uses fast_exp: Cody-
// Waite range reduction and Cephes' degree-6 polynomial, branch-free so the lane loop vectorises;
// within 2 ulp of expf (results below FLT_MIN flush to 0). fp64 inputs use std::exp.
//
// Backward: the forward stores the state every CHUNK steps (ckpt, (batch, dim, ceil(L/CHUNK), N)).
// The backward walks the chunks in reverse; for each it recomputes the CHUNK states (and the decays
// exp(dt A)) from the checkpoint into per-thread buffers, then runs the reverse-time adjoint
//   h_t = dL/dx_t = a_{t+1} h_{t+1} + gy_t C_t (+ gnorm_t x_t/|x_t|) (+ glast at t = L-1)
// and accumulates every gradient lane-wise. Gradients of time-varying B/C are per-block partial
// sums (batch, blocks, N, L) that Python adds over the blocks of a group.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"
#include "selective_scan.h"

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

constexpr int CB = 16;  // channels per block = SIMD lanes of the inner loops

inline float fast_exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504019f;  // k = round(x log2 e) in [-126, 127]
  float xc = x < lo ? lo : x;                                      // NaN passes through
  xc = xc > hi ? hi : xc;
  float kf = xc * 1.44269504088896341f + 12582912.0f;              // round to nearest (1.5 * 2^23)
  kf -= 12582912.0f;
  float r = xc - kf * 0.693359375f;                                // ln 2 split in two (Cody-Waite)
  r = r + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  float res = e * scale;
  res = x < lo ? 0.0f : res;
  res = x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : res;
  return res;
}
inline double fast_exp(double x) { return std::exp(x); }

// softplus with torch's threshold (x > 20 -> x), written as max(v, 0) + log1p(exp(-|v|)). fp32: log1p(e)
// for e in (0, 1] by the atanh series 2s(1 + s^2/3 + ... + s^14/15), s = e / (2 + e) <= 1/3 (error
// < 1e-8 relative), so the loop vectorises; fp64 uses libm.
inline float softplus(float v) {
  const float e = fast_exp(-std::fabs(v));
  const float s = e / (2.0f + e), q = s * s;
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
inline double softplus(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }
template <typename Acc> inline Acc sigmoid(Acc v) { return Acc(1) / (Acc(1) + fast_exp(-v)); }

// dst[t * ds] = (Acc) src[off + t * st] for t < T, src of dtype code `code`.
template <typename Acc>
void load_seq(int64_t ptr, int64_t code, int64_t off, int64_t st, int64_t T, Acc* dst, int64_t ds) {
  auto go = [&](const auto* p) {
    p += off;
    for (int64_t t = 0; t < T; ++t) dst[t * ds] = to_acc<Acc>(p[t * st]);
  };
  switch (code) {
    case F32: go(reinterpret_cast<const float*>(ptr)); break;
    case F64: go(reinterpret_cast<const double*>(ptr)); break;
    case F16: go(reinterpret_cast<const half_t*>(ptr)); break;
    default: go(reinterpret_cast<const bfloat16_t*>(ptr)); break;  // BF16 (codes checked up front)
  }
}

struct Geometry {
  int64_t dpgB, dpgC;  // channels per B / C group (dim when constant)
  int64_t seg;         // channels per segment: a segment lies inside one B group and one C group
  int64_t bps, nblk;   // blocks per segment, blocks per batch row
  int64_t nck;         // checkpoints (chunks)
};

Geometry geometry(const SelectiveScanArgs& a, const char* fn) {
  auto bad = [&](const char* what) {
    throw std::invalid_argument(std::string("collapsekit._C.") + fn + ": " + what);
  };
  if (a.batch < 1 || a.dim < 1 || a.L < 1 || a.N < 1 || a.chunk < 1) bad("bad sizes");
  if ((a.b_mode && (a.b_groups < 1 || a.dim % a.b_groups)) || (a.c_mode && (a.c_groups < 1 || a.dim % a.c_groups)))
    bad("groups must divide dim");
  for (int64_t code : {a.u_code, a.delta_code, a.B_code, a.C_code})
    if (code < 0 || code > 3) bad("unsupported float dtype code");
  if ((a.z && (a.z_code < 0 || a.z_code > 3)) || a.acc_code < 0 || a.acc_code > 1) bad("unsupported dtype code");
  if (!a.u || !a.delta || !a.A || !a.B || !a.C) bad("missing input pointer");
  Geometry g;
  g.dpgB = a.b_mode ? a.dim / a.b_groups : a.dim;
  g.dpgC = a.c_mode ? a.dim / a.c_groups : a.dim;
  g.seg = std::gcd(g.dpgB, g.dpgC);
  g.bps = (g.seg + CB - 1) / CB;
  g.nblk = (a.dim / g.seg) * g.bps;
  g.nck = (a.L + a.chunk - 1) / a.chunk;
  return g;
}

// The block of task `task`: batch row b, block index j within the row, first channel d0, lanes nc.
struct Block {
  int64_t b, j, d0, nc, gb, gc;
};
inline Block block_of(int64_t task, const Geometry& g) {
  Block k;
  k.b = task / g.nblk;
  k.j = task % g.nblk;
  const int64_t s = k.j / g.bps, blk = k.j % g.bps;
  k.d0 = s * g.seg + blk * CB;
  k.nc = std::min<int64_t>(CB, g.seg - blk * CB);
  k.gb = k.d0 / g.dpgB;
  k.gc = k.d0 / g.dpgC;
  return k;
}

// Per-lane constants of a block: A, constant B/C ([N][CB], zero in unused lanes), D, bias.
template <typename Acc>
void load_block_constants(const SelectiveScanArgs& a, const Block& k, Acc* Ab, Acc* Bc, Acc* Cc, Acc* Dv, Acc* bv) {
  const int64_t N = a.N;
  std::fill(Ab, Ab + N * CB, Acc(0));
  std::fill(Bc, Bc + N * CB, Acc(0));
  std::fill(Cc, Cc + N * CB, Acc(0));
  const Acc* A = reinterpret_cast<const Acc*>(a.A);
  for (int64_t c = 0; c < k.nc; ++c) {
    const int64_t d = k.d0 + c;
    for (int64_t n = 0; n < N; ++n) Ab[n * CB + c] = A[d * N + n];
    if (!a.b_mode) load_seq(a.B, a.B_code, d * a.B_s0, a.B_s1, N, Bc + c, CB);
    if (!a.c_mode) load_seq(a.C, a.C_code, d * a.C_s0, a.C_s1, N, Cc + c, CB);
  }
  for (int c = 0; c < CB; ++c) {
    Dv[c] = (a.D && c < k.nc) ? reinterpret_cast<const Acc*>(a.D)[k.d0 + c] : Acc(0);
    bv[c] = (a.bias && c < k.nc) ? reinterpret_cast<const Acc*>(a.bias)[k.d0 + c] : Acc(0);
  }
}

// Chunk [t0, t0 + T) of a (batch, dim, L) input into buf[t][c] (zeros in unused lanes).
template <typename Acc>
void load_chunk(int64_t ptr, int64_t code, int64_t s0, int64_t s1, int64_t s2, const Block& k, int64_t t0,
                int64_t T, Acc* buf) {
  if (k.nc < CB) std::fill(buf, buf + T * CB, Acc(0));
  for (int64_t c = 0; c < k.nc; ++c) load_seq(ptr, code, k.b * s0 + (k.d0 + c) * s1 + t0 * s2, s2, T, buf + c, CB);
}

// Time-varying B or C of the block's group for steps [t0, t0 + T) into buf[t][n].
template <typename Acc>
void load_varying(int64_t ptr, int64_t code, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t b, int64_t g,
                  int64_t N, int64_t t0, int64_t T, Acc* buf) {
  for (int64_t n = 0; n < N; ++n) load_seq(ptr, code, b * s0 + g * s1 + n * s2 + t0 * s3, s3, T, buf + n, N);
}

// dt = softplus(delta + bias) or delta + bias, in place over a [T][CB] buffer; pre keeps delta + bias.
template <typename Acc>
void make_dt(Acc* db, Acc* pre, const Acc* bv, int64_t T, bool sp) {
  for (int64_t t = 0; t < T; ++t)
    for (int c = 0; c < CB; ++c) {
      const Acc v = db[t * CB + c] + bv[c];
      if (pre) pre[t * CB + c] = v;
      db[t * CB + c] = sp ? softplus(v) : v;
    }
}

template <typename Acc>
void store_chunk(Acc* dst, const Acc* buf, const SelectiveScanArgs& a, const Block& k, int64_t t0, int64_t T) {
  for (int64_t c = 0; c < k.nc; ++c) {
    Acc* o = dst + (k.b * a.dim + k.d0 + c) * a.L + t0;
    for (int64_t t = 0; t < T; ++t) o[t] = buf[t * CB + c];
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename Acc, bool VB, bool VC, bool NORMS>
void scan_forward(const SelectiveScanArgs& a, const Geometry& g) {
  const int64_t N = a.N, L = a.L, K = std::min(a.chunk, a.L);
  const int64_t ntasks = a.batch * g.nblk;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(clamp_threads(int(a.num_threads)), ntasks)));
  Acc* out = reinterpret_cast<Acc*>(a.out);
  Acc* last = reinterpret_cast<Acc*>(a.last);
  Acc* norms = reinterpret_cast<Acc*>(a.norms);
  Acc* ckpt = reinterpret_cast<Acc*>(a.ckpt);
  const Acc* init = reinterpret_cast<const Acc*>(a.init);
#pragma omp parallel num_threads(nt)
  {
    std::vector<Acc> ws(static_cast<size_t>(4 * N * CB + 5 * K * CB + 2 * K * N));
    Acc* x = ws.data();
    Acc* Ab = x + N * CB;
    Acc* Bc = Ab + N * CB;
    Acc* Cc = Bc + N * CB;
    Acc* ub = Cc + N * CB;
    Acc* db = ub + K * CB;
    Acc* zb = db + K * CB;
    Acc* ob = zb + K * CB;
    Acc* nb = ob + K * CB;
    Acc* Bt = nb + K * CB;
    Acc* Ct = Bt + K * N;
    alignas(64) Acc Dv[CB], bv[CB], du[CB], y[CB], s2[CB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const Block k = block_of(task, g);
      load_block_constants(a, k, Ab, Bc, Cc, Dv, bv);
      std::fill(x, x + N * CB, Acc(0));
      if (init)
        for (int64_t c = 0; c < k.nc; ++c)
          for (int64_t n = 0; n < N; ++n) x[n * CB + c] = init[(k.b * a.dim + k.d0 + c) * N + n];
      for (int64_t ci = 0; ci < g.nck; ++ci) {
        const int64_t t0 = ci * K, T = std::min(K, L - t0);
        if (ckpt)
          for (int64_t c = 0; c < k.nc; ++c)
            for (int64_t n = 0; n < N; ++n) ckpt[((k.b * a.dim + k.d0 + c) * g.nck + ci) * N + n] = x[n * CB + c];
        load_chunk(a.u, a.u_code, a.u_s0, a.u_s1, a.u_s2, k, t0, T, ub);
        load_chunk(a.delta, a.delta_code, a.delta_s0, a.delta_s1, a.delta_s2, k, t0, T, db);
        make_dt<Acc>(db, nullptr, bv, T, a.softplus != 0);
        if (a.z) load_chunk(a.z, a.z_code, a.z_s0, a.z_s1, a.z_s2, k, t0, T, zb);
        if (VB) load_varying(a.B, a.B_code, a.B_s0, a.B_s1, a.B_s2, a.B_s3, k.b, k.gb, N, t0, T, Bt);
        if (VC) load_varying(a.C, a.C_code, a.C_s0, a.C_s1, a.C_s2, a.C_s3, k.b, k.gc, N, t0, T, Ct);
        for (int64_t t = 0; t < T; ++t) {
          const Acc* dtv = db + t * CB;
          const Acc* uv = ub + t * CB;
          for (int c = 0; c < CB; ++c) {
            du[c] = dtv[c] * uv[c];
            y[c] = 0;
            s2[c] = 0;
          }
          for (int64_t n = 0; n < N; ++n) {
            const Acc bn = VB ? Bt[t * N + n] : Acc(0), cn = VC ? Ct[t * N + n] : Acc(0);
            const Acc* An = Ab + n * CB;
            const Acc* Bn = Bc + n * CB;
            const Acc* Cn = Cc + n * CB;
            Acc* xn = x + n * CB;
            for (int c = 0; c < CB; ++c) {
              const Acc xv = fast_exp(dtv[c] * An[c]) * xn[c] + du[c] * (VB ? bn : Bn[c]);
              xn[c] = xv;
              y[c] += xv * (VC ? cn : Cn[c]);
              if (NORMS) s2[c] += xv * xv;
            }
          }
          for (int c = 0; c < CB; ++c) {
            Acc o = y[c] + Dv[c] * uv[c];
            if (a.z) {
              const Acc zv = zb[t * CB + c];
              o *= zv * sigmoid(zv);
            }
            ob[t * CB + c] = o;
            if (NORMS) nb[t * CB + c] = std::sqrt(s2[c]);
          }
        }
        store_chunk(out, ob, a, k, t0, T);
        if (NORMS) store_chunk(norms, nb, a, k, t0, T);
      }
      for (int64_t c = 0; c < k.nc; ++c)
        for (int64_t n = 0; n < N; ++n) last[(k.b * a.dim + k.d0 + c) * N + n] = x[n * CB + c];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------
template <typename Acc, bool VB, bool VC, bool GN>
void scan_backward(const SelectiveScanArgs& a, const Geometry& g) {
  const int64_t N = a.N, L = a.L, K = std::min(a.chunk, a.L), NC = N * CB;
  const int64_t ntasks = a.batch * g.nblk;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(clamp_threads(int(a.num_threads)), ntasks)));
  const Acc* ckpt = reinterpret_cast<const Acc*>(a.ckpt);
  const Acc* glast = reinterpret_cast<const Acc*>(a.glast);
  const Acc* gnorms = reinterpret_cast<const Acc*>(a.gnorms);
  Acc* gu_o = reinterpret_cast<Acc*>(a.gu);
  Acc* gd_o = reinterpret_cast<Acc*>(a.gdelta);
  Acc* gz_o = reinterpret_cast<Acc*>(a.gz);
  Acc* gA_o = reinterpret_cast<Acc*>(a.gA);
  Acc* gB_o = reinterpret_cast<Acc*>(a.gB);
  Acc* gC_o = reinterpret_cast<Acc*>(a.gC);
  Acc* gD_o = reinterpret_cast<Acc*>(a.gD);
  Acc* gi_o = reinterpret_cast<Acc*>(a.ginit);
  const bool sp = a.softplus != 0, has_z = a.z != 0;
#pragma omp parallel num_threads(nt)
  {
    std::vector<Acc> ws(static_cast<size_t>((K + 1) * NC + K * NC + 7 * NC + 2 * (VB || VC ? K * NC : 0) +
                                            10 * K * CB + 2 * K * N));
    Acc* xs = ws.data();          // [K + 1][N][CB]: xs[0] the checkpoint, xs[t + 1] the state after step t
    Acc* as = xs + (K + 1) * NC;  // [K][N][CB] decays exp(dt A)
    Acc* h = as + K * NC;         // adjoint carried to the previous step (already times a_{t+1})
    Acc* Ab = h + NC;
    Acc* Bc = Ab + NC;
    Acc* Cc = Bc + NC;
    Acc* gAa = Cc + NC;
    Acc* gBa = gAa + NC;
    Acc* gCa = gBa + NC;
    Acc* gBl = gCa + NC;                         // [K][N][CB] lane terms of the B / C gradient
    Acc* gCl = gBl + ((VB || VC) ? K * NC : 0);
    Acc* ub = gCl + ((VB || VC) ? K * NC : 0);
    Acc* db = ub + K * CB;
    Acc* pre = db + K * CB;
    Acc* zb = pre + K * CB;
    Acc* gob = zb + K * CB;
    Acc* gnb = gob + K * CB;
    Acc* gub = gnb + K * CB;
    Acc* gdb = gub + K * CB;
    Acc* gzb = gdb + K * CB;
    Acc* Bt = gzb + K * CB + K * CB;
    Acc* Ct = Bt + K * N;
    alignas(64) Acc Dv[CB], bv[CB], du[CB], y[CB], s2[CB], gy[CB], sc[CB], gu[CB], gdt[CB], gDv[CB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const Block k = block_of(task, g);
      load_block_constants(a, k, Ab, Bc, Cc, Dv, bv);
      std::fill(h, h + NC, Acc(0));
      std::fill(gAa, gAa + 3 * NC, Acc(0));  // gAa, gBa, gCa
      std::fill(gDv, gDv + CB, Acc(0));
      if (glast)
        for (int64_t c = 0; c < k.nc; ++c)
          for (int64_t n = 0; n < N; ++n) h[n * CB + c] = glast[(k.b * a.dim + k.d0 + c) * N + n];
      if (gnorms) std::fill(gnb, gnb + K * CB, Acc(0));
      for (int64_t ci = g.nck - 1; ci >= 0; --ci) {
        const int64_t t0 = ci * K, T = std::min(K, L - t0);
        load_chunk(a.u, a.u_code, a.u_s0, a.u_s1, a.u_s2, k, t0, T, ub);
        load_chunk(a.delta, a.delta_code, a.delta_s0, a.delta_s1, a.delta_s2, k, t0, T, db);
        make_dt<Acc>(db, pre, bv, T, sp);
        if (has_z) load_chunk(a.z, a.z_code, a.z_s0, a.z_s1, a.z_s2, k, t0, T, zb);
        load_chunk(a.gout, a.gout_code, a.gout_s0, a.gout_s1, a.gout_s2, k, t0, T, gob);
        if (GN) load_chunk(reinterpret_cast<int64_t>(gnorms), a.acc_code, a.dim * L, L, 1, k, t0, T, gnb);
        if (VB) load_varying(a.B, a.B_code, a.B_s0, a.B_s1, a.B_s2, a.B_s3, k.b, k.gb, N, t0, T, Bt);
        if (VC) load_varying(a.C, a.C_code, a.C_s0, a.C_s1, a.C_s2, a.C_s3, k.b, k.gc, N, t0, T, Ct);
        // recompute the chunk's states from its checkpoint
        std::fill(xs, xs + NC, Acc(0));
        for (int64_t c = 0; c < k.nc; ++c)
          for (int64_t n = 0; n < N; ++n) xs[n * CB + c] = ckpt[((k.b * a.dim + k.d0 + c) * g.nck + ci) * N + n];
        for (int64_t t = 0; t < T; ++t) {
          const Acc* dtv = db + t * CB;
          for (int c = 0; c < CB; ++c) du[c] = dtv[c] * ub[t * CB + c];
          for (int64_t n = 0; n < N; ++n) {
            const Acc bn = VB ? Bt[t * N + n] : Acc(0);
            const Acc* An = Ab + n * CB;
            const Acc* Bn = Bc + n * CB;
            const Acc* xp = xs + t * NC + n * CB;
            Acc* xo = xs + (t + 1) * NC + n * CB;
            Acc* ao = as + t * NC + n * CB;
            for (int c = 0; c < CB; ++c) {
              const Acc av = fast_exp(dtv[c] * An[c]);
              ao[c] = av;
              xo[c] = av * xp[c] + du[c] * (VB ? bn : Bn[c]);
            }
          }
        }
        // reverse time through the chunk
        for (int64_t t = T - 1; t >= 0; --t) {
          const Acc* xt = xs + (t + 1) * NC;
          const Acc* xp = xs + t * NC;
          const Acc* at = as + t * NC;
          const Acc* dtv = db + t * CB;
          const Acc* uv = ub + t * CB;
          for (int c = 0; c < CB; ++c) {
            y[c] = 0;
            s2[c] = 0;
            du[c] = dtv[c] * uv[c];
          }
          for (int64_t n = 0; n < N; ++n) {
            const Acc cn = VC ? Ct[t * N + n] : Acc(0);
            const Acc* Cn = Cc + n * CB;
            for (int c = 0; c < CB; ++c) {
              const Acc xv = xt[n * CB + c];
              if (has_z) y[c] += xv * (VC ? cn : Cn[c]);
              if (GN) s2[c] += xv * xv;
            }
          }
          for (int c = 0; c < CB; ++c) {
            const Acc go = gob[t * CB + c];
            if (has_z) {
              const Acc zv = zb[t * CB + c], sz = sigmoid(zv), yv = y[c] + Dv[c] * uv[c];
              gy[c] = go * zv * sz;
              gzb[t * CB + c] = go * yv * sz * (Acc(1) + zv * (Acc(1) - sz));
            } else {
              gy[c] = go;
            }
            gDv[c] += gy[c] * uv[c];
            gu[c] = gy[c] * Dv[c];
            gdt[c] = 0;
            sc[c] = (GN && s2[c] > 0) ? gnb[t * CB + c] / std::sqrt(s2[c]) : Acc(0);
          }
          for (int64_t n = 0; n < N; ++n) {
            const Acc bn = VB ? Bt[t * N + n] : Acc(0), cn = VC ? Ct[t * N + n] : Acc(0);
            const Acc* An = Ab + n * CB;
            const Acc* Bn = Bc + n * CB;
            const Acc* Cn = Cc + n * CB;
            const Acc* xtn = xt + n * CB;
            const Acc* xpn = xp + n * CB;
            const Acc* atn = at + n * CB;
            Acc* hn = h + n * CB;
            Acc* gAn = gAa + n * CB;
            Acc* gBn = VB ? gBl + t * NC + n * CB : gBa + n * CB;
            Acc* gCn = VC ? gCl + t * NC + n * CB : gCa + n * CB;
            for (int c = 0; c < CB; ++c) {
              Acc hv = hn[c] + gy[c] * (VC ? cn : Cn[c]);
              if (GN) hv += sc[c] * xtn[c];
              if (VC) gCn[c] = gy[c] * xtn[c]; else gCn[c] += gy[c] * xtn[c];
              const Acc ga = hv * xpn[c] * atn[c];
              const Acc hb = hv * (VB ? bn : Bn[c]);
              gdt[c] += ga * An[c] + hb * uv[c];
              gu[c] += hb * dtv[c];
              gAn[c] += ga * dtv[c];
              if (VB) gBn[c] = hv * du[c]; else gBn[c] += hv * du[c];
              hn[c] = hv * atn[c];
            }
          }
          for (int c = 0; c < CB; ++c) {
            gub[t * CB + c] = gu[c];
            gdb[t * CB + c] = sp ? gdt[c] * sigmoid(pre[t * CB + c]) : gdt[c];
          }
        }
        // lane sums of the time-varying B / C gradient terms: this block's share, (batch, nblk, N, L)
        for (int v = 0; v < 2; ++v) {
          if (v == 0 ? !VB : !VC) continue;
          const Acc* src = v == 0 ? gBl : gCl;
          Acc* dst = (v == 0 ? gB_o : gC_o) + (k.b * g.nblk + k.j) * N * L + t0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t t = 0; t < T; ++t) {
              const Acc* s = src + t * NC + n * CB;
              Acc acc = 0;
              for (int c = 0; c < CB; ++c) acc += s[c];
              dst[n * L + t] = acc;
            }
        }
        store_chunk(gu_o, gub, a, k, t0, T);
        store_chunk(gd_o, gdb, a, k, t0, T);
        if (has_z) store_chunk(gz_o, gzb, a, k, t0, T);
      }
      for (int64_t c = 0; c < k.nc; ++c) {
        const int64_t bd = k.b * a.dim + k.d0 + c;
        for (int64_t n = 0; n < N; ++n) {
          gi_o[bd * N + n] = h[n * CB + c];
          gA_o[bd * N + n] = gAa[n * CB + c];
          if (!VB) gB_o[bd * N + n] = gBa[n * CB + c];
          if (!VC) gC_o[bd * N + n] = gCa[n * CB + c];
        }
        gD_o[bd] = gDv[c];
      }
    }
  }
}

// Calls fn.template operator()<Acc, VB, VC, FLAG>() for the run-time choices.
template <typename Fn>
void dispatch(const SelectiveScanArgs& a, bool flag, Fn&& fn) {
  auto with_acc = [&](auto acc) {
    using Acc = decltype(acc);
    if (a.b_mode && a.c_mode) flag ? fn.template operator()<Acc, true, true, true>() : fn.template operator()<Acc, true, true, false>();
    else if (a.b_mode) flag ? fn.template operator()<Acc, true, false, true>() : fn.template operator()<Acc, true, false, false>();
    else if (a.c_mode) flag ? fn.template operator()<Acc, false, true, true>() : fn.template operator()<Acc, false, true, false>();
    else flag ? fn.template operator()<Acc, false, false, true>() : fn.template operator()<Acc, false, false, false>();
  };
  if (a.acc_code == F64) with_acc(double{});
  else with_acc(float{});
}

SelectiveScanArgs unpack(const std::vector<int64_t>& v, const char* fn) {
  SelectiveScanArgs a;
  if (v.size() * sizeof(int64_t) != sizeof(a))
    throw std::invalid_argument(std::string("collapsekit._C.") + fn + ": expected " +
                                std::to_string(sizeof(a) / sizeof(int64_t)) + " arguments, got " +
                                std::to_string(v.size()));
  std::memcpy(&a, v.data(), sizeof(a));
  return a;
}

struct Forward {
  const SelectiveScanArgs& a;
  const Geometry& g;
  template <typename Acc, bool VB, bool VC, bool F> void operator()() const { scan_forward<Acc, VB, VC, F>(a, g); }
};
struct Backward {
  const SelectiveScanArgs& a;
  const Geometry& g;
  template <typename Acc, bool VB, bool VC, bool F> void operator()() const { scan_backward<Acc, VB, VC, F>(a, g); }
};

}  // namespace

void selective_scan_fwd(const std::vector<int64_t>& args) {
  const SelectiveScanArgs a = unpack(args, "selective_scan_fwd");
  const Geometry g = geometry(a, "selective_scan_fwd");
  if (!a.out || !a.last) throw std::invalid_argument("collapsekit._C.selective_scan_fwd: missing output pointer");
  dispatch(a, a.norms != 0, Forward{a, g});
}

void selective_scan_bwd(const std::vector<int64_t>& args) {
  const SelectiveScanArgs a = unpack(args, "selective_scan_bwd");
  const Geometry g = geometry(a, "selective_scan_bwd");
  if (!a.ckpt || !a.gout || !a.gu || !a.gdelta || !a.gA || !a.gB || !a.gC || !a.gD || !a.ginit || (a.z && !a.gz))
    throw std::invalid_argument("collapsekit._C.selective_scan_bwd: missing pointer");
  if (a.gout_code < 0 || a.gout_code > 3) throw std::invalid_argument("collapsekit._C.selective_scan_bwd: bad gout dtype");
  dispatch(a, a.gnorms != 0, Backward{a, g});
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
