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
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" and features.device.type == "cpu"
    n, d = features.shape
    k = labels.shape[1]
    c = means.shape[0]
    acc_dtype = means.dtype
    out = torch.zeros(c, dtype=acc_dtype, device=features.device)
    if n == 0:
        return out
    if weights is not None:
        weights = weights.to(acc_dtype)
    w_arg = weights if weights is not None else out
    ws0, ws1 = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    bn, bd, nw = TILES["variance"]
    if interpret:
        bn, bd = 16, 16
    wrap_triton(within_class_variance_kernel)[(triton.cdiv(n, bn),)](
        features, labels, w_arg, means, out, n, d, k, c,
        features.stride(0), features.stride(1), labels.stride(0), labels.stride(1), ws0, ws1,
        HAS_WEIGHTS=weights is not None, ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
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
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" and features.device.type == "cpu"
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
        HAS_WEIGHTS=weights is not None, ACC=tl.float64 if means.dtype == torch.float64 else tl.float32,
        BLOCK_N=bn, BLOCK_D=bd, num_warps=nw)
