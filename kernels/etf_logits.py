"""Triton kernels for etf_logits = scale · normalize(h) @ Eᵀ and its backward.

* forward: one GEMM kernel; the row norms of h are summed from the same h tiles the product
  loads (the normalisation is fused into the GEMM: no normalised copy of h), and the epilogue
  multiplies each row by scale / max(‖h‖, eps).
* grad_h: one GEMM kernel over classes, g = scale · G E, with the projection epilogue
  grad_h = (g − ĥ (ĥ·g)) / ‖h‖. The row term ĥ·g is Σ_c G_ic L_ic (L = the saved logits), so
  it is summed from the same G tiles, alongside the product.
* grad_E: one GEMM kernel over rows, scale · Gᵀ (h / max(‖h‖, eps)), the row scaling applied to
  the h tiles as they are loaded.
Row inverse norms for the backward come from a small row kernel ([N] fp32, the only temporary).
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import acc_dtype, interpreting, tl_acc


@triton.jit
def etf_logits_fwd_kernel(
    h_ptr, e_ptr, out_ptr, par_ptr, N, C, D, hs0, hs1, es0, es1, os0,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cls = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    rmask = rows < N
    cmask = cls < C
    scale = tl.load(par_ptr)
    eps = tl.load(par_ptr + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    ss = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dmask = cols < D
        h = tl.load(h_ptr + rows[:, None] * hs0 + cols[None, :] * hs1, mask=rmask[:, None] & dmask[None, :], other=0.0)
        e = tl.load(e_ptr + cls[None, :] * es0 + cols[:, None] * es1, mask=cmask[None, :] & dmask[:, None], other=0.0)
        hf = h.to(ACC)
        ss += tl.sum(hf * hf, axis=1)
        acc += tl.dot(h.to(DOT), e.to(DOT), input_precision="ieee", out_dtype=ACC)
    f = scale / tl.maximum(tl.sqrt(ss), eps)
    out = acc * f[:, None]
    tl.store(out_ptr + rows[:, None] * os0 + cls[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def row_inv_norms_kernel(h_ptr, inv_ptr, par_ptr, N, D, hs0, hs1, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    eps = tl.load(par_ptr + 1)
    ss = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * hs0 + cols[None, :] * hs1, mask=rmask[:, None] & (cols < D)[None, :],
                    other=0.0).to(ACC)
        ss += tl.sum(h * h, axis=1)
    tl.store(inv_ptr + rows, 1.0 / tl.maximum(tl.sqrt(ss), eps), mask=rmask)


@triton.jit
def etf_logits_grad_h_kernel(
    g_ptr, l_ptr, e_ptr, h_ptr, inv_ptr, par_ptr, out_ptr, N, C, D, gs0, gs1, ls0, ls1, es0, es1, hs0, hs1,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    rmask = rows < N
    dmask = cols < D
    scale = tl.load(par_ptr)
    eps = tl.load(par_ptr + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    gl = tl.zeros([BLOCK_M], dtype=ACC)  # Σ_c G_ic L_ic = ĥ_i · g_i
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < C
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * gs0 + cls[None, :] * gs1, mask=m2, other=0.0)
        lg = tl.load(l_ptr + rows[:, None] * ls0 + cls[None, :] * ls1, mask=m2, other=0.0)
        gl += tl.sum(g.to(ACC) * lg.to(ACC), axis=1)
        e = tl.load(e_ptr + cls[:, None] * es0 + cols[None, :] * es1, mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(g.to(DOT), e.to(DOT), input_precision="ieee", out_dtype=ACC)
    inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
    h = tl.load(h_ptr + rows[:, None] * hs0 + cols[None, :] * hs1, mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    # ‖h‖ > eps: (g − ĥ(ĥ·g)) / ‖h‖ with g = scale·acc and ĥ = h·inv; clamped rows: g / eps
    # (then inv = 1/eps and the radial term drops).
    clamped = inv >= 1.0 / eps
    radial = tl.where(clamped, 0.0, gl * inv)  # ĥ (ĥ·g) = h · inv · gl
    grad = (scale * acc - h * radial[:, None]) * inv[:, None]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], grad.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def etf_logits_grad_e_kernel(
    g_ptr, h_ptr, inv_ptr, par_ptr, out_ptr, N, C, D, gs0, gs1, hs0, hs1,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cls = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    cmask = cls < C
    dmask = cols < D
    scale = tl.load(par_ptr)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        gt = tl.load(g_ptr + rows[None, :] * gs0 + cls[:, None] * gs1, mask=cmask[:, None] & rmask[None, :], other=0.0)
        h = tl.load(h_ptr + rows[:, None] * hs0 + cols[None, :] * hs1, mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
        hn = h.to(ACC) * inv[:, None]
        acc += tl.dot(gt.to(DOT), hn.to(DOT), input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + cls[:, None] * D + cols[None, :], acc * scale, mask=cmask[:, None] & dmask[None, :])


# (rows, classes, columns per step, warps): forward; the backward kernels use the same tiles.
TILES = {"fwd": (128, 128, 32, 8), "grad_h": (64, 64, 32, 4), "grad_e": (64, 64, 32, 4), "norms": (32, 128, 4)}
INTERPRET_TILES = 16  # the interpreter runs numpy per program: small tiles, few programs


def _dot(dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}.get(dtype, tl.float32)


_acc = tl_acc


def _params(h: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """[scale, eps] in the accumulation dtype: a pointer argument, so fp64 runs keep fp64 scalars
    (a Python float argument would reach the kernel as fp32)."""
    dt = acc_dtype(h.dtype)
    return torch.tensor([scale, eps], dtype=dt, device=h.device)


def forward(h: torch.Tensor, etf: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """h [N, D] (fp16/bf16/fp32, any strides), etf [C, D] (any strides) -> logits [N, C] in h's dtype."""
    n, d = h.shape
    c = etf.shape[0]
    out = torch.empty(n, c, dtype=h.dtype, device=h.device)
    if n == 0 or c == 0:
        return out
    bm, bc, bd, nw = TILES["fwd"]
    if interpreting(h):
        bm = bc = bd = INTERPRET_TILES
    wrap_triton(etf_logits_fwd_kernel)[(triton.cdiv(n, bm), triton.cdiv(c, bc))](
        h, etf, out, _params(h, scale, eps), n, c, d, h.stride(0), h.stride(1), etf.stride(0), etf.stride(1),
        out.stride(0), DOT=_dot(h.dtype), ACC=_acc(h.dtype), BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd, num_warps=nw)
    return out


def row_inv_norms(h: torch.Tensor, eps: float) -> torch.Tensor:
    n, d = h.shape
    inv = torch.empty(n, dtype=acc_dtype(h.dtype), device=h.device)
    if n == 0:
        return inv
    bm, bd, nw = TILES["norms"]
    if interpreting(h):
        bm = bd = INTERPRET_TILES
    wrap_triton(row_inv_norms_kernel)[(triton.cdiv(n, bm),)](
        h, inv, _params(h, 1.0, eps), n, d, h.stride(0), h.stride(1), ACC=_acc(h.dtype), BLOCK_M=bm, BLOCK_D=bd, num_warps=nw)
    return inv


def backward(grad: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, etf: torch.Tensor, scale: float,
             eps: float, need_h: bool, need_etf: bool):
    """grad, logits [N, C]; h [N, D]; etf [C, D] -> (grad_h [N, D] in h's dtype or empty,
    grad_etf [C, D] in the accumulation dtype or empty)."""
    n, d = h.shape
    c = etf.shape[0]
    gh = torch.zeros(n, d, dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    gdt = acc_dtype(h.dtype)
    ge = torch.zeros(c, d, dtype=gdt, device=h.device) if need_etf else h.new_empty(0, dtype=gdt)
    if n == 0 or c == 0 or d == 0:
        return gh, ge
    inv = row_inv_norms(h, eps)
    par = _params(h, scale, eps)
    dot, acc = _dot(h.dtype), _acc(h.dtype)
    interp = interpreting(h)
    if need_h:
        bm, bc, bd, nw = TILES["grad_h"]
        if interp:
            bm = bc = bd = INTERPRET_TILES
        wrap_triton(etf_logits_grad_h_kernel)[(triton.cdiv(n, bm), triton.cdiv(d, bd))](
            grad, logits, etf, h, inv, par, gh, n, c, d, grad.stride(0), grad.stride(1), logits.stride(0),
            logits.stride(1), etf.stride(0), etf.stride(1), h.stride(0), h.stride(1),
            DOT=dot, ACC=acc, BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd, num_warps=nw)
    if need_etf:
        bc, bd, bn, nw = TILES["grad_e"]
        if interp:
            bc = bd = bn = INTERPRET_TILES
        wrap_triton(etf_logits_grad_e_kernel)[(triton.cdiv(c, bc), triton.cdiv(d, bd))](
            grad, h, inv, par, ge, n, c, d, grad.stride(0), grad.stride(1), h.stride(0), h.stride(1),
            DOT=dot, ACC=acc, BLOCK_C=bc, BLOCK_D=bd, BLOCK_N=bn, num_warps=nw)
    return gh, ge
