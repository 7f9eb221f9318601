"""Chunked SSD (Mamba-2 "state space duality", the matmul form) in Triton: forward and backward.

The sequence is cut into chunks of ``chunk_size`` steps. With ``a_t = λ·exp(Δ_t A)`` and the
within-chunk cumulative log-decay ``cum_t = Σ_{r ≤ t, r in chunk} log a_r``:

    S_0        = initial state (or 0)                                   S_c: state entering chunk c
    states_c   = Σ_s exp(cum_last − cum_s) Δ_s x_s ⊗ B_s                (chunk's own contribution)
    U_c        = exp(cum_last) S_c + states_c                           (state leaving chunk c)
    S_{c+1}    = U_c · min(1, τ/‖U_c‖_F)   (state_norm_max τ; plain U_c without it); final = U_last
    y_t        = exp(cum_t) C_t S_cᵀ + Σ_{s ≤ t} (C_t·B_s) exp(cum_t − cum_s) Δ_s x_s + D x_t
    out_t      = y_t · silu(z_t)

Forward kernels (the stage structure of mamba-ssm's Triton SSD, written independently):
  1. ``_cumsum_fwd_kernel``     Δ (dt_bias, softplus, dt_limit clamp) and cum per chunk.
  2. ``_chunk_state_kernel``    states_c = Xᵀ·(B ∘ decay·Δ), one tl.dot per (p, n) tile.
  3. ``_state_passing_kernel``  the sequential recurrence over chunks on [p·n] (per state block in
                                parallel; with τ one program per (batch, head), since the norm
                                needs the whole state).
  4. ``_bmm_kernel``            C·Bᵀ per chunk per *group* (the heads of a group share it).
  5. ``_chunk_scan_kernel``     y (state term + causal intra-chunk term), D and the z gate fused.

Backward kernels (gy = gout·silu(z)):
  1. ``_bwd_dstates_kernel``    dS_c = Σ_t exp(cum_t) gy_tᵀ C_t   (gradient at each chunk's entering state)
  2. ``_state_passing_bwd_kernel`` reverse recurrence over chunks, τ's backward
                                (τ/‖U‖)(I − ĥĥᵀ), gradient of states_c, of cum_last, of S_0.
  3. ``_bwd_dx_kernel``         dx, the direct dΔ (Σ_p x·dx/Δ), D's gradient, and Σ_p gy·(y − Dx).
  4. ``_bwd_dcb_kernel``        dCB[t, s] = Σ_{heads of the group} exp(cum_t − cum_s) Δ_s gy_t·x_s.
  5. ``_bwd_dbc_kernel``        dB, dC (state terms + dCB·B, dCBᵀ·C).
  6. ``_cumsum_bwd_kernel``     the cum gradient, reverse cumsum inside each chunk → dΔ, dA, d dt_bias.
The cum gradient needs no extra matmul: its intra-chunk row sums are Σ_p gy·(y − Dx) (y saved
by the forward) and its column sums are −Δ_s·(direct dΔ_s).

``seq_idx`` (packed sequences) is a mask in every kernel; ``window=W`` (the sliding-window
mitigation) replaces stages 2-5 by banded kernels (``_window_*``) that need no carried state. Per-step
state norms are not computed here (the recurrent kernel in kernels/ssd_scan.py has them).

Every global offset is computed in int64 (program ids and row indices are widened before they
meet a stride), so b·l·h·p past 2^31 elements is addressed correctly. Grid axis 0 carries
batch·chunks (CUDA allows 2^31−1 there, 65535 on axes 1 and 2).

Dtypes: x, z, B, C in fp16/bf16/fp32/fp64. Products run through tl.dot with fp32 accumulation:
half inputs are fed to the tensor cores in their dtype (weights computed in fp32 and rounded to
x's dtype, as mamba-ssm does), fp32 in IEEE fp32 (no TF32), fp64 in fp64 (ACC = fp64).
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import sigmoid, softplus, tl_acc

# Tile sizes. BLOCK_T: time rows of a tile; BLOCK_S: time columns (the s of C_t·B_s); BLOCK_P:
# headdim; BLOCK_N: dstate; BLOCK_K: the contraction block of a loop; warps per program.
# Chosen for p=64, n=128, chunk 64..256 bf16 on sm_80/sm_90, not tuned on a GPU yet (see
# docs/ssd_scan.md). num_warps=8 where ptxas (sm_90, bf16, every flag) reported heavy spills at 4
# warps (chunk_scan 1028/1772 B spill stores/loads -> 28/16, bwd_dbc 1896/2400 -> 56/56).
TILES = {
    "chunk_state": dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32, num_warps=4),
    "state_passing": dict(BLOCK=1024, num_warps=4),
    "bmm": dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=32, num_warps=4),
    "chunk_scan": dict(BLOCK_T=64, BLOCK_P=64, BLOCK_K=32, BLOCK_N=64, num_warps=8),
    "dstates": dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=32, num_warps=4),
    "dx": dict(BLOCK_T=64, BLOCK_P=64, BLOCK_K=32, BLOCK_N=64, num_warps=8),
    "dcb": dict(BLOCK_T=64, BLOCK_S=64, BLOCK_K=32, num_warps=8),
    "dbc": dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, num_warps=8),
}


@triton.jit
def _chunk_ids(NCHUNK):
    """(batch, chunk) of this program from grid axis 0, as int64."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // NCHUNK, pid % NCHUNK


@triton.jit
def _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1):
    """seq_idx just before chunk c (at position 0 for c = 0: initial_states belong to the row's
    first sequence) and at the chunk's last step."""
    prev = tl.load(seq_ptr + bi * ss0 + tl.maximum(c * CS - 1, 0) * ss1)
    last = tl.load(seq_ptr + bi * ss0 + (tl.minimum(L, (c + 1) * CS) - 1) * ss1)
    return prev, last


# --------------------------------------------------------------------------- forward ---------

@triton.jit
def _cumsum_fwd_kernel(dt_ptr, A_ptr, bias_ptr, par_ptr, dtp_ptr, cum_ptr,
                       L, NH, CS, NCHUNK, ds0, ds1, ds2,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_CS: tl.constexpr):
    bi, c = _chunk_ids(NCHUNK)
    hi = tl.program_id(1).to(tl.int64)
    log_lam = tl.load(par_ptr).to(ACC)
    dt_min = tl.load(par_ptr + 2).to(ACC)
    dt_max = tl.load(par_ptr + 3).to(ACC)
    ot = tl.arange(0, BLOCK_CS)
    pos = c * CS + ot
    valid = (ot < CS) & (pos < L)
    raw = tl.load(dt_ptr + bi * ds0 + pos * ds1 + hi * ds2, mask=valid, other=0.0).to(ACC)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hi).to(ACC)
    d = raw
    if SOFTPLUS:
        d = softplus(raw)
    d = tl.minimum(tl.maximum(d, dt_min), dt_max)
    d = tl.where(valid, d, 0.0)
    # padded steps (past L) get log-decay 0, so cum at CS-1 is the chunk's last valid cum
    la = tl.where(valid, d * tl.load(A_ptr + hi).to(ACC) + log_lam, 0.0)
    cum = tl.cumsum(la, axis=0)
    base = ((bi * NH + hi) * NCHUNK + c) * CS
    tl.store(dtp_ptr + base + ot, d, mask=ot < CS)
    tl.store(cum_ptr + base + ot, cum, mask=ot < CS)


@triton.jit
def _chunk_state_kernel(x_ptr, B_ptr, dtp_ptr, cum_ptr, st_ptr,
                        L, NH, P, N, HPG, CS, NCHUNK,
                        xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3, seq_ptr, ss0, ss1,
                        HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """states_c[p, n] = Σ_s x_s[p] · exp(cum_last − cum_s) Δ_s B_s[n]  (one (p, n) tile); with
    seq_idx only the steps of the chunk's last sequence count."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    nnb = tl.cdiv(N, BLOCK_N)
    op = (pid_t // nnb) * BLOCK_P + tl.arange(0, BLOCK_P)
    on = (pid_t % nnb) * BLOCK_N + tl.arange(0, BLOCK_N)
    pm = op < P
    nm = on < N
    clen = tl.minimum(CS, L - c * CS)
    cbase = ((bi * NH + hi) * NCHUNK + c) * CS
    cl = tl.load(cum_ptr + cbase + CS - 1)
    if HAS_SEQ:
        sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    for k0 in range(0, clen, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        km = ok < clen
        pos = (c * CS + ok).to(tl.int64)
        xt = tl.load(x_ptr + bi * xs0 + pos[None, :] * xs1 + hi * xs2 + op[:, None] * xs3,
                     mask=pm[:, None] & km[None, :], other=0.0)
        bt = tl.load(B_ptr + bi * bs0 + pos[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                     mask=km[:, None] & nm[None, :], other=0.0)
        cum_k = tl.load(cum_ptr + cbase + ok, mask=km, other=0.0)
        d_k = tl.load(dtp_ptr + cbase + ok, mask=km, other=0.0)
        keep = km
        if HAS_SEQ:
            keep = keep & (tl.load(seq_ptr + bi * ss0 + pos * ss1, mask=km, other=-1) == sq_last)
        sc = tl.where(keep, tl.exp(cl - cum_k) * d_k, 0.0)
        bt = (bt.to(ACC) * sc[:, None]).to(DOT)
        acc += tl.dot(xt.to(DOT), bt, input_precision=PREC, out_dtype=ACC)
    so = (((bi * NCHUNK + c) * NH + hi) * P + op[:, None]) * N + on[None, :]
    tl.store(st_ptr + so, acc, mask=pm[:, None] & nm[None, :])


@triton.jit
def _state_passing_kernel(st_ptr, cum_ptr, init_ptr, par_ptr, S_ptr, final_ptr, norm_ptr,
                          NH, PN, CS, NCHUNK, L, seq_ptr, ss0, ss1,
                          HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, NORM_MAX: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    """S_0 = init; U_c = exp(cum_last_c) S_c + states_c; S_{c+1} = clip_τ(U_c); final = U_last.
    Writes S_c for every chunk (the chunk scan and the backward read it) and, with τ, ‖U_{c−1}‖
    at norm[b, h, c] (c ≥ 1)."""
    bi = tl.program_id(1).to(tl.int64)
    hi = tl.program_id(2).to(tl.int64)
    bh = bi * NH + hi
    if not NORM_MAX:
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < PN
        if HAS_INIT:
            S = tl.load(init_ptr + bh * PN + o, mask=m, other=0.0).to(ACC)
        else:
            S = tl.zeros([BLOCK], dtype=ACC)
        for c in range(0, NCHUNK):
            so = ((bi * NCHUNK + c) * NH + hi) * PN + o
            tl.store(S_ptr + so, S, mask=m)
            e = tl.exp(tl.load(cum_ptr + (bh * NCHUNK + c) * CS + CS - 1))
            if HAS_SEQ:   # a new sequence starts inside chunk c: the carried state is dropped
                sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
                e = tl.where(sq_prev == sq_last, e, 0.0)
            S = e * S + tl.load(st_ptr + so, mask=m, other=0.0)
        tl.store(final_ptr + bh * PN + o, S, mask=m)
    else:
        # one program per (batch, head): the clip needs ‖U‖ over the whole state, so each chunk
        # takes two passes over the state blocks (write U and sum squares; rescale in place)
        tau = tl.load(par_ptr + 1).to(ACC)
        for o0 in range(0, PN, BLOCK):
            o = o0 + tl.arange(0, BLOCK)
            m = o < PN
            if HAS_INIT:
                S = tl.load(init_ptr + bh * PN + o, mask=m, other=0.0).to(ACC)
            else:
                S = tl.zeros([BLOCK], dtype=ACC)
            tl.store(S_ptr + (bi * NCHUNK * NH + hi) * PN + o, S, mask=m)
        tl.debug_barrier()
        for c in range(0, NCHUNK):
            e = tl.exp(tl.load(cum_ptr + (bh * NCHUNK + c) * CS + CS - 1))
            if HAS_SEQ:
                sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
                e = tl.where(sq_prev == sq_last, e, 0.0)
            so = ((bi * NCHUNK + c) * NH + hi) * PN
            sn = ((bi * NCHUNK + c + 1) * NH + hi) * PN
            ss = tl.zeros([BLOCK], dtype=ACC)
            for o0 in range(0, PN, BLOCK):
                o = o0 + tl.arange(0, BLOCK)
                m = o < PN
                U = e * tl.load(S_ptr + so + o, mask=m, other=0.0) + \
                    tl.load(st_ptr + so + o, mask=m, other=0.0)
                if c == NCHUNK - 1:
                    tl.store(final_ptr + bh * PN + o, U, mask=m)
                else:
                    tl.store(S_ptr + sn + o, U, mask=m)
                ss += U * U
            tl.debug_barrier()
            if c < NCHUNK - 1:
                nrm = tl.sqrt(tl.sum(ss, axis=0))
                tl.store(norm_ptr + bh * NCHUNK + c + 1, nrm)
                if nrm > tau:
                    f = tau / nrm
                    for o0 in range(0, PN, BLOCK):
                        o = o0 + tl.arange(0, BLOCK)
                        m = o < PN
                        U = tl.load(S_ptr + sn + o, mask=m, other=0.0)
                        tl.store(S_ptr + sn + o, U * f, mask=m)
                tl.debug_barrier()


@triton.jit
def _bmm_kernel(C_ptr, B_ptr, cb_ptr, L, G, N, CS, NCHUNK,
                cs0, cs1, cs2, cs3, bs0, bs1, bs2, bs3,
                DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """CB[b, c, g, t, s] = C_t · B_s for s ≤ t (tiles entirely above the diagonal are skipped)."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    gi = tl.program_id(2).to(tl.int64)
    nsb = tl.cdiv(CS, BLOCK_S)
    tb = pid_t // nsb
    sb = pid_t % nsb
    if sb * BLOCK_S <= tb * BLOCK_T + BLOCK_T - 1:
        clen = tl.minimum(CS, L - c * CS)
        ot = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        os = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        tm = ot < clen
        sm = os < clen
        pt = (c * CS + ot).to(tl.int64)
        ps = (c * CS + os).to(tl.int64)
        acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=ACC)
        for k0 in range(0, N, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            km = ok < N
            ct = tl.load(C_ptr + bi * cs0 + pt[:, None] * cs1 + gi * cs2 + ok[None, :] * cs3,
                         mask=tm[:, None] & km[None, :], other=0.0)
            bt = tl.load(B_ptr + bi * bs0 + ps[None, :] * bs1 + gi * bs2 + ok[:, None] * bs3,
                         mask=km[:, None] & sm[None, :], other=0.0)
            acc += tl.dot(ct.to(DOT), bt.to(DOT), input_precision=PREC, out_dtype=ACC)
        off = ((bi * NCHUNK + c) * G + gi) * CS * CS + ot[:, None] * CS + os[None, :]
        tl.store(cb_ptr + off, acc, mask=(ot[:, None] < CS) & (os[None, :] < CS))


@triton.jit
def _chunk_scan_kernel(x_ptr, z_ptr, C_ptr, cb_ptr, dtp_ptr, cum_ptr, S_ptr, D_ptr, out_ptr, y_ptr,
                       L, NH, P, N, HPG, G, CS, NCHUNK,
                       xs0, xs1, xs2, xs3, zs0, zs1, zs2, zs3, cs0, cs1, cs2, cs3, seq_ptr, ss0, ss1,
                       HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE_Y: tl.constexpr,
                       DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """y[t, p] for a (t, p) tile of one chunk and head: exp(cum_t)·(C S_cᵀ) + (CB ∘ decay ∘ Δ)·X + D x;
    out = y·silu(z). With SAVE_Y (z given, backward to follow) also stores y."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    npb = tl.cdiv(P, BLOCK_P)
    tb = pid_t // npb
    ot = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    op = (pid_t % npb) * BLOCK_P + tl.arange(0, BLOCK_P)
    clen = tl.minimum(CS, L - c * CS)
    tm = ot < clen
    pm = op < P
    pt = (c * CS + ot).to(tl.int64)
    cbase = ((bi * NH + hi) * NCHUNK + c) * CS
    cum_t = tl.load(cum_ptr + cbase + ot, mask=tm, other=0.0)
    sbase = ((bi * NCHUNK + c) * NH + hi) * P * N
    acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        on = n0 + tl.arange(0, BLOCK_N)
        nm = on < N
        ct = tl.load(C_ptr + bi * cs0 + pt[:, None] * cs1 + gi * cs2 + on[None, :] * cs3,
                     mask=tm[:, None] & nm[None, :], other=0.0)
        sv = tl.load(S_ptr + sbase + op[None, :] * N + on[:, None], mask=nm[:, None] & pm[None, :], other=0.0)
        acc += tl.dot(ct.to(DOT), sv.to(DOT), input_precision=PREC, out_dtype=ACC)
    keep_t = tm
    if HAS_SEQ:   # rows of a sequence that began inside this chunk see no carried state
        sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
        sq_t = tl.load(seq_ptr + bi * ss0 + pt * ss1, mask=tm, other=-1)
        keep_t = tm & (sq_t == sq_prev)
    acc = acc * tl.where(keep_t, tl.exp(cum_t), 0.0)[:, None]
    cbb = ((bi * NCHUNK + c) * G + gi) * CS * CS
    s_end = tl.minimum(clen, (tb + 1) * BLOCK_T)
    for s0 in range(0, s_end, BLOCK_K):
        os = s0 + tl.arange(0, BLOCK_K)
        sm = os < clen
        causal = tm[:, None] & sm[None, :] & (os[None, :] <= ot[:, None])
        ps = (c * CS + os).to(tl.int64)
        if HAS_SEQ:
            sq_s = tl.load(seq_ptr + bi * ss0 + ps * ss1, mask=sm, other=-2)
            causal = causal & (sq_s[None, :] == sq_t[:, None])
        cb = tl.load(cb_ptr + cbb + ot[:, None] * CS + os[None, :], mask=causal, other=0.0)
        cum_s = tl.load(cum_ptr + cbase + os, mask=sm, other=0.0)
        d_s = tl.load(dtp_ptr + cbase + os, mask=sm, other=0.0)
        w = tl.where(causal, cb * tl.exp(cum_t[:, None] - cum_s[None, :]), 0.0) * d_s[None, :]
        xs = tl.load(x_ptr + bi * xs0 + ps[:, None] * xs1 + hi * xs2 + op[None, :] * xs3,
                     mask=sm[:, None] & pm[None, :], other=0.0)
        acc += tl.dot(w.to(DOT), xs.to(DOT), input_precision=PREC, out_dtype=ACC)
    m2 = tm[:, None] & pm[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + bi * xs0 + pt[:, None] * xs1 + hi * xs2 + op[None, :] * xs3, mask=m2, other=0.0)
        acc += tl.load(D_ptr + hi * P + op, mask=pm, other=0.0).to(ACC)[None, :] * xt.to(ACC)
    oo = ((bi * L + pt[:, None]) * NH + hi) * P + op[None, :]
    if SAVE_Y:
        tl.store(y_ptr + oo, acc.to(y_ptr.dtype.element_ty), mask=m2)
    if HAS_Z:
        zt = tl.load(z_ptr + bi * zs0 + pt[:, None] * zs1 + hi * zs2 + op[None, :] * zs3, mask=m2, other=0.0)
        zt = zt.to(ACC)
        acc = acc * zt * sigmoid(zt)
    tl.store(out_ptr + oo, acc.to(out_ptr.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------- backward --------

@triton.jit
def _bwd_gate_kernel(gout_ptr, z_ptr, y_ptr, gy_ptr, dz_ptr, L, NH, P,
                     gs0, gs1, gs2, gs3, zs0, zs1, zs2, zs3,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """out = y·silu(z): gy = gout·z·σ(z), dz = gout·y·σ(z)(1 + z(1 − σ(z))), one pass over a block of
    time steps of one (batch, head). gy and dz are contiguous (b, l, h, p). (Batch and head come
    from the grid, not from dividing a flat row index: 64-bit division per element is slow and
    register-hungry.)"""
    t = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    bi = tl.program_id(1).to(tl.int64)
    hi = tl.program_id(2).to(tl.int64)
    op = tl.arange(0, BLOCK_P)
    rm = t < L
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + op
        m = rm[:, None] & (pp < P)[None, :]
        go = tl.load(gout_ptr + bi * gs0 + hi * gs2 + t[:, None] * gs1 + pp[None, :] * gs3, mask=m, other=0.0)
        zv = tl.load(z_ptr + bi * zs0 + hi * zs2 + t[:, None] * zs1 + pp[None, :] * zs3, mask=m, other=0.0)
        go = go.to(ACC)
        zv = zv.to(ACC)
        o = ((bi * L + t[:, None]) * NH + hi) * P + pp[None, :]
        yv = tl.load(y_ptr + o, mask=m, other=0.0).to(ACC)
        sg = sigmoid(zv)
        tl.store(gy_ptr + o, (go * zv * sg).to(gy_ptr.dtype.element_ty), mask=m)
        tl.store(dz_ptr + o, (go * yv * sg * (1.0 + zv * (1.0 - sg))).to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dstates_kernel(gy_ptr, C_ptr, cum_ptr, dS_ptr,
                        L, NH, P, N, HPG, CS, NCHUNK, cs0, cs1, cs2, cs3, seq_ptr, ss0, ss1,
                        HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dS_c[p, n] = Σ_t gy_t[p] exp(cum_t) C_t[n]  (gy contiguous (b, l, h, p))."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    nnb = tl.cdiv(N, BLOCK_N)
    op = (pid_t // nnb) * BLOCK_P + tl.arange(0, BLOCK_P)
    on = (pid_t % nnb) * BLOCK_N + tl.arange(0, BLOCK_N)
    pm = op < P
    nm = on < N
    clen = tl.minimum(CS, L - c * CS)
    cbase = ((bi * NH + hi) * NCHUNK + c) * CS
    if HAS_SEQ:
        sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    for k0 in range(0, clen, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        km = ok < clen
        pos = (c * CS + ok).to(tl.int64)
        gt = tl.load(gy_ptr + ((bi * L + pos[None, :]) * NH + hi) * P + op[:, None],
                     mask=pm[:, None] & km[None, :], other=0.0)
        ct = tl.load(C_ptr + bi * cs0 + pos[:, None] * cs1 + gi * cs2 + on[None, :] * cs3,
                     mask=km[:, None] & nm[None, :], other=0.0)
        cum_k = tl.load(cum_ptr + cbase + ok, mask=km, other=0.0)
        keep = km
        if HAS_SEQ:
            keep = keep & (tl.load(seq_ptr + bi * ss0 + pos * ss1, mask=km, other=-1) == sq_prev)
        ct = (ct.to(ACC) * tl.where(keep, tl.exp(cum_k), 0.0)[:, None]).to(DOT)
        acc += tl.dot(gt.to(DOT), ct, input_precision=PREC, out_dtype=ACC)
    so = (((bi * NCHUNK + c) * NH + hi) * P + op[:, None]) * N + on[None, :]
    tl.store(dS_ptr + so, acc, mask=pm[:, None] & nm[None, :])


@triton.jit
def _state_passing_bwd_kernel(dS_ptr, S_ptr, cum_ptr, gfinal_ptr, norm_ptr, par_ptr,
                              gst_ptr, dcl_ptr, dinit_ptr,
                              NH, PN, CS, NCHUNK, NBLK, L, seq_ptr, ss0, ss1,
                              HAS_SEQ: tl.constexpr, HAS_GFINAL: tl.constexpr, NORM_MAX: tl.constexpr,
                              ACC: tl.constexpr,
                              BLOCK: tl.constexpr):
    """Reverse of _state_passing_kernel. g_U (gradient at the state leaving chunk c, = gradient of
    states_c) goes to gst[c]; exp(cum_last_c)·⟨g_U, S_c⟩ to dcl[b, h, c, block]; the gradient at S_0
    to dinit. gS_c = dS_c + exp(cum_last_c) g_U_c; g_U_{c−1} = clip_τ'(U_{c−1})ᵀ gS_c."""
    bi = tl.program_id(1).to(tl.int64)
    hi = tl.program_id(2).to(tl.int64)
    bh = bi * NH + hi
    if not NORM_MAX:
        blk = tl.program_id(0).to(tl.int64)
        o = blk * BLOCK + tl.arange(0, BLOCK)
        m = o < PN
        if HAS_GFINAL:
            gU = tl.load(gfinal_ptr + bh * PN + o, mask=m, other=0.0).to(ACC)
        else:
            gU = tl.zeros([BLOCK], dtype=ACC)
        for cc in range(0, NCHUNK):
            c = NCHUNK - 1 - cc
            so = ((bi * NCHUNK + c) * NH + hi) * PN + o
            tl.store(gst_ptr + so, gU, mask=m)
            e = tl.exp(tl.load(cum_ptr + (bh * NCHUNK + c) * CS + CS - 1))
            if HAS_SEQ:
                sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
                e = tl.where(sq_prev == sq_last, e, 0.0)
            S = tl.load(S_ptr + so, mask=m, other=0.0)
            tl.store(dcl_ptr + (bh * NCHUNK + c) * NBLK + blk, e * tl.sum(gU * S, axis=0))
            gU = tl.load(dS_ptr + so, mask=m, other=0.0) + e * gU
        tl.store(dinit_ptr + bh * PN + o, gU, mask=m)
    else:
        tau = tl.load(par_ptr + 1).to(ACC)
        top = ((bi * NCHUNK + NCHUNK - 1) * NH + hi) * PN
        for o0 in range(0, PN, BLOCK):
            o = o0 + tl.arange(0, BLOCK)
            m = o < PN
            if HAS_GFINAL:
                gU = tl.load(gfinal_ptr + bh * PN + o, mask=m, other=0.0).to(ACC)
            else:
                gU = tl.zeros([BLOCK], dtype=ACC)
            tl.store(gst_ptr + top + o, gU, mask=m)
        tl.debug_barrier()
        for cc in range(0, NCHUNK):
            c = NCHUNK - 1 - cc
            so = ((bi * NCHUNK + c) * NH + hi) * PN
            e = tl.exp(tl.load(cum_ptr + (bh * NCHUNK + c) * CS + CS - 1))
            if HAS_SEQ:
                sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
                e = tl.where(sq_prev == sq_last, e, 0.0)
            dcl = tl.zeros([BLOCK], dtype=ACC)
            q = tl.zeros([BLOCK], dtype=ACC)
            for o0 in range(0, PN, BLOCK):  # pass 1: gS into dS (in place), ⟨g_U, S⟩, ⟨S, gS⟩
                o = o0 + tl.arange(0, BLOCK)
                m = o < PN
                gU = tl.load(gst_ptr + so + o, mask=m, other=0.0)
                S = tl.load(S_ptr + so + o, mask=m, other=0.0)
                gS = tl.load(dS_ptr + so + o, mask=m, other=0.0) + e * gU
                tl.store(dS_ptr + so + o, gS, mask=m)
                dcl += gU * S
                q += S * gS
            tl.store(dcl_ptr + (bh * NCHUNK + c) * NBLK, e * tl.sum(dcl, axis=0))
            tl.debug_barrier()
            # pass 2: through the clip at the start of chunk c (S_c = f·U_{c−1}, f = τ/‖U‖ < 1):
            # dU = (τ/‖U‖)(gS − ĥ⟨ĥ, gS⟩), ĥ = S_c/τ
            nrm = tl.load(norm_ptr + bh * NCHUNK + c)   # 0 at c = 0 (never clipped there)
            clip = (c > 0) & (nrm > tau)
            f = tl.where(clip, tau / tl.where(clip, nrm, tau), 1.0)
            qq = tl.where(clip, tl.sum(q, axis=0) / (tau * tau), 0.0)
            sp = ((bi * NCHUNK + c - 1) * NH + hi) * PN
            for o0 in range(0, PN, BLOCK):
                o = o0 + tl.arange(0, BLOCK)
                m = o < PN
                gS = tl.load(dS_ptr + so + o, mask=m, other=0.0)
                if c > 0:
                    S = tl.load(S_ptr + so + o, mask=m, other=0.0)
                    tl.store(gst_ptr + sp + o, f * (gS - S * qq), mask=m)
                else:
                    tl.store(dinit_ptr + bh * PN + o, gS, mask=m)
            tl.debug_barrier()


@triton.jit
def _bwd_dx_kernel(x_ptr, B_ptr, gy_ptr, y_ptr, cb_ptr, dtp_ptr, cum_ptr, gst_ptr, D_ptr,
                   dx_ptr, ddt_ptr, ddts_ptr, dcy_ptr, dD_ptr,
                   L, NH, P, N, HPG, G, CS, NCHUNK, NPB, NTB,
                   xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3, seq_ptr, ss0, ss1,
                   HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """For a (s, p) tile: W = exp(cum_last − cum_s)·(B_s g_Uᵀ) + Σ_{t ≥ s} CB[t, s] exp(cum_t − cum_s) gy_t;
    dx = Δ_s W + D gy. Per p-block partials: Σ_p x W (direct dΔ), Σ_p x W_state (its state part),
    Σ_p gy (y − D x) (row sums of the cum gradient); per (chunk, s-block) partials of dD."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    sb = pid_t // NPB
    pb = pid_t % NPB
    os = sb * BLOCK_T + tl.arange(0, BLOCK_T)
    op = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    clen = tl.minimum(CS, L - c * CS)
    sm = os < clen
    pm = op < P
    m2 = sm[:, None] & pm[None, :]
    ps = (c * CS + os).to(tl.int64)
    cbase = ((bi * NH + hi) * NCHUNK + c) * CS
    cum_s = tl.load(cum_ptr + cbase + os, mask=sm, other=0.0)
    d_s = tl.load(dtp_ptr + cbase + os, mask=sm, other=0.0)
    cl = tl.load(cum_ptr + cbase + CS - 1)
    # state part: B_s (n) · g_U[p, n]
    gbase = ((bi * NCHUNK + c) * NH + hi) * P * N
    accs = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        on = n0 + tl.arange(0, BLOCK_N)
        nm = on < N
        bt = tl.load(B_ptr + bi * bs0 + ps[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                     mask=sm[:, None] & nm[None, :], other=0.0)
        gu = tl.load(gst_ptr + gbase + op[None, :] * N + on[:, None], mask=nm[:, None] & pm[None, :], other=0.0)
        accs += tl.dot(bt.to(DOT), gu.to(DOT), input_precision=PREC, out_dtype=ACC)
    keep_s = sm
    if HAS_SEQ:   # only the chunk's last sequence reaches the state leaving it
        sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
        sq_s = tl.load(seq_ptr + bi * ss0 + ps * ss1, mask=sm, other=-1)
        keep_s = sm & (sq_s == sq_last)
    accs = accs * tl.where(keep_s, tl.exp(cl - cum_s), 0.0)[:, None]
    # intra-chunk part: Σ_{t ≥ s} CB[t, s] exp(cum_t − cum_s) gy_t
    acc = accs
    cbb = ((bi * NCHUNK + c) * G + gi) * CS * CS
    for t0 in range(sb * BLOCK_T, clen, BLOCK_K):
        ot = t0 + tl.arange(0, BLOCK_K)
        tm = ot < clen
        causal = sm[:, None] & tm[None, :] & (ot[None, :] >= os[:, None])
        pt = (c * CS + ot).to(tl.int64)
        if HAS_SEQ:
            sq_t = tl.load(seq_ptr + bi * ss0 + pt * ss1, mask=tm, other=-2)
            causal = causal & (sq_t[None, :] == sq_s[:, None])
        cbt = tl.load(cb_ptr + cbb + ot[None, :] * CS + os[:, None], mask=causal, other=0.0)
        cum_t = tl.load(cum_ptr + cbase + ot, mask=tm, other=0.0)
        w = tl.where(causal, cbt * tl.exp(cum_t[None, :] - cum_s[:, None]), 0.0)
        gt = tl.load(gy_ptr + ((bi * L + pt[:, None]) * NH + hi) * P + op[None, :],
                     mask=tm[:, None] & pm[None, :], other=0.0)
        acc += tl.dot(w.to(DOT), gt.to(DOT), input_precision=PREC, out_dtype=ACC)
    xs = tl.load(x_ptr + bi * xs0 + ps[:, None] * xs1 + hi * xs2 + op[None, :] * xs3, mask=m2, other=0.0).to(ACC)
    rows = ((bi * L + ps[:, None]) * NH + hi) * P + op[None, :]
    gs = tl.load(gy_ptr + rows, mask=m2, other=0.0).to(ACC)
    ys = tl.load(y_ptr + rows, mask=m2, other=0.0).to(ACC)
    dx = d_s[:, None] * acc
    if HAS_D:
        Dv = tl.load(D_ptr + hi * P + op, mask=pm, other=0.0).to(ACC)
        dx += Dv[None, :] * gs
        ys -= Dv[None, :] * xs
        tl.store(dD_ptr + (((bi * NCHUNK + c) * NTB + sb) * NH + hi) * P + op, tl.sum(gs * xs, axis=0), mask=pm)
    tl.store(dx_ptr + rows, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    part = (cbase * NPB + pb * CS) + os   # layout (b, h, c, NPB, CS)
    tl.store(ddt_ptr + part, tl.sum(xs * acc, axis=1), mask=os < CS)
    tl.store(ddts_ptr + part, tl.sum(xs * accs, axis=1), mask=os < CS)
    tl.store(dcy_ptr + part, tl.sum(gs * ys, axis=1), mask=os < CS)


@triton.jit
def _bwd_dcb_kernel(gy_ptr, x_ptr, dtp_ptr, cum_ptr, dcb_ptr,
                    L, NH, P, HPG, G, CS, NCHUNK,
                    xs0, xs1, xs2, xs3, seq_ptr, ss0, ss1,
                    HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """dCB[t, s] = Σ_{h in group} exp(cum_t − cum_s) Δ_s (gy_t · x_s), s ≤ t."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    gi = tl.program_id(2).to(tl.int64)
    nsb = tl.cdiv(CS, BLOCK_S)
    tb = pid_t // nsb
    sb = pid_t % nsb
    if sb * BLOCK_S <= tb * BLOCK_T + BLOCK_T - 1:
        clen = tl.minimum(CS, L - c * CS)
        ot = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        os = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        tm = ot < clen
        sm = os < clen
        causal = tm[:, None] & sm[None, :] & (os[None, :] <= ot[:, None])
        pt = (c * CS + ot).to(tl.int64)
        ps = (c * CS + os).to(tl.int64)
        if HAS_SEQ:
            sq_t = tl.load(seq_ptr + bi * ss0 + pt * ss1, mask=tm, other=-1)
            sq_s = tl.load(seq_ptr + bi * ss0 + ps * ss1, mask=sm, other=-2)
            causal = causal & (sq_s[None, :] == sq_t[:, None])
        acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=ACC)
        for j in range(0, HPG):
            hi = gi * HPG + j
            cbase = ((bi * NH + hi) * NCHUNK + c) * CS
            dot = tl.zeros([BLOCK_T, BLOCK_S], dtype=ACC)
            for k0 in range(0, P, BLOCK_K):
                ok = k0 + tl.arange(0, BLOCK_K)
                km = ok < P
                gt = tl.load(gy_ptr + ((bi * L + pt[:, None]) * NH + hi) * P + ok[None, :],
                             mask=tm[:, None] & km[None, :], other=0.0)
                xt = tl.load(x_ptr + bi * xs0 + ps[None, :] * xs1 + hi * xs2 + ok[:, None] * xs3,
                             mask=km[:, None] & sm[None, :], other=0.0)
                dot += tl.dot(gt.to(DOT), xt.to(DOT), input_precision=PREC, out_dtype=ACC)
            cum_t = tl.load(cum_ptr + cbase + ot, mask=tm, other=0.0)
            cum_s = tl.load(cum_ptr + cbase + os, mask=sm, other=0.0)
            d_s = tl.load(dtp_ptr + cbase + os, mask=sm, other=0.0)
            acc += tl.where(causal, dot * tl.exp(cum_t[:, None] - cum_s[None, :]), 0.0) * d_s[None, :]
        off = ((bi * NCHUNK + c) * G + gi) * CS * CS + ot[:, None] * CS + os[None, :]
        tl.store(dcb_ptr + off, acc, mask=(ot[:, None] < CS) & (os[None, :] < CS))


@triton.jit
def _bwd_dbc_kernel(x_ptr, gy_ptr, B_ptr, C_ptr, dcb_ptr, dtp_ptr, cum_ptr, S_ptr, gst_ptr, dB_ptr, dC_ptr,
                    L, NH, P, N, HPG, G, CS, NCHUNK,
                    xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3, cs0, cs1, cs2, cs3, seq_ptr, ss0, ss1,
                    HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For rows r of a chunk and an n tile, summed over the group's heads:
    dC_r = Σ_h exp(cum_r) gy_r S_c + Σ_{s ≤ r} dCB[r, s] B_s;
    dB_r = Σ_h exp(cum_last − cum_r) Δ_r x_r g_U + Σ_{t ≥ r} dCB[t, r] C_t.  Stored fp32 (b, l, g, n)."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    gi = tl.program_id(2).to(tl.int64)
    nnb = tl.cdiv(N, BLOCK_N)
    tb = pid_t // nnb
    orr = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    on = (pid_t % nnb) * BLOCK_N + tl.arange(0, BLOCK_N)
    clen = tl.minimum(CS, L - c * CS)
    rm = orr < clen
    nm = on < N
    pr = (c * CS + orr).to(tl.int64)
    keep_c = rm   # rows that see the carried state (dC's state term)
    keep_b = rm   # rows that reach the state leaving the chunk (dB's state term)
    if HAS_SEQ:
        sq_prev, sq_last = _seq_ends(seq_ptr, bi, c, L, CS, ss0, ss1)
        sq_r = tl.load(seq_ptr + bi * ss0 + pr * ss1, mask=rm, other=-1)
        keep_c = rm & (sq_r == sq_prev)
        keep_b = rm & (sq_r == sq_last)
    accc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
    accb = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
    for j in range(0, HPG):
        hi = gi * HPG + j
        cbase = ((bi * NH + hi) * NCHUNK + c) * CS
        sbase = ((bi * NCHUNK + c) * NH + hi) * P * N
        tc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
        tb_ = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
        for k0 in range(0, P, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            km = ok < P
            gt = tl.load(gy_ptr + ((bi * L + pr[:, None]) * NH + hi) * P + ok[None, :],
                         mask=rm[:, None] & km[None, :], other=0.0)
            sv = tl.load(S_ptr + sbase + ok[:, None] * N + on[None, :], mask=km[:, None] & nm[None, :], other=0.0)
            tc += tl.dot(gt.to(DOT), sv.to(DOT), input_precision=PREC, out_dtype=ACC)
            xt = tl.load(x_ptr + bi * xs0 + pr[:, None] * xs1 + hi * xs2 + ok[None, :] * xs3,
                         mask=rm[:, None] & km[None, :], other=0.0)
            gu = tl.load(gst_ptr + sbase + ok[:, None] * N + on[None, :], mask=km[:, None] & nm[None, :], other=0.0)
            tb_ += tl.dot(xt.to(DOT), gu.to(DOT), input_precision=PREC, out_dtype=ACC)
        cum_r = tl.load(cum_ptr + cbase + orr, mask=rm, other=0.0)
        d_r = tl.load(dtp_ptr + cbase + orr, mask=rm, other=0.0)
        cl = tl.load(cum_ptr + cbase + CS - 1)
        accc += tc * tl.where(keep_c, tl.exp(cum_r), 0.0)[:, None]
        accb += tb_ * (tl.where(keep_b, tl.exp(cl - cum_r), 0.0) * d_r)[:, None]
    cbb = ((bi * NCHUNK + c) * G + gi) * CS * CS
    r_end = tl.minimum(clen, (tb + 1) * BLOCK_T)
    for s0 in range(0, r_end, BLOCK_K):   # dC += dCB[r, s] B_s, s ≤ r
        os = s0 + tl.arange(0, BLOCK_K)
        sm = os < clen
        causal = rm[:, None] & sm[None, :] & (os[None, :] <= orr[:, None])
        w = tl.load(dcb_ptr + cbb + orr[:, None] * CS + os[None, :], mask=causal, other=0.0)
        ps = (c * CS + os).to(tl.int64)
        bt = tl.load(B_ptr + bi * bs0 + ps[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                     mask=sm[:, None] & nm[None, :], other=0.0)
        accc += tl.dot(w.to(DOT), bt.to(DOT), input_precision=PREC, out_dtype=ACC)
    for t0 in range(tb * BLOCK_T, clen, BLOCK_K):   # dB += dCB[t, r] C_t, t ≥ r
        ot = t0 + tl.arange(0, BLOCK_K)
        tm = ot < clen
        causal = rm[:, None] & tm[None, :] & (ot[None, :] >= orr[:, None])
        w = tl.load(dcb_ptr + cbb + ot[None, :] * CS + orr[:, None], mask=causal, other=0.0)
        pt = (c * CS + ot).to(tl.int64)
        ct = tl.load(C_ptr + bi * cs0 + pt[:, None] * cs1 + gi * cs2 + on[None, :] * cs3,
                     mask=tm[:, None] & nm[None, :], other=0.0)
        accb += tl.dot(w.to(DOT), ct.to(DOT), input_precision=PREC, out_dtype=ACC)
    oo = ((bi * L + pr[:, None]) * G + gi) * N + on[None, :]
    m2 = rm[:, None] & nm[None, :]
    tl.store(dC_ptr + oo, accc, mask=m2)
    tl.store(dB_ptr + oo, accb, mask=m2)


@triton.jit
def _cumsum_bwd_kernel(dt_ptr, A_ptr, bias_ptr, par_ptr, dtp_ptr, ddtp_ptr, ddts_ptr, dcy_ptr, dcl_ptr,
                       ddt_ptr, dA_ptr, dbias_ptr,
                       L, NH, CS, NCHUNK, NPB, NBLK, ds0, ds1, ds2,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_CS: tl.constexpr, BLOCK_B: tl.constexpr):
    """dcum_t = Σ_p gy(y − Dx) − Δ_t·(direct dΔ_t) (+ the state terms at the chunk's last step);
    d log a_r = Σ_{t ≥ r} dcum_t; dΔ = direct + A·d log a; back through clamp and softplus."""
    bi, c = _chunk_ids(NCHUNK)
    hi = tl.program_id(1).to(tl.int64)
    dt_min = tl.load(par_ptr + 2).to(ACC)
    dt_max = tl.load(par_ptr + 3).to(ACC)
    Ah = tl.load(A_ptr + hi).to(ACC)
    ot = tl.arange(0, BLOCK_CS)
    pos = c * CS + ot
    valid = (ot < CS) & (pos < L)
    cbase = ((bi * NH + hi) * NCHUNK + c) * CS
    d = tl.load(dtp_ptr + cbase + ot, mask=valid, other=0.0)
    ddt = tl.zeros([BLOCK_CS], dtype=ACC)
    dds = tl.zeros([BLOCK_CS], dtype=ACC)
    dcy = tl.zeros([BLOCK_CS], dtype=ACC)
    for pb in range(0, NPB):
        part = cbase * NPB + pb * CS + ot
        ddt += tl.load(ddtp_ptr + part, mask=valid, other=0.0)
        dds += tl.load(ddts_ptr + part, mask=valid, other=0.0)
        dcy += tl.load(dcy_ptr + part, mask=valid, other=0.0)
    ob = tl.arange(0, BLOCK_B)
    dcl = tl.sum(tl.load(dcl_ptr + ((bi * NH + hi) * NCHUNK + c) * NBLK + ob, mask=ob < NBLK, other=0.0), axis=0)
    dcl += tl.sum(d * dds, axis=0)   # states_c's decay exp(cum_last − cum_s): the cum_last side
    dcum = dcy - d * ddt + tl.where(ot == CS - 1, dcl, 0.0)
    dla = tl.cumsum(dcum, axis=0, reverse=True)
    dla = tl.where(valid, dla, 0.0)
    dd = ddt + dla * Ah
    raw = tl.load(dt_ptr + bi * ds0 + pos * ds1 + hi * ds2, mask=valid, other=0.0).to(ACC)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hi).to(ACC)
    dg = tl.full([BLOCK_CS], 1.0, ACC)
    pre = raw
    if SOFTPLUS:
        dg = tl.where(raw > 20.0, 1.0, sigmoid(raw))
        pre = softplus(raw)
    dg = tl.where((pre < dt_min) | (pre > dt_max), 0.0, dg)   # torch.clamp's gradient (inclusive)
    g = tl.where(valid, dd * dg, 0.0)
    tl.store(ddt_ptr + (bi * L + pos) * NH + hi, g, mask=valid)
    tl.store(dA_ptr + (bi * NCHUNK + c) * NH + hi, tl.sum(dla * d, axis=0))
    tl.store(dbias_ptr + (bi * NCHUNK + c) * NH + hi, tl.sum(g, axis=0))


# ------------------------------------------------------------------- sliding window (window=W) ---
# y_t = C_t·Σ_{s=t−W+1..t} P(s, t] Δ_s x_s B_sᵀ + D x_t with P(s, t] = Π_{r=s+1..t} a_r: a banded
# "attention" over the last W steps (no carried state). The decay between chunks is
# exp(cum_t − cum_s + Σ_{chunks c_s ≤ c' < c_t} cum_last_{c'}): a sum over at most W/chunk + 1
# chunk totals, so no long-range cumulative sum (and its fp32 cancellation) is ever formed.

@triton.jit
def _zero_scalar(ACC: tl.constexpr):
    return tl.sum(tl.zeros([1], dtype=ACC), axis=0)


@triton.jit
def _window_scan_kernel(x_ptr, z_ptr, B_ptr, C_ptr, dtp_ptr, cum_ptr, D_ptr, out_ptr, y_ptr,
                        L, NH, P, N, HPG, CS, NCHUNK, W,
                        xs0, xs1, xs2, xs3, zs0, zs1, zs2, zs3, bs0, bs1, bs2, bs3, cs0, cs1, cs2, cs3,
                        seq_ptr, ss0, ss1,
                        HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE_Y: tl.constexpr,
                        DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """y for a (t, p) tile: Σ over s in (t − W, t] of (C_t·B_s) P(s, t] Δ_s x_s, then D and the gate."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    npb = tl.cdiv(P, BLOCK_P)
    tb = pid_t // npb
    ot = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    op = (pid_t % npb) * BLOCK_P + tl.arange(0, BLOCK_P)
    clen = tl.minimum(CS, L - c * CS)
    tm = ot < clen
    pm = op < P
    pt = (c * CS + ot).to(tl.int64)
    cum_t = tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c) * CS + ot, mask=tm, other=0.0)
    if HAS_SEQ:
        sq_t = tl.load(seq_ptr + bi * ss0 + pt * ss1, mask=tm, other=-1)
    t_first = c * CS + tb * BLOCK_T
    t_last = tl.minimum(L, t_first + BLOCK_T) - 1
    s_min = tl.maximum(t_first - W + 1, 0)
    acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
    off = _zero_scalar(ACC)
    for cc in range(0, c - s_min // CS + 1):
        c2 = c - cc
        cb2 = ((bi * NH + hi) * NCHUNK + c2) * CS
        off += tl.where(cc > 0, tl.load(cum_ptr + cb2 + CS - 1), 0.0)
        s_lo = tl.maximum(s_min - c2 * CS, 0)
        s_hi = tl.minimum(t_last - c2 * CS + 1, CS)
        for s0 in range(s_lo, s_hi, BLOCK_K):
            os = s0 + tl.arange(0, BLOCK_K)
            sm = os < s_hi
            ps = (c2 * CS + os).to(tl.int64)
            band = tm[:, None] & sm[None, :] & (ps[None, :] <= pt[:, None]) & (ps[None, :] > pt[:, None] - W)
            if HAS_SEQ:
                sq_s = tl.load(seq_ptr + bi * ss0 + ps * ss1, mask=sm, other=-2)
                band = band & (sq_s[None, :] == sq_t[:, None])
            cb = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
            for n0 in range(0, N, BLOCK_N):
                on = n0 + tl.arange(0, BLOCK_N)
                nm = on < N
                ct = tl.load(C_ptr + bi * cs0 + pt[:, None] * cs1 + gi * cs2 + on[None, :] * cs3,
                             mask=tm[:, None] & nm[None, :], other=0.0)
                bt = tl.load(B_ptr + bi * bs0 + ps[None, :] * bs1 + gi * bs2 + on[:, None] * bs3,
                             mask=nm[:, None] & sm[None, :], other=0.0)
                cb += tl.dot(ct.to(DOT), bt.to(DOT), input_precision=PREC, out_dtype=ACC)
            cum_s = tl.load(cum_ptr + cb2 + os, mask=sm, other=0.0)
            d_s = tl.load(dtp_ptr + cb2 + os, mask=sm, other=0.0)
            w = tl.where(band, cb * tl.exp(cum_t[:, None] - cum_s[None, :] + off), 0.0) * d_s[None, :]
            xs = tl.load(x_ptr + bi * xs0 + ps[:, None] * xs1 + hi * xs2 + op[None, :] * xs3,
                         mask=sm[:, None] & pm[None, :], other=0.0)
            acc += tl.dot(w.to(DOT), xs.to(DOT), input_precision=PREC, out_dtype=ACC)
    m2 = tm[:, None] & pm[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + bi * xs0 + pt[:, None] * xs1 + hi * xs2 + op[None, :] * xs3, mask=m2, other=0.0)
        acc += tl.load(D_ptr + hi * P + op, mask=pm, other=0.0).to(ACC)[None, :] * xt.to(ACC)
    oo = ((bi * L + pt[:, None]) * NH + hi) * P + op[None, :]
    if SAVE_Y:
        tl.store(y_ptr + oo, acc.to(y_ptr.dtype.element_ty), mask=m2)
    if HAS_Z:
        zt = tl.load(z_ptr + bi * zs0 + pt[:, None] * zs1 + hi * zs2 + op[None, :] * zs3, mask=m2, other=0.0)
        zt = zt.to(ACC)
        acc = acc * zt * sigmoid(zt)
    tl.store(out_ptr + oo, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _window_final_kernel(x_ptr, B_ptr, dtp_ptr, cum_ptr, final_ptr,
                         L, NH, P, N, HPG, CS, NCHUNK, W,
                         xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3, seq_ptr, ss0, ss1,
                         HAS_SEQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The windowed final state Σ_{s > L−1−W} P(s, L−1] Δ_s x_s ⊗ B_s (of the last sequence with seq_idx)."""
    pid_t = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    nnb = tl.cdiv(N, BLOCK_N)
    op = (pid_t // nnb) * BLOCK_P + tl.arange(0, BLOCK_P)
    on = (pid_t % nnb) * BLOCK_N + tl.arange(0, BLOCK_N)
    pm = op < P
    nm = on < N
    c_last = (L - 1) // CS
    cl_end = tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c_last) * CS + CS - 1)
    if HAS_SEQ:
        sq_end = tl.load(seq_ptr + bi * ss0 + (L - 1) * ss1)
    s_min = tl.maximum(L - W, 0)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    off = _zero_scalar(ACC)
    for cc in range(0, c_last - s_min // CS + 1):
        c2 = c_last - cc
        cb2 = ((bi * NH + hi) * NCHUNK + c2) * CS
        off += tl.where(cc > 0, tl.load(cum_ptr + cb2 + CS - 1), 0.0)
        s_lo = tl.maximum(s_min - c2 * CS, 0)
        s_hi = tl.minimum(L - c2 * CS, CS)
        for k0 in range(s_lo, s_hi, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            km = ok < s_hi
            pos = (c2 * CS + ok).to(tl.int64)
            keep = km
            if HAS_SEQ:
                keep = keep & (tl.load(seq_ptr + bi * ss0 + pos * ss1, mask=km, other=-1) == sq_end)
            xt = tl.load(x_ptr + bi * xs0 + pos[None, :] * xs1 + hi * xs2 + op[:, None] * xs3,
                         mask=pm[:, None] & km[None, :], other=0.0)
            bt = tl.load(B_ptr + bi * bs0 + pos[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                         mask=km[:, None] & nm[None, :], other=0.0)
            cum_k = tl.load(cum_ptr + cb2 + ok, mask=km, other=0.0)
            d_k = tl.load(dtp_ptr + cb2 + ok, mask=km, other=0.0)
            sc = tl.where(keep, tl.exp(cl_end - cum_k + off) * d_k, 0.0)
            acc += tl.dot(xt.to(DOT), (bt.to(ACC) * sc[:, None]).to(DOT), input_precision=PREC, out_dtype=ACC)
    tl.store(final_ptr + ((bi * NH + hi) * P + op[:, None]) * N + on[None, :], acc, mask=pm[:, None] & nm[None, :])


@triton.jit
def _window_dx_kernel(x_ptr, B_ptr, C_ptr, gy_ptr, y_ptr, dtp_ptr, cum_ptr, gfinal_ptr, D_ptr,
                      dx_ptr, ddt_ptr, dcy_ptr, dD_ptr,
                      L, NH, P, N, HPG, CS, NCHUNK, NPB, NTB, W,
                      xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3, cs0, cs1, cs2, cs3, seq_ptr, ss0, ss1,
                      HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, HAS_GFINAL: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """For an (s, p) tile: V = Σ_{t in [s, s+W)} (C_t·B_s) P(s, t] gy_t (+ P(s, L−1] B_s gFᵀ for the
    final state); dx = Δ_s V + D gy; partials Σ_p x V (direct dΔ) and Σ_p gy (y − D x)."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    hi = tl.program_id(2).to(tl.int64)
    gi = hi // HPG
    sb = pid_t // NPB
    pb = pid_t % NPB
    os = sb * BLOCK_T + tl.arange(0, BLOCK_T)
    op = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    clen = tl.minimum(CS, L - c * CS)
    sm = os < clen
    pm = op < P
    m2 = sm[:, None] & pm[None, :]
    ps = (c * CS + os).to(tl.int64)
    cbase = ((bi * NH + hi) * NCHUNK + c) * CS
    cum_s = tl.load(cum_ptr + cbase + os, mask=sm, other=0.0)
    d_s = tl.load(dtp_ptr + cbase + os, mask=sm, other=0.0)
    if HAS_SEQ:
        sq_s = tl.load(seq_ptr + bi * ss0 + ps * ss1, mask=sm, other=-1)
    s_first = c * CS + sb * BLOCK_T
    s_last = tl.minimum(L, s_first + BLOCK_T) - 1
    t_max = tl.minimum(s_last + W - 1, L - 1)
    acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
    off = _zero_scalar(ACC)
    for cc in range(0, t_max // CS - c + 1):
        c2 = c + cc
        cb2 = ((bi * NH + hi) * NCHUNK + c2) * CS
        off += tl.load(cum_ptr + cb2 - 1, mask=cc > 0, other=0.0)   # cum_last of chunk c2 − 1 (none for cc = 0)
        t_lo = tl.maximum(s_first - c2 * CS, 0)
        t_hi = tl.minimum(t_max - c2 * CS + 1, CS)
        for t0 in range(t_lo, t_hi, BLOCK_K):
            ot = t0 + tl.arange(0, BLOCK_K)
            tm = ot < t_hi
            pt = (c2 * CS + ot).to(tl.int64)
            band = sm[:, None] & tm[None, :] & (pt[None, :] >= ps[:, None]) & (pt[None, :] < ps[:, None] + W)
            if HAS_SEQ:
                sq_t = tl.load(seq_ptr + bi * ss0 + pt * ss1, mask=tm, other=-2)
                band = band & (sq_t[None, :] == sq_s[:, None])
            cbt = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
            for n0 in range(0, N, BLOCK_N):
                on = n0 + tl.arange(0, BLOCK_N)
                nm = on < N
                bt = tl.load(B_ptr + bi * bs0 + ps[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                             mask=sm[:, None] & nm[None, :], other=0.0)
                ct = tl.load(C_ptr + bi * cs0 + pt[None, :] * cs1 + gi * cs2 + on[:, None] * cs3,
                             mask=nm[:, None] & tm[None, :], other=0.0)
                cbt += tl.dot(bt.to(DOT), ct.to(DOT), input_precision=PREC, out_dtype=ACC)
            cum_t = tl.load(cum_ptr + cb2 + ot, mask=tm, other=0.0)
            w = tl.where(band, cbt * tl.exp(cum_t[None, :] - cum_s[:, None] + off), 0.0)
            gt = tl.load(gy_ptr + ((bi * L + pt[:, None]) * NH + hi) * P + op[None, :],
                         mask=tm[:, None] & pm[None, :], other=0.0)
            acc += tl.dot(w.to(DOT), gt.to(DOT), input_precision=PREC, out_dtype=ACC)
    if HAS_GFINAL:
        if s_last > L - 1 - W:   # some rows of this tile are inside the final state's window
            c_last = (L - 1) // CS
            offf = _zero_scalar(ACC)
            for c3 in range(c, c_last):
                offf += tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c3) * CS + CS - 1)
            cl_end = tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c_last) * CS + CS - 1)
            keep = sm & (ps > L - 1 - W)
            if HAS_SEQ:
                keep = keep & (sq_s == tl.load(seq_ptr + bi * ss0 + (L - 1) * ss1))
            accf = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
            for n0 in range(0, N, BLOCK_N):
                on = n0 + tl.arange(0, BLOCK_N)
                nm = on < N
                bt = tl.load(B_ptr + bi * bs0 + ps[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                             mask=sm[:, None] & nm[None, :], other=0.0)
                gf = tl.load(gfinal_ptr + ((bi * NH + hi) * P + op[None, :]) * N + on[:, None],
                             mask=nm[:, None] & pm[None, :], other=0.0)
                accf += tl.dot(bt.to(DOT), gf.to(DOT), input_precision=PREC, out_dtype=ACC)
            acc += accf * tl.where(keep, tl.exp(cl_end - cum_s + offf), 0.0)[:, None]
    xs = tl.load(x_ptr + bi * xs0 + ps[:, None] * xs1 + hi * xs2 + op[None, :] * xs3, mask=m2, other=0.0).to(ACC)
    rows = ((bi * L + ps[:, None]) * NH + hi) * P + op[None, :]
    gs = tl.load(gy_ptr + rows, mask=m2, other=0.0).to(ACC)
    ys = tl.load(y_ptr + rows, mask=m2, other=0.0).to(ACC)
    dx = d_s[:, None] * acc
    if HAS_D:
        Dv = tl.load(D_ptr + hi * P + op, mask=pm, other=0.0).to(ACC)
        dx += Dv[None, :] * gs
        ys -= Dv[None, :] * xs
        tl.store(dD_ptr + (((bi * NCHUNK + c) * NTB + sb) * NH + hi) * P + op, tl.sum(gs * xs, axis=0), mask=pm)
    tl.store(dx_ptr + rows, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    part = (cbase * NPB + pb * CS) + os
    tl.store(ddt_ptr + part, tl.sum(xs * acc, axis=1), mask=os < CS)
    tl.store(dcy_ptr + part, tl.sum(gs * ys, axis=1), mask=os < CS)


@triton.jit
def _window_dbc_kernel(x_ptr, gy_ptr, B_ptr, C_ptr, dtp_ptr, cum_ptr, gfinal_ptr, out_ptr,
                       L, NH, P, N, HPG, G, CS, NCHUNK, W,
                       xs0, xs1, xs2, xs3, bs0, bs1, bs2, bs3, cs0, cs1, cs2, cs3, seq_ptr, ss0, ss1,
                       IS_DB: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_GFINAL: tl.constexpr,
                       DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dC (IS_DB False): dC_r = Σ_h Σ_{s in (r−W, r]} (gy_r·x_s) P(s, r] Δ_s B_s;
    dB (IS_DB True):  dB_r = Σ_h Σ_{t in [r, r+W)} (gy_t·x_r) P(r, t] Δ_r C_t (+ the final state's
    P(r, L−1] Δ_r x_r g_F). Rows r of one chunk, an n tile, summed over the group's heads; fp32 (b, l, g, n)."""
    bi, c = _chunk_ids(NCHUNK)
    pid_t = tl.program_id(1)
    gi = tl.program_id(2).to(tl.int64)
    nnb = tl.cdiv(N, BLOCK_N)
    tb = pid_t // nnb
    orr = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    on = (pid_t % nnb) * BLOCK_N + tl.arange(0, BLOCK_N)
    clen = tl.minimum(CS, L - c * CS)
    rm = orr < clen
    nm = on < N
    pr = (c * CS + orr).to(tl.int64)
    if HAS_SEQ:
        sq_r = tl.load(seq_ptr + bi * ss0 + pr * ss1, mask=rm, other=-1)
    r_first = c * CS + tb * BLOCK_T
    r_last = tl.minimum(L, r_first + BLOCK_T) - 1
    if IS_DB:
        o_min = r_first
        o_max = tl.minimum(r_last + W - 1, L - 1)
        c_from = c
        n_c = o_max // CS - c + 1
    else:
        o_min = tl.maximum(r_first - W + 1, 0)
        o_max = r_last
        c_from = c
        n_c = c - o_min // CS + 1
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
    for j in range(0, HPG):
        hi = gi * HPG + j
        cbase = ((bi * NH + hi) * NCHUNK + c) * CS
        cum_r = tl.load(cum_ptr + cbase + orr, mask=rm, other=0.0)
        d_r = tl.load(dtp_ptr + cbase + orr, mask=rm, other=0.0)
        off = _zero_scalar(ACC)
        for cc in range(0, n_c):
            if IS_DB:
                c2 = c_from + cc
                off += tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c2) * CS - 1, mask=cc > 0, other=0.0)
            else:
                c2 = c_from - cc
                off += tl.where(cc > 0, tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c2) * CS + CS - 1), 0.0)
            cb2 = ((bi * NH + hi) * NCHUNK + c2) * CS
            o_lo = tl.maximum(o_min - c2 * CS, 0)
            o_hi = tl.minimum(o_max - c2 * CS + 1, CS)
            for k0 in range(o_lo, o_hi, BLOCK_K):
                ok = k0 + tl.arange(0, BLOCK_K)
                km = ok < o_hi
                po = (c2 * CS + ok).to(tl.int64)
                if IS_DB:   # other index = t ≥ r
                    band = rm[:, None] & km[None, :] & (po[None, :] >= pr[:, None]) & (po[None, :] < pr[:, None] + W)
                else:       # other index = s ≤ r
                    band = rm[:, None] & km[None, :] & (po[None, :] <= pr[:, None]) & (po[None, :] > pr[:, None] - W)
                if HAS_SEQ:
                    sq_o = tl.load(seq_ptr + bi * ss0 + po * ss1, mask=km, other=-2)
                    band = band & (sq_o[None, :] == sq_r[:, None])
                dm = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
                for p0 in range(0, P, BLOCK_K):
                    opp = p0 + tl.arange(0, BLOCK_K)
                    ppm = opp < P
                    if IS_DB:   # x_r · gy_t
                        a_ = tl.load(x_ptr + bi * xs0 + pr[:, None] * xs1 + hi * xs2 + opp[None, :] * xs3,
                                     mask=rm[:, None] & ppm[None, :], other=0.0)
                        b_ = tl.load(gy_ptr + ((bi * L + po[None, :]) * NH + hi) * P + opp[:, None],
                                     mask=ppm[:, None] & km[None, :], other=0.0)
                    else:       # gy_r · x_s
                        a_ = tl.load(gy_ptr + ((bi * L + pr[:, None]) * NH + hi) * P + opp[None, :],
                                     mask=rm[:, None] & ppm[None, :], other=0.0)
                        b_ = tl.load(x_ptr + bi * xs0 + po[None, :] * xs1 + hi * xs2 + opp[:, None] * xs3,
                                     mask=ppm[:, None] & km[None, :], other=0.0)
                    dm += tl.dot(a_.to(DOT), b_.to(DOT), input_precision=PREC, out_dtype=ACC)
                cum_o = tl.load(cum_ptr + cb2 + ok, mask=km, other=0.0)
                if IS_DB:
                    w = tl.where(band, dm * tl.exp(cum_o[None, :] - cum_r[:, None] + off), 0.0) * d_r[:, None]
                    mt = tl.load(C_ptr + bi * cs0 + po[:, None] * cs1 + gi * cs2 + on[None, :] * cs3,
                                 mask=km[:, None] & nm[None, :], other=0.0)
                else:
                    d_o = tl.load(dtp_ptr + cb2 + ok, mask=km, other=0.0)
                    w = tl.where(band, dm * tl.exp(cum_r[:, None] - cum_o[None, :] + off), 0.0) * d_o[None, :]
                    mt = tl.load(B_ptr + bi * bs0 + po[:, None] * bs1 + gi * bs2 + on[None, :] * bs3,
                                 mask=km[:, None] & nm[None, :], other=0.0)
                acc += tl.dot(w.to(DOT), mt.to(DOT), input_precision=PREC, out_dtype=ACC)
        if IS_DB:
            if HAS_GFINAL:
                if r_last > L - 1 - W:
                    c_last = (L - 1) // CS
                    offf = _zero_scalar(ACC)
                    for c3 in range(c, c_last):
                        offf += tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c3) * CS + CS - 1)
                    cl_end = tl.load(cum_ptr + ((bi * NH + hi) * NCHUNK + c_last) * CS + CS - 1)
                    keep = rm & (pr > L - 1 - W)
                    if HAS_SEQ:
                        keep = keep & (sq_r == tl.load(seq_ptr + bi * ss0 + (L - 1) * ss1))
                    accf = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
                    for p0 in range(0, P, BLOCK_K):
                        opp = p0 + tl.arange(0, BLOCK_K)
                        ppm = opp < P
                        xt = tl.load(x_ptr + bi * xs0 + pr[:, None] * xs1 + hi * xs2 + opp[None, :] * xs3,
                                     mask=rm[:, None] & ppm[None, :], other=0.0)
                        gf = tl.load(gfinal_ptr + ((bi * NH + hi) * P + opp[:, None]) * N + on[None, :],
                                     mask=ppm[:, None] & nm[None, :], other=0.0)
                        accf += tl.dot(xt.to(DOT), gf.to(DOT), input_precision=PREC, out_dtype=ACC)
                    acc += accf * (tl.where(keep, tl.exp(cl_end - cum_r + offf), 0.0) * d_r)[:, None]
    tl.store(out_ptr + ((bi * L + pr[:, None]) * G + gi) * N + on[None, :], acc, mask=rm[:, None] & nm[None, :])


# --------------------------------------------------------------------------- launchers -------

_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
        torch.float64: tl.float64}


def _types(x):
    """(accumulation torch dtype, ACC, DOT, PREC) for x's dtype. PREC "ieee": fp32 products are
    exact fp32 (no TF32), which the fp32 tolerance of the tests needs."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return acc, tl_acc(x.dtype), _DOT[x.dtype], "ieee"


def _tile(name, **limits):
    """TILES[name] with each block shrunk to at most next_pow2(limit) (never below 16: tl.dot's minimum)."""
    t = dict(TILES[name])
    for k, lim in limits.items():
        t[k] = max(16, min(t[k], triton.next_power_of_2(max(int(lim), 1))))
    return t


def _params(x, decay_scale, state_norm_max, dt_min, dt_max):
    import math
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor([math.log(decay_scale), state_norm_max, dt_min, dt_max], dtype=acc, device=x.device)


def _safe(t):
    """The kernels multiply int32 aranges by the last dim's stride; a layout where that product
    could pass 2^31 (a last dim strided by more than 2^31 / size) is copied contiguous first. Every
    other offset is int64 in the kernels."""
    if t is not None and t.dim() == 4 and t.shape[3] > 1 and (t.shape[3] - 1) * abs(t.stride(3)) >= 2 ** 31 - 1:
        return t.contiguous()
    return t


def _seq(seq_idx, x):
    """(seq tensor or a dummy, its strides) for the kernels' seq_ptr, ss0, ss1."""
    if seq_idx is None:
        return _dummy(x, torch.int32), (0, 0)
    return seq_idx, tuple(seq_idx.stride())


def _dummy(x, dtype):
    return torch.empty(1, dtype=dtype, device=x.device)


def _cumsum_fwd(dt, A, dt_bias, par, b, l, h, cs, k, dt_softplus, acc, ACC):
    dtp = torch.empty(b, h, k, cs, dtype=acc, device=dt.device)
    cum = torch.empty(b, h, k, cs, dtype=acc, device=dt.device)
    wrap_triton(_cumsum_fwd_kernel)[(b * k, h)](
        dt, A, dt_bias if dt_bias is not None else _dummy(dt, acc), par, dtp, cum,
        l, h, cs, k, *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), ACC=ACC,
        BLOCK_CS=max(16, triton.next_power_of_2(cs)))
    return dtp, cum


def _cb(B, C, b, l, g, n, cs, k, acc, ACC, DOT, PREC):
    t = _tile("bmm", BLOCK_T=cs, BLOCK_S=cs, BLOCK_K=n)
    cb = torch.empty(b, k, g, cs, cs, dtype=acc, device=B.device)
    nt = triton.cdiv(cs, t["BLOCK_T"]) * triton.cdiv(cs, t["BLOCK_S"])
    wrap_triton(_bmm_kernel)[(b * k, nt, g)](
        C, B, cb, l, g, n, cs, k, *C.stride(), *B.stride(), DOT=DOT, PREC=PREC, ACC=ACC, **t)
    return cb


def forward(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, decay_scale,
            state_norm_max, save_for_backward, seq_idx=None, window=None):
    """Chunked SSD forward.

    x (b, l, h, p) fp16/bf16/fp32/fp64; dt (b, l, h); A (h,); B, C (b, l, g, n); D (h, p) or None;
    z like x or None; dt_bias (h,) or None; initial_states (b, h, p, n) or None; state_norm_max
    0.0 = off. Returns (out (b, l, h, p) in x's dtype, final_states (b, h, p, n) fp32 (fp64 for
    fp64 x), saved) where ``saved`` is an opaque tuple for ``backward`` (None unless
    save_for_backward): the chunks' entering states S (b, k, h, p, n), CB (b, k, g, cs, cs), Δ and cum
    (b, h, k, cs), the norms at the boundaries, y (z given), seq_idx and window.

    ``seq_idx`` (b, l) int32, non-decreasing per row: the state resets where it changes
    (initial_states belong to each row's first sequence); not with state_norm_max.
    ``window=W`` (int >= 1): the sliding-window form y_t = C_t·Σ_{s=t−W+1..t} P(s, t] Δ_s x_s B_sᵀ + D x_t
    (banded kernels, no carried state); final_states is then the windowed state at the last step.
    Not with initial_states or state_norm_max."""
    x, z, B, C = _safe(x), _safe(z), _safe(B), _safe(C)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc, ACC, DOT, PREC = _types(x)
    cs = int(chunk_size)
    k = triton.cdiv(l, cs)
    dev = x.device
    out = torch.empty(b, l, h, p, dtype=x.dtype, device=dev)
    final = torch.empty(b, h, p, n, dtype=acc, device=dev)
    if b * h * p == 0 or l == 0:
        if initial_states is not None:
            final.copy_(initial_states)
        else:
            final.zero_()
        saved = dict(y=out, seq_idx=seq_idx, window=window) if save_for_backward else None
        return out, final, saved
    par = _params(x, decay_scale, state_norm_max, dt_min, dt_max)
    norm_max = state_norm_max > 0
    if seq_idx is not None and norm_max:
        raise ValueError("ssd_scan (chunked): state_norm_max with seq_idx acts at positions relative to each "
                         "sequence's start, not at the chunk boundaries; use the recurrent path")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"ssd_scan (chunked): window must be an int >= 1, got {window!r}")
        if initial_states is not None or norm_max:
            raise ValueError("ssd_scan (chunked): window holds only the last W inputs; it is not defined with "
                             "initial_states or state_norm_max")
    sq, sqs = _seq(seq_idx, x)
    dtp, cum = _cumsum_fwd(dt, A, dt_bias, par, b, l, h, cs, k, dt_softplus, acc, ACC)
    save_y = bool(save_for_backward) and z is not None
    y = torch.empty(b, l, h, p, dtype=x.dtype, device=dev) if save_y else out
    zz = z if z is not None else x
    if window is not None:
        W = min(int(window), l + 1)   # a window past the start holds everything
        t = _tile("chunk_scan", BLOCK_T=cs, BLOCK_P=p, BLOCK_K=cs, BLOCK_N=n)
        wrap_triton(_window_scan_kernel)[(b * k, triton.cdiv(cs, t["BLOCK_T"]) * triton.cdiv(p, t["BLOCK_P"]), h)](
            x, zz, B, C, dtp, cum, D if D is not None else _dummy(x, acc), out, y,
            l, h, p, n, h // g, cs, k, W, *x.stride(), *zz.stride(), *B.stride(), *C.stride(), sq, *sqs,
            HAS_SEQ=seq_idx is not None, HAS_D=D is not None, HAS_Z=z is not None, SAVE_Y=save_y,
            DOT=DOT, PREC=PREC, ACC=ACC, **t)
        t = _tile("chunk_state", BLOCK_P=p, BLOCK_N=n, BLOCK_K=cs)
        wrap_triton(_window_final_kernel)[(triton.cdiv(p, t["BLOCK_P"]) * triton.cdiv(n, t["BLOCK_N"]), b, h)](
            x, B, dtp, cum, final, l, h, p, n, h // g, cs, k, W, *x.stride(), *B.stride(), sq, *sqs,
            HAS_SEQ=seq_idx is not None, DOT=DOT, PREC=PREC, ACC=ACC, **t)
        saved = dict(dtp=dtp, cum=cum, par=par, y=y, seq_idx=seq_idx, window=W, final=final) \
            if save_for_backward else None
        return out, final, saved

    t = _tile("chunk_state", BLOCK_P=p, BLOCK_N=n, BLOCK_K=cs)
    st = torch.empty(b, k, h, p, n, dtype=acc, device=dev)
    wrap_triton(_chunk_state_kernel)[(b * k, triton.cdiv(p, t["BLOCK_P"]) * triton.cdiv(n, t["BLOCK_N"]), h)](
        x, B, dtp, cum, st, l, h, p, n, h // g, cs, k, *x.stride(), *B.stride(), sq, *sqs, HAS_SEQ=seq_idx is not None,
        DOT=DOT, PREC=PREC, ACC=ACC, **t)

    S = torch.empty(b, k, h, p, n, dtype=acc, device=dev)
    norms = torch.zeros(b, h, k, dtype=acc, device=dev) if norm_max else _dummy(x, acc)
    t = dict(TILES["state_passing"])
    t["BLOCK"] = min(t["BLOCK"], max(16, triton.next_power_of_2(p * n)))
    nblk = 1 if norm_max else triton.cdiv(p * n, t["BLOCK"])
    init = initial_states.contiguous() if initial_states is not None else None
    wrap_triton(_state_passing_kernel)[(nblk, b, h)](
        st, cum, init if init is not None else _dummy(x, acc), par, S, final, norms,
        h, p * n, cs, k, l, sq, *sqs, HAS_SEQ=seq_idx is not None, HAS_INIT=init is not None, NORM_MAX=norm_max,
        ACC=ACC, **t)
    del st

    cb = _cb(B, C, b, l, g, n, cs, k, acc, ACC, DOT, PREC)

    t = _tile("chunk_scan", BLOCK_T=cs, BLOCK_P=p, BLOCK_K=cs, BLOCK_N=n)
    wrap_triton(_chunk_scan_kernel)[(b * k, triton.cdiv(cs, t["BLOCK_T"]) * triton.cdiv(p, t["BLOCK_P"]), h)](
        x, zz, C, cb, dtp, cum, S, D if D is not None else _dummy(x, acc), out, y,
        l, h, p, n, h // g, g, cs, k, *x.stride(), *zz.stride(), *C.stride(), sq, *sqs,
        HAS_SEQ=seq_idx is not None, HAS_D=D is not None, HAS_Z=z is not None, SAVE_Y=save_y, DOT=DOT, PREC=PREC,
        ACC=ACC, **t)
    saved = dict(dtp=dtp, cum=cum, S=S, norms=norms if norm_max else None, cb=cb, par=par, y=y, seq_idx=seq_idx,
                 window=None) if save_for_backward else None
    return out, final, saved


def _window_backward(gy, gfinal, x, dt, A, B, C, D, dt_bias, saved, cs, dt_softplus, sq, sqs,
                     dx, dz, ddt, dA, dB, dC, dD, dbias):
    """Backward of the sliding-window form (see _window_dx_kernel / _window_dbc_kernel). The cum
    gradient of a step is Σ_p gy·(y − Dx) − Δ·(direct dΔ) (+ ⟨g_F, final⟩ at the last step); the
    log-decay gradient sums it over all later steps: inside a chunk by the reverse cumsum of
    _cumsum_bwd_kernel, across chunks by an fp64 suffix sum of the chunk totals (passed as the
    kernel's per-chunk constant)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc, ACC, DOT, PREC = _types(x)
    k = triton.cdiv(l, cs)
    dev = x.device
    dtp, cum, par, y, W, final = (saved[key] for key in ("dtp", "cum", "par", "y", "window", "final"))
    hs = saved["seq_idx"] is not None
    gf = gfinal.to(acc).contiguous() if gfinal is not None else None
    t = _tile("dx", BLOCK_T=cs, BLOCK_P=p, BLOCK_K=cs, BLOCK_N=n)
    npb = triton.cdiv(p, t["BLOCK_P"])
    ntb = triton.cdiv(cs, t["BLOCK_T"])
    ddtp = torch.empty(b, h, k, npb, cs, dtype=acc, device=dev)
    dcy = torch.empty_like(ddtp)
    dDp = torch.empty(b, k, ntb, h, p, dtype=acc, device=dev) if D is not None else None
    wrap_triton(_window_dx_kernel)[(b * k, ntb * npb, h)](
        x, B, C, gy, y, dtp, cum, gf if gf is not None else _dummy(x, acc), D if D is not None else _dummy(x, acc),
        dx, ddtp, dcy, dDp if dDp is not None else _dummy(x, acc),
        l, h, p, n, h // g, cs, k, npb, ntb, W, *x.stride(), *B.stride(), *C.stride(), sq, *sqs,
        HAS_SEQ=hs, HAS_D=D is not None, HAS_GFINAL=gf is not None, DOT=DOT, PREC=PREC, ACC=ACC, **t)
    if dD is not None:
        dD.copy_(dDp.sum(dim=(0, 1, 2)))
    t = _tile("dbc", BLOCK_T=cs, BLOCK_N=n, BLOCK_K=min(cs, p))
    for is_db, dst in ((False, dC), (True, dB)):
        wrap_triton(_window_dbc_kernel)[(b * k, triton.cdiv(cs, t["BLOCK_T"]) * triton.cdiv(n, t["BLOCK_N"]), g)](
            x, gy, B, C, dtp, cum, gf if gf is not None else _dummy(x, acc), dst,
            l, h, p, n, h // g, g, cs, k, W, *x.stride(), *B.stride(), *C.stride(), sq, *sqs,
            IS_DB=is_db, HAS_SEQ=hs, HAS_GFINAL=gf is not None, DOT=DOT, PREC=PREC, ACC=ACC, **t)
    # per-chunk constant of the log-decay gradient: the cum gradient of every later step
    tot = (dcy.sum(3) - dtp * ddtp.sum(3)).double().sum(-1)                      # (b, h, k)
    gfterm = ((gf.double() * final.double()).sum((-1, -2)) if gf is not None
              else torch.zeros(b, h, dtype=torch.float64, device=dev))
    tot[..., -1] += gfterm
    carry = tot.flip(-1).cumsum(-1).flip(-1) - tot                                 # Σ over chunks after c
    carry[..., -1] += gfterm
    dcl = carry.to(acc).contiguous()
    dAp = torch.empty(b, k, h, dtype=acc, device=dev)
    dbp = torch.empty(b, k, h, dtype=acc, device=dev)
    wrap_triton(_cumsum_bwd_kernel)[(b * k, h)](
        dt, A, dt_bias if dt_bias is not None else _dummy(x, acc), par, dtp, ddtp, torch.zeros_like(ddtp), dcy, dcl,
        ddt, dAp, dbp, l, h, cs, k, npb, 1, *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), ACC=ACC,
        BLOCK_CS=max(16, triton.next_power_of_2(cs)), BLOCK_B=16)
    dA.copy_(dAp.sum(dim=(0, 1)))
    if dbias is not None:
        dbias.copy_(dbp.sum(dim=(0, 1)))
    return dx, dz, ddt, dA, dB, dC, dD, dbias, None


def backward(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, saved, chunk_size, dt_softplus, dt_min,
             dt_max, decay_scale, state_norm_max):
    """Gradients of the chunked SSD. gout (b, l, h, p) or None, gfinal (b, h, p, n) or None.
    Returns (dx like x, dz like z or None, ddt (b, l, h), dA (h,), dB (b, l, g, n), dC (b, l, g, n),
    dD (h, p) or None, ddt_bias (h,) or None, dinit (b, h, p, n) or None); dB/dC are summed over the
    group's heads. ddt, dA, dB, dC, dD, ddt_bias, dinit are in the accumulation dtype (fp32; fp64
    for fp64 x), dx/dz in x's dtype."""
    x, z, B, C, gout = _safe(x), _safe(z), _safe(B), _safe(C), _safe(gout)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc, ACC, DOT, PREC = _types(x)
    cs = int(chunk_size)
    k = triton.cdiv(l, cs)
    dev = x.device
    empty = b * h * p == 0 or l == 0
    new = torch.zeros if empty else torch.empty   # the kernels write every element of these
    dx = new(b, l, h, p, dtype=x.dtype, device=dev)
    dz = torch.zeros_like(z) if z is not None else None
    ddt = new(b, l, h, dtype=acc, device=dev)
    dA = torch.zeros(h, dtype=acc, device=dev)
    dB = new(b, l, g, n, dtype=acc, device=dev)
    dC = new(b, l, g, n, dtype=acc, device=dev)
    dD = torch.zeros(h, p, dtype=acc, device=dev) if D is not None else None
    dbias = torch.zeros(h, dtype=acc, device=dev) if dt_bias is not None else None
    dinit = torch.zeros(b, h, p, n, dtype=acc, device=dev) if initial_states is not None else None
    if empty:
        if dinit is not None and gfinal is not None:
            dinit.copy_(gfinal)
        return dx, dz, ddt, dA, dB, dC, dD, dbias, dinit
    dtp, cum, par, y, seq_idx, window = (saved[key] for key in ("dtp", "cum", "par", "y", "seq_idx", "window"))
    sq, sqs = _seq(seq_idx, x)
    hs = seq_idx is not None
    norm_max = state_norm_max > 0
    if gout is None:
        gout = torch.zeros(b, l, h, p, dtype=x.dtype, device=dev)
    if z is not None:   # the gate, one elementwise pass: gy = gout·silu(z), dz
        gy = torch.empty(b, l, h, p, dtype=x.dtype, device=dev)
        dz = torch.empty(b, l, h, p, dtype=z.dtype, device=dev)
        bp = min(64, max(16, triton.next_power_of_2(p)))
        wrap_triton(_bwd_gate_kernel)[(triton.cdiv(l, 32), b, h)](
            gout, z, y, gy, dz, l, h, p, *gout.stride(), *z.stride(), ACC=ACC, BLOCK_R=32, BLOCK_P=bp,
            num_warps=8)
    else:
        gy = gout.to(x.dtype).contiguous()
    if window is not None:
        return _window_backward(gy, gfinal, x, dt, A, B, C, D, dt_bias, saved, cs, dt_softplus, sq, sqs,
                                dx, dz, ddt, dA, dB, dC, dD, dbias)
    S, norms, cb = saved["S"], saved["norms"], saved["cb"]

    t = _tile("dstates", BLOCK_P=p, BLOCK_N=n, BLOCK_K=cs)
    dS = torch.empty(b, k, h, p, n, dtype=acc, device=dev)
    wrap_triton(_bwd_dstates_kernel)[(b * k, triton.cdiv(p, t["BLOCK_P"]) * triton.cdiv(n, t["BLOCK_N"]), h)](
        gy, C, cum, dS, l, h, p, n, h // g, cs, k, *C.stride(), sq, *sqs, HAS_SEQ=hs, DOT=DOT, PREC=PREC, ACC=ACC, **t)

    t = dict(TILES["state_passing"])
    t["BLOCK"] = min(t["BLOCK"], max(16, triton.next_power_of_2(p * n)))
    nblk = 1 if norm_max else triton.cdiv(p * n, t["BLOCK"])
    gst = torch.empty(b, k, h, p, n, dtype=acc, device=dev)
    dcl = torch.empty(b, h, k, nblk, dtype=acc, device=dev)
    dinit_buf = dinit if dinit is not None else torch.empty(b, h, p, n, dtype=acc, device=dev)
    gf = gfinal.to(acc).contiguous() if gfinal is not None else None
    wrap_triton(_state_passing_bwd_kernel)[(nblk, b, h)](
        dS, S, cum, gf if gf is not None else _dummy(x, acc), norms if norms is not None else _dummy(x, acc), par,
        gst, dcl, dinit_buf, h, p * n, cs, k, nblk, l, sq, *sqs,
        HAS_SEQ=hs, HAS_GFINAL=gf is not None, NORM_MAX=norm_max, ACC=ACC, **t)
    del dS

    t = _tile("dx", BLOCK_T=cs, BLOCK_P=p, BLOCK_K=cs, BLOCK_N=n)
    npb = triton.cdiv(p, t["BLOCK_P"])
    ntb = triton.cdiv(cs, t["BLOCK_T"])
    ddtp = torch.empty(b, h, k, npb, cs, dtype=acc, device=dev)
    ddts = torch.empty_like(ddtp)
    dcy = torch.empty_like(ddtp)
    dDp = torch.empty(b, k, ntb, h, p, dtype=acc, device=dev) if D is not None else None
    wrap_triton(_bwd_dx_kernel)[(b * k, ntb * npb, h)](
        x, B, gy, y, cb, dtp, cum, gst, D if D is not None else _dummy(x, acc),
        dx, ddtp, ddts, dcy, dDp if dDp is not None else _dummy(x, acc),
        l, h, p, n, h // g, g, cs, k, npb, ntb, *x.stride(), *B.stride(), sq, *sqs,
        HAS_SEQ=hs, HAS_D=D is not None, DOT=DOT, PREC=PREC, ACC=ACC, **t)
    if dD is not None:
        dD.copy_(dDp.sum(dim=(0, 1, 2)))

    t = _tile("dcb", BLOCK_T=cs, BLOCK_S=cs, BLOCK_K=p)
    dcb = torch.empty(b, k, g, cs, cs, dtype=acc, device=dev)
    wrap_triton(_bwd_dcb_kernel)[(b * k, triton.cdiv(cs, t["BLOCK_T"]) * triton.cdiv(cs, t["BLOCK_S"]), g)](
        gy, x, dtp, cum, dcb, l, h, p, h // g, g, cs, k, *x.stride(), sq, *sqs, HAS_SEQ=hs, DOT=DOT, PREC=PREC,
        ACC=ACC, **t)

    t = _tile("dbc", BLOCK_T=cs, BLOCK_N=n, BLOCK_K=min(cs, p))
    wrap_triton(_bwd_dbc_kernel)[(b * k, triton.cdiv(cs, t["BLOCK_T"]) * triton.cdiv(n, t["BLOCK_N"]), g)](
        x, gy, B, C, dcb, dtp, cum, S, gst, dB, dC, l, h, p, n, h // g, g, cs, k,
        *x.stride(), *B.stride(), *C.stride(), sq, *sqs, HAS_SEQ=hs, DOT=DOT, PREC=PREC, ACC=ACC, **t)
    del dcb

    dAp = torch.empty(b, k, h, dtype=acc, device=dev)
    dbp = torch.empty(b, k, h, dtype=acc, device=dev)
    wrap_triton(_cumsum_bwd_kernel)[(b * k, h)](
        dt, A, dt_bias if dt_bias is not None else _dummy(x, acc), par, dtp, ddtp, ddts, dcy, dcl,
        ddt, dAp, dbp, l, h, cs, k, npb, nblk, *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), ACC=ACC,
        BLOCK_CS=max(16, triton.next_power_of_2(cs)), BLOCK_B=max(16, triton.next_power_of_2(nblk)))
    dA.copy_(dAp.sum(dim=(0, 1)))
    if dbias is not None:
        dbias.copy_(dbp.sum(dim=(0, 1)))
    return dx, dz, ddt, dA, dB, dC, dD, dbias, dinit
