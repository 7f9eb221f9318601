#pragma once
#include <cstdint>
#include <vector>

namespace collapsekit {

// Arguments of the selective-scan kernels (a named pybind struct, _C.SelectiveScanArgs): data
// pointers as integers, sizes, strides in elements, dtype codes; filled by one helper in
// python/collapsekit/ops/selective_scan.py (_args). 0 for an absent pointer.
struct SelectiveScanArgs {
  int64_t batch, dim, L, N;
  int64_t b_mode, b_groups, c_mode, c_groups;  // mode 0: (dim, N) constant; 1: (batch, G, N, L)
  int64_t softplus, chunk, acc_code, num_threads;
  int64_t u, u_code, u_s0, u_s1, u_s2;
  int64_t delta, delta_code, delta_s0, delta_s1, delta_s2;
  int64_t z, z_code, z_s0, z_s1, z_s2;
  int64_t B, B_code, B_s0, B_s1, B_s2, B_s3;  // constant: s0 over dim, s1 over N
  int64_t C, C_code, C_s0, C_s1, C_s2, C_s3;
  int64_t A, D, bias, init;                    // accumulation dtype, contiguous
  int64_t out, last, norms, ckpt;              // forward outputs (acc dtype, contiguous)
  int64_t gout, gout_code, gout_s0, gout_s1, gout_s2, glast, gnorms;  // backward inputs
  int64_t gu, gdelta, gz, gA, gB, gC, gD, ginit, gbias;               // backward outputs
  int64_t seq_idx, seq_s0, seq_s1;  // (batch, L) int32 or 0: the state resets to 0 where it changes
};

#define COLLAPSEKIT_DECLARE_ISA(ns) namespace ns { \
void selective_scan_fwd(const SelectiveScanArgs& a); \
void selective_scan_bwd(const SelectiveScanArgs& a); }
COLLAPSEKIT_DECLARE_ISA(base)
COLLAPSEKIT_DECLARE_ISA(avx2)
#undef COLLAPSEKIT_DECLARE_ISA

}  // namespace collapsekit
