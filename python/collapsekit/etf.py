"""Simplex equiangular tight frames (ETFs): construction, the closest scaled ETF to a matrix,
and the distance of a matrix from ETF geometry.

Notation: ``C`` classes, ``D`` dimensions, ``Q`` a ``[C, C−1]`` orthonormal basis of the
complement of the all-ones vector ``1`` (so ``QᵀQ = I`` and ``QQᵀ = I − 11ᵀ/C``). Every simplex ETF
with unit rows is ``E = √(C/(C−1)) · Q Uᵀ`` for some ``U`` with ``C−1`` orthonormal columns in
``R^D``: ``E Eᵀ = C/(C−1) (I − 11ᵀ/C)``, so rows have norm 1, pairwise cosine ``−1/(C−1)`` and
sum to zero. It needs ``C − 1 ≤ D``.

``Q`` is never formed: we use the columns ``0..C−2`` of the Householder reflection
``H = I − 2vvᵀ/‖v‖²`` (``v = e_{C−1} − 1/√C``) that swaps the last basis vector with ``1/√C``;
applying it costs ``O(C·D)``, so nothing ``C × C`` exists even at vocabulary scale.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _validate


def _householder_v(c: int, dtype, device) -> Tensor:
    v = torch.full((c,), -1.0 / math.sqrt(c), dtype=dtype, device=device)
    v[-1] += 1.0
    return v


def _apply_q(x: Tensor) -> Tensor:
    """``Q x`` for ``x [C−1, k]`` -> ``[C, k]``."""
    c = x.shape[0] + 1
    v = _householder_v(c, x.dtype, x.device)
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])], 0)  # P x with P = [I; 0]
    return padded - (2.0 / (v @ v)) * torch.outer(v, v[:-1] @ x)


def _apply_qt(w: Tensor) -> Tensor:
    """``Qᵀ w`` for ``w [C, k]`` -> ``[C−1, k]``."""
    c = w.shape[0]
    v = _householder_v(c, w.dtype, w.device)
    hw = w - (2.0 / (v @ v)) * torch.outer(v, v @ w)
    return hw[:-1]


def check_etf_size(c: int, d: int, op: str) -> None:
    if c < 2:
        raise ValueError(f"{op}: a simplex ETF needs at least 2 classes, got num_classes={c}")
    if c - 1 > d:
        raise ValueError(f"{op}: a simplex ETF of {c} classes needs dim >= num_classes - 1 = {c - 1}, "
                         f"got dim={d} (C classes span a (C-1)-dimensional subspace)")


def simplex_etf(num_classes: int, dim: int, *, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """A random simplex ETF: ``[num_classes, dim]`` with unit rows, pairwise cosine
    ``−1/(C−1)`` and rows summing to zero.

    ``E = √(C/(C−1)) · Q Uᵀ`` with ``U`` a Haar-random ``[D, C−1]`` orthonormal frame (QR of a
    Gaussian matrix with the signs of R's diagonal moved into Q). Computed in fp64, returned in
    ``dtype``. ``generator`` makes it reproducible (a CPU generator; the frame is drawn on CPU).

    Raises ValueError if ``num_classes < 2`` or ``num_classes − 1 > dim``.
    """
    op = "simplex_etf"
    for name, v in (("num_classes", num_classes), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    c, d = num_classes, dim
    check_etf_size(c, d, op)
    if dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype, got {dtype}")
    g = torch.randn(d, c - 1, generator=generator, dtype=torch.float64)
    u, r = torch.linalg.qr(g)
    u = u * torch.sign(torch.sign(r.diagonal()) + 0.5)  # Haar: fix the sign ambiguity of QR
    e = math.sqrt(c / (c - 1)) * _apply_q(u.t().contiguous())
    return e.to(dtype=dtype, device=device)


def nearest_etf(weight: Tensor) -> Tensor:
    """The closest scaled simplex ETF ``s·E`` (``s ≥ 0``) to ``weight [C, D]`` in Frobenius norm.

    Closed form (one thin SVD instead of the Riemannian optimisation over the Stiefel manifold the
    research code uses): with ``M = weightᵀ Q = P Σ Rᵀ`` (thin SVD, ``[D, C−1]``),
    ``‖W − a Q Uᵀ‖² = ‖W‖² − 2a·tr(Uᵀ M) + a²(C−1)``; ``tr(UᵀM)`` is maximised by the polar
    factor ``U = P Rᵀ`` (value ``Σσ``), then ``a = Σσ/(C−1)`` (clamped at 0), i.e.
    ``s = a / √(C/(C−1)) = √(C/(C−1)) · Σσ / C``. Adding a constant row vector to ``weight``
    does not change the result (``Qᵀ1 = 0``).

    Computed in fp64; returned in the input dtype. Raises ValueError if ``C < 2`` or ``C − 1 > D``.
    """
    op = "nearest_etf"
    _validate.floating(weight, "weight", op, ndim=2)
    c, d = weight.shape
    check_etf_size(c, d, op)
    w = weight.detach().double()
    m = _apply_qt(w).t()  # [D, C−1] = Wᵀ Q
    p, sig, rh = torch.linalg.svd(m, full_matrices=False)
    u = p @ rh  # polar factor, [D, C−1]
    a = max(float(sig.sum()) / (c - 1), 0.0)
    return (a * _apply_q(u.t().contiguous())).to(weight.dtype)


def etf_error(weight: Tensor) -> float:
    """``‖G/‖G‖_F − (I − 11ᵀ/C)/√(C−1)‖_F`` with ``G = W̃W̃ᵀ`` and ``W̃`` the rows of
    ``weight [C, D]`` minus their mean: 0 for a (scaled, rotated, translated) simplex ETF, at most 2.

    Computed in fp64 through the ``D × D`` matrix ``W̃ᵀW̃`` (``‖G‖_F = ‖W̃ᵀW̃‖_F`` and
    ``⟨G, I − 11ᵀ/C⟩ = tr G``), never the ``C × C`` Gram. NaN when ``C < 2`` or all rows are equal.
    The closed form is ``√(2 − 2x)`` with ``x → 1`` at collapse, so an exact ETF reads ~1e-8
    rather than 1e-16 (fp64 cancellation).
    """
    from .metrics import etf_error_of_rows

    _validate.floating(weight, "weight", "etf_error", ndim=2)
    return etf_error_of_rows(weight.detach())
