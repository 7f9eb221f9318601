"""Neural-collapse metrics (DESIGN.md, "Streaming and metrics") from accumulated totals.

Everything here is computed from the fp64 totals of a :class:`CollapseAccumulator` (counts, class
sums, per-class ``V_c``, the within-class scatter) plus, for NC3/NC4, the classifier and the
decision counts. Nothing ``C x C`` or ``N x C`` is ever held: pairwise quantities are reduced tile
by tile over the upper triangle, and NC4's decisions are taken over class tiles with a running
arg-min / arg-max. Conventions follow the neural-collapse library of Wu & Papyan (2024): the global
mean is the unweighted mean of the present classes' means, CDNV uses distance exponent 1, NC1 uses
the pseudo-inverse of the between-class covariance.

This first version computes the tiled reductions with torch ops (BLAS Gram tiles, fp64 sums);
dedicated C++/Triton kernels for the sweeps are the next step.
"""
import math
from typing import Any, Dict, Optional

import torch

PAIR_TILE = 2048     # classes per side of a Gram tile: 2048^2 fp64 = 32 MiB
ROW_TILE = 4096      # feature rows per step of the NC4 decisions
CLASS_TILE = 4096    # classes per step of the NC4 decisions


def pairwise_geometry(centred: torch.Tensor, variances: Optional[torch.Tensor] = None,
                      tile: int = PAIR_TILE) -> Dict[str, float]:
    """One sweep over the pairs c < c' of the rows of ``centred`` ([K, D], the centred means of the
    present classes) that returns the pair means needed by cdnv, nc2_equiangle, nc2_coherence and
    gnc2. Gram tiles in the input dtype, every sum in fp64; memory O(tile^2)."""
    k = centred.shape[0]
    norms2 = centred.double().pow(2).sum(1)
    norms = norms2.sqrt()
    inv_k1 = 1.0 / (k - 1)
    total = dict(pairs=0.0, cos=0.0, cos2=0.0, coherence=0.0, log_kernel=0.0, cdnv=0.0)
    for a0 in range(0, k, tile):
        a1 = min(k, a0 + tile)
        for b0 in range(a0, k, tile):
            b1 = min(k, b0 + tile)
            g = (centred[a0:a1] @ centred[b0:b1].t()).double()          # [ta, tb]
            mask = None
            if a0 == b0:  # diagonal tile: strictly upper triangle only
                ia = torch.arange(a0, a1, device=g.device)[:, None]
                ib = torch.arange(b0, b1, device=g.device)[None, :]
                mask = ia < ib
            cos = g / (norms[a0:a1, None] * norms[None, b0:b1])
            dist2 = (norms2[a0:a1, None] + norms2[None, b0:b1] - 2 * g).clamp_min(0)
            terms = {
                "cos": cos, "cos2": cos * cos, "coherence": (cos + inv_k1).abs(),
                # log(1 / ||u - u'||) with ||u - u'||^2 = 2 - 2 cos
                "log_kernel": -0.5 * torch.log((2 - 2 * cos).clamp_min(1e-300)),
            }
            if variances is not None:
                terms["cdnv"] = (variances[a0:a1, None] + variances[None, b0:b1]) / (2 * dist2)
            for key, t in terms.items():
                total[key] += float((t[mask] if mask is not None else t).sum())
            total["pairs"] += float(mask.sum()) if mask is not None else g.numel()
    return total


def _nc1(centred: torch.Tensor, sigma_w: torch.Tensor, rtol: float = 1e-10) -> float:
    """Tr(Σ_W Σ_B⁺) / K with Σ_B = M̃ᵀM̃ / K, eigenvalues <= rtol·λ_max dropped, in fp64.
    Through the K x K Gram when K < D (same result), else through the D x D Σ_B."""
    m = centred.double()
    k, d = m.shape
    if k < d:
        evals, u = torch.linalg.eigh(m @ m.t())              # M̃M̃ᵀ = U S² Uᵀ; eigvals of Σ_B are S²/K
        keep = evals > rtol * evals.max().clamp_min(0)
        u, s2 = u[:, keep], evals[keep]
        v = (m.t() @ u) / s2.sqrt()                             # right singular vectors [D, r]
        # Tr(Σ_W Σ_B⁺)/K = Σ_j v_jᵀ Σ_W v_j / s_j²
        return float(((v * (sigma_w @ v)).sum(0) / s2).sum())
    sigma_b = m.t() @ m / k
    evals, v = torch.linalg.eigh(sigma_b)
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


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def nearest_center_ids(features: torch.Tensor, means: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """For each row, ``class_ids[argmin_j ‖h − means[j]‖²]`` (ties: lowest j), tiled over rows and
    classes with a running arg-min of ``‖μ‖² − 2 h·μ``; no [N, C] in memory."""
    dt = _compute_dtype(features)
    mu = means.to(features.device, dt)
    mu_n2 = mu.pow(2).sum(1)
    out = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    for r0 in range(0, features.shape[0], ROW_TILE):
        h = features[r0:r0 + ROW_TILE].to(dt)
        best = arg = None
        for c0 in range(0, mu.shape[0], CLASS_TILE):
            d = torch.addmm(mu_n2[None, c0:c0 + CLASS_TILE], h, mu[c0:c0 + CLASS_TILE].t(), alpha=-2)
            v, i = d.min(1)
            if best is None:
                best, arg = v, i + c0
            else:  # strict: an earlier tile keeps ties
                better = v < best
                best, arg = torch.where(better, v, best), torch.where(better, i + c0, arg)
        out[r0:r0 + ROW_TILE] = class_ids.to(features.device)[arg]
    return out


def classifier_argmax(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``argmax(W h + b)`` per row (ties: lowest class), tiled: no [N, C] logits in memory."""
    dt = _compute_dtype(features)
    w = weight.to(features.device, dt)
    b = None if bias is None else bias.to(features.device, dt)
    out = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    for r0 in range(0, features.shape[0], ROW_TILE):
        h = features[r0:r0 + ROW_TILE].to(dt)
        best = arg = None
        for c0 in range(0, w.shape[0], CLASS_TILE):
            z = h @ w[c0:c0 + CLASS_TILE].t()
            if b is not None:
                z += b[None, c0:c0 + CLASS_TILE]
            v, i = z.max(1)
            if best is None:
                best, arg = v, i + c0
            else:
                better = v > best
                best, arg = torch.where(better, v, best), torch.where(better, i + c0, arg)
        out[r0:r0 + ROW_TILE] = arg
    return out


def metrics_from_totals(counts: torch.Tensor, means: torch.Tensor, variance_sums: torch.Tensor,
                        covariance_sum: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, decisions: Optional[torch.Tensor] = None
                        ) -> Dict[str, Any]:
    """All DESIGN.md metric keys from fp64 totals. Absent classes (counts == 0) are excluded;
    keys that need a classifier (nc3, nc3_cos, unc3), decisions (nc4) or the within-class scatter
    (nc1) are left out when those were not given."""
    present = counts != 0
    k = int(present.sum())
    c = counts.shape[0]
    idx = present.nonzero()[:, 0]
    mu = means.double()[idx]
    centred = mu - mu.mean(0, keepdim=True)
    n = counts.double()[idx]
    sigma2 = variance_sums.double()[idx] / n
    mean_norms = centred.norm(dim=1)
    out: Dict[str, Any] = {"num_present": k}
    if k >= 2:
        pw = pairwise_geometry(centred.float() if k > PAIR_TILE else centred, sigma2)
        p = pw["pairs"]
        mean_cos = pw["cos"] / p
        out["cdnv"] = pw["cdnv"] / p
        out["nc2_equiangle"] = math.sqrt(max(pw["cos2"] / p - mean_cos * mean_cos, 0.0))
        out["nc2_coherence"] = pw["coherence"] / p
        out["gnc2"] = pw["log_kernel"] / p
        out["nc2_equinorm"] = float(mean_norms.std(unbiased=False) / mean_norms.mean())
        out["etf_error"] = etf_error_of_rows(centred)
        tr_b = float(centred.pow(2).sum()) / k
        tr_w = float(variance_sums.double()[idx].sum() / n.sum())
        out["nc1_quotient"] = tr_w / tr_b
        if covariance_sum is not None:
            out["nc1"] = _nc1(centred, covariance_sum.double() / n.sum())
    per_class = {
        "counts": counts.double(),
        "mean_norms": torch.zeros(c, dtype=torch.float64, device=counts.device).index_copy(0, idx, mean_norms),
        "variances": torch.zeros(c, dtype=torch.float64, device=counts.device).index_copy(0, idx, sigma2),
    }
    if weight is not None:
        w = weight.double()
        per_class["weight_norms"] = w.norm(dim=1)
        wp = w[idx]
        out["nc3"] = float((wp / wp.norm() - centred / centred.norm()).pow(2).sum())
        cos = (wp * centred).sum(1) / (wp.norm(dim=1) * mean_norms)
        out["nc3_cos"] = float(cos.mean())
        out["unc3"] = float(cos.var(unbiased=False))
    if decisions is not None and float(decisions[1]) > 0:  # [disagreeing rows, rows] from update_decisions
        out["nc4"] = float(decisions[0] / decisions[1])
    out["per_class"] = per_class
    return out
