"""The one tiling loop of the "BLAS tile + fused kernel pass" ops (within-class covariance,
etf_logits, nearest class center, pairwise geometry): the GEMM of a tile goes to the device's BLAS
(torch.mm / addmm), and a fused C++ or Triton pass turns it into the op's result, so nothing larger
than a tile is ever held (docs/design.md, Memory)."""
from typing import Iterator, Tuple

import torch


def row_tiles(n: int, rows: int) -> Iterator[Tuple[int, int]]:
    """``(start, length)`` of consecutive row tiles of at most ``rows`` rows covering ``[0, n)``."""
    rows = max(1, int(rows))
    for r0 in range(0, n, rows):
        yield r0, min(rows, n - r0)


def gram_tiles(x: torch.Tensor, tile: int) -> Iterator[Tuple[Tuple[int, int], Tuple[int, int], torch.Tensor]]:
    """The upper-triangle tiles of ``x @ xᵀ`` (``x`` ``[K, D]``): ``((a0, a1), (b0, b1), G)`` with
    ``G = x[a0:a1] @ x[b0:b1]ᵀ`` for ``b0 >= a0`` (diagonal tiles have ``a0 == b0``)."""
    k = x.shape[0]
    for a0, ra in row_tiles(k, tile):
        for b0, rb in row_tiles(k - a0, tile):
            b0 += a0
            yield (a0, a0 + ra), (b0, b0 + rb), x[a0:a0 + ra] @ x[b0:b0 + rb].t()


def score_tiles(h: torch.Tensor, v: torch.Tensor, cols: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(c0, h @ v[c0:c0 + cols]ᵀ)`` over column tiles of the scores of the rows ``h`` against the
    rows of ``v`` (a ``[len(h), cols]`` tile at a time)."""
    for c0, c in row_tiles(v.shape[0], cols):
        yield c0, h @ v[c0:c0 + c].t()
