"""Triton kernels for class_sums (per-class weighted sums of feature rows).

Three kernels, same result (up to fp32 summation order):

* ``atomic``: programs tile (rows x columns) of the features, load the tile once, and for each
  of the K label columns add ``w * tile`` into ``sums[y]`` with fp32 atomics (counts likewise).
  No preprocessing; every element costs an atomic, and at large C each atomic misses L2.
* ``sorted``: entries are sorted by label once (torch.sort); a program takes BLOCK_M consecutive
  sorted entries, builds the [BLOCK_M, BLOCK_M] "same class" matrix S (S[i, j] = w_j when entries
  i and j share a label), and walks the columns: ``S @ X`` on the tensor cores gives every entry
  its run's total, and one atomic per run and column (at the run's last entry) writes it. Atomics
  drop from N*D to about (runs)*D, rows are read whole by one program.
* ``scan``: the sorted order again, reduced with a segmented ``tl.associative_scan`` per column
  tile instead of a matrix product (the fallback for fp64, where tensor cores do not apply).

``choose_path`` picks among them by the rule measured on the GPU (docs/class_sums.md).
Outputs are in the accumulation dtype (fp32; fp64 for fp64 features); labels outside [0, C)
are masked out, never written.
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from ._common import acc_dtype, interpreting, tl_acc


@triton.jit
def _segmented_add(v1, k1, v2, k2):
    # Combine for a segmented inclusive scan keyed by label; associative because the keys of a
    # block are sorted (a key never reappears after a different one).
    return tl.where(k1 == k2, v1 + v2, v2), k2


@triton.jit
def class_sums_atomic_kernel(
    feat_ptr, labels_ptr, weights_ptr, sums_ptr, counts_ptr,
    N, D, K, C,
    fs0, fs1, ls0, ls1, ws0, ws1,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    x = tl.load(feat_ptr + rows[:, None] * fs0 + cols[None, :] * fs1,
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(ACC)
    for k in range(K):
        y = tl.load(labels_ptr + rows * ls0 + k * ls1, mask=rmask, other=-1).to(tl.int64)
        valid = rmask & (y >= 0) & (y < C)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + rows * ws0 + k * ws1, mask=valid, other=0.0).to(ACC)
        else:
            w = tl.where(valid, 1.0, 0.0).to(ACC)
        tl.atomic_add(sums_ptr + y[:, None] * D + cols[None, :], x * w[:, None],
                      mask=valid[:, None] & cmask[None, :])
        if pid_d == 0:
            tl.atomic_add(counts_ptr + y, w, mask=valid)


@triton.jit
def _sorted_block(perm_ptr, sorted_labels_ptr, weights_ptr, block, M, K, C, ws0, ws1,
                  HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Block ``block`` of the label-sorted entries: (label, feature row, weight, valid, run end).
    Invalid entries (padding, labels outside [0, C)) get weight 0 and are never flushed; a run
    ends where the next sorted label differs, or at the end of the block."""
    offs = tl.arange(0, BLOCK_M)
    pos = (block * BLOCK_M + offs).to(tl.int64)
    pmask = pos < M
    y = tl.load(sorted_labels_ptr + pos, mask=pmask, other=-1)
    y_next = tl.load(sorted_labels_ptr + pos + 1, mask=(pos + 1) < M, other=-1)
    valid = pmask & (y >= 0) & (y < C)
    entry = tl.load(perm_ptr + pos, mask=valid, other=0)
    row = entry // K
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + row * ws0 + (entry % K) * ws1, mask=valid, other=0.0).to(ACC)
    else:
        w = tl.where(valid, 1.0, 0.0).to(ACC)
    run_end = valid & ((y_next != y) | (offs == BLOCK_M - 1))
    return y, row, w, valid, run_end


@triton.jit
def class_sums_scan_kernel(
    feat_ptr, perm_ptr, sorted_labels_ptr, weights_ptr, sums_ptr, counts_ptr,
    M, D, K, C,
    fs0, fs1, ws0, ws1,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(1)
    y, row, w, valid, run_end = _sorted_block(perm_ptr, sorted_labels_ptr, weights_ptr, tl.program_id(0), M, K, C,
                                              ws0, ws1, HAS_WEIGHTS, ACC, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = tl.load(feat_ptr + row[:, None] * fs0 + cols[None, :] * fs1,
                mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC)
    x = x * w[:, None]
    # int32 scan keys (half the registers of int64); exact for valid labels (C < 2**31), and
    # invalid entries carry x = 0 and are never flushed, so their key only needs to be distinct.
    key = tl.where(valid, y, -1).to(tl.int32)
    keys = tl.broadcast_to(key[:, None], (BLOCK_M, BLOCK_D))
    run_sums, _run_keys = tl.associative_scan((x, keys), 0, _segmented_add)
    tl.atomic_add(sums_ptr + y[:, None] * D + cols[None, :], run_sums,
                  mask=run_end[:, None] & cmask[None, :])
    if pid_d == 0:
        run_counts, _count_keys = tl.associative_scan((w, key), 0, _segmented_add)
        tl.atomic_add(counts_ptr + y, run_counts, mask=run_end)


@triton.jit
def class_sums_sorted_kernel(
    feat_ptr, perm_ptr, sorted_labels_ptr, weights_ptr, sums_ptr, counts_ptr,
    M, D, K, C,
    fs0, fs1, ws0, ws1,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    y, row, w, valid, run_end = _sorted_block(perm_ptr, sorted_labels_ptr, weights_ptr, tl.program_id(0), M, K, C,
                                              ws0, ws1, HAS_WEIGHTS, ACC, BLOCK_M)
    key = tl.where(valid, y, -1)
    # seg[i, j] = w_j if entries i and j have the same (valid) label: row i of seg @ X is the
    # weighted total of i's run within this block.
    seg = tl.where((key[:, None] == key[None, :]) & valid[None, :], w[None, :], 0.0).to(ACC)
    tl.atomic_add(counts_ptr + y, tl.sum(seg, axis=1), mask=run_end)  # each run once, at its end
    seg = seg.to(DOT)  # DOT is the feature dtype only when seg is 0/1 (exact); else ACC
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(feat_ptr + row[:, None] * fs0 + cols[None, :] * fs1,
                    mask=valid[:, None] & cmask[None, :], other=0.0).to(DOT)
        run_sums = tl.dot(seg, x, input_precision="ieee", out_dtype=ACC)
        tl.atomic_add(sums_ptr + y[:, None] * D + cols[None, :], run_sums,
                      mask=run_end[:, None] & cmask[None, :])


def choose_path(n_entries: int, num_classes: int, dim: int, dtype: torch.dtype) -> str:
    """The kernel the auto rule picks: ``"sorted"``, ``"scan"`` or ``"atomic"``.

    Measured on an H200 (bench/results/2026-11-28-nvidia-h200-*.json, docs/class_sums.md): with
    about a million entries the sorted kernels beat atomics at every C (C=16, 1024, 50257); at
    100k-200k entries the two tie within 10% (launch and sort overhead dominate) and atomics skip
    the sort."""
    if n_entries < SORTED_MIN_ENTRIES:
        return "atomic"
    return "scan" if dtype == torch.float64 else "sorted"


SORTED_MIN_ENTRIES = 1 << 19

# Tile defaults from bench/tune_scatter.py on an H200 (bench/results/2026-11-28-nvidia-h200-tune.json):
# (block over rows or sorted entries, block over columns, warps)
TILES = {"atomic": (32, 128, 8), "scan": (32, 64, 4), "sorted": (64, 128, 4)}


def class_sums(features: torch.Tensor, labels: torch.Tensor, weights, num_classes: int,
               path: str = "auto", block_m=None, block_d=None, num_warps=None):
    """features [N, D] (any strides), labels [N, K] int32/int64, weights [N, K] or None.

    Returns (sums [C, D], counts [C]) in the accumulation dtype. ``block_m``, ``block_d`` and
    ``num_warps`` override the tile defaults (for bench/tune_scatter.py)."""
    interpret = interpreting(features)
    n, d = features.shape
    k = labels.shape[1]
    acc_t = acc_dtype(features.dtype)
    acc = tl_acc(acc_t)
    sums = torch.zeros(num_classes, d, dtype=acc_t, device=features.device)
    counts = torch.zeros(num_classes, dtype=acc_t, device=features.device)
    if n == 0:
        return sums, counts
    if weights is not None:
        weights = weights.to(acc_t)  # [N, K] (or a stride-0 view of [N]); small
    w_arg = weights if weights is not None else counts  # any valid pointer; unused
    ws0, ws1 = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    if path == "auto":
        path = choose_path(n * k, num_classes, d, features.dtype)
    if path == "sorted" and features.dtype == torch.float64:
        path = "scan"  # no fp64 tensor-core products
    if path not in TILES:
        raise ValueError(f"class_sums: triton path must be 'auto', 'atomic', 'sorted' or 'scan', got {path!r}")
    bm, bd, nw = TILES[path]
    bm, bd, nw = block_m or bm, block_d or bd, num_warps or nw
    if interpret:  # tiny tiles: the interpreter runs every element in numpy
        bm, bd = 16, 16
    common = dict(HAS_WEIGHTS=weights is not None, ACC=acc, BLOCK_D=bd, num_warps=nw)
    if path == "atomic":
        grid = (triton.cdiv(n, bm), max(1, triton.cdiv(d, bd)))
        wrap_triton(class_sums_atomic_kernel)[grid](
            features, labels, w_arg, sums, counts, n, d, k, num_classes,
            features.stride(0), features.stride(1), labels.stride(0), labels.stride(1), ws0, ws1,
            BLOCK_N=bm, **common)
        return sums, counts
    flat = labels.reshape(-1).to(torch.int64)  # entry e = i*K + k
    sorted_labels, perm = torch.sort(flat)
    m = flat.shape[0]
    args = (features, perm, sorted_labels, w_arg, sums, counts, m, d, k, num_classes,
            features.stride(0), features.stride(1), ws0, ws1)
    if path == "scan":
        grid = (triton.cdiv(m, bm), max(1, triton.cdiv(d, bd)))
        wrap_triton(class_sums_scan_kernel)[grid](*args, BLOCK_M=bm, **common)
    else:
        exact_01 = weights is None and features.dtype in (torch.float16, torch.bfloat16)
        dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[features.dtype] if exact_01 else acc
        wrap_triton(class_sums_sorted_kernel)[(triton.cdiv(m, bm),)](*args, DOT=dot, BLOCK_M=bm, **common)
    return sums, counts
