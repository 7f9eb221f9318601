"""Triton kernel for nearest_class_center and the NC4 classifier decision: a fused GEMM +
running arg-min of ``offsets[c] + alpha · h·v_c``.

A program owns BLOCK_N rows; it walks the classes in BLOCK_C tiles, builds ``h · vᵀ`` for the tile
with ``tl.dot`` over BLOCK_D column steps, turns it into the score and keeps, per row, the best
score and its class in registers (ties: lowest class). Nothing ``[N, C]`` is written.
Nearest center: v = μ, offsets = ‖μ‖², alpha = −2. Classifier: v = w, offsets = −b, alpha = −1.
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import interpreting


@triton.jit
def nearest_center_kernel(
    feat_ptr, means_ptr, norms2_ptr, out_ptr,
    N, C, D, fs0, fs1, ms0, alpha,
    DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < C
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            dmask = cols < D
            h = tl.load(feat_ptr + rows[:, None] * fs0 + cols[None, :] * fs1,
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            mu = tl.load(means_ptr + cls[:, None].to(tl.int64) * ms0 + cols[None, :],
                         mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc += tl.dot(h.to(DOT), tl.trans(mu.to(DOT)), input_precision="ieee", out_dtype=tl.float32)
        n2 = tl.load(norms2_ptr + cls, mask=cmask, other=float("inf"))
        score = n2[None, :] + alpha * acc
        score = tl.where(cmask[None, :], score, float("inf"))
        tile_best, tile_idx = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an earlier tile keeps equal scores
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, c0 + tile_idx.to(tl.int64), best_idx)
    tl.store(out_ptr + rows, best_idx, mask=rmask)


TILES = {"nearest_center": (64, 64, 32, 4)}  # rows, classes, columns per step, warps


def tile_argmin(features: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_c offsets[c] + alpha * features · rows[c]: features [N, D] (fp16/bf16/fp32, any
    strides), rows [C, D] fp32 contiguous, offsets [C] fp32 -> [N] int64."""
    interpret = interpreting(features)
    n, d = features.shape
    out = torch.zeros(n, dtype=torch.long, device=features.device)
    if n == 0:
        return out
    bn, bc, bd, nw = TILES["nearest_center"]
    if interpret:
        bn, bc, bd = 16, 16, 16
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(features.dtype, tl.float32)
    wrap_triton(nearest_center_kernel)[(triton.cdiv(n, bn),)](
        features, rows, offsets.float().contiguous(), out, n, rows.shape[0], d, features.stride(0), features.stride(1),
        rows.stride(0), alpha,
        DOT=dot, BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=nw)
    return out
