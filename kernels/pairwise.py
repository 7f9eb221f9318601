"""Triton kernel for the pairwise class-geometry sweep: the fused reduction of one Gram tile.

Each program takes BLOCK_A rows of the tile, walks its columns in BLOCK_B blocks, computes every
pair term (cos, cos², coherence, log kernel, CDNV) in fp64 and adds its six partial sums into
``out`` with fp64 atomics. The Gram tile itself comes from cuBLAS (torch.mm).
"""
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import interpreting


@triton.jit
def pairwise_tile_kernel(
    gram_ptr, n2a_ptr, n2b_ptr, va_ptr, vb_ptr, out_ptr,
    TA, TB, gs0, inv_k1,
    STRICT_UPPER: tl.constexpr, HAS_VAR: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    ra = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    ma = ra < TA
    n2a = tl.load(n2a_ptr + ra, mask=ma, other=1.0)
    if HAS_VAR:
        va = tl.load(va_ptr + ra, mask=ma, other=0.0)
    s_pairs = tl.zeros([BLOCK_A], dtype=tl.float64)
    s_cos = tl.zeros([BLOCK_A], dtype=tl.float64)
    s_cos2 = tl.zeros([BLOCK_A], dtype=tl.float64)
    s_coh = tl.zeros([BLOCK_A], dtype=tl.float64)
    s_log = tl.zeros([BLOCK_A], dtype=tl.float64)
    s_cdnv = tl.zeros([BLOCK_A], dtype=tl.float64)
    for b0 in range(0, TB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mb = rb < TB
        m = ma[:, None] & mb[None, :]
        if STRICT_UPPER:
            m = m & (rb[None, :] > ra[:, None])
        g = tl.load(gram_ptr + ra[:, None].to(tl.int64) * gs0 + rb[None, :], mask=m, other=0.0).to(tl.float64)
        n2b = tl.load(n2b_ptr + rb, mask=mb, other=1.0)
        cos = g / tl.sqrt(n2a[:, None] * n2b[None, :])
        s_pairs += tl.sum(tl.where(m, 1.0, 0.0).to(tl.float64), axis=1)
        s_cos += tl.sum(tl.where(m, cos, 0.0), axis=1)
        s_cos2 += tl.sum(tl.where(m, cos * cos, 0.0), axis=1)
        s_coh += tl.sum(tl.where(m, tl.abs(cos + inv_k1), 0.0), axis=1)
        # log in fp32: Triton has no fp64 log on every backend; the terms are O(1) each
        lk = -0.5 * tl.log(tl.maximum(2.0 - 2.0 * cos, 1e-30).to(tl.float32)).to(tl.float64)
        s_log += tl.sum(tl.where(m, lk, 0.0), axis=1)
        if HAS_VAR:
            vb = tl.load(vb_ptr + rb, mask=mb, other=0.0)
            d2 = tl.maximum(n2a[:, None] + n2b[None, :] - 2.0 * g, 0.0)
            s_cdnv += tl.sum(tl.where(m, (va[:, None] + vb[None, :]) / (2.0 * d2), 0.0), axis=1)
    tl.atomic_add(out_ptr + 0, tl.sum(s_pairs, axis=0))
    tl.atomic_add(out_ptr + 1, tl.sum(s_cos, axis=0))
    tl.atomic_add(out_ptr + 2, tl.sum(s_cos2, axis=0))
    tl.atomic_add(out_ptr + 3, tl.sum(s_coh, axis=0))
    tl.atomic_add(out_ptr + 4, tl.sum(s_log, axis=0))
    tl.atomic_add(out_ptr + 5, tl.sum(s_cdnv, axis=0))


TILES = {"pairwise": (32, 128, 4)}


def pairwise_tile_sums(gram, n2a, n2b, va, vb, strict_upper: bool, inv_k1: float, out):
    """out[6] (fp64) += the pair sums of one Gram tile (see csrc/pairwise.cpp for the terms)."""
    interpret = interpreting(gram)
    ta, tb = gram.shape
    ba, bb, nw = TILES["pairwise"]
    if interpret:
        ba, bb = 16, 16
    wrap_triton(pairwise_tile_kernel)[(triton.cdiv(ta, ba),)](
        gram, n2a, n2b, va if va is not None else n2a, vb if vb is not None else n2b, out,
        ta, tb, gram.stride(0), inv_k1,
        STRICT_UPPER=strict_upper, HAS_VAR=va is not None, BLOCK_A=ba, BLOCK_B=bb, num_warps=nw)
