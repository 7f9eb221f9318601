"""Triton kernels for within-class statistics against given class means.

``within_class_variance``: a program takes BLOCK_N rows, walks the columns in BLOCK_D tiles,
gathers each row's class-mean tile, and reduces ``(h - mu)^2`` over the row in registers; one
atomic per row adds ``w * distance`` into ``out[y]``. Features are read once (per label column
with soft labels), means are only read, nothing [N, D] is materialised.
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import interpreting, tl_acc


@triton.jit
def within_class_variance_kernel(
    feat_ptr, labels_ptr, weights_ptr, means_ptr, out_ptr,
    N, D, K, C,
    fs0, fs1, ls0, ls1, ws0, ws1,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    for k in range(K):
        y = tl.load(labels_ptr + rows * ls0 + k * ls1, mask=rmask, other=-1).to(tl.int64)
        valid = rmask & (y >= 0) & (y < C)
        dist = tl.zeros([BLOCK_N], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = valid[:, None] & (cols < D)[None, :]
            x = tl.load(feat_ptr + rows[:, None] * fs0 + cols[None, :] * fs1, mask=m, other=0.0).to(ACC)
            mu = tl.load(means_ptr + y[:, None] * D + cols[None, :], mask=m, other=0.0)
            diff = x - mu
            dist += tl.sum(diff * diff, axis=1)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + rows * ws0 + k * ws1, mask=valid, other=0.0).to(ACC)
            dist = dist * w
        tl.atomic_add(out_ptr + y, dist, mask=valid)


# (rows, columns, warps) per program
TILES = {"variance": (32, 128, 4)}


def within_class_variance(features: torch.Tensor, labels: torch.Tensor, weights, means: torch.Tensor):
    """features [N, D] (any strides), labels [N, K], weights [N, K] or None, means [C, D]
    contiguous in the accumulation dtype. Returns V [C] in the accumulation dtype."""
    interpret = interpreting(features)
    n, d = features.shape
    k = labels.shape[1]
    c = means.shape[0]
    acc_t = means.dtype
    out = torch.zeros(c, dtype=acc_t, device=features.device)
    if n == 0:
        return out
    if weights is not None:
        weights = weights.to(acc_t)
    w_arg = weights if weights is not None else out
    ws0, ws1 = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    bn, bd, nw = TILES["variance"]
    if interpret:
        bn, bd = 16, 16
    wrap_triton(within_class_variance_kernel)[(triton.cdiv(n, bn),)](
        features, labels, w_arg, means, out, n, d, k, c,
        features.stride(0), features.stride(1), labels.stride(0), labels.stride(1), ws0, ws1,
        HAS_WEIGHTS=weights is not None, ACC=tl_acc(acc_t),
        BLOCK_N=bn, BLOCK_D=bd, num_warps=nw)
    return out


@triton.jit
def center_rows_kernel(
    feat_ptr, labels_ptr, weights_ptr, means_ptr, out_ptr, out_w_ptr,
    R, D, C, fs0, fs1, ls0, ws0,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[r] = h[r] - means[y[r]] (zero row, weight 0 where y is outside [0, C)); one Gram tile.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < R
    y = tl.load(labels_ptr + rows * ls0, mask=rmask, other=-1).to(tl.int64)
    valid = rmask & (y >= 0) & (y < C)
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + rows * ws0, mask=valid, other=0.0).to(ACC)
    else:
        w = tl.where(valid, 1.0, 0.0).to(ACC)
    tl.store(out_w_ptr + rows, w, mask=rmask)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = valid[:, None] & (cols < D)[None, :]
        x = tl.load(feat_ptr + rows[:, None] * fs0 + cols[None, :] * fs1, mask=m, other=0.0).to(ACC)
        mu = tl.load(means_ptr + y[:, None] * D + cols[None, :], mask=m, other=0.0)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], x - mu, mask=rmask[:, None] & (cols < D)[None, :])


TILES["center"] = (32, 128, 4)


def center_rows(features, labels, weights, means, out, out_weights):
    """out[:R] = features - means[labels]; labels [R] (one soft-label column), weights [R] or None."""
    interpret = interpreting(features)
    r, d = features.shape
    bn, bd, nw = TILES["center"]
    if interpret:
        bn, bd = 16, 16
    if weights is not None:
        weights = weights.to(means.dtype)
    wrap_triton(center_rows_kernel)[(triton.cdiv(r, bn),)](
        features, labels, weights if weights is not None else out_weights, means, out, out_weights,
        r, d, means.shape[0], features.stride(0), features.stride(1), labels.stride(0),
        weights.stride(0) if weights is not None else 0,
        HAS_WEIGHTS=weights is not None, ACC=tl_acc(means.dtype),
        BLOCK_N=bn, BLOCK_D=bd, num_warps=nw)


@triton.jit
def within_class_covariance_kernel(
    feat_ptr, labels_ptr, weights_ptr, means_ptr, out_ptr,
    N, D, C, fs0, fs1, ls0, ws0, rows_per_split,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One [BLOCK_D, BLOCK_D] block (bi, bj) of S_W = Σ_r w_r c_r c_rᵀ with c = h − μ[y], over one
    # split of the rows; the centring is fused into the loads of both operands (no centred copy
    # anywhere), the block product runs on tl.dot, and splits meet in out with fp32 atomics.
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    split = tl.program_id(2)
    ci = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = bj * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = ci < D
    mj = cj < D
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC)
    r0 = split * rows_per_split
    for k0 in range(0, rows_per_split, BLOCK_K):
        rows = (r0 + k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        rmask = (rows < N) & (k0 + tl.arange(0, BLOCK_K) < rows_per_split)
        y = tl.load(labels_ptr + rows * ls0, mask=rmask, other=-1).to(tl.int64)
        valid = rmask & (y >= 0) & (y < C)
        a = tl.load(feat_ptr + rows[:, None] * fs0 + ci[None, :] * fs1, mask=valid[:, None] & mi[None, :], other=0.0)
        a = a.to(ACC) - tl.load(means_ptr + y[:, None] * D + ci[None, :], mask=valid[:, None] & mi[None, :], other=0.0)
        b = tl.load(feat_ptr + rows[:, None] * fs0 + cj[None, :] * fs1, mask=valid[:, None] & mj[None, :], other=0.0)
        b = b.to(ACC) - tl.load(means_ptr + y[:, None] * D + cj[None, :], mask=valid[:, None] & mj[None, :], other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + rows * ws0, mask=valid, other=0.0).to(ACC)
            b = b * w[:, None]
        acc += tl.dot(tl.trans(a.to(DOT)), b.to(DOT), input_precision="ieee", out_dtype=ACC)
    tl.atomic_add(out_ptr + ci[:, None] * D + cj[None, :], acc, mask=mi[:, None] & mj[None, :])


TILES["covariance"] = (64, 64, 4)  # (rows per step, output block, warps): not yet tuned on a GPU


def within_class_covariance(features, labels, weights, means, splits=None):
    """Fused-centring covariance: features [N, D], labels [N, K], weights [N, K] or None, means
    [C, D] contiguous in the accumulation dtype. Returns S_W [D, D] in that dtype (not symmetrised)."""
    interpret = interpreting(features)
    n, d = features.shape
    acc_t = means.dtype
    out = torch.zeros(d, d, dtype=acc_t, device=features.device)
    if n == 0 or d == 0:
        return out
    bk, bd, nw = TILES["covariance"]
    if interpret:
        bk, bd = 16, 16
    acc = tl_acc(acc_t)
    # products in the feature dtype for fp16/bf16 (what a bf16 torch.mm does), else in ACC (IEEE)
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(features.dtype, acc)
    blocks = triton.cdiv(d, bd)
    if splits is None:  # enough programs to fill the GPU: about 4 per SM over the output blocks
        sms = torch.cuda.get_device_properties(features.device).multi_processor_count if features.is_cuda else 4
        splits = max(1, min(triton.cdiv(n, bk), (4 * sms) // (blocks * blocks) or 1))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), bk) * bk
    splits = triton.cdiv(n, rows_per_split)
    if weights is not None:
        weights = weights.to(acc_t)
    for k in range(labels.shape[1]):
        lab = labels[:, k]
        wk = None if weights is None else weights[:, k]
        wrap_triton(within_class_covariance_kernel)[(blocks, blocks, splits)](
            features, lab, wk if wk is not None else out, means, out,
            n, d, means.shape[0], features.stride(0), features.stride(1), lab.stride(0),
            wk.stride(0) if wk is not None else 0, rows_per_split,
            HAS_WEIGHTS=wk is not None, ACC=acc, DOT=dot, BLOCK_K=bk, BLOCK_D=bd, num_warps=nw)
    return out
