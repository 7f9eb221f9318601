"""Triton kernel of the decode step (ops/state_update.py has the semantics).

One program per (batch row, head, block of BLOCK_P head-dim rows); the [BLOCK_P, BLOCK_N] state
tile is loaded, updated and stored once. Every tensor is addressed through its strides (int64
offsets), so HF's stride-0 expansions of dt/A/D/dt_bias cost nothing. Rows whose
state_batch_indices entry is the pad slot (or out of range, which the wrapper reports as an
error first) read a zero state and write none.
"""
import os

import torch
import triton
import triton.language as tl

from torch.library import wrap_triton


@triton.jit
def _softplus(v):
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v))))


@triton.jit
def state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, out_ptr,
    h, P, N, hpg, rows, pad_slot_id, decay_scale,
    ss0, ss1, ss2, ss3, xs0, xs1, xs2, ds0, ds1, ds2, as0, as1, as2,
    bs0, bs1, bs2, cs0, cs1, cs2, Ds0, Ds1, zs0, zs1, zs2, bis0, bis1, idx_s, os0, os1, os2,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // h
    hi = pid % h
    gi = hi // hpg
    q = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    nn = tl.arange(0, BLOCK_N).to(tl.int64)
    qm = q < P
    nm = nn < N
    m2 = qm[:, None] & nm[None, :]
    row = bi
    if HAS_IDX:
        row = tl.load(idx_ptr + bi * idx_s).to(tl.int64)
    valid = (row >= 0) & (row < rows) & (row != pad_slot_id)
    srow = tl.where(valid, row, 0)
    pv = tl.where(valid, P, 0)  # no state row to read or write: every element masked
    mv = (q < pv)[:, None] & nm[None, :]
    sp = state_ptr + srow * ss0 + hi * ss1 + q[:, None] * ss2 + nn[None, :] * ss3
    s = tl.load(sp, mask=mv, other=0.0).to(ACC)
    x = tl.load(x_ptr + bi * xs0 + hi * xs1 + q * xs2, mask=qm, other=0.0).to(ACC)
    dt = tl.load(dt_ptr + bi * ds0 + hi * ds1 + q * ds2, mask=qm, other=0.0).to(ACC)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hi * bis0 + q * bis1, mask=qm, other=0.0).to(ACC)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + hi * as0 + q[:, None] * as1 + nn[None, :] * as2, mask=m2, other=0.0).to(ACC)
    Bv = tl.load(B_ptr + bi * bs0 + gi * bs1 + nn * bs2, mask=nm, other=0.0).to(ACC)
    Cv = tl.load(C_ptr + bi * cs0 + gi * cs1 + nn * cs2, mask=nm, other=0.0).to(ACC)
    s = decay_scale * tl.exp(dt[:, None] * A) * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, s.to(state_ptr.dtype.element_ty), mask=mv)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + hi * Ds0 + q * Ds1, mask=qm, other=0.0).to(ACC) * x
    if HAS_Z:
        zv = tl.load(z_ptr + bi * zs0 + hi * zs1 + q * zs2, mask=qm, other=0.0).to(ACC)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_ptr + bi * os0 + hi * os1 + q * os2, y.to(out_ptr.dtype.element_ty), mask=qm)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id, dt_softplus, decay_scale, out,
                           sizes, strides):
    b, h, P, n, g, rows = sizes
    ss, xs, ds_, As, bs, cs, Ds, zs, dbs = strides
    if b == 0 or P == 0:
        return
    bn = max(2, triton.next_power_of_2(n))
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1" and state.device.type == "cpu"
    bp = max(2, min(triton.next_power_of_2(P), 16 if interp else max(1, 4096 // bn)))
    os_ = out.stride() if out.dim() == 3 else (out.stride(0), 0, out.stride(1))
    acc = tl.float64 if (x.dtype == torch.float64 or state.dtype == torch.float64) else tl.float32
    dummy = out
    wrap_triton(state_update_kernel)[(b * h, triton.cdiv(P, bp))](
        state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, idx if idx is not None else dummy, out,
        h, P, n, h // g, rows, pad_slot_id, float(decay_scale),
        *ss, *xs, *ds_, *As, *bs, *cs, *(Ds or (0, 0)), *(zs or (0, 0, 0)), *(dbs or (0, 0)),
        idx.stride(0) if idx is not None else 0, *os_,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_IDX=idx is not None,
        SOFTPLUS=bool(dt_softplus), ACC=acc, BLOCK_P=bp, BLOCK_N=bn, num_warps=4)
