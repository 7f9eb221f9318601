#pragma once
#include <cstdint>
#include <vector>

namespace collapsekit {

// Arguments of the SSD (Mamba-2) scan kernels. Pointers are addresses (0 = absent); strides are
// in elements. x, z, B, C, dout, dx, dz share the "feature" dtype; everything else is in the
// accumulation dtype (fp32, or fp64 for fp64 features) and contiguous.
struct SsdArgs {
  int dtype;                   // feature dtype code (common.h)
  int64_t b, l, h, p, g, n;    // sizes
  uintptr_t x; std::vector<int64_t> xs;      // (b, l, h, p)
  uintptr_t dt; std::vector<int64_t> dts;    // (b, l, h), acc dtype
  uintptr_t A;                               // (h,)
  uintptr_t B; std::vector<int64_t> bs;      // (b, l, g, n)
  uintptr_t C; std::vector<int64_t> cs;      // (b, l, g, n)
  uintptr_t D;                               // (h, p) or 0
  uintptr_t z; std::vector<int64_t> zs;      // (b, l, h, p) or 0
  uintptr_t dt_bias;                         // (h,) or 0
  int dt_softplus; int dt_clamp; double dt_min, dt_max;
  double decay_scale; double state_norm_max;  // <= 0: no state normalisation
  int64_t chunk_size;
  uintptr_t init;                            // (b, h, p, n) or 0
  uintptr_t ckpt;                            // (b, h, K, p, n): state entering each chunk
  uintptr_t pre_norms;                       // (b, h, K): ‖state‖ before normalisation at each boundary
  int path = 0;                              // forward: 0 auto (choose_ssd_path), 1 recurrent, 2 chunked
  int64_t window = 0;                        // > 0: the windowed recurrence (forward only; no init/τ)
  int num_threads;
};

// Forward algorithm for these arguments (1 recurrent, 2 chunked): the measured rule of
// docs/ssd_scan.md ("Choosing the path"). Norms requested -> recurrent.
int choose_ssd_path(const SsdArgs& a, bool want_norms);

// One definition per instruction-set build (namespaces base, avx2, avx512); bindings.cpp picks at
// run time.
#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void ssd_scan_forward(const SsdArgs& a, uintptr_t out, uintptr_t final_state, uintptr_t norms); \
void ssd_scan_backward(const SsdArgs& a, uintptr_t dout, const std::vector<int64_t>& dos, uintptr_t dfinal, \
                       uintptr_t dx, uintptr_t dz, uintptr_t ddt, uintptr_t dA, uintptr_t dB, uintptr_t dC, \
                       uintptr_t dD, uintptr_t dinit); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
COLLAPSEKIT_DECLARE_ISA(avx512)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
