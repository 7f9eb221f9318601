"""Pure-PyTorch references, computed in fp64. Every kernel is tested against these.

They are written for clarity, not speed or memory (they materialise what the kernels avoid).
They take the same arguments as the public ops and return fp64 results.
"""
from typing import Optional, Tuple

import torch


def _entries(labels: torch.Tensor, weights: Optional[torch.Tensor], n: int):
    """labels [N] or [N, K] and weights [N] or [N, K] -> (labels [N, K], weights [N, K] fp64)."""
    y = labels if labels.dim() == 2 else labels.unsqueeze(1)
    if weights is None:
        w = torch.ones(y.shape, dtype=torch.float64, device=y.device)
    else:
        w = weights.double()
        w = w.unsqueeze(1).expand(y.shape) if w.dim() == 1 else w
    return y.long(), w


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
               weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """sums[c] = Σ_{(i,k): y_ik = c} w_ik h_i  ([C, D] fp64);  counts[c] = Σ w_ik  ([C] fp64).

    Entries with a label outside [0, C) are ignored (the check=False behaviour)."""
    h = features.double()
    y, w = _entries(labels, weights, h.shape[0])
    sums = h.new_zeros(num_classes, h.shape[1])
    counts = h.new_zeros(num_classes)
    for k in range(y.shape[1]):
        keep = (y[:, k] >= 0) & (y[:, k] < num_classes)
        yk, wk = y[keep, k], w[keep, k]
        sums = sums.index_add(0, yk, h[keep] * wk[:, None])
        counts = counts.index_add(0, yk, wk)
    return sums, counts


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """means[c] = sums[c] / counts[c] (zero row where counts[c] == 0), counts [C]; fp64."""
    sums, counts = class_sums(features, labels, num_classes, weights)
    present = counts != 0
    safe = torch.where(present, counts, torch.ones_like(counts))
    return sums / safe[:, None], counts


def within_class_variance(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor,
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """V[c] = Σ_{(i,k): y_ik = c} w_ik ‖h_i − μ_c‖²  ([C] fp64; a sum, σ_c² = V[c] / n_c).

    Entries with a label outside [0, C) are ignored."""
    h, mu = features.double(), means.double()
    y, w = _entries(labels, weights, h.shape[0])
    c = mu.shape[0]
    out = h.new_zeros(c)
    for k in range(y.shape[1]):
        keep = (y[:, k] >= 0) & (y[:, k] < c)
        yk = y[keep, k]
        dist = (h[keep] - mu[yk]).pow(2).sum(1)
        out = out.index_add(0, yk, w[keep, k] * dist)
    return out


def within_class_covariance(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor,
                            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_{(i,k)} w_ik (h_i − μ_{y_ik})(h_i − μ_{y_ik})ᵀ  ([D, D] fp64, a sum). Out-of-range labels ignored."""
    h, mu = features.double(), means.double()
    y, w = _entries(labels, weights, h.shape[0])
    c = mu.shape[0]
    out = h.new_zeros(h.shape[1], h.shape[1])
    for k in range(y.shape[1]):
        keep = (y[:, k] >= 0) & (y[:, k] < c)
        centred = h[keep] - mu[y[keep, k]]
        out = out + centred.t() @ (centred * w[keep, k, None])
    return out


def collapse_metrics(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     weights: Optional[torch.Tensor] = None) -> dict:
    """docs/design.md's metric formulas, written out literally in fp64 with full K x K grids and [N, C]
    logits (the test oracle; the library computes them tiled)."""
    import math

    h = features.double()
    means, counts = class_means(features, labels, num_classes, weights)
    present = counts != 0
    k = int(present.sum())
    mu = means[present]
    m_g = mu.mean(0)
    mt = mu - m_g
    n = counts[present]
    var = within_class_variance(features, labels, means, weights)[present] / n
    sigma_w = within_class_covariance(features, labels, means, weights) / n.sum()
    sigma_b = mt.t() @ mt / k
    out = {}
    if k < 2:  # one present class: no between-class geometry; only the classifier agreement is defined
        if weight is not None:
            logits = h @ weight.double().t() + (0 if bias is None else bias.double())
            out["nc4"] = float((present.nonzero()[0, 0] != logits.argmax(1)).double().mean()) if k else None
            if k == 0:
                del out["nc4"]
        return out
    out["nc1"] = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=1e-10, hermitian=True))) / k
    out["nc1_quotient"] = float(torch.trace(sigma_w) / torch.trace(sigma_b))
    iu = torch.triu_indices(k, k, 1)
    d2 = torch.cdist(mu, mu).pow(2)
    out["cdnv"] = float(((var[:, None] + var[None, :]) / (2 * d2))[iu[0], iu[1]].mean())
    norms = mt.norm(dim=1)
    out["nc2_equinorm"] = float(norms.std(unbiased=False) / norms.mean())
    cos = (mt @ mt.t()) / (norms[:, None] * norms[None, :])
    pc = cos[iu[0], iu[1]]
    out["nc2_equiangle"] = float(pc.std(unbiased=False))
    out["nc2_coherence"] = float((pc + 1 / (k - 1)).abs().mean())
    u = mt / norms[:, None]
    out["gnc2"] = float(torch.log(1 / torch.cdist(u, u)[iu[0], iu[1]]).mean())
    g = mt @ mt.t()
    ideal = (torch.eye(k, dtype=g.dtype) - 1.0 / k) / math.sqrt(k - 1)
    out["etf_error"] = float((g / g.norm() - ideal).norm())
    if weight is not None:
        wp = weight.double()[present]
        out["nc3"] = float((wp / wp.norm() - mt / mt.norm()).pow(2).sum())
        c3 = (wp * mt).sum(1) / (wp.norm(dim=1) * norms)
        out["nc3_cos"] = float(c3.mean())
        out["unc3"] = float(c3.var(unbiased=False))
        logits = h @ weight.double().t() + (0 if bias is None else bias.double())
        ids = present.nonzero()[:, 0]
        ncc = ids[torch.cdist(h, mu).argmin(1)]
        out["nc4"] = float((ncc != logits.argmax(1)).double().mean())
    return out


def pairwise_geometry(centred: torch.Tensor, variances: Optional[torch.Tensor] = None) -> dict:
    """The pair sums of ops/pairwise.py over the full K x K grid in fp64 (the test oracle): over
    pairs c < c' of the rows of ``centred``: count, Σ cos, Σ cos², Σ |cos + 1/(K−1)|,
    Σ −½ log(2 − 2 cos), and Σ (σ_c² + σ_c'²) / (2 ‖μ_c − μ_c'‖²) when ``variances`` is given."""
    m = centred.double()
    k = m.shape[0]
    iu = torch.triu_indices(k, k, 1, device=m.device)
    g = m @ m.t()
    n2 = torch.diagonal(g)
    cos = (g / (n2.sqrt()[:, None] * n2.sqrt()[None, :]))[iu[0], iu[1]]
    inv_k1 = 1.0 / (k - 1) if k > 1 else 0.0
    out = {"pairs": float(iu.shape[1]), "cos": float(cos.sum()), "cos2": float((cos * cos).sum()),
           "coherence": float((cos + inv_k1).abs().sum()),
           "log_kernel": float((-0.5 * torch.log((2 - 2 * cos).clamp_min(1e-300))).sum()), "cdnv": 0.0}
    if variances is not None:
        v = variances.double().to(m.device)
        d2 = (n2[:, None] + n2[None, :] - 2 * g).clamp_min(0)[iu[0], iu[1]]
        out["cdnv"] = float(((v[iu[0]] + v[iu[1]]) / (2 * d2)).sum())
    return out


def etf_logits(features: torch.Tensor, etf: torch.Tensor, scale: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """fp64 ``scale · (h / max(‖h‖, eps)) @ Eᵀ`` (``F.normalize`` semantics); differentiable."""
    h = features.double()
    n = h.norm(dim=-1, keepdim=True).clamp_min(eps)
    return scale * (h / n) @ etf.double().t()


def ssd_scan(x, dt, A, B, C, chunk_size=64, *, D=None, z=None, dt_bias=None, initial_states=None,
             dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, return_state_norms=False,
             decay_scale=1.0, state_norm_max=None, window=None):
    """fp64 step-by-step SSD (Mamba-2) recurrence, literally as docs/design.md writes it; differentiable.
    ``window=W``: the windowed state literally, ``H_t = Σ_{s=t−W+1..t} (Π_{r=s+1..t} a_r) Δ_s x_s B_sᵀ``
    (no initial state, no state_norm_max).
    ``dt_limit`` always clamps (mamba-ssm's kernel does): with the default ``(0, inf)`` a negative
    ``dt + dt_bias`` becomes 0 and gets gradient 0."""
    import torch.nn.functional as F

    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    X = x.double()
    dtv = dt.double() + (dt_bias.double() if dt_bias is not None else 0.0)
    if dt_softplus:
        dtv = F.softplus(dtv)
    dtv = dtv.clamp(dt_limit[0], dt_limit[1])
    a = decay_scale * torch.exp(dtv * A.double())
    Bh = B.double().repeat_interleave(h // g, dim=2)
    Ch = C.double().repeat_interleave(h // g, dim=2)
    H = initial_states.double() if initial_states is not None else X.new_zeros(b, h, p, n)
    Dd = None if D is None else (D.double()[:, None] if D.dim() == 1 else D.double())
    if window is not None:
        loga = torch.log(a)                                           # (b, l, h)
        S = torch.cumsum(loga, 1)
        U = (dtv[..., None] * X)                                      # Δ_s x_s: (b, l, h, p)
        ys, norms = [], []
        for t in range(l):
            s0 = max(0, t - window + 1)
            w = torch.exp(S[:, t:t + 1] - S[:, s0:t + 1])            # Π_{r=s+1..t} a_r: (b, ws, h)
            H = torch.einsum("bsh,bshp,bshn->bhpn", w, U[:, s0:t + 1], Bh[:, s0:t + 1])
            y = (H * Ch[:, t, :, None, :]).sum(-1)
            if Dd is not None:
                y = y + Dd * X[:, t]
            ys.append(y)
            norms.append(H.detach().flatten(2).norm(dim=2))
        if l == 0:
            H = X.new_zeros(b, h, p, n)
    ys, norms = ([], []) if window is None else (ys, norms)
    for t in range(l if window is None else 0):
        if t > 0 and t % chunk_size == 0 and state_norm_max is not None:
            nrm = H.flatten(2).norm(dim=2)
            f = torch.where(nrm > state_norm_max, state_norm_max / nrm.clamp_min(1e-300), torch.ones_like(nrm))
            H = H * f[..., None, None]
        H = a[:, t, :, None, None] * H + (dtv[:, t, :, None, None] * X[:, t, :, :, None]) * Bh[:, t, :, None, :]
        y = (H * Ch[:, t, :, None, :]).sum(-1)
        if Dd is not None:
            y = y + Dd * X[:, t]
        ys.append(y)
        norms.append(H.detach().flatten(2).norm(dim=2))
    y = torch.stack(ys, 1) if ys else X.new_zeros(b, 0, h, p)
    if z is not None:
        y = y * F.silu(z.double())
    out = [y]
    if return_final_states:
        out.append(H)
    if return_state_norms:
        out.append(torch.stack(norms, 1) if norms else X.new_zeros(b, 0, h))
    return out[0] if len(out) == 1 else tuple(out)


def _scan_matrix_at(M: torch.Tensor, t: int, batch: int, dim: int) -> torch.Tensor:
    """B or C at step t as [batch or 1, dim, N] fp64: (dim, N) constant, (batch, N, L) variable,
    (batch, G, N, L) grouped (channel d uses group d // (dim // G))."""
    if M.dim() == 2:
        return M.double()[None]
    if M.dim() == 3:
        return M[:, None, :, t].double().expand(batch, dim, M.shape[1])
    g = M.shape[1]
    return M[:, :, :, t].double().repeat_interleave(dim // g, dim=1)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, initial_state: Optional[torch.Tensor] = None,
                   return_state_norms: bool = False, seq_idx: Optional[torch.Tensor] = None):
    """Mamba-1 selective scan, one time step at a time, in fp64 (docs/design.md, selective_scan):

        dt_t = softplus(delta_t + delta_bias) (or without softplus)
        x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t,   x_{-1} = initial_state or 0
        y_t  = sum_n x_t[:, n] C_t[:, n] + D u_t;   out = y * silu(z) if z is given

    Returns fp64 ``out`` (batch, dim, L), then ``last_state`` (batch, dim, N) if return_last_state,
    then ``state_norms`` (batch, dim, L) = ||x_t[d, :]|| if return_state_norms. Differentiable in
    every floating input (autograd through the loop: the tests' gradient ground truth).
    ``seq_idx (batch, L)``: the state is zero before every step t > 0 where seq_idx changes."""
    batch, dim, L = u.shape
    uu = u.double()
    dt = delta.double()
    if delta_bias is not None:
        dt = dt + delta_bias.double()[:, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    Ad = A.double()
    x = (initial_state.double() if initial_state is not None
         else torch.zeros(batch, dim, A.shape[1], dtype=torch.float64, device=u.device))
    ys, norms = [], []
    for t in range(L):
        Bt = _scan_matrix_at(B, t, batch, dim)
        Ct = _scan_matrix_at(C, t, batch, dim)
        if seq_idx is not None and t > 0:
            x = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None], torch.zeros_like(x), x)
        x = torch.exp(dt[:, :, t, None] * Ad) * x + (dt[:, :, t] * uu[:, :, t])[:, :, None] * Bt
        ys.append((x * Ct).sum(-1))
        norms.append(torch.linalg.vector_norm(x, dim=-1))
    y = torch.stack(ys, -1) if L else uu.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.double()[:, None] * uu
    if z is not None:
        y = y * torch.nn.functional.silu(z.double())
    out = [y]
    if return_last_state:
        out.append(x)
    if return_state_norms:
        out.append(torch.stack(norms, -1) if L else uu.new_zeros(batch, dim, 0))
    return out[0] if len(out) == 1 else tuple(out)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                           z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                           dt_softplus: bool = False, *, state_batch_indices: Optional[torch.Tensor] = None,
                           pad_slot_id: int = -1, decay_scale: float = 1.0) -> torch.Tensor:
    """One decode step in fp64 (docs/design.md, "Mamba in real models"), in place on ``state``:

        dt' = softplus(dt + dt_bias) (or not);  s = decay_scale * exp(dt' A) * s + dt' x B
        out = <s, C> + D x;  out *= silu(z) if z is given

    Mamba-1 ``state (b, dim, n)`` or Mamba-2 ``state (b, h, p, n)`` with ``B, C (b, g, n)``.
    Rows with ``state_batch_indices[i] == pad_slot_id`` start from a zero state and are not
    written back. Returns ``out`` in x's dtype."""
    two = state.dim() == 4
    if not two:  # Mamba-1 as one head and one group
        out = selective_state_update(state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0),
                                     B.unsqueeze(1), C.unsqueeze(1), None if D is None else D.unsqueeze(0),
                                     None if z is None else z.unsqueeze(1),
                                     None if dt_bias is None else dt_bias.unsqueeze(0), dt_softplus,
                                     state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id,
                                     decay_scale=decay_scale)
        return out.squeeze(1)
    b, h = x.shape[0], x.shape[1]
    g = B.shape[1]
    rows = (torch.arange(b, device=x.device) if state_batch_indices is None else state_batch_indices.long())
    valid = rows != pad_slot_id if state_batch_indices is not None else torch.ones(b, dtype=torch.bool,
                                                                                  device=x.device)
    s = torch.zeros(b, *state.shape[1:], dtype=torch.float64, device=state.device)
    s[valid] = state[rows[valid]].double()
    d = dt.double()
    if dt_bias is not None:
        d = d + dt_bias.double()
    if dt_softplus:
        d = torch.nn.functional.softplus(d)
    Bh = B.double().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.double().repeat_interleave(h // g, dim=1)
    xd = x.double()
    s = decay_scale * torch.exp(d[..., None] * A.double()) * s + (d * xd)[..., None] * Bh[:, :, None, :]
    y = (s * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + D.double() * xd
    if z is not None:
        y = y * torch.nn.functional.silu(z.double())
    state[rows[valid]] = s[valid].to(state.dtype)
    return y.to(x.dtype)
