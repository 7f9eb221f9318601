"""Modules and losses that shape collapse: a fixed simplex-ETF classifier head (dense or sparse)
and the dot-regression loss that goes with it."""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _validate
from .etf import check_etf_size, simplex_etf
from .ops.etf_logits import etf_logits

__all__ = ["ETFClassifier", "sparse_simplex_etf", "dot_regression_loss"]


def _sparsity_mask(c: int, d: int, sparsity: float, generator: Optional[torch.Generator]) -> Tensor:
    """A [C, D] bool mask (True = kept) with exactly round(sparsity·C·D) zeros, spread as evenly as
    possible over the rows (counts differ by at most one), positions uniform within each row."""
    k = int(round(sparsity * c * d))
    per_row = torch.full((c,), k // c, dtype=torch.long)
    per_row[torch.randperm(c, generator=generator)[: k % c]] += 1
    order = torch.rand(c, d, generator=generator).argsort(1)  # a random permutation per row
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(d).expand(c, d).contiguous())
    return rank >= per_row[:, None]


def sparse_simplex_etf(num_classes: int, dim: int, sparsity: float, *, generator: Optional[torch.Generator] = None,
                       steps: int = 300, lr: float = 0.01, dtype: torch.dtype = torch.float32) -> Tensor:
    """A static sparse ETF in the style of FedLoGe's SSE-C: ``[C, D]`` with exactly
    ``round(sparsity·C·D)`` zero entries and unit rows, as close to a simplex ETF as the mask allows.

    Start from :func:`~collapsekit.simplex_etf`, zero a random ``sparsity`` fraction of the entries
    (as evenly as possible per row, so no row is emptied), then run ``steps`` Adam steps on the
    kept entries only (the gradient is masked, zeros stay zero) minimising a smooth maximum of the
    pairwise cosines, ``(1/τ)·log Σ_{c≠c'} exp(τ·cos(w_c, w_c'))`` with ``τ = 4·log(C²)``
    (a soft max over the pairs), and finally scale every row to unit norm (equal norms exactly).
    Deterministic for a given ``generator``; fp64 internally.
    """
    op = "sparse_simplex_etf"
    check_etf_size(num_classes, dim, op)
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"{op}: sparsity must be in [0, 1), got {sparsity!r}")
    c, d = num_classes, dim
    if int(round(sparsity * c * d)) > c * (d - 1):
        raise ValueError(f"{op}: sparsity={sparsity} would leave a row of the {c} x {d} ETF all zero; "
                         f"at most {(d - 1) / d:.4f} is possible")
    e = simplex_etf(c, d, generator=generator, dtype=torch.float64)
    if sparsity == 0:
        return e.to(dtype)
    mask = _sparsity_mask(c, d, sparsity, generator).double()
    w = (e * mask).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    tau = 4.0 * math.log(c * c)
    off = ~torch.eye(c, dtype=torch.bool)
    for _ in range(steps):
        u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = (u @ u.t())[off]
        loss = torch.logsumexp(tau * cos, 0) / tau
        opt.zero_grad()
        loss.backward()
        w.grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            w.mul_(mask)  # Adam's momentum must not revive a zero
    with torch.no_grad():
        out = w / w.norm(dim=1, keepdim=True)
    return out.detach().to(dtype)


class ETFClassifier(torch.nn.Module):
    """A fixed (non-trainable) simplex-ETF classifier head: ``logits = scale · normalize(x) @ Eᵀ``.

    ``E [num_classes, in_features]`` is a buffer (saved in ``state_dict``, moved by ``.to()``,
    never updated by an optimiser). ``sparsity > 0`` uses :func:`sparse_simplex_etf`.
    Input ``[..., in_features]``, output ``[..., num_classes]``; the product is
    :func:`collapsekit.ops.etf_logits.etf_logits` (no normalised copy of ``x``).
    """

    def __init__(self, in_features: int, num_classes: int, *, sparsity: float = 0.0, scale: float = 1.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.sparsity, self.scale = float(sparsity), float(scale)
        if sparsity:
            etf = sparse_simplex_etf(num_classes, in_features, sparsity, generator=generator)
        else:
            etf = simplex_etf(num_classes, in_features, generator=generator)
        self.register_buffer("etf", etf)

    def forward(self, x: Tensor) -> Tensor:
        return etf_logits(x, self.etf.to(x.dtype) if x.dtype != self.etf.dtype else self.etf, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"sparsity={self.sparsity}, scale={self.scale}")


_LOSS_CHUNK = 4096  # rows per chunk: the gathered ETF rows stay [chunk, D], never [N, D]


def dot_regression_loss(features: Tensor, targets: Tensor, etf: Tensor, reduction: str = "mean") -> Tensor:
    """The dot-regression loss for fixed ETF heads (Yang et al. 2022, "Inducing Neural Collapse in
    Imbalanced Learning: Do We Really Need a Learnable Classifier at the End of Deep Neural
    Network?", NeurIPS):

        L_i = (ĥ_i · e_{y_i} − ‖e_{y_i}‖)² / (2 ‖e_{y_i}‖),   ĥ_i = h_i / max(‖h_i‖, 1e-12)

    i.e. the paper's ``(wᵀh − E_W E_H)² / (2 E_W E_H)`` with features normalised (``E_H = 1``) and
    ``E_W`` the norm of the target's ETF row (1 for :func:`simplex_etf`: ``L = (cos − 1)²/2``).
    Only the target class enters: the other classes are already separated by the fixed ETF.

    Args:
        features: ``[N, D]`` floating. targets: ``[N]`` int class ids. etf: ``[C, D]``.
        reduction: ``"mean" | "sum" | "none"``.
    """
    op = "dot_regression_loss"
    _validate.floating(features, "features", op, ndim=2)
    _validate.floating(etf, "etf", op, ndim=2)
    _validate.tensor(targets, "targets", op)
    if targets.dtype not in _validate.INDEX_DTYPES or targets.dim() != 1 or targets.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: targets must be int32/int64 of shape [N]=({features.shape[0]},), "
                         f"got {tuple(targets.shape)} {targets.dtype}")
    if features.shape[1] != etf.shape[1]:
        raise ValueError(f"{op}: features has D={features.shape[1]} but etf has D={etf.shape[1]}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _validate.same_device(op, features=features, targets=targets, etf=etf)
    _validate.labels_in_range(targets, etf.shape[0], op, name="targets")
    dt = torch.promote_types(features.dtype, torch.float32)
    e = etf.to(dt)
    en = e.norm(dim=1)
    parts = []
    for r0 in range(0, features.shape[0], _LOSS_CHUNK):
        h = features[r0:r0 + _LOSS_CHUNK].to(dt)
        y = targets[r0:r0 + _LOSS_CHUNK]
        dot = (h * e[y]).sum(1) / h.norm(dim=1).clamp_min(1e-12)
        parts.append((dot - en[y]).pow(2) / (2 * en[y]))
    loss = torch.cat(parts) if parts else features.new_zeros(0, dtype=dt)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
