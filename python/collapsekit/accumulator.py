"""CollapseAccumulator: streaming, resumable, distributed totals for neural-collapse analysis.

Two ways to feed it (one per accumulator; mixing them is an error):

* one pass: ``update(features, labels, weights=None)`` -- per-class sums and counts, per-class
  ``V_c = Σ w‖h − μ_c‖²`` and the within-class scatter ``Σ_W = Σ w (h − μ_y)(h − μ_y)ᵀ`` at once.
  Each batch's statistics are taken about the *batch's own* class means (the kernels of
  class_sums / within_class_variance / within_class_covariance, on the batch's K_b classes only)
  and merged into the fp64 totals with the exact parallel-merge rule of Chan, Golub & LeVeque
  (1979): for a class with totals (n_a, μ_a, V_a) and a batch part (n_b, μ_b, V_b), δ = μ_b − μ_a,

      n = n_a + n_b,  μ = μ_a + δ n_b / n,  V = V_a + V_b + (n_a n_b / n) ‖δ‖²,
      Σ_W = Σ_W,a + Σ_W,b + Σ_c (n_a,c n_b,c / n_c) δ_c δ_cᵀ   (classes present on both sides).

  No sample's deviation is ever formed against a far-away centre, so nearly collapsed features
  (spread 1e-4 of the mean norm) keep their digits, unlike ``Σ hhᵀ − n μμᵀ``.
* two passes: ``update_means`` over the data, then ``update_variance`` against the means frozen
  at its first call.

NC4 (``update_decisions``) always needs the final means, so it is a further pass in both modes.

Every total is fp64 (per-batch kernel results in fp32 are added into fp64). Totals live on
``device``; batches may come from any device (the kernels run where the batch is).

Data-parallel use: each rank runs the same passes over its shard and calls ``all_reduce()`` after
each pass; ``all_reduce`` combines the contributions gathered since the previous call (nothing is
counted twice), so after pass 1 + ``all_reduce`` every rank holds the global means and pass 2
measures against them. In one-pass mode ``all_reduce`` merges the ranks' statistics exactly
(parallel-axis corrections against the combined means). ``merge(other)`` does the same for
accumulators of different jobs or files.
"""
import hashlib
from typing import Any, Dict, Optional

import torch

from . import _library, _validate
from .ops.class_sums import class_sums_acc
from .ops.within_class import within_class_covariance, within_class_variance

_TOTALS = ("sums", "counts", "variance_sums", "covariance_sum", "decisions")
_MODES = (None, "one_pass", "two_pass")


def fingerprint(means: Optional[torch.Tensor]) -> Optional[str]:
    """A short hash of the bytes of fp64 ``means`` (the frozen means of pass 2): two-pass variance
    totals are only additive when they were measured against bit-identical means."""
    if means is None:
        return None
    m = means.detach().to("cpu", torch.float64).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(m.shape)).encode())
    h.update(m.numpy().tobytes())
    return h.hexdigest()


def _chan_merge(dst: Dict[str, torch.Tensor], n_b: torch.Tensor, s_b: torch.Tensor, v_b: torch.Tensor,
                cov_b: Optional[torch.Tensor], rows: Optional[torch.Tensor], compute_dtype=torch.float64) -> None:
    """Merge one group's per-class statistics into the fp64 totals ``dst`` in place (exactly, up
    to rounding): ``n_b [K]``, ``s_b [K, D]`` (sums), ``v_b [K]`` and ``cov_b [D, D]`` (scatter about
    the group's own means) for the classes ``rows [K]`` of ``dst`` (``None``: all C rows).

    The Σ_W correction ``Σ_c (n_a n_b / n) δ_c δ_cᵀ`` runs only over the classes present on both
    sides, as one ``[D, K'] @ [K', D]`` product on the device of ``s_b`` in ``compute_dtype``: δ is a
    difference of means formed in fp64, so rounding it to fp32 costs relative 1e-7 of a term no
    larger than the within-class scatter itself."""
    n_b = n_b.to(dst["counts"].device, torch.float64)
    s_b64 = s_b.to(dst["sums"].device, torch.float64)
    v_b = v_b.to(dst["counts"].device, torch.float64)
    take = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    n_a = take(dst["counts"])
    both = (n_a != 0) & (n_b != 0)
    if bool(both.any()):
        j = both.nonzero()[:, 0]
        ra = j if rows is None else rows.index_select(0, j)
        na, nb = n_a.index_select(0, j), n_b.index_select(0, j)
        n = na + nb
        coef = torch.where(n != 0, na * nb / torch.where(n != 0, n, torch.ones_like(n)), torch.zeros_like(n))
        delta = s_b64.index_select(0, j) / nb[:, None] - dst["sums"].index_select(0, ra) / na[:, None]
        v_b = v_b.index_put((j,), coef * delta.pow(2).sum(1), accumulate=True)
        if dst["covariance_sum"].numel():
            dev = s_b.device
            dl = delta.to(dev, compute_dtype)
            corr = (dl * coef.to(dev, compute_dtype)[:, None]).t() @ dl
            dst["covariance_sum"] += corr.to(dst["covariance_sum"].device, torch.float64)
    if cov_b is not None and dst["covariance_sum"].numel():
        dst["covariance_sum"] += cov_b.to(dst["covariance_sum"].device, torch.float64)
    if rows is None:
        dst["counts"] += n_b
        dst["sums"] += s_b64
        dst["variance_sums"] += v_b
    else:
        # index_put_ rather than index_add_: torch's multi-threaded CPU index_add_ of [K, D] rows
        # costs ~20 ms a call on a busy 2-core machine (measured), index_put_ microseconds
        dst["counts"].index_put_((rows,), n_b, accumulate=True)
        dst["sums"].index_put_((rows,), s_b64, accumulate=True)
        dst["variance_sums"].index_put_((rows,), v_b, accumulate=True)


class CollapseAccumulator:
    """Streaming fp64 totals over batches of (features [N, D], labels [N] or [N, K], weights).

    Args:
        num_classes: C.
        dim: D, the feature dimension.
        device: where the totals live (default CPU; use the GPU for NCCL all_reduce and for the
            merge corrections of ``update`` to run on the GPU's BLAS).
        covariance: keep the ``[D, D]`` within-class scatter (``covariance_sum``); turn off for
            large D (8 bytes * D² each).
    """

    def __init__(self, num_classes: int, dim: int, *, device=None, covariance: bool = True):
        op = "CollapseAccumulator"
        _validate.positive_int(num_classes, "num_classes", op)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(f"{op}: dim must be an int >= 0, got {dim!r}")
        self.num_classes, self.dim, self.covariance = num_classes, dim, bool(covariance)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # totals = synced (combined over ranks at the last all_reduce) + local (gathered since).
        # two-pass mode: the parts add. One-pass mode: each part holds its variance and scatter
        # about its *own* means, and the parts are combined with _chan_merge.
        self._synced = self._zeros()
        self._local = self._zeros()
        self._synced_used = False  # False: synced is all zeros (no all_reduce yet): read local directly
        self._frozen_means: Optional[torch.Tensor] = None
        self._fingerprint: Optional[str] = None
        self.mode: Optional[str] = None      # None (nothing yet) | "one_pass" | "two_pass"
        self.batches = {"means": 0, "variance": 0, "decisions": 0, "update": 0}

    def _zeros(self) -> Dict[str, torch.Tensor]:
        c, d = self.num_classes, self.dim
        shapes = {"sums": (c, d), "counts": (c,), "variance_sums": (c,),
                  "covariance_sum": (d, d) if self.covariance else (0, 0),
                  "decisions": (2,)}  # NC4: [rows where NCC != classifier, rows]
        return {k: torch.zeros(*s, dtype=torch.float64, device=self.device) for k, s in shapes.items()}

    # -- read-outs (fp64) ---------------------------------------------------------------------
    def _combined(self) -> Dict[str, torch.Tensor]:
        """synced ⊕ local: a sum in two-pass mode, a Chan merge in one-pass mode. Without an
        all_reduce yet, the local tensors themselves (read-only: no [C, D] copy at vocabulary scale)."""
        if not self._synced_used:
            return dict(self._local)
        if self.mode != "one_pass" or not bool((self._synced["counts"] != 0).any()):
            return {k: self._synced[k] + self._local[k] for k in _TOTALS}
        out = {k: v.clone() for k, v in self._synced.items()}
        loc = self._local
        rows = (loc["counts"] != 0).nonzero()[:, 0]
        _chan_merge(out, loc["counts"][rows], loc["sums"][rows], loc["variance_sums"][rows],
                    loc["covariance_sum"] if self.covariance else None, rows)
        out["decisions"] += loc["decisions"]
        return out

    def _total(self, key, copy=True):
        if not self._synced_used:
            return self._local[key].clone() if copy else self._local[key]
        if self.mode == "one_pass" and key in ("variance_sums", "covariance_sum"):
            return self._combined()[key]
        return self._synced[key] + self._local[key]

    @property
    def counts(self) -> torch.Tensor:
        """``[C]``: Σ w per class."""
        return self._total("counts")

    @property
    def means(self) -> torch.Tensor:
        """``[C, D]``: class means (zero rows for absent classes)."""
        counts = self.counts
        safe = torch.where(counts != 0, counts, torch.ones_like(counts))
        return self._total("sums", copy=False) / safe[:, None]

    @property
    def variance_sums(self) -> torch.Tensor:
        """``[C]``: ``V_c = Σ w ‖h − μ_c‖²`` (``σ_c² = V_c / n_c``)."""
        return self._total("variance_sums")

    @property
    def covariance_sum(self) -> torch.Tensor:
        """``[D, D]``: ``Σ w (h − μ_y)(h − μ_y)ᵀ``."""
        if not self.covariance:
            raise RuntimeError("CollapseAccumulator: built with covariance=False, so covariance_sum is not kept")
        return self._total("covariance_sum")

    @property
    def frozen_means(self) -> Optional[torch.Tensor]:
        """The means pass 2 measures against (set by its first call), or None before that."""
        return self._frozen_means

    @property
    def means_fingerprint(self) -> Optional[str]:
        """Hash of the frozen means (two-pass mode, once pass 2 has started), else None."""
        return self._fingerprint

    # -- passes -------------------------------------------------------------------------------
    def _require_mode(self, mode: str, op: str) -> None:
        if self.mode is not None and self.mode != mode:
            if mode == "one_pass":
                raise RuntimeError(f"{op}: this accumulator runs two passes (update_means / update_variance); "
                                   "the one-pass update cannot be mixed into it -- use a new accumulator")
            raise RuntimeError(f"{op}: this accumulator runs one pass (update); update_means / update_variance "
                               "cannot be mixed into it -- use a new accumulator")

    def _check(self, features, labels, weights, op):  # labels=None: features only
        _validate.floating(features, "features", op, ndim=2)
        if features.shape[1] != self.dim:
            raise ValueError(f"{op}: features has D={features.shape[1]} but the accumulator was built for "
                             f"dim={self.dim}")
        finite = torch.isfinite(features).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[:, 0]
            raise ValueError(f"{op}: features has {bad.numel()} row(s) with NaN or Inf (first: row {int(bad[0])})")
        if labels is not None:
            return _validate.class_labels(features, labels, weights, self.num_classes, op, check=True)
        return None

    def update(self, features: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """One pass: add a batch's counts, sums, per-class ``V_c`` and within-class scatter at once.

        The batch's labels are renumbered to its K_b distinct classes, the three kernels run on
        those K_b classes only (about the batch's own class means; no ``[C, D]`` or ``[N, D]``
        temporary), and the result is merged into the fp64 totals (see the module docstring).
        Soft labels ``[N, K]`` and weights as in :func:`collapsekit.class_sums`."""
        op = "CollapseAccumulator.update"
        self._require_mode("one_pass", op)
        labels2, weights2 = self._check(features, labels, weights, op)
        self.mode = "one_pass"
        self.batches["update"] += 1
        if features.shape[0] == 0:
            return
        classes, inv = torch.unique(labels2, return_inverse=True)
        k = classes.numel()
        # batch statistics in the accumulation dtype (fp32; fp64 for fp64), on the batch's device
        sums, counts = class_sums_acc(features, inv, k, weights2, False, "auto", "auto", op)
        safe = torch.where(counts != 0, counts, torch.ones_like(counts))
        bmeans = sums / safe[:, None]
        v = within_class_variance(features, inv, bmeans, weights2, check=False)
        cov = within_class_covariance(features, inv, bmeans, weights2, check=False) if self.covariance else None
        keep = (counts != 0).nonzero()[:, 0]
        if keep.numel() != k:  # classes carried only by zero weights
            classes, sums, counts, v = classes[keep], sums[keep], counts[keep], v[keep]
        _chan_merge(self._local, counts, sums, v, cov, classes.to(self.device),
                    compute_dtype=_library.acc_dtype(features.dtype))

    def update_means(self, features: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """Pass 1: add a batch's per-class sums and counts."""
        op = "CollapseAccumulator.update_means"
        self._require_mode("two_pass", op)
        if self._frozen_means is not None:
            raise RuntimeError(f"{op}: pass 2 (update_variance) has started and the means are frozen; "
                               "start a new accumulator (or load a state saved during pass 1)")
        self._check(features, labels, weights, op)
        self.mode = "two_pass"
        sums, counts = class_sums_acc(features, labels, self.num_classes, weights, False, "auto", "auto", op)
        self._local["sums"] += sums.to(self.device, torch.float64)
        self._local["counts"] += counts.to(self.device, torch.float64)
        self.batches["means"] += 1

    def _freeze(self) -> None:
        self._frozen_means = self.means.clone()
        self._fingerprint = fingerprint(self._frozen_means)

    def update_variance(self, features: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """Pass 2: add a batch's within-class scatter against the means frozen at the first call."""
        op = "CollapseAccumulator.update_variance"
        self._require_mode("two_pass", op)
        if self._frozen_means is None and self.batches["means"] == 0 and not bool((self.counts != 0).any()):
            raise RuntimeError(f"{op}: call update_means over the data (pass 1) first")
        self._check(features, labels, weights, op)
        self.mode = "two_pass"
        if self._frozen_means is None:
            self._freeze()
        means = self._frozen_means.to(features.device)
        v = within_class_variance(features, labels, means, weights, check=False)
        self._local["variance_sums"] += v.to(self.device, torch.float64)
        if self.covariance:
            cov = within_class_covariance(features, labels, means, weights, check=False)
            self._local["covariance_sum"] += cov.to(self.device, torch.float64)
        self.batches["variance"] += 1

    def update_decisions(self, features: torch.Tensor, logits_or_predictions: torch.Tensor):
        """NC4: count the rows whose nearest class center (over the present classes, against the
        frozen means, or the current ones in one-pass mode and before pass 2) differs from the
        classifier's decision. ``logits_or_predictions``: ``[N, C]`` logits (arg-max taken) or
        ``[N]`` class ids. Needs the final means, hence a pass of its own after the others."""
        from .metrics import nearest_center_ids

        op = "CollapseAccumulator.update_decisions"
        self._check(features, None, None, op)
        p = logits_or_predictions
        _validate.tensor(p, "logits_or_predictions", op)
        if p.dim() == 2 and p.is_floating_point():
            if p.shape != (features.shape[0], self.num_classes):
                raise ValueError(f"{op}: logits must be [N, C]=({features.shape[0]}, {self.num_classes}), "
                                 f"got {tuple(p.shape)}")
            p = p.argmax(1)
        elif p.dim() != 1 or p.shape[0] != features.shape[0] or p.is_floating_point():
            raise ValueError(f"{op}: logits_or_predictions must be [N, C] logits or [N] integer class ids, "
                             f"got {tuple(p.shape)} {p.dtype}")
        counts = self.counts
        if not bool((counts != 0).any()):
            raise RuntimeError(f"{op}: call update (one pass) or update_means (pass 1) over the data first")
        means = self._frozen_means if self._frozen_means is not None else self.means
        present = (counts != 0).nonzero()[:, 0]
        ncc = nearest_center_ids(features, means[present], present)
        disagree = float((ncc != p.to(ncc.device).long()).sum())
        self._local["decisions"] += torch.tensor([disagree, float(features.shape[0])], dtype=torch.float64,
                                                 device=self.device)
        self.batches["decisions"] += 1

    def metrics(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                min_count: float = 1, max_count: Optional[float] = None) -> Dict[str, Any]:
        """The docs/design.md metric dict (see :mod:`collapsekit.metrics`). ``weight [C, D]`` / ``bias [C]``:
        the classifier, for nc3, nc3_cos, unc3 and per_class weight_norms. nc4 appears once
        ``update_decisions`` has counted rows; nc1 needs ``covariance=True``.

        ``min_count`` / ``max_count``: classes whose count ``n_c`` (Σ w) lies outside
        ``[min_count, max_count]`` are treated as absent (the frequent-token analyses); classes
        with ``n_c = 0`` are always absent. ``per_class`` keeps every class, with a bool
        ``present`` mask; ``mean_norms`` and ``variances`` are given for every class seen at all
        (centred on the global mean of the present ones). nc4 counts the decisions as taken by
        ``update_decisions`` (nearest centre over all classes seen), whatever the range."""
        from .metrics import metrics_from_totals

        op = "CollapseAccumulator.metrics"
        if weight is not None:
            _validate.floating(weight, "weight", op, ndim=2)
            if tuple(weight.shape) != (self.num_classes, self.dim):
                raise ValueError(f"{op}: weight must be [C, D]=({self.num_classes}, {self.dim}), got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (self.num_classes,):
            raise ValueError(f"{op}: bias must be [C]=({self.num_classes},), got {tuple(bias.shape)}")
        for name, v in (("min_count", min_count), ("max_count", max_count)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v):
                raise TypeError(f"{op}: {name} must be a number{' or None' if name == 'max_count' else ''}, got {v!r}")
        if min_count is None:
            raise TypeError(f"{op}: min_count must be a number, got None")
        if max_count is not None and max_count < min_count:
            raise ValueError(f"{op}: max_count={max_count} is below min_count={min_count}: no class could be present")
        if self.mode == "one_pass":
            tot = self._combined()
            means = self.means
        else:
            if self.batches["variance"] == 0 and not bool(self.variance_sums.any()):
                raise RuntimeError(f"{op}: run update (one pass) or update_variance (pass 2) over the data first")
            tot = self._combined()
            means = self._frozen_means if self._frozen_means is not None else self.means
        return metrics_from_totals(tot["counts"].clone(), means, tot["variance_sums"],
                                   tot["covariance_sum"] if self.covariance else None,
                                   None if weight is None else weight.to(self.device),
                                   None if bias is None else bias.to(self.device), tot["decisions"],
                                   min_count=min_count, max_count=max_count)

    # -- combining accumulators ---------------------------------------------------------------
    def _same_kind(self, other, op):
        if not isinstance(other, CollapseAccumulator):
            raise TypeError(f"{op}: other must be a CollapseAccumulator, got {type(other).__name__}")
        for key in ("num_classes", "dim", "covariance"):
            if getattr(other, key) != getattr(self, key):
                raise ValueError(f"{op}: other has {key}={getattr(other, key)!r} but this accumulator has "
                                 f"{key}={getattr(self, key)!r}")

    def merge(self, other: "CollapseAccumulator") -> "CollapseAccumulator":
        """Add ``other``'s totals (another shard, job or file) to this accumulator, exactly.

        One-pass accumulators merge with the parallel-merge rule. Two-pass accumulators add their
        pass-1 totals while both are in pass 1, and their pass-2 totals (variance, scatter,
        decisions) when both measured against the same frozen means (same fingerprint; the pass-1
        totals, identical by construction, are kept once). An empty accumulator takes on
        ``other``'s state. Mismatched shapes, modes or means raise ValueError. Returns self.
        Do not merge accumulators that were already combined by ``all_reduce`` (that counts twice)."""
        op = "CollapseAccumulator.merge"
        self._same_kind(other, op)
        if other is self:
            raise ValueError(f"{op}: cannot merge an accumulator into itself")
        if other.mode is None:
            return self
        if self.mode is None and not bool((self.counts != 0).any()):
            sd = other.state_dict()
            tot = other._combined()
            self._local = {k: v.to(self.device, torch.float64).clone() for k, v in tot.items()}
            self._synced = self._zeros()
            self._synced_used = False
            self.mode = other.mode
            self._frozen_means = None if other._frozen_means is None else other._frozen_means.to(self.device).clone()
            self._fingerprint = other._fingerprint
            self.batches = {k: self.batches.get(k, 0) + v for k, v in sd["batches"].items()}
            return self
        if self.mode != other.mode:
            raise ValueError(f"{op}: this accumulator is {self.mode.replace('_', '-')} and other is "
                             f"{other.mode.replace('_', '-')}; only accumulators of the same mode can be merged")
        tot = {k: v.to(self.device) for k, v in other._combined().items()}
        if self.mode == "one_pass":
            rows = (tot["counts"] != 0).nonzero()[:, 0]
            _chan_merge(self._local, tot["counts"][rows], tot["sums"][rows], tot["variance_sums"][rows],
                        tot["covariance_sum"] if self.covariance else None, rows)
            self._local["decisions"] += tot["decisions"]
        else:
            mine, theirs = self._fingerprint, other._fingerprint
            if (mine is None) != (theirs is None):
                which = "this accumulator" if mine is None else "other"
                raise ValueError(f"{op}: {which} is still in pass 1 (means not frozen) while the other is in pass 2; "
                                 "merge pass-1 totals first, then run pass 2 against the merged means")
            if mine is None:
                for k in ("sums", "counts", "decisions"):
                    self._local[k] += tot[k]
            else:
                if mine != theirs:
                    raise ValueError(f"{op}: the pass-2 totals were measured against different means "
                                     f"(fingerprints {mine} vs {theirs}); they cannot be added")
                for k in ("variance_sums", "covariance_sum", "decisions"):
                    self._local[k] += tot[k]
        for k, v in other.batches.items():
            self.batches[k] = self.batches.get(k, 0) + v
        return self

    # -- distributed --------------------------------------------------------------------------
    def all_reduce(self, group=None) -> None:
        """Combine, over the ranks of ``group``, the totals gathered since the previous all_reduce.

        Collective: every rank must call it at the same point. Uses the process group's backend
        (gloo for CPU totals, NCCL for CUDA totals). Two-pass mode: one sum. One-pass mode: the
        counts and sums are summed first; each rank then shifts its variance and scatter to the
        combined means (parallel-axis rule) and those are summed, then merged into the synced
        totals -- exact, and identical on every rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("CollapseAccumulator.all_reduce: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        # agree on the mode (a rank with an empty shard has none yet)
        flags = torch.tensor([self.mode == "one_pass", self.mode == "two_pass"], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if bool(flags[0]) and bool(flags[1]):
            raise RuntimeError("CollapseAccumulator.all_reduce: some ranks run one pass (update) and others two "
                               "passes (update_means / update_variance)")
        if bool(flags[0]):
            self.mode = "one_pass"
            self._all_reduce_one_pass(dist, group)
            return
        if bool(flags[1]):
            self.mode = "two_pass"
        self._synced_used = True
        keys = [k for k in _TOTALS if self._local[k].numel()]
        flat = torch.cat([self._local[k].reshape(-1) for k in keys])  # one collective, not four
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for k in keys:
            n = self._local[k].numel()
            self._synced[k] += flat[offset:offset + n].view_as(self._local[k])
            self._local[k].zero_()
            offset += n

    def _all_reduce_one_pass(self, dist, group) -> None:
        loc = self._local
        c, d = self.num_classes, self.dim
        flat = torch.cat([loc["counts"], loc["sums"].reshape(-1), loc["decisions"]])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        n_all, s_all, dec_all = flat[:c], flat[c:c + c * d].view(c, d), flat[c + c * d:]
        # this rank's part about the combined means: V + n‖μ_r − μ‖², Σ + Σ_c n (μ_r − μ)(μ_r − μ)ᵀ
        rows = (loc["counts"] != 0).nonzero()[:, 0]
        n_r = loc["counts"][rows]
        delta = loc["sums"][rows] / n_r[:, None] - s_all[rows] / n_all[rows][:, None]
        v = loc["variance_sums"].index_put((rows,), n_r * delta.pow(2).sum(1), accumulate=True)
        parts = [v]
        if self.covariance:
            parts.append((loc["covariance_sum"] + (delta * n_r[:, None]).t() @ delta).reshape(-1))
        flat2 = torch.cat(parts)
        dist.all_reduce(flat2, op=dist.ReduceOp.SUM, group=group)
        v_all = flat2[:c]
        cov_all = flat2[c:].view(d, d) if self.covariance else None
        rows = (n_all != 0).nonzero()[:, 0]
        self._synced_used = True
        _chan_merge(self._synced, n_all[rows], s_all[rows], v_all[rows], cov_all, rows)
        self._synced["decisions"] += dec_all
        self._local = self._zeros()

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        sd = {"num_classes": self.num_classes, "dim": self.dim, "covariance": self.covariance,
              "mode": self.mode, "batches": dict(self.batches),
              "frozen_means": None if self._frozen_means is None else self._frozen_means.clone(),
              "frozen_means_fingerprint": self._fingerprint}
        for k in _TOTALS:
            sd["synced_" + k] = self._synced[k].clone()
            sd["local_" + k] = self._local[k].clone()
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        op = "CollapseAccumulator.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{op}: state must be a dict from state_dict(), got {type(state).__name__}")
        for key, mine in (("num_classes", self.num_classes), ("dim", self.dim), ("covariance", self.covariance)):
            if key not in state:
                raise ValueError(f"{op}: state has no {key!r}; not a CollapseAccumulator state")
            if state[key] != mine:
                raise ValueError(f"{op}: state has {key}={state[key]!r} but this accumulator has {key}={mine!r}")
        for k in _TOTALS:
            for part, store in (("synced_", self._synced), ("local_", self._local)):
                t = state.get(part + k)
                if t is None and k == "decisions":  # states saved before NC4 decisions existed
                    continue
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(store[k].shape):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{op}: {part + k} must be a tensor of shape {tuple(store[k].shape)}, got {got}")
        mode = state.get("mode")
        if mode not in _MODES:
            raise ValueError(f"{op}: mode must be one of {_MODES}, got {mode!r}")
        fm = state.get("frozen_means")
        if fm is not None and tuple(fm.shape) != (self.num_classes, self.dim):
            raise ValueError(f"{op}: frozen_means must have shape {(self.num_classes, self.dim)}, got {tuple(fm.shape)}")
        fp = fingerprint(fm)
        recorded = state.get("frozen_means_fingerprint")
        if recorded is not None and recorded != fp:
            raise ValueError(f"{op}: frozen_means do not match the recorded fingerprint ({recorded}): the pass-2 "
                             "totals of this state were measured against different means")
        if mode != "one_pass" and fm is None and any(
                bool(state["%s_%s" % (part, k)].any()) for part in ("synced", "local")
                for k in ("variance_sums", "covariance_sum")):
            raise ValueError(f"{op}: the state has pass-2 totals but no frozen_means they were measured against")
        if mode is None:  # states saved before modes existed
            b = state.get("batches", {})
            mode = "two_pass" if (b.get("means") or b.get("variance") or fm is not None) else None
        for k in _TOTALS:
            if "synced_" + k in state:
                self._synced[k] = state["synced_" + k].to(self.device, torch.float64).clone()
                self._local[k] = state["local_" + k].to(self.device, torch.float64).clone()
        self._frozen_means = None if fm is None else fm.to(self.device, torch.float64).clone()
        self._fingerprint = fp
        self._synced_used = any(bool(v.any()) for v in self._synced.values())
        self.mode = mode
        self.batches = {"means": 0, "variance": 0, "decisions": 0, "update": 0, **state.get("batches", {})}


def collapse_metrics(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                     weights: Optional[torch.Tensor] = None, covariance: bool = True) -> Dict[str, Any]:
    """Every neural-collapse metric of in-memory ``features [N, D]`` with ``labels`` (and optional
    per-sample ``weights``), and of the classifier ``weight [C, D]`` / ``bias [C]`` if given: the
    two passes of :class:`CollapseAccumulator` plus the NC4 decisions (tiled, no [N, C] logits)."""
    from .metrics import classifier_argmax

    acc = CollapseAccumulator(num_classes, features.shape[1] if features.dim() == 2 else 0,
                              device=features.device, covariance=covariance)
    acc.update_means(features, labels, weights)
    acc.update_variance(features, labels, weights)
    if weight is not None:
        acc.update_decisions(features, classifier_argmax(features, weight, bias))
    return acc.metrics(weight, bias)
