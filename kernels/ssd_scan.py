"""Triton kernels for ssd_scan (Mamba-2 / SSD): forward and checkpointed backward.

One program per (batch, head) walks time with the whole [headdim, dstate] state in registers —
state_norm_max needs the norm of the whole state at chunk boundaries, so the state is not split
across programs — saving the state entering each chunk when a backward will follow. The backward
program walks chunks in reverse: it recomputes the chunk's states from its checkpoint into a
per-program scratch slice of global memory ((chunk_size + 1) states, read back by the same
program), then runs the reverse-time recurrence dH_{t−1} = a_t (dH_t + dy_t C_tᵀ).

This is the recurrent form of the scan (the same algorithm as csrc/ssd_scan.cpp), not mamba-ssm's
chunked tensor-core algorithm; it needs headdim_pow2 · dstate_pow2 <= 16384 (the state in
registers) and gives batch · nheads programs of parallelism. See docs/ssd_scan.md.
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import sigmoid, softplus

MAX_STATE = 16384  # BLOCK_P * BLOCK_N held in registers by one program


@triton.jit
def _delta(dt_ptr, bias_ptr, bi, t, hi, ds0, ds1, ds2, dt_min, dt_max,
           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    raw = tl.load(dt_ptr + bi * ds0 + t * ds1 + hi * ds2)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hi)
    d = raw
    if SOFTPLUS:
        d = softplus(raw)
    if CLAMP:
        d = tl.minimum(tl.maximum(d, dt_min), dt_max)
    return raw, d


@triton.jit
def ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, par_ptr,
    out_ptr, final_ptr, norms_ptr, ckpt_ptr, pre_ptr,
    L, NH, P, N, HPG, CS, NCHUNK,
    xs0, xs1, xs2, xs3, ds0, ds1, ds2, bs0, bs1, bs2, bs3, cs0, cs1, cs2, cs3, zs0, zs1, zs2, zs3,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, NORM_MAX: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // NH
    hi = pid % NH
    gi = hi // HPG
    op = tl.arange(0, BLOCK_P)
    on = tl.arange(0, BLOCK_N)
    pm = op < P
    nm = on < N
    m2 = pm[:, None] & nm[None, :]
    so = op[:, None] * N + on[None, :]  # offsets of a contiguous [P, N] state
    lam = tl.load(par_ptr).to(ACC)
    tau = tl.load(par_ptr + 1).to(ACC)
    dt_min = tl.load(par_ptr + 2).to(ACC)
    dt_max = tl.load(par_ptr + 3).to(ACC)
    if HAS_INIT:
        H = tl.load(init_ptr + pid * P * N + so, mask=m2, other=0.0).to(ACC)
    else:
        H = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    Ah = tl.load(A_ptr + hi).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + hi * P + op, mask=pm, other=0.0).to(ACC)
    for t in range(0, L):
        if t % CS == 0:
            k = t // CS
            if NORM_MAX:
                if k > 0:
                    nrm = tl.sqrt(tl.sum(tl.sum(H * H, axis=1), axis=0))
                    if SAVE:
                        tl.store(pre_ptr + pid * NCHUNK + k, nrm)
                    H = H * tl.where(nrm > tau, tau / nrm, 1.0)
            if SAVE:
                tl.store(ckpt_ptr + (pid * NCHUNK + k) * P * N + so, H, mask=m2)
        raw, d = _delta(dt_ptr, bias_ptr, bi, t, hi, ds0, ds1, ds2, dt_min, dt_max, HAS_BIAS, SOFTPLUS, CLAMP)
        d = d.to(ACC)
        at = lam * tl.exp(d * Ah)
        xv = tl.load(x_ptr + bi * xs0 + t * xs1 + hi * xs2 + op * xs3, mask=pm, other=0.0).to(ACC)
        bv = tl.load(B_ptr + bi * bs0 + t * bs1 + gi * bs2 + on * bs3, mask=nm, other=0.0).to(ACC)
        cv = tl.load(C_ptr + bi * cs0 + t * cs1 + gi * cs2 + on * cs3, mask=nm, other=0.0).to(ACC)
        H = at * H + (d * xv)[:, None] * bv[None, :]
        y = tl.sum(H * cv[None, :], axis=1)
        if HAS_D:
            y += Dv * xv
        if HAS_Z:
            zv = tl.load(z_ptr + bi * zs0 + t * zs1 + hi * zs2 + op * zs3, mask=pm, other=0.0).to(ACC)
            y = y * zv * sigmoid(zv)
        row = (bi * L + t) * NH + hi
        tl.store(out_ptr + row * P + op, y.to(out_ptr.dtype.element_ty), mask=pm)
        tl.store(norms_ptr + row, tl.sqrt(tl.sum(tl.sum(H * H, axis=1), axis=0)))
    tl.store(final_ptr + pid * P * N + so, H, mask=m2)


@triton.jit
def ssd_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, par_ptr, ckpt_ptr, pre_ptr, scratch_ptr,
    gout_ptr, gfinal_ptr,
    dx_ptr, dz_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dinit_ptr,
    L, NH, P, N, HPG, CS, NCHUNK, SLOTS,
    xs0, xs1, xs2, xs3, ds0, ds1, ds2, bs0, bs1, bs2, bs3, cs0, cs1, cs2, cs3, zs0, zs1, zs2, zs3,
    gs0, gs1, gs2, gs3,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GFINAL: tl.constexpr,
    SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, NORM_MAX: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // NH
    hi = pid % NH
    gi = hi // HPG
    op = tl.arange(0, BLOCK_P)
    on = tl.arange(0, BLOCK_N)
    pm = op < P
    nm = on < N
    m2 = pm[:, None] & nm[None, :]
    so = op[:, None] * N + on[None, :]
    lam = tl.load(par_ptr).to(ACC)
    tau = tl.load(par_ptr + 1).to(ACC)
    dt_min = tl.load(par_ptr + 2).to(ACC)
    dt_max = tl.load(par_ptr + 3).to(ACC)
    scratch = scratch_ptr + pid * SLOTS * P * N   # slot 0: entering the chunk; slot j+1: after step j
    Ah = tl.load(A_ptr + hi).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + hi * P + op, mask=pm, other=0.0).to(ACC)
    dD = tl.zeros([BLOCK_P], dtype=ACC)
    dAh = tl.zeros([1], dtype=ACC)
    if HAS_GFINAL:
        dH = tl.load(gfinal_ptr + pid * P * N + so, mask=m2, other=0.0).to(ACC)
    else:
        dH = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    for kk in range(0, NCHUNK):
        k = NCHUNK - 1 - kk
        t0 = k * CS
        t1 = tl.minimum(L, t0 + CS)
        S = tl.load(ckpt_ptr + (pid * NCHUNK + k) * P * N + so, mask=m2, other=0.0)
        tl.store(scratch + so, S, mask=m2)
        for t in range(t0, t1):  # recompute the chunk's states
            raw, d = _delta(dt_ptr, bias_ptr, bi, t, hi, ds0, ds1, ds2, dt_min, dt_max, HAS_BIAS, SOFTPLUS, CLAMP)
            d = d.to(ACC)
            at = lam * tl.exp(d * Ah)
            xv = tl.load(x_ptr + bi * xs0 + t * xs1 + hi * xs2 + op * xs3, mask=pm, other=0.0).to(ACC)
            bv = tl.load(B_ptr + bi * bs0 + t * bs1 + gi * bs2 + on * bs3, mask=nm, other=0.0).to(ACC)
            S = at * S + (d * xv)[:, None] * bv[None, :]
            tl.store(scratch + (t - t0 + 1) * P * N + so, S, mask=m2)
        tl.debug_barrier()
        for tt in range(0, t1 - t0):  # reverse-time recurrence
            t = t1 - 1 - tt
            j = t - t0
            raw, d = _delta(dt_ptr, bias_ptr, bi, t, hi, ds0, ds1, ds2, dt_min, dt_max, HAS_BIAS, SOFTPLUS, CLAMP)
            d = d.to(ACC)
            at = lam * tl.exp(d * Ah)
            Hp = tl.load(scratch + j * P * N + so, mask=m2, other=0.0)
            Hn = tl.load(scratch + (j + 1) * P * N + so, mask=m2, other=0.0)
            xv = tl.load(x_ptr + bi * xs0 + t * xs1 + hi * xs2 + op * xs3, mask=pm, other=0.0).to(ACC)
            bv = tl.load(B_ptr + bi * bs0 + t * bs1 + gi * bs2 + on * bs3, mask=nm, other=0.0).to(ACC)
            cv = tl.load(C_ptr + bi * cs0 + t * cs1 + gi * cs2 + on * cs3, mask=nm, other=0.0).to(ACC)
            gv = tl.load(gout_ptr + bi * gs0 + t * gs1 + hi * gs2 + op * gs3, mask=pm, other=0.0).to(ACC)
            row = (bi * L + t) * NH + hi
            if HAS_Z:  # out = y · silu(z)
                zv = tl.load(z_ptr + bi * zs0 + t * zs1 + hi * zs2 + op * zs3, mask=pm, other=0.0).to(ACC)
                y = tl.sum(Hn * cv[None, :], axis=1)
                if HAS_D:
                    y += Dv * xv
                s = sigmoid(zv)
                tl.store(dz_ptr + row * P + op, (gv * y * s * (1.0 + zv * (1.0 - s))).to(dz_ptr.dtype.element_ty),
                         mask=pm)
                gv = gv * zv * s
            v = dH + gv[:, None] * cv[None, :]          # dH_t including this step's output
            dC = tl.sum(Hn * gv[:, None], axis=0)
            da = tl.sum(tl.sum(v * Hp, axis=1), axis=0)
            r = tl.sum(v * bv[None, :], axis=1)
            dB = tl.sum(v * xv[:, None], axis=0) * d
            dH = at * v
            dd = tl.sum(xv * r, axis=0)
            gx = d * r
            if HAS_D:
                gx += gv * Dv
                dD += gv * xv
            tl.store(dx_ptr + row * P + op, gx.to(dx_ptr.dtype.element_ty), mask=pm)
            tl.store(dB_ptr + row * N + on, dB, mask=nm)
            tl.store(dC_ptr + row * N + on, dC, mask=nm)
            dd += da * at * Ah
            dAh += da * at * d
            # dΔ/draw: sigmoid for softplus, 0 where the clamp is active
            dg = 1.0
            pre_clamp = raw
            if SOFTPLUS:
                dg = tl.where(raw > 20.0, 1.0, sigmoid(raw))
                pre_clamp = softplus(raw)
            if CLAMP:  # torch.clamp's gradient: 1 inside [min, max] (inclusive), else 0
                dg = tl.where((pre_clamp < dt_min) | (pre_clamp > dt_max), 0.0, dg)
            tl.store(ddt_ptr + row, dd * dg)
        if NORM_MAX:
            if k > 0:  # back through H ← H · min(1, τ/‖H‖)
                nrm = tl.load(pre_ptr + pid * NCHUNK + k)
                if nrm > tau:
                    S0 = tl.load(scratch + so, mask=m2, other=0.0)
                    q = tl.sum(tl.sum(S0 * dH, axis=1), axis=0) / (tau * tau)
                    dH = (tau / nrm) * (dH - S0 * q)
        tl.debug_barrier()
    tl.store(dA_ptr + pid + tl.arange(0, 1), dAh)
    if HAS_D:
        tl.store(dD_ptr + pid * P + op, dD, mask=pm)
    tl.store(dinit_ptr + pid * P * N + so, dH, mask=m2)


def _blocks(p: int, n: int):
    bp, bn = triton.next_power_of_2(max(p, 1)), triton.next_power_of_2(max(n, 1))
    if bp * bn > MAX_STATE:
        raise ValueError(f"ssd_scan: the Triton kernels hold the [headdim, dstate] state in registers and need "
                         f"next_pow2(headdim) * next_pow2(dstate) <= {MAX_STATE}; got headdim={p}, dstate={n}")
    return bp, bn, (4 if bp * bn <= 4096 else 8)


def _params(x, decay_scale, state_norm_max, dt_min, dt_max):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor([decay_scale, state_norm_max, dt_min, dt_max], dtype=dt, device=x.device)


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _dummy(x, dtype=None):
    return torch.empty(1, dtype=dtype or x.dtype, device=x.device)


def forward(x, dt, A, B, C, D, z, dt_bias, init, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp, decay_scale,
            state_norm_max, save):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = (l + chunk_size - 1) // chunk_size
    out = torch.empty(b, l, h, p, dtype=x.dtype, device=x.device)
    final = torch.empty(b, h, p, n, dtype=acc, device=x.device)
    norms = torch.empty(b, l, h, dtype=acc, device=x.device)
    ckpt = torch.empty(b, h, k, p, n, dtype=acc, device=x.device) if save else x.new_empty(0, dtype=acc)
    pre = torch.zeros(b, h, k, dtype=acc, device=x.device) if save and state_norm_max > 0 else x.new_empty(0, dtype=acc)
    if b * h == 0:
        return out, final.zero_(), norms, ckpt, pre
    bp, bn, nw = _blocks(p, n)
    zz = z if z is not None else x
    wrap_triton(ssd_fwd_kernel)[(b * h,)](
        x, dt, A, B, C, D if D is not None else _dummy(x, acc), zz, dt_bias if dt_bias is not None else _dummy(x, acc),
        init if init is not None else _dummy(x, acc), _params(x, decay_scale, state_norm_max, dt_min, dt_max),
        out, final, norms, ckpt if save else _dummy(x, acc), pre if pre.numel() else _dummy(x, acc),
        l, h, p, n, h // g, chunk_size, k, *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zz.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_INIT=init is not None,
        SOFTPLUS=bool(dt_softplus), CLAMP=bool(dt_clamp), NORM_MAX=state_norm_max > 0, SAVE=bool(save),
        ACC=_acc(x), BLOCK_P=bp, BLOCK_N=bn, num_warps=nw)
    return out, final, norms, ckpt, pre


def backward(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, init, ckpt, pre, chunk_size, dt_softplus, dt_min, dt_max,
             dt_clamp, decay_scale, state_norm_max):
    b, l, h, p = x.shape
    n = B.shape[3]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = (l + chunk_size - 1) // chunk_size
    dev = x.device
    gout = gout.to(x.dtype)
    dx = torch.empty(b, l, h, p, dtype=x.dtype, device=dev)
    dz = torch.empty(b, l, h, p, dtype=x.dtype, device=dev) if z is not None else x.new_empty(0)
    ddt = torch.empty(b, l, h, dtype=acc, device=dev)
    dA = torch.zeros(b, h, dtype=acc, device=dev)
    dB = torch.empty(b, l, h, n, dtype=acc, device=dev)
    dC = torch.empty(b, l, h, n, dtype=acc, device=dev)
    dD = torch.zeros(b, h, p, dtype=acc, device=dev) if D is not None else x.new_empty(0, dtype=acc)
    dinit = torch.zeros(b, h, p, n, dtype=acc, device=dev)
    if b * h == 0:
        return dx, dz, ddt, dA, dB, dC, dD, dinit
    if gfinal is not None and l == 0:
        dinit.copy_(gfinal)
    bp, bn, nw = _blocks(p, n)
    slots = min(chunk_size, max(l, 1)) + 1
    scratch = torch.empty(b * h, slots, p, n, dtype=acc, device=dev)
    zz = z if z is not None else x
    gf = gfinal.to(acc).contiguous() if gfinal is not None else None
    wrap_triton(ssd_bwd_kernel)[(b * h,)](
        x, dt, A, B, C, D if D is not None else _dummy(x, acc), zz, dt_bias if dt_bias is not None else _dummy(x, acc),
        _params(x, decay_scale, state_norm_max, dt_min, dt_max), ckpt if ckpt.numel() else _dummy(x, acc),
        pre if pre.numel() else _dummy(x, acc), scratch, gout, gf if gf is not None else _dummy(x, acc),
        dx, dz if z is not None else _dummy(x), ddt, dA, dB, dC, dD if D is not None else _dummy(x, acc), dinit,
        l, h, p, n, h // B.shape[2], chunk_size, k, slots, *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        *zz.stride(), *gout.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_GFINAL=gf is not None,
        SOFTPLUS=bool(dt_softplus), CLAMP=bool(dt_clamp), NORM_MAX=state_norm_max > 0,
        ACC=_acc(x), BLOCK_P=bp, BLOCK_N=bn, num_warps=nw)
    return dx, dz, ddt, dA, dB, dC, dD, dinit


@triton.jit
def ssd_window_norms_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, par_ptr, norms_ptr,
    L, NH, P, N, HPG, W,
    xs0, xs1, xs2, xs3, ds0, ds1, ds2, bs0, bs1, bs2, bs3,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The sliding-window state H_t = a_t H_{t−1} + Δ_t x_t B_tᵀ − P_t Δ_{t−W} x_{t−W} B_{t−W}ᵀ,
    # P_t = Π_{r=t−W+1..t} a_r (a running fp64 sum of log a); writes ‖H_t‖_F only (see
    # ops/ssd_scan.py: the outputs come from two plain scans).
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // NH
    hi = pid % NH
    gi = hi // HPG
    op = tl.arange(0, BLOCK_P)
    on = tl.arange(0, BLOCK_N)
    pm = op < P
    nm = on < N
    lam = tl.load(par_ptr).to(ACC)
    dt_min = tl.load(par_ptr + 2).to(ACC)
    dt_max = tl.load(par_ptr + 3).to(ACC)
    loglam = tl.log(lam.to(tl.float64))
    Ah = tl.load(A_ptr + hi).to(ACC)
    H = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    logP = tl.zeros([1], dtype=tl.float64)
    for t in range(0, L):
        raw, d = _delta(dt_ptr, bias_ptr, bi, t, hi, ds0, ds1, ds2, dt_min, dt_max, HAS_BIAS, SOFTPLUS, True)
        d = d.to(ACC)
        at = lam * tl.exp(d * Ah)
        logP += d.to(tl.float64) * Ah.to(tl.float64) + loglam
        xv = tl.load(x_ptr + bi * xs0 + t * xs1 + hi * xs2 + op * xs3, mask=pm, other=0.0).to(ACC)
        bv = tl.load(B_ptr + bi * bs0 + t * bs1 + gi * bs2 + on * bs3, mask=nm, other=0.0).to(ACC)
        H = at * H + (d * xv)[:, None] * bv[None, :]
        if t >= W:
            to = t - W
            rawo, do = _delta(dt_ptr, bias_ptr, bi, to, hi, ds0, ds1, ds2, dt_min, dt_max, HAS_BIAS, SOFTPLUS, True)
            do = do.to(ACC)
            logP -= do.to(tl.float64) * Ah.to(tl.float64) + loglam
            pw = tl.sum(tl.exp(logP), axis=0).to(ACC)
            xo = tl.load(x_ptr + bi * xs0 + to * xs1 + hi * xs2 + op * xs3, mask=pm, other=0.0).to(ACC)
            bo = tl.load(B_ptr + bi * bs0 + to * bs1 + gi * bs2 + on * bs3, mask=nm, other=0.0).to(ACC)
            H = H - (pw * do * xo)[:, None] * bo[None, :]
        tl.store(norms_ptr + (bi * L + t) * NH + hi, tl.sqrt(tl.sum(tl.sum(H * H, axis=1), axis=0)))


def window_norms(x, dt, A, B, C, dt_bias, dt_softplus, dt_min, dt_max, decay_scale, window):
    """‖H^W_t‖_F (b, l, h) of the sliding-window state (forward only)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norms = torch.empty(b, l, h, dtype=acc, device=x.device)
    if b * h == 0 or l == 0:
        return norms
    bp, bn, nw = _blocks(p, n)
    wrap_triton(ssd_window_norms_kernel)[(b * h,)](
        x, dt, A, B, C, dt_bias if dt_bias is not None else _dummy(x, acc),
        _params(x, decay_scale, 0.0, dt_min, dt_max), norms, l, h, p, n, h // g, window,
        *x.stride(), *dt.stride(), *B.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), ACC=_acc(x), BLOCK_P=bp, BLOCK_N=bn, num_warps=nw)
    return norms
