"""Neural-collapse metrics (docs/design.md, "Streaming and metrics") from accumulated totals.

Everything here is computed from the fp64 totals of a :class:`CollapseAccumulator` (counts, class
sums, per-class ``V_c``, the within-class scatter) plus, for NC3/NC4, the classifier and the
decision counts. Nothing ``C x C`` or ``N x C`` is ever held: pairwise quantities are reduced tile
by tile over the upper triangle, and NC4's decisions are taken over class tiles with a running
arg-min / arg-max. Conventions follow the neural-collapse library of Wu & Papyan (2024): the global
mean is the unweighted mean of the present classes' means, CDNV uses distance exponent 1, NC1 uses
the pseudo-inverse of the between-class covariance.

The kernels live in the op families: the pairwise sweep is ops/pairwise.py (BLAS Gram tiles, each
reduced by a fused C++ or Triton pass), NC4's decisions come from the fused tile arg-min kernels of
ops/nearest_center.py. This module holds only formulas on accumulated totals.
"""
import math
from typing import Any, Dict, Optional

import torch

from .ops import pairwise


def _eigh(a: torch.Tensor):
    """torch.linalg.eigh on one CPU thread: at these sizes (≤ D x D) the threaded LAPACK gains
    nothing and, on a shared 2-core machine, spin-waits: 768 x 768 fp64 took 2-23 s with 2 threads
    and 0.12 s with 1 (measured)."""
    if a.device.type != "cpu":
        return torch.linalg.eigh(a)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(old)


def _nc1(centred: torch.Tensor, sigma_w: torch.Tensor, rtol: float = 1e-10) -> float:
    """Tr(Σ_W Σ_B⁺) / K with Σ_B = M̃ᵀM̃ / K, eigenvalues <= rtol·λ_max dropped, in fp64.
    Through the K x K Gram when K < D (same result), else through the D x D Σ_B."""
    m = centred.double()
    k, d = m.shape
    if k < d:
        evals, u = _eigh(m @ m.t())              # M̃M̃ᵀ = U S² Uᵀ; eigvals of Σ_B are S²/K
        keep = evals > rtol * evals.max().clamp_min(0)
        u, s2 = u[:, keep], evals[keep]
        v = (m.t() @ u) / s2.sqrt()                             # right singular vectors [D, r]
        # Tr(Σ_W Σ_B⁺)/K = Σ_j v_jᵀ Σ_W v_j / s_j²
        return float(((v * (sigma_w @ v)).sum(0) / s2).sum())
    sigma_b = m.t() @ m / k
    evals, v = _eigh(sigma_b)
    keep = evals > rtol * evals.max().clamp_min(0)
    v, lam = v[:, keep], evals[keep]
    return float(((v * (sigma_w @ v)).sum(0) / lam).sum()) / k


def etf_error_of_rows(rows: torch.Tensor) -> float:
    """‖G/‖G‖_F − (I − 11ᵀ/K)/√(K−1)‖_F with G = W̃W̃ᵀ, W̃ = rows minus their mean — without the
    K x K matrix: since W̃ᵀ1 = 0, ⟨G, I − 11ᵀ/K⟩ = tr G and ‖G‖_F = ‖W̃ᵀW̃‖_F, so the error is
    √(2 − 2 tr G / (√(K−1) ‖W̃ᵀW̃‖_F))."""
    w = rows.double()
    w = w - w.mean(0, keepdim=True)
    k = w.shape[0]
    fro = torch.linalg.matrix_norm(w.t() @ w)
    if k < 2 or float(fro) == 0.0:
        return float("nan")
    val = 2 - 2 * float(w.pow(2).sum()) / (math.sqrt(k - 1) * float(fro))
    return math.sqrt(max(val, 0.0))


def nearest_center_ids(features: torch.Tensor, means: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """For each row, ``class_ids[argmin_j ‖h − means[j]‖²]`` through :func:`nearest_class_center`
    (tiled, no [N, C] in memory)."""
    from .ops.nearest_center import nearest_class_center

    return class_ids.to(features.device)[nearest_class_center(features, means.to(features.device))]


def classifier_argmax(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``argmax(W h + b)`` per row (ties: lowest class) through the fused tile arg-min kernel:
    no [N, C] logits in memory."""
    from .ops.nearest_center import classifier_decisions

    w = weight.to(features.device)
    return classifier_decisions(features, w, None if bias is None else bias.to(features.device))


def metrics_from_totals(counts: torch.Tensor, means: torch.Tensor, variance_sums: torch.Tensor,
                        covariance_sum: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, decisions: Optional[torch.Tensor] = None,
                        *, min_count: float = 1, max_count: Optional[float] = None) -> Dict[str, Any]:
    """All docs/design.md metric keys from fp64 totals. Absent classes (counts == 0, or counts outside
    ``[min_count, max_count]``) are excluded; keys that need a classifier (nc3, nc3_cos, unc3),
    decisions (nc4) or the within-class scatter (nc1) are left out when those were not given.
    ``per_class`` keeps every class and a bool ``present`` mask; ``mean_norms`` / ``variances``
    are filled for every class with a non-zero count (centred on the global mean of the present
    ones), zero for the rest."""
    seen = counts != 0
    present = seen & (counts >= min_count)
    if max_count is not None:
        present &= counts <= max_count
    k = int(present.sum())
    c = counts.shape[0]
    idx = present.nonzero()[:, 0]
    # [K, D] fp64 buffers are 300 MB each at vocabulary scale (K = 50k, D = 768): one for the
    # centred means (centred in place), row tiles for everything that involves the classifier
    centred = means.double()[idx]
    m_g = centred.mean(0, keepdim=True)
    centred -= m_g
    n = counts.double()[idx]
    sigma2 = variance_sums.double()[idx] / n
    mean_norms = centred.norm(dim=1)
    out: Dict[str, Any] = {"num_present": k}
    if k >= 2:
        pw = pairwise.pairwise_geometry(centred.float() if k > pairwise.PAIR_TILE else centred, sigma2)
        p = pw["pairs"]
        mean_cos = pw["cos"] / p
        out["cdnv"] = pw["cdnv"] / p
        out["nc2_equiangle"] = math.sqrt(max(pw["cos2"] / p - mean_cos * mean_cos, 0.0))
        out["nc2_coherence"] = pw["coherence"] / p
        out["gnc2"] = pw["log_kernel"] / p
        out["nc2_equinorm"] = float(mean_norms.std(unbiased=False) / mean_norms.mean())
        out["etf_error"] = etf_error_of_rows(centred)
        tr_b = float(mean_norms.pow(2).sum()) / k
        tr_w = float(variance_sums.double()[idx].sum() / n.sum())
        out["nc1_quotient"] = tr_w / tr_b
        # Σ_W is one [D, D] total over every sample; it cannot be split by class, so nc1 is left
        # out when the count range drops classes that were seen (nc1_quotient still applies)
        if covariance_sum is not None and k == int(seen.sum()):
            out["nc1"] = _nc1(centred, covariance_sum.double() / n.sum())
    sidx = seen.nonzero()[:, 0]
    zeros = torch.zeros(c, dtype=torch.float64, device=counts.device)
    if k and sidx.numel() != k:  # classes seen but outside the count range: centred on the same m_G
        all_norms = zeros.index_copy(0, sidx, (means.double()[sidx] - m_g).norm(dim=1))
    else:
        all_norms = zeros.index_copy(0, idx, mean_norms)
    per_class = {
        "counts": counts.double(),
        "mean_norms": all_norms,
        "variances": zeros.index_copy(0, sidx, variance_sums.double()[sidx] / counts.double()[sidx]),
        "present": present,
    }
    if weight is not None:
        tile = max(1, (1 << 22) // max(1, weight.shape[1]))  # 32 MiB of fp64 rows at a time
        per_class["weight_norms"] = torch.cat([weight[i:i + tile].double().norm(dim=1)
                                               for i in range(0, weight.shape[0], tile)])
    if weight is not None and k >= 2:  # with one class the centred mean is 0: no direction to compare
        wn = per_class["weight_norms"][idx]
        w_fro, m_fro = float(wn.pow(2).sum().sqrt()), float(mean_norms.pow(2).sum().sqrt())
        nc3, dots = 0.0, []
        for i in range(0, k, tile):  # ‖W_P/‖W_P‖ − M̃/‖M̃‖‖² and the row cosines, tile by tile
            wt, ct = weight[idx[i:i + tile]].double(), centred[i:i + tile]
            nc3 += float((wt / w_fro - ct / m_fro).pow(2).sum())
            dots.append((wt * ct).sum(1))
        out["nc3"] = nc3
        cos = torch.cat(dots) / (wn * mean_norms)
        out["nc3_cos"] = float(cos.mean())
        out["unc3"] = float(cos.var(unbiased=False))
    if decisions is not None and float(decisions[1]) > 0:  # [disagreeing rows, rows] from update_decisions
        out["nc4"] = float(decisions[0] / decisions[1])
    out["per_class"] = per_class
    return out
