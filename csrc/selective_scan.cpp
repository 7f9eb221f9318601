// Mamba-1 selective scan on the CPU: forward, and the backward from checkpointed states.
//
//   dt_t = softplus(delta_t + bias) (or not),  x_t = exp(dt_t A) * x_{t-1} + dt_t u_t B_t,
//   y_t = <x_t, C_t> + D u_t,  out_t = y_t * silu(z_t)
//
// Work unit (one OpenMP task): one batch row and a block of CB = 8 channels that share their B
// and C group. The 8 channels are the SIMD lanes: the state x is an [N][8] tile (L1, never
// written to memory except at checkpoints), every inner loop runs over the 8 lanes with B_t[n]
// and C_t[n] broadcast (time-varying B/C are shared by the channels of a group), so the output
// y_t = sum_n x_t[n] C_t[n] is a lane-wise multiply-add, never a horizontal reduction. Inputs are
// read CHUNK time steps at a time into small transposed [T][8] buffers (any strides and dtypes,
// converted once); nothing of size (batch, dim, L, N) exists.
//
// exp(dt*A) -- N exponentials per channel and step, the bulk of the work -- uses vexp: Cody-Waite
// range reduction and Cephes' degree-6 polynomial, branch-free on whole lane vectors; within 1 ulp
// of expf (results below FLT_MIN flush to 0). fp64 inputs use std::exp.
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
#include <type_traits>
#include <vector>

#include "common.h"
#include "selective_scan.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace collapsekit {
namespace COLLAPSEKIT_ISA {  // compiled once per instruction set; see CMakeLists.txt
namespace {

constexpr int CB = 8;  // channels per block = SIMD lanes of the inner loops (one AVX2 fp32 register)

// ---- lane vectors: CB values of Acc, one per channel of the block -------------------------------
// The hot loops are written once, as whole-lane expressions. In the AVX2 build fp32 lanes are a
// GCC/Clang vector-extension type of exactly one register (wider ones get their selects
// scalarised); elsewhere, and for fp64, a plain array struct with the same operations stands in
// (short loops the compiler vectorises; -fno-trapping-math lets it if-convert the selects).
template <typename Acc> struct ArrVec {
  Acc v[CB];
  Acc& operator[](int i) { return v[i]; }
  Acc operator[](int i) const { return v[i]; }
#define CK_VOP(op) \
  friend ArrVec operator op(ArrVec a, const ArrVec& b) { for (int i = 0; i < CB; ++i) a.v[i] = a.v[i] op b.v[i]; return a; } \
  friend ArrVec operator op(ArrVec a, Acc b) { for (int i = 0; i < CB; ++i) a.v[i] = a.v[i] op b; return a; } \
  ArrVec& operator op##=(const ArrVec& b) { for (int i = 0; i < CB; ++i) v[i] = v[i] op b.v[i]; return *this; }
  CK_VOP(+) CK_VOP(-) CK_VOP(*) CK_VOP(/)
#undef CK_VOP
};

#if defined(__GNUC__) && defined(__AVX2__)
#define CK_NATIVE_F32 1
#define CK_INLINE inline __attribute__((always_inline))
typedef float VF __attribute__((vector_size(CB * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(CB * sizeof(float))));
typedef uint32_t VU __attribute__((vector_size(CB * sizeof(float))));
CK_INLINE VF splat(float s) { return VF{} + s; }
CK_INLINE VF if_gt(VF x, float t, VF a, VF b) { return x > t ? a : b; }  // x > t ? a : b, per lane
CK_INLINE VF if_lt(VF x, float t, VF a, VF b) { return x < t ? a : b; }
#else
#define CK_INLINE inline
typedef ArrVec<float> VF;
CK_INLINE VF splat(float s) { VF r; for (int i = 0; i < CB; ++i) r.v[i] = s; return r; }
#endif
typedef ArrVec<double> VD;
CK_INLINE VD splat(double s) { VD r; for (int i = 0; i < CB; ++i) r.v[i] = s; return r; }
template <typename Acc> CK_INLINE ArrVec<Acc> if_gt(ArrVec<Acc> x, Acc t, ArrVec<Acc> a, const ArrVec<Acc>& b) {
  for (int i = 0; i < CB; ++i) a[i] = x[i] > t ? a[i] : b[i];
  return a;
}
template <typename Acc> CK_INLINE ArrVec<Acc> if_lt(ArrVec<Acc> x, Acc t, ArrVec<Acc> a, const ArrVec<Acc>& b) {
  for (int i = 0; i < CB; ++i) a[i] = x[i] < t ? a[i] : b[i];
  return a;
}

template <typename Acc> struct LaneT;
template <> struct LaneT<float> { typedef VF V; };
template <> struct LaneT<double> { typedef VD V; };
template <typename Acc> using Vec = typename LaneT<Acc>::V;

template <typename Acc> CK_INLINE Vec<Acc> vload(const Acc* p) { Vec<Acc> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename Acc> CK_INLINE void vstore(Acc* p, const Vec<Acc>& v) { std::memcpy(p, &v, sizeof(v)); }

// exp on the lanes. fp32: Cody-Waite range reduction and Cephes' degree-6 polynomial, branch-free
// (within 1 ulp of exp over the normal range, tested; results below FLT_MIN flush to 0, above
// FLT_MAX give inf, NaN stays NaN).
// fp64: libm, lane by lane (the fp64 path is for gradcheck, not speed).
CK_INLINE VF vexp(VF x) {
  // lo: exp(lo) = FLT_MIN; hi: exp(hi) = FLT_MAX. k = round(x log2 e) lies in [-126, 128]; 2^k is
  // built from exponent bits as 2^min(k, 127) times 1 or 2, so k = 128 needs no special case.
  const float hi = 88.72283935546875f, lo = -87.3365447504019f;
  VF xc = if_lt(x, lo, splat(lo), x);                              // NaN passes through
  xc = if_gt(xc, hi, splat(hi), xc);
  VF kf = xc * 1.44269504088896341f + 12582912.0f;                 // round to nearest (1.5 * 2^23)
  kf = kf - 12582912.0f;
  VF r = xc - kf * 0.693359375f;                                   // ln 2 split in two (Cody-Waite)
  r = r + kf * 2.12194440e-4f;
  VF p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF e = p * (r * r) + r + 1.0f;
  const VF k1 = if_gt(kf, 127.0f, splat(127.0f), kf);
  VF scale;  // 2^k1 from the exponent bits
#if defined(CK_NATIVE_F32)
  scale = (VF)(((VU)__builtin_convertvector(k1, VI) + 127u) << 23);
#else
  for (int i = 0; i < CB; ++i) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k1[i]) + 127) << 23;
    std::memcpy(&scale.v[i], &bits, 4);
  }
#endif
  VF res = e * scale * (kf - k1 + 1.0f);
  res = if_lt(x, lo, splat(0.0f), res);
  return if_gt(x, hi, splat(std::numeric_limits<float>::infinity()), res);
}
CK_INLINE Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < CB; ++i) x[i] = std::exp(x[i]);
  return x;
}

// softplus with torch's threshold (v > 20 -> v), as max(v, 0) + log1p(exp(-|v|)). fp32: log1p(e)
// for e in (0, 1] by the atanh series 2s(1 + s^2/3 + ... + s^14/15), s = e / (2 + e) <= 1/3
// (error < 1e-8 relative); fp64: libm.
CK_INLINE VF vsoftplus(VF v) {
  const Vec<float> zero = splat(0.0f);
  const Vec<float> e = vexp(if_lt(v, 0.0f, v, zero - v));  // exp(-|v|)
  const Vec<float> pos = if_gt(v, 0.0f, v, zero);
  const Vec<float> s = e / (e + 2.0f), q = s * s;
  Vec<float> p = splat(1.0f / 15);
  p = p * q + 1.0f / 13;
  p = p * q + 1.0f / 11;
  p = p * q + 1.0f / 9;
  p = p * q + 1.0f / 7;
  p = p * q + 1.0f / 5;
  p = p * q + 1.0f / 3;
  p = p * q + 1.0f;
  return if_gt(v, 20.0f, v, pos + s * p * 2.0f);
}
CK_INLINE Vec<double> vsoftplus(Vec<double> v) {
  for (int i = 0; i < CB; ++i) v[i] = v[i] > 20.0 ? v[i] : std::log1p(std::exp(v[i]));
  return v;
}
CK_INLINE Vec<float> vsigmoid(Vec<float> v) { return splat(1.0f) / (vexp(splat(0.0f) - v) + 1.0f); }
CK_INLINE Vec<double> vsigmoid(Vec<double> v) { return splat(1.0) / (vexp(splat(0.0) - v) + 1.0); }

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

// Threads for a call: at most one per task, and one for small problems (under 2^18 state
// updates, ~0.3 ms of work): a parallel region costs a thread wake-up, which on a busy machine
// can be a scheduler time slice (measured: 12 ms instead of 0.1 ms per call on the shared 2-core VM).
int team(const SelectiveScanArgs& a, int64_t ntasks) {
  int64_t nt = std::min<int64_t>(clamp_threads(static_cast<int>(a.num_threads)), ntasks);
  if (a.batch * a.dim * a.L * a.N < (int64_t(1) << 18)) nt = 1;
  return static_cast<int>(std::max<int64_t>(1, nt));
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

#if defined(__AVX2__)
// dst[j * ds + i] = src[i * ss + j] for an 8 x 8 block of fp32 (unpack, shuffle, 128-bit permute)
inline void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

// Chunk [t0, t0 + T) of a (batch, dim, L) input into buf[t][c] (zeros in unused lanes).
template <typename Acc>
void load_chunk(int64_t ptr, int64_t code, int64_t s0, int64_t s1, int64_t s2, const Block& k, int64_t t0,
                int64_t T, Acc* buf) {
  int64_t done = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Acc, float> && CB == 8) {
    if (code == F32 && s2 == 1 && k.nc == CB) {  // fp32, unit stride in time: 8 x 8 register transposes
      const float* p = reinterpret_cast<const float*>(ptr) + k.b * s0 + k.d0 * s1 + t0;
      for (; done + 8 <= T; done += 8) transpose8(p + done, s1, buf + done * CB, CB);
    }
  }
#endif
  if (done == T) return;
  if (k.nc < CB) std::fill(buf + done * CB, buf + T * CB, Acc(0));
  for (int64_t c = 0; c < k.nc; ++c)
    load_seq(ptr, code, k.b * s0 + (k.d0 + c) * s1 + (t0 + done) * s2, s2, T - done, buf + done * CB + c, CB);
}

// Time-varying B or C of the block's group for steps [t0, t0 + T) into buf[t][n].
template <typename Acc>
void load_varying(int64_t ptr, int64_t code, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t b, int64_t g,
                  int64_t N, int64_t t0, int64_t T, Acc* buf) {
  for (int64_t n = 0; n < N; ++n) load_seq(ptr, code, b * s0 + g * s1 + n * s2 + t0 * s3, s3, T, buf + n, N);
}

// rb[t] = 1 where the state resets before step t0 + t (seq_idx changes there), else 0.
inline void load_resets(const SelectiveScanArgs& a, int64_t b, int64_t t0, int64_t T, unsigned char* rb) {
  const int32_t* s = reinterpret_cast<const int32_t*>(a.seq_idx) + b * a.seq_s0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t u = t0 + t;
    rb[t] = u > 0 && s[u * a.seq_s1] != s[(u - 1) * a.seq_s1];
  }
}

// dt = softplus(delta + bias) or delta + bias, in place over a [T][CB] buffer; pre keeps delta + bias.
template <typename Acc>
void make_dt(Acc* db, Acc* pre, const Acc* bv, int64_t T, bool sp) {
  const Vec<Acc> b = vload(bv);
  for (int64_t t = 0; t < T; ++t) {
    const Vec<Acc> v = vload(db + t * CB) + b;
    if (pre) vstore(pre + t * CB, v);
    vstore(db + t * CB, sp ? vsoftplus(v) : v);
  }
}

template <typename Acc>
void store_chunk(Acc* dst, const Acc* buf, const SelectiveScanArgs& a, const Block& k, int64_t t0, int64_t T) {
  int64_t done = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Acc, float> && CB == 8) {
    if (k.nc == CB)
      for (; done + 8 <= T; done += 8)
        transpose8(buf + done * CB, CB, dst + (k.b * a.dim + k.d0) * a.L + t0 + done, a.L);
  }
#endif
  for (int64_t c = 0; c < k.nc; ++c) {
    Acc* o = dst + (k.b * a.dim + k.d0 + c) * a.L + t0;
    for (int64_t t = done; t < T; ++t) o[t] = buf[t * CB + c];
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename Acc, bool VB, bool VC, bool NORMS>
void scan_forward(const SelectiveScanArgs& a, const Geometry& g) {
  const int64_t N = a.N, L = a.L, K = std::min(a.chunk, a.L);
  const int64_t ntasks = a.batch * g.nblk;
  const int nt = team(a, ntasks);
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
    alignas(64) Acc Dv[CB], bv[CB];
    std::vector<unsigned char> rb(static_cast<size_t>(K));
    using V = Vec<Acc>;
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
        if (a.seq_idx) load_resets(a, k.b, t0, T, rb.data());
        for (int64_t t = 0; t < T; ++t) {
          if (a.seq_idx && rb[t]) std::fill(x, x + N * CB, Acc(0));  // a new sequence starts at this step
          const V dtv = vload(db + t * CB), uv = vload(ub + t * CB), du = dtv * uv;
          V y = splat(Acc(0)), s2 = y;
          for (int64_t n = 0; n < N; ++n) {
            const V bv_ = VB ? splat(Bt[t * N + n]) : vload(Bc + n * CB);
            const V cv = VC ? splat(Ct[t * N + n]) : vload(Cc + n * CB);
            const V xv = vexp(dtv * vload(Ab + n * CB)) * vload(x + n * CB) + du * bv_;
            vstore(x + n * CB, xv);
            y += xv * cv;
            if (NORMS) s2 += xv * xv;
          }
          V o = y + vload(Dv) * uv;
          if (a.z) {
            const V zv = vload(zb + t * CB);
            o *= zv * vsigmoid(zv);
          }
          vstore(ob + t * CB, o);
          if (NORMS)
            for (int c = 0; c < CB; ++c) nb[t * CB + c] = std::sqrt(s2[c]);
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
  const int nt = team(a, ntasks);
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
  Acc* gbias_o = reinterpret_cast<Acc*>(a.gbias);
  const bool sp = a.softplus != 0, has_z = a.z != 0;
  // time-varying B / C gradients, (batch, G, N, L): each thread sums its blocks' lane totals into a
  // private copy (small: G is 1 in Mamba), added to the zeroed output at the end
  const int64_t nB = VB ? a.batch * a.b_groups * N * L : 0, nC = VC ? a.batch * a.c_groups * N * L : 0;
  if (VB) std::fill(gB_o, gB_o + nB, Acc(0));
  if (VC) std::fill(gC_o, gC_o + nC, Acc(0));
#pragma omp parallel num_threads(nt)
  {
    std::vector<Acc> accB(static_cast<size_t>(nB)), accC(static_cast<size_t>(nC));
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
    alignas(64) Acc Dv[CB], bv[CB];
    std::vector<unsigned char> rb(static_cast<size_t>(K));
    using V = Vec<Acc>;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const Block k = block_of(task, g);
      load_block_constants(a, k, Ab, Bc, Cc, Dv, bv);
      std::fill(h, h + NC, Acc(0));
      std::fill(gAa, gAa + 3 * NC, Acc(0));  // gAa, gBa, gCa
      V gDl = splat(Acc(0)), gbl = gDl;
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
        if (a.seq_idx) load_resets(a, k.b, t0, T, rb.data());
        // recompute the chunk's states from its checkpoint
        std::fill(xs, xs + NC, Acc(0));
        for (int64_t c = 0; c < k.nc; ++c)
          for (int64_t n = 0; n < N; ++n) xs[n * CB + c] = ckpt[((k.b * a.dim + k.d0 + c) * g.nck + ci) * N + n];
        for (int64_t t = 0; t < T; ++t) {
          const V dtv = vload(db + t * CB), du = dtv * vload(ub + t * CB);
          const bool reset = a.seq_idx && rb[t];  // decay 0 at a reset: no state, no gradient flows back
          for (int64_t n = 0; n < N; ++n) {
            const V av = reset ? splat(Acc(0)) : vexp(dtv * vload(Ab + n * CB));
            vstore(as + t * NC + n * CB, av);
            const V bv_ = VB ? splat(Bt[t * N + n]) : vload(Bc + n * CB);
            vstore(xs + (t + 1) * NC + n * CB, av * vload(xs + t * NC + n * CB) + du * bv_);
          }
        }
        // reverse time through the chunk
        for (int64_t t = T - 1; t >= 0; --t) {
          const Acc* xt = xs + (t + 1) * NC;
          const Acc* xp = xs + t * NC;
          const Acc* at = as + t * NC;
          const V dtv = vload(db + t * CB), uv = vload(ub + t * CB), du = dtv * uv, Dl = vload(Dv);
          const V go = vload(gob + t * CB);
          V gy = go, sc = splat(Acc(0));
          if (has_z || GN) {
            V y = splat(Acc(0)), s2 = y;
            for (int64_t n = 0; n < N; ++n) {
              const V xv = vload(xt + n * CB);
              if (has_z) y += xv * (VC ? splat(Ct[t * N + n]) : vload(Cc + n * CB));
              if (GN) s2 += xv * xv;
            }
            if (has_z) {
              const V zv = vload(zb + t * CB), sz = vsigmoid(zv), yv = y + Dl * uv;
              gy = go * zv * sz;
              vstore(gzb + t * CB, go * yv * sz * ((splat(Acc(1)) - sz) * zv + Acc(1)));
            }
            if (GN) {
              const V gn = vload(gnb + t * CB);
              for (int c = 0; c < CB; ++c) sc[c] = s2[c] > 0 ? gn[c] / std::sqrt(s2[c]) : Acc(0);
            }
          }
          gDl += gy * uv;
          V gu = gy * Dl, gdt = splat(Acc(0));
          for (int64_t n = 0; n < N; ++n) {
            const V cv = VC ? splat(Ct[t * N + n]) : vload(Cc + n * CB);
            const V bv_ = VB ? splat(Bt[t * N + n]) : vload(Bc + n * CB);
            const V xv = vload(xt + n * CB), av = vload(at + n * CB), An = vload(Ab + n * CB);
            V hv = vload(h + n * CB) + gy * cv;
            if (GN) hv += sc * xv;
            const V gC = gy * xv, gB = hv * du;
            if (VC) vstore(gCl + t * NC + n * CB, gC); else vstore(gCa + n * CB, vload(gCa + n * CB) + gC);
            if (VB) vstore(gBl + t * NC + n * CB, gB); else vstore(gBa + n * CB, vload(gBa + n * CB) + gB);
            const V ga = hv * vload(xp + n * CB) * av;
            const V hb = hv * bv_;
            gdt += ga * An + hb * uv;
            gu += hb * dtv;
            vstore(gAa + n * CB, vload(gAa + n * CB) + ga * dtv);
            vstore(h + n * CB, hv * av);
          }
          vstore(gub + t * CB, gu);
          vstore(gdb + t * CB, sp ? gdt * vsigmoid(vload(pre + t * CB)) : gdt);
        }
        // lane sums of the time-varying B / C gradient terms, added to this thread's copy
        for (int v = 0; v < 2; ++v) {
          if (v == 0 ? !VB : !VC) continue;
          const Acc* src = v == 0 ? gBl : gCl;
          Acc* dst = v == 0 ? accB.data() + ((k.b * a.b_groups + k.gb) * N) * L + t0
                            : accC.data() + ((k.b * a.c_groups + k.gc) * N) * L + t0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t t = 0; t < T; ++t) {
              const Acc* s = src + t * NC + n * CB;
              Acc acc = 0;
              for (int c = 0; c < CB; ++c) acc += s[c];
              dst[n * L + t] += acc;
            }
        }
        for (int64_t t = 0; t < T; ++t) gbl += vload(gdb + t * CB);
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
        gD_o[bd] = gDl[c];
        gbias_o[bd] = gbl[c];
      }
    }
#pragma omp critical
    {
      for (int64_t i = 0; i < nB; ++i) gB_o[i] += accB[i];
      for (int64_t i = 0; i < nC; ++i) gC_o[i] += accC[i];
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

void selective_scan_fwd(const SelectiveScanArgs& a) {
  const Geometry g = geometry(a, "selective_scan_fwd");
  if (!a.out || !a.last) throw std::invalid_argument("collapsekit._C.selective_scan_fwd: missing output pointer");
  dispatch(a, a.norms != 0, Forward{a, g});
}

void selective_scan_bwd(const SelectiveScanArgs& a) {
  const Geometry g = geometry(a, "selective_scan_bwd");
  if (!a.ckpt || !a.gout || !a.gu || !a.gdelta || !a.gA || !a.gB || !a.gC || !a.gD || !a.ginit || !a.gbias || (a.z && !a.gz))
    throw std::invalid_argument("collapsekit._C.selective_scan_bwd: missing pointer");
  if (a.gout_code < 0 || a.gout_code > 3) throw std::invalid_argument("collapsekit._C.selective_scan_bwd: bad gout dtype");
  dispatch(a, a.gnorms != 0, Backward{a, g});
}

}  // namespace COLLAPSEKIT_ISA
}  // namespace collapsekit
