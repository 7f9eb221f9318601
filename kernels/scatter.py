"""Triton kernels for class_sums (per-class weighted sums of feature rows).

Two kernels, same result (up to fp32 summation order):

* ``atomic``: programs tile (rows x columns) of the features, load the tile once, and for each
  of the K label columns add ``w * tile`` into ``sums[y]`` with fp32 atomics (counts likewise).
  No preprocessing; contention grows as rows of one class meet in the same program/column.
* ``sorted``: entries are sorted by label once (torch.sort), then each program takes a block of
  sorted entries x a column tile, gathers the rows, reduces each run of equal labels with a
  segmented scan and issues one atomic per run and column. Atomics drop from N*D to about
  (number of runs)*D and are spread over distinct addresses -- the path for large C, where the
  [C, D] output does not fit in L2 and every atomic of the plain path misses.

``choose_path`` picks between them by the rule measured on the GPU (docs/class_sums.md).
Outputs are in the accumulation dtype (fp32; fp64 for fp64 features); labels outside [0, C)
are masked out, never written.
"""
import torch
import triton
import triton.language as tl

from torch.library import wrap_triton


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
def class_sums_sorted_kernel(
    feat_ptr, perm_ptr, sorted_labels_ptr, weights_ptr, sums_ptr, counts_ptr,
    M, D, K, C,
    fs0, fs1, ws0, ws1,
    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs = tl.arange(0, BLOCK_M)
    pos = (pid_m * BLOCK_M + offs).to(tl.int64)
    pmask = pos < M
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    y = tl.load(sorted_labels_ptr + pos, mask=pmask, other=-1)
    y_next = tl.load(sorted_labels_ptr + pos + 1, mask=(pos + 1) < M, other=-1)
    valid = pmask & (y >= 0) & (y < C)
    entry = tl.load(perm_ptr + pos, mask=valid, other=0)
    row = entry // K
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + row * ws0 + (entry % K) * ws1, mask=valid, other=0.0).to(ACC)
    else:
        w = tl.where(valid, 1.0, 0.0).to(ACC)
    x = tl.load(feat_ptr + row[:, None] * fs0 + cols[None, :] * fs1,
                mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC)
    x = x * w[:, None]
    # int32 scan keys (half the registers of int64); exact for valid labels (C < 2**31), and
    # invalid entries carry x = 0 and are never flushed, so their key only needs to be distinct.
    key = tl.where(valid, y, -1).to(tl.int32)
    keys = tl.broadcast_to(key[:, None], (BLOCK_M, BLOCK_D))
    run_sums, _run_keys = tl.associative_scan((x, keys), 0, _segmented_add)
    # A run ends where the next sorted label differs, or at the end of this block.
    run_end = valid & ((y_next != y) | (offs == BLOCK_M - 1))
    tl.atomic_add(sums_ptr + y[:, None] * D + cols[None, :], run_sums,
                  mask=run_end[:, None] & cmask[None, :])
    if pid_d == 0:
        run_counts, _count_keys = tl.associative_scan((w, key), 0, _segmented_add)
        tl.atomic_add(counts_ptr + y, run_counts, mask=run_end)


def choose_path(n_entries: int, num_classes: int, dim: int) -> str:
    """The kernel the auto rule picks: ``"sorted"`` or ``"atomic"``.

    Measured on an H200 (bench/results/2026-11-28-nvidia-h200-run1.json, docs/class_sums.md):
    at N = 1M the sorted kernel won at every C (C=16: 2.7 vs 6.4 ms, C=1024: 2.9 vs 4.0 ms,
    C=50257 D=4096 bf16: 11.3 vs 19.6 ms); at N = 100k-200k the two tie within 10% (launch and
    sort overhead dominate), where atomic skips the sort."""
    return "sorted" if n_entries >= SORTED_MIN_ENTRIES else "atomic"


SORTED_MIN_ENTRIES = 1 << 19


def _tile_d(dim: int, interpret: bool, cap: int) -> int:
    if interpret:
        return 16
    return max(16, min(cap, triton.next_power_of_2(max(dim, 1))))


def class_sums(features: torch.Tensor, labels: torch.Tensor, weights, num_classes: int,
               path: str = "auto", block_m=None, block_d=None, num_warps=None):
    """features [N, D] (any strides), labels [N, K] int32/int64, weights [N, K] or None.

    Returns (sums [C, D], counts [C]) in the accumulation dtype."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" and features.device.type == "cpu"
    n, d = features.shape
    k = labels.shape[1]
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    sums = torch.zeros(num_classes, d, dtype=acc_dtype, device=features.device)
    counts = torch.zeros(num_classes, dtype=acc_dtype, device=features.device)
    if n == 0:
        return sums, counts
    if weights is not None:
        weights = weights.to(acc_dtype)  # [N, K] (or a stride-0 view of [N]); small
    w_arg = weights if weights is not None else counts  # any valid pointer; unused
    ws0, ws1 = (weights.stride(0), weights.stride(1)) if weights is not None else (0, 0)
    if path == "auto":
        path = choose_path(n * k, num_classes, d)
    if path == "atomic":
        block_d_default = _tile_d(d, interpret, 256)
        block_n = 16 if interpret else (block_m or 32)
        block_d = block_d or block_d_default
        grid_d = max(1, triton.cdiv(d, block_d))
        grid = (triton.cdiv(n, block_n), grid_d)
        wrap_triton(class_sums_atomic_kernel)[grid](
            features, labels, w_arg, sums, counts, n, d, k, num_classes,
            features.stride(0), features.stride(1), labels.stride(0), labels.stride(1), ws0, ws1,
            HAS_WEIGHTS=weights is not None, ACC=acc, BLOCK_N=block_n, BLOCK_D=block_d,
            **({} if num_warps is None else dict(num_warps=num_warps)))
    elif path == "sorted":
        flat = labels.reshape(-1).to(torch.int64)  # entry e = i*K + k
        sorted_labels, perm = torch.sort(flat)
        m = flat.shape[0]
        block_m = 16 if interpret else (block_m or 64)
        block_d = block_d or _tile_d(d, interpret, 64)  # the segmented scan keeps (value, key) pairs in registers
        grid_d = max(1, triton.cdiv(d, block_d))
        grid = (triton.cdiv(m, block_m), grid_d)
        wrap_triton(class_sums_sorted_kernel)[grid](
            features, perm, sorted_labels, w_arg, sums, counts, m, d, k, num_classes,
            features.stride(0), features.stride(1), ws0, ws1,
            HAS_WEIGHTS=weights is not None, ACC=acc, BLOCK_M=block_m, BLOCK_D=block_d,
            **({} if num_warps is None else dict(num_warps=num_warps)))
    else:
        raise ValueError(f"class_sums: triton path must be 'auto', 'atomic' or 'sorted', got {path!r}")
    return sums, counts
