"""nearest_class_center: ``argmin_c ‖h − μ_c‖²`` per row, over all or a subset of classes.

Same pattern as ops/class_sums.py (no autograd: the output is an index). Both kernels keep a
running arg-min of ``‖μ‖² − 2 h·μ`` over class tiles and never hold an ``[N, C]`` matrix:

* cpp: ``[rows, classes]`` tiles of ``h · μᵀ`` from BLAS (torch.mm), each reduced by a fused C++
  pass (norm, score, running arg-min) into per-row best score and class;
* triton: one fused kernel, ``tl.dot`` tiles and the arg-min in registers (fp64 inputs take the
  cpp-style tiled path with torch ops, as there is no fp64 tensor-core product).
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _validate

ROW_TILE = 4096
CLASS_TILE = 2048


@torch.library.custom_op("collapsekit::nearest_class_center_cpp", mutates_args=())
def _ncc_cpp(features: Tensor, means: Tensor) -> Tensor:
    dt = torch.float64 if features.dtype == torch.float64 else torch.float32
    mu = means.to(dt).contiguous()
    n2 = mu.pow(2).sum(1)
    n = features.shape[0]
    out = torch.zeros(n, dtype=torch.long)
    C = _dispatch.cpp()
    for r0 in range(0, n, ROW_TILE):
        h = features[r0:r0 + ROW_TILE].to(dt)
        r = h.shape[0]
        best = torch.full((r,), float("inf"), dtype=dt)
        idx = out[r0:r0 + r]
        for c0 in range(0, mu.shape[0], CLASS_TILE):
            dots = h @ mu[c0:c0 + CLASS_TILE].t()
            C.argmin_tile_update(dots.data_ptr(), _dispatch.FLOAT_CODES[dt], r, dots.shape[1], dots.stride(0),
                                 n2[c0:].data_ptr(), c0, best.data_ptr(), idx.data_ptr(), _dispatch.num_threads())
    return out


def _ncc_torch_tiles(features: Tensor, means: Tensor) -> Tensor:
    dt = torch.float64 if features.dtype == torch.float64 else torch.float32
    mu = means.to(dt)
    n2 = mu.pow(2).sum(1)
    out = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    for r0 in range(0, features.shape[0], ROW_TILE):
        h = features[r0:r0 + ROW_TILE].to(dt)
        best = arg = None
        for c0 in range(0, mu.shape[0], CLASS_TILE):
            v, i = torch.addmm(n2[None, c0:c0 + CLASS_TILE], h, mu[c0:c0 + CLASS_TILE].t(), alpha=-2).min(1)
            if best is None:
                best, arg = v, i + c0
            else:
                better = v < best
                best, arg = torch.where(better, v, best), torch.where(better, i + c0, arg)
        out[r0:r0 + ROW_TILE] = arg
    return out


def _ncc_triton_impl(features: Tensor, means: Tensor) -> Tensor:
    if features.dtype == torch.float64:
        return _ncc_torch_tiles(features, means)
    from ..kernels import nearest_center

    return nearest_center.nearest_center(features, means.float().contiguous())


if hasattr(torch.library, "triton_op"):
    _ncc_triton = torch.library.triton_op("collapsekit::nearest_class_center_triton", _ncc_triton_impl, mutates_args=())
else:
    _ncc_triton = torch.library.custom_op("collapsekit::nearest_class_center_triton", _ncc_triton_impl, mutates_args=())

for _op in (_ncc_cpp, _ncc_triton):
    _op.register_fake(lambda features, means: features.new_empty(features.shape[0], dtype=torch.long))


def nearest_class_center(features: Tensor, means: Tensor, classes: Optional[Tensor] = None, *,
                         backend: str = "auto") -> Tensor:
    """Index of the nearest class mean of each row.

    Args:
        features: ``[N, D]`` floating, any strides.
        means: ``[C, D]`` floating.
        classes: optional ``[C]`` bool mask of the classes to consider (default: all).
        backend: ``"auto" | "reference" | "cpp" | "triton"``.

    Returns:
        ``[N]`` int64 class ids; where the computed scores tie exactly, the lowest index wins
        (centers equally near up to rounding may go either way). Not differentiable.
    """
    op = "nearest_class_center"
    _validate.floating(features, "features", op, ndim=2)
    _validate.floating(means, "means", op, ndim=2)
    if means.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: means has D={means.shape[1]} columns but features has D={features.shape[1]}")
    _validate.same_device(op, features=features, means=means, classes=classes)
    if classes is None:
        ids = None
        if means.shape[0] == 0:
            raise ValueError(f"{op}: no class to choose from (means is empty or classes selects none)")
    else:
        _validate.tensor(classes, "classes", op)
        if classes.dtype != torch.bool or tuple(classes.shape) != (means.shape[0],):
            raise ValueError(f"{op}: classes must be a bool mask of shape [C]=({means.shape[0]},), "
                             f"got {tuple(classes.shape)} {classes.dtype}")
        ids = classes.nonzero()[:, 0]
        if ids.numel() == 0:
            raise ValueError(f"{op}: no class to choose from (means is empty or classes selects none)")
        means = means[ids]
    backend = _dispatch.resolve_backend(backend, features.device, op)
    features, means = features.detach(), means.detach()
    if backend == "reference":  # exact fp64 distances, one class at a time; argmin keeps the first
        h = features.double()
        local = torch.stack([(h - m).pow(2).sum(1) for m in means.double()], 1).argmin(1)
    elif backend == "cpp":
        local = _ncc_cpp(features, means)
    else:
        local = _ncc_triton(features, means)
    return local if ids is None else ids[local]
