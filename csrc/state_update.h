#pragma once
#include <cstdint>
#include <vector>

namespace collapsekit {

// Arguments of the decode-step kernel (mamba-ssm's selective_state_update), both forms in one
// layout: Mamba-1 is heads = groups = 1 (python/collapsekit/ops/state_update.py writes a zero
// stride for the missing head axis). Pointers are addresses (0 = absent); strides are in
// elements and may be 0 (HF passes dt/A/D/dt_bias expanded with stride 0); every tensor has its
// own dtype code (common.h).
struct StateUpdateArgs {
  int64_t b = 0, h = 1, p = 0, n = 0, g = 1;  // batch, heads, head dim (Mamba-1: dim), state size, groups
  int64_t rows = 0;                           // state.shape[0] (>= b with state_batch_indices)
  int acc = 0;                                // accumulation dtype code: F32 or F64
  uintptr_t state = 0; int state_code = 0; std::vector<int64_t> ss;  // (rows, h, p, n), updated in place
  uintptr_t x = 0; int x_code = 0; std::vector<int64_t> xs;          // (b, h, p)
  uintptr_t dt = 0; int dt_code = 0; std::vector<int64_t> dts;       // (b, h, p)
  uintptr_t A = 0; int A_code = 0; std::vector<int64_t> As;          // (h, p, n)
  uintptr_t B = 0; int B_code = 0; std::vector<int64_t> bs;          // (b, g, n)
  uintptr_t C = 0; int C_code = 0; std::vector<int64_t> cs;          // (b, g, n)
  uintptr_t D = 0; int D_code = 0; std::vector<int64_t> Ds;          // (h, p) or 0
  uintptr_t z = 0; int z_code = 0; std::vector<int64_t> zs;          // (b, h, p) or 0
  uintptr_t dt_bias = 0; int dt_bias_code = 0; std::vector<int64_t> dbs;  // (h, p) or 0
  uintptr_t idx = 0; int idx_code = 0; int64_t idx_s = 0;           // state_batch_indices (b,) or 0
  int64_t pad_slot_id = -1;                   // rows with this index: state read as 0, not written
  uintptr_t out = 0; int out_code = 0; std::vector<int64_t> os;      // (b, h, p)
  int dt_softplus = 0;
  double decay_scale = 1.0;
  int num_threads = 1;
};

#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void selective_state_update(const StateUpdateArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
