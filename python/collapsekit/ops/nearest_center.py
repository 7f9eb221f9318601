"""nearest_class_center: ``argmin_c ‖h − μ_c‖²`` per row, over all or a subset of classes.

This first version's ``auto`` backend is the tiled torch implementation in
:mod:`collapsekit.metrics` (BLAS tiles of ``‖μ‖² − 2 h·μ`` with a running arg-min; never an
``[N, C]`` matrix). The dedicated C++ and Triton kernels of the op pattern are not written yet, so
``backend="cpp"`` / ``"triton"`` raise ``NotImplementedError``.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _validate


def nearest_class_center(features: Tensor, means: Tensor, classes: Optional[Tensor] = None, *,
                         backend: str = "auto") -> Tensor:
    """Index of the nearest class mean of each row.

    Args:
        features: ``[N, D]`` floating.
        means: ``[C, D]`` floating.
        classes: optional ``[C]`` bool mask of the classes to consider (default: all).
        backend: ``"auto"`` (tiled) or ``"reference"`` (exact fp64 distances).

    Returns:
        ``[N]`` int64 class ids; where the computed scores tie exactly, the lowest index wins
        (centers equally near up to rounding may go either way).
    """
    op = "nearest_class_center"
    _validate.floating(features, "features", op, ndim=2)
    _validate.floating(means, "means", op, ndim=2)
    if means.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: means has D={means.shape[1]} columns but features has D={features.shape[1]}")
    _validate.same_device(op, features=features, means=means, classes=classes)
    if classes is None:
        ids = torch.arange(means.shape[0], device=means.device)
    else:
        _validate.tensor(classes, "classes", op)
        if classes.dtype != torch.bool or tuple(classes.shape) != (means.shape[0],):
            raise ValueError(f"{op}: classes must be a bool mask of shape [C]=({means.shape[0]},), "
                             f"got {tuple(classes.shape)} {classes.dtype}")
        ids = classes.nonzero()[:, 0]
    if ids.numel() == 0:
        raise ValueError(f"{op}: no class to choose from (means is empty or classes selects none)")
    if backend == "reference":  # exact fp64 distances, one class at a time; argmin keeps the first
        h = features.double()
        d = torch.stack([(h - m).pow(2).sum(1) for m in means.double()[ids]], 1)
        return ids[d.argmin(1)]
    if backend in ("cpp", "triton"):
        raise NotImplementedError(f"{op}: backend={backend!r} has no dedicated kernel yet; use 'auto' (tiled torch)")
    if backend != "auto":
        raise ValueError(f"{op}: backend must be 'auto', 'reference', 'cpp' or 'triton', got {backend!r}")
    from ..metrics import nearest_center_ids

    return nearest_center_ids(features, means[ids], ids)
