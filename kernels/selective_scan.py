"""Triton kernels for the Mamba-1 selective scan (ops/selective_scan.py has the semantics).

Forward: one program per (batch row, block of BLOCK_D channels); the state is a [BLOCK_D, BLOCK_N]
register tile carried sequentially over L. Every CHUNK steps the state is written to the
checkpoint buffer (only when the backward will need it).

Backward: the same programs walk the chunks in reverse. For each chunk they recompute the states
from its checkpoint into a per-program scratch slab ([CHUNK + 1, BLOCK_D, BLOCK_N], global memory,
L2-resident on a GPU), then run the reverse-time adjoint with the state tile and the gradients
of A / constant B, C / D in registers. Gradients of time-varying B and C are summed over the
channels of the block in registers (tl.sum over the channel axis when the block lies in one group)
and added to the (batch, G, N, L) output with one atomic per (n, t).

Launch tiles are chosen without GPU measurements (TILES); the interpreter uses small blocks.
"""
import os

import torch
import triton
import triton.language as tl

from torch.library import wrap_triton


@triton.jit
def _softplus(v):
    # torch's threshold: v > 20 -> v
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v))))


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, init_ptr, seq_ptr,
    out_ptr, last_ptr, norms_ptr, ckpt_ptr,
    dim, L, N, dpg_b, dpg_c, nck, chunk,
    su0, su1, su2, sd0, sd1, sd2, sz0, sz1, sz2,
    sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sq0, sq1,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    SOFTPLUS: tl.constexpr, NORMS: tl.constexpr, CKPT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    dm = d < dim
    m2 = dm[:, None] & (n < N)[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
    bias = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0)
    Dv = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0)
    boff = b * sb0 + (d // dpg_b)[:, None] * sb1 + n[None, :] * sb2
    coff = b * sc0 + (d // dpg_c)[:, None] * sc1 + n[None, :] * sc2
    bd = b * dim + d
    x = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    if HAS_INIT:
        x = tl.load(init_ptr + bd[:, None] * N + n[None, :], mask=m2, other=0.0)
    for ci in range(0, nck):
        if CKPT:
            tl.store(ckpt_ptr + (bd[:, None] * nck + ci) * N + n[None, :], x, mask=m2)
        t0 = ci * chunk
        t1 = tl.minimum(t0 + chunk, L)
        for t in range(t0, t1):
            uv = tl.load(u_ptr + b * su0 + d * su1 + t * su2, mask=dm, other=0.0).to(ACC)
            dt = tl.load(delta_ptr + b * sd0 + d * sd1 + t * sd2, mask=dm, other=0.0).to(ACC) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + boff + t * sb3, mask=m2, other=0.0).to(ACC)
            Ct = tl.load(C_ptr + coff + t * sc3, mask=m2, other=0.0).to(ACC)
            decay = tl.exp(dt[:, None] * A)
            if HAS_SEQ:  # a new packed sequence starts at t: the state resets
                if t > 0:
                    cur = tl.load(seq_ptr + b * sq0 + t * sq1)
                    prev = tl.load(seq_ptr + b * sq0 + (t - 1) * sq1)
                    x = tl.where(cur != prev, 0.0, x)
            x = decay * x + (dt * uv)[:, None] * Bt
            y = tl.sum(x * Ct, axis=1) + Dv * uv
            if HAS_Z:
                zv = tl.load(z_ptr + b * sz0 + d * sz1 + t * sz2, mask=dm, other=0.0).to(ACC)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + bd * L + t, y, mask=dm)
            if NORMS:
                tl.store(norms_ptr + bd * L + t, tl.sqrt(tl.sum(x * x, axis=1)), mask=dm)
    tl.store(last_ptr + bd[:, None] * N + n[None, :], x, mask=m2)


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, delta_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, ckpt_ptr, seq_ptr,
    gout_ptr, glast_ptr, gnorms_ptr, xs_ptr,
    gu_ptr, gdelta_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, ginit_ptr,
    dim, L, N, dpg_b, dpg_c, g_b, g_c, nck, chunk, n_dblk,
    su0, su1, su2, sd0, sd1, sd2, sz0, sz1, sz2,
    sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sg0, sg1, sg2, sq0, sq1,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_GLAST: tl.constexpr, HAS_GNORMS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    ONE_GROUP_B: tl.constexpr, ONE_GROUP_C: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1).to(tl.int64)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    dm = d < dim
    nm = n < N
    m2 = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
    bias = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0)
    Dv = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0)
    boff = b * sb0 + (d // dpg_b)[:, None] * sb1 + n[None, :] * sb2
    coff = b * sc0 + (d // dpg_c)[:, None] * sc1 + n[None, :] * sc2
    # gradients of time-varying B / C: (batch, G, N, L) contiguous
    gboff = ((b * g_b + d // dpg_b)[:, None] * N + n[None, :]) * L
    gcoff = ((b * g_c + d // dpg_c)[:, None] * N + n[None, :]) * L
    gb1 = ((b * g_b + (pd * BLOCK_D) // dpg_b) * N + n) * L  # the block's one group
    gc1 = ((b * g_c + (pd * BLOCK_D) // dpg_c) * N + n) * L
    bd = b * dim + d
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    slab = xs_ptr + (b * n_dblk + pd) * (chunk + 1) * (BLOCK_D * BLOCK_N)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    if HAS_GLAST:
        h = tl.load(glast_ptr + bd[:, None] * N + n[None, :], mask=m2, other=0.0)
    gA = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    gBc = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    gCc = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    gD = tl.zeros([BLOCK_D], dtype=ACC)
    for cr in range(0, nck):
        ci = nck - 1 - cr
        t0 = ci * chunk
        t1 = tl.minimum(t0 + chunk, L)
        # recompute the chunk's states from its checkpoint into the slab
        x = tl.load(ckpt_ptr + (bd[:, None] * nck + ci) * N + n[None, :], mask=m2, other=0.0)
        tl.store(slab + tile, x)
        for t in range(t0, t1):
            uv = tl.load(u_ptr + b * su0 + d * su1 + t * su2, mask=dm, other=0.0).to(ACC)
            dt = tl.load(delta_ptr + b * sd0 + d * sd1 + t * sd2, mask=dm, other=0.0).to(ACC) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + boff + t * sb3, mask=m2, other=0.0).to(ACC)
            decay = tl.exp(dt[:, None] * A)
            if HAS_SEQ:
                if t > 0:
                    cur = tl.load(seq_ptr + b * sq0 + t * sq1)
                    prev = tl.load(seq_ptr + b * sq0 + (t - 1) * sq1)
                    decay = tl.where(cur != prev, 0.0, decay)
            x = decay * x + (dt * uv)[:, None] * Bt
            tl.store(slab + (t - t0 + 1) * (BLOCK_D * BLOCK_N) + tile, x)
        tl.debug_barrier()
        for tr in range(0, t1 - t0):
            t = t1 - 1 - tr
            xt = tl.load(slab + (t - t0 + 1) * (BLOCK_D * BLOCK_N) + tile)
            xp = tl.load(slab + (t - t0) * (BLOCK_D * BLOCK_N) + tile)
            uv = tl.load(u_ptr + b * su0 + d * su1 + t * su2, mask=dm, other=0.0).to(ACC)
            pre = tl.load(delta_ptr + b * sd0 + d * sd1 + t * sd2, mask=dm, other=0.0).to(ACC) + bias
            dt = pre
            if SOFTPLUS:
                dt = _softplus(pre)
            Bt = tl.load(B_ptr + boff + t * sb3, mask=m2, other=0.0).to(ACC)
            Ct = tl.load(C_ptr + coff + t * sc3, mask=m2, other=0.0).to(ACC)
            g = tl.load(gout_ptr + b * sg0 + d * sg1 + t * sg2, mask=dm, other=0.0).to(ACC)
            gy = g
            if HAS_Z:
                zv = tl.load(z_ptr + b * sz0 + d * sz1 + t * sz2, mask=dm, other=0.0).to(ACC)
                sz = tl.sigmoid(zv)
                yv = tl.sum(xt * Ct, axis=1) + Dv * uv
                gy = g * zv * sz
                tl.store(gz_ptr + bd * L + t, g * yv * sz * (1.0 + zv * (1.0 - sz)), mask=dm)
            gD += gy * uv
            hv = h + gy[:, None] * Ct
            if HAS_GNORMS:
                gn = tl.load(gnorms_ptr + bd * L + t, mask=dm, other=0.0)
                s = tl.sqrt(tl.sum(xt * xt, axis=1))
                sc = tl.where(s > 0, gn / tl.where(s > 0, s, 1.0), 0.0)
                hv += sc[:, None] * xt
            a = tl.exp(dt[:, None] * A)
            if HAS_SEQ:  # decay 0 at a reset: no gradient flows into the previous sequence
                if t > 0:
                    cur = tl.load(seq_ptr + b * sq0 + t * sq1)
                    prev = tl.load(seq_ptr + b * sq0 + (t - 1) * sq1)
                    a = tl.where(cur != prev, 0.0, a)
            ga = hv * xp * a
            hb = tl.sum(hv * Bt, axis=1)
            gdt = tl.sum(ga * A, axis=1) + hb * uv
            gu = gy * Dv + hb * dt
            gA += ga * dt[:, None]
            gBt = hv * (dt * uv)[:, None]
            gCt = gy[:, None] * xt
            if VAR_B:
                if ONE_GROUP_B:
                    tl.atomic_add(gB_ptr + gb1 + t, tl.sum(gBt, axis=0), mask=nm)
                else:
                    tl.atomic_add(gB_ptr + gboff + t, gBt, mask=m2)
            else:
                gBc += gBt
            if VAR_C:
                if ONE_GROUP_C:
                    tl.atomic_add(gC_ptr + gc1 + t, tl.sum(gCt, axis=0), mask=nm)
                else:
                    tl.atomic_add(gC_ptr + gcoff + t, gCt, mask=m2)
            else:
                gCc += gCt
            if SOFTPLUS:
                gdt = gdt * tl.sigmoid(pre)
            tl.store(gu_ptr + bd * L + t, gu, mask=dm)
            tl.store(gdelta_ptr + bd * L + t, gdt, mask=dm)
            h = hv * a
        tl.debug_barrier()  # the next chunk overwrites the slab
    tl.store(ginit_ptr + bd[:, None] * N + n[None, :], h, mask=m2)
    tl.store(gA_ptr + bd[:, None] * N + n[None, :], gA, mask=m2)
    if not VAR_B:
        tl.store(gB_ptr + bd[:, None] * N + n[None, :], gBc, mask=m2)
    if not VAR_C:
        tl.store(gC_ptr + bd[:, None] * N + n[None, :], gCc, mask=m2)
    tl.store(gD_ptr + bd, gD, mask=dm)


# (elements of the state tile per program, warps); BLOCK_D = tile // BLOCK_N. Not yet measured on a GPU.
TILES = {"scan": (512, 4)}


def _interpret(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and t.device.type == "cpu"


def _blocks(u, dim, n):
    bn = max(2, triton.next_power_of_2(n))
    elems, nw = TILES["scan"]
    bd = max(2, min(64, elems // bn))
    if _interpret(u):
        bd = max(2, min(16, triton.next_power_of_2(dim)))
    return bd, bn, nw


def _mode(M, dim, batch):
    """(channels per group, groups, strides b, g, n, t) of B or C in canonical form."""
    if M.dim() == 2:  # constant (dim, N): a group per channel, no batch or time stride
        return 1, dim, (0, M.stride(0), M.stride(1), 0)
    return dim // M.shape[1], M.shape[1], M.stride()


def _acc(A):
    return tl.float64 if A.dtype == torch.float64 else tl.float32


def forward(u, delta, A, B, C, D, z, delta_bias, init, seq_idx, softplus, chunk, out, last, norms, ckpt):
    batch, dim, L = u.shape
    n = A.shape[1]
    bd, bn, nw = _blocks(u, dim, n)
    dpg_b, _, sb = _mode(B, dim, batch)
    dpg_c, _, sc = _mode(C, dim, batch)
    nck = -(-L // chunk)
    dummy = last
    zs = z.stride() if z is not None else (0, 0, 0)
    wrap_triton(selective_scan_fwd_kernel)[(batch, triton.cdiv(dim, bd))](
        u, delta, z if z is not None else dummy, A, B, C, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, init if init is not None else dummy,
        seq_idx if seq_idx is not None else dummy,
        out, last, norms if norms.numel() else dummy, ckpt if ckpt.numel() else dummy,
        dim, L, n, dpg_b, dpg_c, nck, chunk,
        *u.stride(), *delta.stride(), *zs, *sb, *sc, *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_INIT=init is not None,
        HAS_SEQ=seq_idx is not None,
        SOFTPLUS=bool(softplus), NORMS=norms.numel() > 0, CKPT=ckpt.numel() > 0, ACC=_acc(A),
        BLOCK_D=bd, BLOCK_N=bn, num_warps=nw)


def backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt, gout, glast, gnorms, softplus, chunk):
    batch, dim, L = u.shape
    n = A.shape[1]
    acc = A.dtype
    bd, bn, nw = _blocks(u, dim, n)
    dpg_b, g_b, sb = _mode(B, dim, batch)
    dpg_c, g_c, sc = _mode(C, dim, batch)
    nck = -(-L // chunk)
    n_dblk = triton.cdiv(dim, bd)
    new = lambda *s: torch.empty(*s, dtype=acc, device=u.device)
    gu, gdelta = new(batch, dim, L), new(batch, dim, L)
    gz = new(batch, dim, L) if z is not None else new(0)
    gA, gD, ginit = new(batch, dim, n), new(batch, dim), new(batch, dim, n)
    gB = torch.zeros(B.shape, dtype=acc, device=u.device) if B.dim() == 4 else new(batch, dim, n)
    gC = torch.zeros(C.shape, dtype=acc, device=u.device) if C.dim() == 4 else new(batch, dim, n)
    xs = new(batch, n_dblk, chunk + 1, bd, bn)  # per-program slab of recomputed states
    dummy = ginit
    zs = z.stride() if z is not None else (0, 0, 0)
    wrap_triton(selective_scan_bwd_kernel)[(batch, n_dblk)](
        u, delta, z if z is not None else dummy, A, B, C, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, ckpt, seq_idx if seq_idx is not None else dummy,
        gout, glast if glast is not None else dummy, gnorms if gnorms is not None else dummy, xs,
        gu, gdelta, gz if z is not None else dummy, gA, gB, gC, gD, ginit,
        dim, L, n, dpg_b, dpg_c, g_b, g_c, nck, chunk, n_dblk,
        *u.stride(), *delta.stride(), *zs, *sb, *sc, *gout.stride(),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        HAS_Z=z is not None, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        HAS_SEQ=seq_idx is not None,
        HAS_GLAST=glast is not None, HAS_GNORMS=gnorms is not None, VAR_B=B.dim() == 4, VAR_C=C.dim() == 4,
        ONE_GROUP_B=B.dim() == 4 and dpg_b % bd == 0, ONE_GROUP_C=C.dim() == 4 and dpg_c % bd == 0,
        ACC=_acc(A), BLOCK_D=bd, BLOCK_N=bn, num_warps=nw)
    return gu, gdelta, gz, gA.sum(0), gB if B.dim() == 4 else gB.sum(0), gC if C.dim() == 4 else gC.sum(0), \
        gD.sum(0), ginit, gdelta.sum((0, 2))
