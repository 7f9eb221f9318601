"""nearest_class_center (``argmin_c ‖h − μ_c‖²`` per row, over all or a subset of classes) and
classifier_decisions (``argmax_c W h + b``), one fused tile arg-min kernel for both.

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

from .. import _dispatch, _library, _validate
from .._library import fill_args
from .._tiles import row_tiles, score_tiles

# 1024 x 1024 fp32 score tiles (4 MiB) stay in the last-level cache between the BLAS product and
# the arg-min pass. Measured at N=50k, C=8192, D=512 on the 2-core CI-class VM: 4096 x 2048 tiles
# 2.75 s, 1024 x 1024 2.34 s (~180 GFLOP/s, 92% of a square 2048^3 sgemm in the same process).
ROW_TILE = 1024
CLASS_TILE = 1024


# The registered ops compute argmin_c offsets[c] + alpha * (h · rows[c]) per row of features:
# nearest class center (rows = μ, offsets = ‖μ‖², alpha = −2) and the classifier decision
# (rows = W, offsets = −b, alpha = −1) are the same kernel.

_score_dtype = _library.acc_dtype  # scores are computed in the accumulation dtype


def _check_op(features, rows, offsets, alpha):
    op = "tile_argmin"
    _library.expect(op, "features", features, ndim=2, dtypes=_library.FLOAT_DTYPES)
    _library.expect(op, "rows", rows, shape=(-1, features.shape[1]), dtypes=_library.FLOAT_DTYPES)
    _library.expect(op, "offsets", offsets, shape=(rows.shape[0],), dtypes=_library.FLOAT_DTYPES)
    if rows.shape[0] < 1:
        raise ValueError(f"{op} (registered op): rows must have at least one row")


def _outputs(features, rows, offsets, alpha):
    return features.new_empty(features.shape[0], dtype=torch.long)


@_library.cpu_op("tile_argmin_cpp")
def _tile_argmin_cpp(features: Tensor, rows: Tensor, offsets: Tensor, alpha: float) -> Tensor:
    _check_op(features, rows, offsets, alpha)
    dt = _score_dtype(features.dtype)
    v = rows.to(dt).contiguous()
    off = offsets.to(dt).contiguous()
    n = features.shape[0]
    out = _outputs(features, rows, offsets, alpha).zero_()
    C = _dispatch.cpp()
    for r0, r in row_tiles(n, ROW_TILE):
        h = features[r0:r0 + r].to(dt)
        best = torch.full((r,), float("inf"), dtype=dt)
        idx = out[r0:r0 + r]
        for c0, dots in score_tiles(h, v, CLASS_TILE):
            C.argmin_tile_update(fill_args(
                "ArgminTileArgs", dots=dots, dtype=_dispatch.FLOAT_CODES[dt], R=r, T=dots.shape[1],
                ds0=dots.stride(0), offsets=off[c0:], alpha=alpha, col0=c0, best=best, best_idx=idx,
                num_threads=_dispatch.num_threads()))
    return out


def _tile_argmin_torch(features: Tensor, rows: Tensor, offsets: Tensor, alpha: float) -> Tensor:
    dt = _score_dtype(features.dtype)
    v, off = rows.to(dt), offsets.to(dt)
    out = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    for r0, r in row_tiles(features.shape[0], ROW_TILE):
        h = features[r0:r0 + r].to(dt)
        best = arg = None
        for c0, dots in score_tiles(h, v, CLASS_TILE):
            s_, i = (off[None, c0:c0 + dots.shape[1]] + alpha * dots).min(1)
            if best is None:
                best, arg = s_, i + c0
            else:
                better = s_ < best
                best, arg = torch.where(better, s_, best), torch.where(better, i + c0, arg)
        out[r0:r0 + r] = arg
    return out


def _tile_argmin_triton_impl(features: Tensor, rows: Tensor, offsets: Tensor, alpha: float) -> Tensor:
    _check_op(features, rows, offsets, alpha)
    if features.dtype == torch.float64:  # no fp64 tensor-core product: BLAS tiles instead
        return _tile_argmin_torch(features, rows, offsets, alpha)
    from ..kernels import nearest_center

    return nearest_center.tile_argmin(features, rows.float().contiguous(), offsets, alpha)


_tile_argmin_triton = _library.triton_op("tile_argmin_triton", _tile_argmin_triton_impl)
_library.register((_tile_argmin_cpp, _tile_argmin_triton), fake=_outputs)  # an index: no autograd


def _tile_argmin(features: Tensor, rows: Tensor, offsets: Tensor, alpha: float, backend: str, op: str) -> Tensor:
    backend = _dispatch.resolve_backend(backend, features.device, op)
    features, rows, offsets = features.detach(), rows.detach(), offsets.detach()
    if backend == "reference":  # exact fp64 scores, one class at a time; argmin keeps the first
        h = features.double()
        scores = torch.stack([o + alpha * (h @ r) for r, o in zip(rows.double(), offsets.double())], 1)
        return scores.argmin(1)
    if backend == "cpp":
        return _tile_argmin_cpp(features, rows, offsets, alpha)
    return _tile_argmin_triton(features, rows, offsets, alpha)


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
    if backend == "reference":  # exact fp64 distances, one class at a time; argmin keeps the first
        _dispatch.resolve_backend(backend, features.device, op)
        h = features.detach().double()
        local = torch.stack([(h - m).pow(2).sum(1) for m in means.detach().double()], 1).argmin(1)
    else:
        norms2 = means.detach().to(_score_dtype(features)).pow(2).sum(1)
        local = _tile_argmin(features, means, norms2, -2.0, backend, op)
    return local if ids is None else ids[local]


def classifier_decisions(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                         backend: str = "auto") -> Tensor:
    """``argmax_c (W h + b)_c`` per row (ties: lowest class) without the ``[N, C]`` logits: the
    same fused tile arg-min as :func:`nearest_class_center`, with scores ``−b − W h``.

    ``features [N, D]``, ``weight [C, D]``, ``bias [C]`` or None; returns ``[N]`` int64."""
    op = "classifier_decisions"
    _validate.floating(features, "features", op, ndim=2)
    _validate.floating(weight, "weight", op, ndim=2)
    if weight.shape[1] != features.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must be [C, D] with D={features.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [C]=({weight.shape[0]},), got {tuple(bias.shape)}")
    _validate.same_device(op, features=features, weight=weight, bias=bias)
    dt = _score_dtype(features)
    offsets = torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if bias is None else -bias.detach().to(dt)
    return _tile_argmin(features, weight, offsets, -1.0, backend, op)
