"""CollapseAccumulator: streaming, resumable, distributed totals for neural-collapse analysis.

Passes over the data (any number of batches each):

1. ``update_means(features, labels, weights=None)``: per-class sums and counts;
2. ``update_variance(features, labels, weights=None)``: per-class ``V_c = Σ w‖h − μ_c‖²`` and the
   within-class scatter ``Σ w (h − μ_y)(h − μ_y)ᵀ`` against the means *frozen at its first call*.

Every total is fp64 (per-batch kernel results in fp32 are added into fp64). Totals live on
``device``; batches may come from any device (the kernels run where the batch is).

Data-parallel use: each rank runs the same passes over its shard and calls ``all_reduce()`` after
each pass; ``all_reduce`` sums the contributions gathered since the previous call (nothing is
counted twice), so after pass 1 + ``all_reduce`` every rank holds the global means and pass 2
measures against them.
"""
from typing import Any, Dict, Optional

import torch

from . import _validate
from .ops.class_sums import class_sums_acc
from .ops.within_class import within_class_covariance, within_class_variance

_TOTALS = ("sums", "counts", "variance_sums", "covariance_sum", "decisions")


class CollapseAccumulator:
    """Streaming fp64 totals over batches of (features [N, D], labels [N] or [N, K], weights).

    Args:
        num_classes: C.
        dim: D, the feature dimension.
        device: where the totals live (default CPU; use the GPU for NCCL all_reduce).
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
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)
        shapes = {"sums": (num_classes, dim), "counts": (num_classes,), "variance_sums": (num_classes,),
                  "covariance_sum": (dim, dim) if self.covariance else (0, 0),
                  "decisions": (2,)}  # NC4: [rows where NCC != classifier, rows]
        # totals = synced (summed over ranks at the last all_reduce) + local (gathered since)
        self._synced = {k: z(*s) for k, s in shapes.items()}
        self._local = {k: z(*s) for k, s in shapes.items()}
        self._frozen_means: Optional[torch.Tensor] = None
        self.batches = {"means": 0, "variance": 0, "decisions": 0}

    # -- read-outs (fp64) ---------------------------------------------------------------------
    def _total(self, key):
        return self._synced[key] + self._local[key]

    @property
    def counts(self) -> torch.Tensor:
        """``[C]``: Σ w per class."""
        return self._total("counts")

    @property
    def means(self) -> torch.Tensor:
        """``[C, D]``: class means of pass 1 (zero rows for absent classes)."""
        counts = self.counts
        safe = torch.where(counts != 0, counts, torch.ones_like(counts))
        return self._total("sums") / safe[:, None]

    @property
    def variance_sums(self) -> torch.Tensor:
        """``[C]``: ``V_c = Σ w ‖h − μ_c‖²`` of pass 2 (``σ_c² = V_c / n_c``)."""
        return self._total("variance_sums")

    @property
    def covariance_sum(self) -> torch.Tensor:
        """``[D, D]``: ``Σ w (h − μ_y)(h − μ_y)ᵀ`` of pass 2."""
        if not self.covariance:
            raise RuntimeError("CollapseAccumulator: built with covariance=False, so covariance_sum is not kept")
        return self._total("covariance_sum")

    @property
    def frozen_means(self) -> Optional[torch.Tensor]:
        """The means pass 2 measures against (set by its first call), or None before that."""
        return self._frozen_means

    # -- passes -------------------------------------------------------------------------------
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
            _validate.class_labels(features, labels, weights, self.num_classes, op, check=True)

    def update_means(self, features: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """Pass 1: add a batch's per-class sums and counts."""
        op = "CollapseAccumulator.update_means"
        if self._frozen_means is not None:
            raise RuntimeError(f"{op}: pass 2 (update_variance) has started and the means are frozen; "
                               "start a new accumulator (or load a state saved during pass 1)")
        self._check(features, labels, weights, op)
        sums, counts = class_sums_acc(features, labels, self.num_classes, weights, False, "auto", "auto", op)
        self._local["sums"] += sums.to(self.device, torch.float64)
        self._local["counts"] += counts.to(self.device, torch.float64)
        self.batches["means"] += 1

    def update_variance(self, features: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """Pass 2: add a batch's within-class scatter against the means frozen at the first call."""
        op = "CollapseAccumulator.update_variance"
        if self._frozen_means is None and self.batches["means"] == 0 and not bool((self.counts != 0).any()):
            raise RuntimeError(f"{op}: call update_means over the data (pass 1) first")
        self._check(features, labels, weights, op)
        if self._frozen_means is None:
            self._frozen_means = self.means.clone()
        means = self._frozen_means.to(features.device)
        v = within_class_variance(features, labels, means, weights, check=False)
        self._local["variance_sums"] += v.to(self.device, torch.float64)
        if self.covariance:
            cov = within_class_covariance(features, labels, means, weights, check=False)
            self._local["covariance_sum"] += cov.to(self.device, torch.float64)
        self.batches["variance"] += 1

    def update_decisions(self, features: torch.Tensor, logits_or_predictions: torch.Tensor):
        """NC4: count the rows whose nearest class center (over the present classes, against the
        frozen means, or the current ones before pass 2) differs from the classifier's decision.
        ``logits_or_predictions``: ``[N, C]`` logits (arg-max taken) or ``[N]`` class ids."""
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
            raise RuntimeError(f"{op}: call update_means over the data (pass 1) first")
        means = self._frozen_means if self._frozen_means is not None else self.means
        present = (counts != 0).nonzero()[:, 0]
        ncc = nearest_center_ids(features, means[present], present)
        disagree = float((ncc != p.to(ncc.device).long()).sum())
        self._local["decisions"] += torch.tensor([disagree, float(features.shape[0])], dtype=torch.float64,
                                                 device=self.device)
        self.batches["decisions"] += 1

    def metrics(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """The DESIGN.md metric dict (see :mod:`collapsekit.metrics`). ``weight [C, D]`` / ``bias [C]``:
        the classifier, for nc3, nc3_cos, unc3 and per_class weight_norms. nc4 appears once
        ``update_decisions`` has counted rows; nc1 needs ``covariance=True``."""
        from .metrics import metrics_from_totals

        op = "CollapseAccumulator.metrics"
        if weight is not None:
            _validate.floating(weight, "weight", op, ndim=2)
            if tuple(weight.shape) != (self.num_classes, self.dim):
                raise ValueError(f"{op}: weight must be [C, D]=({self.num_classes}, {self.dim}), got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (self.num_classes,):
            raise ValueError(f"{op}: bias must be [C]=({self.num_classes},), got {tuple(bias.shape)}")
        if self.batches["variance"] == 0 and not bool(self.variance_sums.any()):
            raise RuntimeError(f"{op}: run update_variance over the data (pass 2) first")
        means = self._frozen_means if self._frozen_means is not None else self.means
        return metrics_from_totals(self.counts, means, self.variance_sums,
                                   self._total("covariance_sum") if self.covariance else None,
                                   None if weight is None else weight.to(self.device),
                                   None if bias is None else bias.to(self.device), self._total("decisions"))

    # -- distributed --------------------------------------------------------------------------
    def all_reduce(self, group=None) -> None:
        """Sum, over the ranks of ``group``, the totals gathered since the previous all_reduce.

        Collective: every rank must call it at the same point. Uses the process group's backend
        (gloo for CPU totals, NCCL for CUDA totals)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("CollapseAccumulator.all_reduce: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        keys = [k for k in _TOTALS if self._local[k].numel()]
        flat = torch.cat([self._local[k].reshape(-1) for k in keys])  # one collective, not four
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for k in keys:
            n = self._local[k].numel()
            self._synced[k] += flat[offset:offset + n].view_as(self._local[k])
            self._local[k].zero_()
            offset += n

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        sd = {"num_classes": self.num_classes, "dim": self.dim, "covariance": self.covariance,
              "batches": dict(self.batches),
              "frozen_means": None if self._frozen_means is None else self._frozen_means.clone()}
        for k in _TOTALS:
            sd["synced_" + k] = self._synced[k].clone()
            sd["local_" + k] = self._local[k].clone()
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        op = "CollapseAccumulator.load_state_dict"
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
        fm = state.get("frozen_means")
        if fm is not None and tuple(fm.shape) != (self.num_classes, self.dim):
            raise ValueError(f"{op}: frozen_means must have shape {(self.num_classes, self.dim)}, got {tuple(fm.shape)}")
        for k in _TOTALS:
            if "synced_" + k in state:
                self._synced[k] = state["synced_" + k].to(self.device, torch.float64).clone()
                self._local[k] = state["local_" + k].to(self.device, torch.float64).clone()
        self._frozen_means = None if fm is None else fm.to(self.device, torch.float64).clone()
        self.batches = {"means": 0, "variance": 0, "decisions": 0, **state.get("batches", {})}


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
