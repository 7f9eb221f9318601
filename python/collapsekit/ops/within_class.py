"""within_class_variance and within_class_covariance: within-class scatter against given class
means. Same pattern as ops/class_sums.py."""
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _library, _validate, reference
from .._library import fill_args
from .._tiles import row_tiles
from .class_sums import class_sums_acc, labeled_rows_fields


# ---------------------------------------------------------------------------------------------
# Registered ops. Canonical arguments: features [N, D] (any strides), labels [N, K], weights
# [N, K] or None, means [C, D] contiguous in the accumulation dtype. Output in that dtype.
# ---------------------------------------------------------------------------------------------

def _check_op(features, labels, weights, means, op):
    """What the kernels index (a direct torch.ops.collapsekit.* call is checked too)."""
    _library.expect(op, "features", features, ndim=2, dtypes=_library.FLOAT_DTYPES)
    n, d = features.shape
    _library.expect(op, "labels", labels, ndim=2, dtypes=_library.INDEX_DTYPES)
    if labels.shape[0] != n:
        raise ValueError(f"{op} (registered op): labels must have shape ({n}, K), got {tuple(labels.shape)}")
    _library.expect(op, "weights", weights, shape=tuple(labels.shape), dtypes=_library.FLOAT_DTYPES, optional=True)
    _library.expect(op, "means", means, shape=(-1, d), dtypes=(_library.acc_dtype(features.dtype),), contiguous=True)
    if means.shape[0] < 1:
        raise ValueError(f"{op} (registered op): means must have at least one row")


def _variance_outputs(features, labels, weights, means):
    return means.new_empty(means.shape[0])


@_library.cpu_op("within_class_variance_cpp")
def _variance_cpp(features: Tensor, labels: Tensor, weights: Optional[Tensor], means: Tensor) -> Tensor:
    _check_op(features, labels, weights, means, "within_class_variance")
    n, d = features.shape
    c = means.shape[0]
    out = _variance_outputs(features, labels, weights, means)
    if weights is not None:
        weights = weights.to(means.dtype)
    _dispatch.cpp().within_class_variance(fill_args(
        "WithinClassArgs", **labeled_rows_fields(features, labels, weights),
        C=c, means=means, out=out, num_threads=_dispatch.num_threads()))
    return out


def _variance_triton_impl(features: Tensor, labels: Tensor, weights: Optional[Tensor], means: Tensor) -> Tensor:
    _check_op(features, labels, weights, means, "within_class_variance")
    from ..kernels import within_class  # imports triton: only on the first Triton call

    return within_class.within_class_variance(features, labels, weights, means)


_variance_triton = _library.triton_op("within_class_variance_triton", _variance_triton_impl)


def _variance_setup_context(ctx, inputs, output):
    features, labels, weights, means = inputs
    ctx.features_dtype = features.dtype
    ctx.weights_dtype = None if weights is None else weights.dtype
    ctx.save_for_backward(features, labels, weights, means)


def _variance_backward(ctx, grad):
    """With a_ik = w_ik g[y_ik] (0 for out-of-range labels), S, n = class_sums(h, y, w):
        ∂/∂h_i   = 2 Σ_k a_ik (h_i − μ_{y_ik})
        ∂/∂μ_c   = −2 g_c (S_c − n_c μ_c)                    (no [N, D] temporary)
        ∂/∂w_ik  = g[y_ik] ‖h_i − μ_{y_ik}‖²                 (one row gather per label column)"""
    features, labels, weights, means = ctx.saved_tensors
    c = means.shape[0]
    valid = (labels >= 0) & (labels < c)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    acc = means.dtype
    w = torch.ones(labels.shape, dtype=acc, device=labels.device) if weights is None else weights.to(acc)
    w = w * valid
    g = grad.to(acc)
    grad_features = grad_weights = grad_means = None
    if ctx.needs_input_grad[0]:
        a = w * g[y]                                             # [N, K]
        h = features.to(acc)
        grad_features = h * (2 * a.sum(1, keepdim=True))
        for k in range(labels.shape[1]):
            grad_features.sub_(torch.index_select(means, 0, y[:, k]) * (2 * a[:, k:k + 1]))
        grad_features = grad_features.to(ctx.features_dtype)
    if ctx.needs_input_grad[3]:
        sums, counts = class_sums_acc(features.detach(), labels, c, w, False, "auto", "auto", "within_class_variance")
        grad_means = -2 * g[:, None] * (sums - counts[:, None] * means)
    if ctx.needs_input_grad[2]:
        h = features.to(acc)
        cols = [g[y[:, k]] * (h - torch.index_select(means, 0, y[:, k])).pow(2).sum(1) * valid[:, k]
                for k in range(labels.shape[1])]
        grad_weights = torch.stack(cols, 1).to(ctx.weights_dtype)
    return grad_features, None, grad_weights, grad_means


_library.register((_variance_cpp, _variance_triton), fake=_variance_outputs, backward=_variance_backward,
                  setup_context=_variance_setup_context)


# within_class_covariance: Σ w (h − μ_y)(h − μ_y)ᵀ, tile by tile. A kernel writes one centred tile
# of rows (the gather and subtraction fused, never more than one [tile, D] buffer); the tile's Gram
# goes to the BLAS of the device (torch.addmm), which is the fastest block product on both.
_COV_TILE_ELEMENTS = 1 << 20  # rows per tile = this / D (4 MiB of fp32)


def _covariance_tiles(features, labels, weights, means, center):
    n, d = features.shape
    acc = means.dtype
    cov = torch.zeros(d, d, dtype=acc, device=features.device)
    if n == 0 or d == 0:
        return cov
    tile = max(1, min(n, _COV_TILE_ELEMENTS // d))
    buf = torch.empty(tile, d, dtype=acc, device=features.device)
    wbuf = torch.empty(tile, dtype=acc, device=features.device)
    for k in range(labels.shape[1]):
        for lo, r in row_tiles(n, tile):
            center(features[lo:lo + r], labels[lo:lo + r, k],
                   None if weights is None else weights[lo:lo + r, k], means, buf, wbuf)
            c = buf[:r]
            # unweighted: rows with a bad label are already zero; weighted: scale one side
            cov.addmm_(c.t(), c if weights is None else c * wbuf[:r, None])
    return (cov + cov.t()).mul_(0.5)  # exactly symmetric


def _center_cpp(f, lab, w, means, out, out_w):
    _dispatch.cpp().center_rows(fill_args(
        "CenterRowsArgs",
        features=f, feature_dtype=_dispatch.FLOAT_CODES[f.dtype], R=f.shape[0], D=f.shape[1],
        fs0=f.stride(0), fs1=f.stride(1),
        labels=lab, label_dtype=_dispatch.INDEX_CODES[lab.dtype], ls0=lab.stride(0),
        weights=w, ws0=0 if w is None else w.stride(0),
        C=means.shape[0], means=means, out=out, out_weights=out_w, num_threads=_dispatch.num_threads()))


def _covariance_outputs(features, labels, weights, means, path):
    return means.new_empty(features.shape[1], features.shape[1])


@_library.cpu_op("within_class_covariance_cpp")
def _covariance_cpp(features: Tensor, labels: Tensor, weights: Optional[Tensor], means: Tensor,
                    path: str) -> Tensor:
    _check_op(features, labels, weights, means, "within_class_covariance")
    if path != "tiles":
        raise ValueError(f"within_class_covariance (registered op): cpp path must be 'tiles', got {path!r}")
    if weights is not None:
        weights = weights.to(means.dtype)
    return _covariance_tiles(features, labels, weights, means, _center_cpp)


def _covariance_triton_impl(features: Tensor, labels: Tensor, weights: Optional[Tensor], means: Tensor,
                            path: str) -> Tensor:
    _check_op(features, labels, weights, means, "within_class_covariance")
    if path not in ("tiles", "fused"):
        raise ValueError(f"within_class_covariance (registered op): triton path must be 'tiles' or 'fused', "
                         f"got {path!r}")
    from ..kernels import within_class

    if path == "fused":  # centring fused into a tl.dot kernel; not yet measured on a GPU
        cov = within_class.within_class_covariance(features, labels, weights, means)
        return (cov + cov.t()).mul_(0.5)
    return _covariance_tiles(features, labels, weights, means, within_class.center_rows)


_covariance_triton = _library.triton_op("within_class_covariance_triton", _covariance_triton_impl)


def _covariance_backward(ctx, grad):
    """With G' = (G + Gᵀ)/2 and c_ik = h_i − μ_{y_ik} (0 for out-of-range labels):
        ∂/∂h_i  = 2 Σ_k w_ik G' c_ik,   ∂/∂μ_c = −2 G'(S_c − n_c μ_c),   ∂/∂w_ik = c_ikᵀ G' c_ik.
    Written with torch ops: the [N, D] gradient plus one [N, D] centred copy per label column."""
    features, labels, weights, means = ctx.saved_tensors
    c = means.shape[0]
    acc = means.dtype
    valid = (labels >= 0) & (labels < c)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    w = torch.ones(labels.shape, dtype=acc, device=labels.device) if weights is None else weights.to(acc)
    w = w * valid
    gs = (grad + grad.t()).to(acc) * 0.5
    h = features.to(acc)
    grad_features = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
    wcols = []
    for k in range(labels.shape[1]):
        ck_ = (h - torch.index_select(means, 0, y[:, k])) * valid[:, k:k + 1]
        gc = ck_ @ gs
        if grad_features is not None:
            grad_features.add_(gc * (2 * w[:, k:k + 1]))
        if ctx.needs_input_grad[2]:
            wcols.append((gc * ck_).sum(1))
    grad_means = None
    if ctx.needs_input_grad[3]:
        sums, counts = class_sums_acc(features.detach(), labels, c, w, False, "auto", "auto", "within_class_covariance")
        grad_means = -2 * (sums - counts[:, None] * means) @ gs
    grad_weights = torch.stack(wcols, 1).to(ctx.weights_dtype) if ctx.needs_input_grad[2] else None
    if grad_features is not None:
        grad_features = grad_features.to(ctx.features_dtype)
    return grad_features, None, grad_weights, grad_means, None


def _covariance_setup_context(ctx, inputs, output):
    _variance_setup_context(ctx, inputs[:4], output)


_library.register((_covariance_cpp, _covariance_triton), fake=_covariance_outputs, backward=_covariance_backward,
                  setup_context=_covariance_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _prepare(features: Tensor, labels, means, weights, check: bool, backend: str, op: str):
    """Validate the shared arguments; returns (labels [N, K], weights [N, K] or None, backend,
    accumulation dtype). C is the number of rows of means."""
    _validate.floating(features, "features", op, ndim=2)
    _validate.floating(means, "means", op, ndim=2)
    if means.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: means has D={means.shape[1]} columns but features has D={features.shape[1]}")
    if means.shape[0] < 1:
        raise ValueError(f"{op}: means must have at least one class row, got shape {tuple(means.shape)}")
    labels2, weights2 = _validate.class_labels(features, labels, weights, means.shape[0], op, check)
    _validate.same_device(op, features=features, means=means)
    return labels2, weights2, _dispatch.resolve_backend(backend, features.device, op), \
        _library.acc_dtype(features.dtype)


def within_class_variance(features: Tensor, labels: Tensor, means: Tensor, weights: Optional[Tensor] = None, *,
                          check: bool = True, backend: str = "auto") -> Tensor:
    """Per-class within-class scatter ``V_c = Σ_{y_ik = c} w_ik · ‖h_i − μ_c‖²`` (a sum; the class
    variance is ``σ_c² = V_c / n_c``).

    Args:
        features: ``[N, D]`` float16/bfloat16/float32/float64, any strides.
        labels: ``[N]`` int32/int64 or soft ``[N, K]`` (as in :func:`class_sums`).
        means: ``[C, D]`` floating class means (C = number of classes), e.g. from :func:`class_means`.
        weights: optional ``[N]`` or ``[N, K]``.
        check: verify labels lie in ``[0, C)``; with ``check=False`` others are ignored.
        backend: ``"auto" | "reference" | "cpp" | "triton"``.

    Returns:
        ``V [C]`` in the accumulation dtype (fp32; fp64 for fp64 features). One fused pass over
        the features: no ``[N, D]`` temporary. Differentiable in ``features``, ``means`` and
        ``weights``.
    """
    op = "within_class_variance"
    labels2, weights2, backend, acc = _prepare(features, labels, means, weights, check, backend, op)
    if backend == "reference":
        return reference.within_class_variance(features, labels, means, weights).to(acc)
    means_acc = means.to(acc).contiguous()  # [C, D], read by every row: one compact copy
    if backend == "cpp":
        return _variance_cpp(features, labels2, weights2, means_acc)
    return _variance_triton(features, labels2, weights2, means_acc)


def within_class_covariance(features: Tensor, labels: Tensor, means: Tensor, weights: Optional[Tensor] = None, *,
                            check: bool = True, backend: str = "auto", path: str = "auto") -> Tensor:
    """Within-class scatter matrix ``Σ_W·N = Σ_{(i,k)} w_ik (h_i − μ_{y_ik})(h_i − μ_{y_ik})ᵀ`` (a sum).

    Args: as :func:`within_class_variance`.

    Returns:
        ``[D, D]`` symmetric, in the accumulation dtype. Computed tile by tile (one ``[tile, D]``
        centred buffer, the gather and subtraction fused in a C++ or Triton kernel, the tile's
        Gram on the device's BLAS): extra memory O(tile·D + D²). Differentiable in ``features``,
        ``means`` and ``weights``. ``path="fused"`` (Triton only) instead centres inside the loads
        of a ``tl.dot`` kernel (no centred buffer at all); ``"auto"`` is ``"tiles"`` until the
        fused kernel has been measured on a GPU.
    """
    op = "within_class_covariance"
    labels2, weights2, backend, acc = _prepare(features, labels, means, weights, check, backend, op)
    if backend == "reference":
        return reference.within_class_covariance(features, labels, means, weights).to(acc)
    paths = ("auto", "tiles") + (("fused",) if backend == "triton" else ())
    if path not in paths:
        raise ValueError(f"{op}: path for the {backend} backend must be one of {paths}, got {path!r}")
    path = "tiles" if path == "auto" else path
    means_acc = means.to(acc).contiguous()
    if backend == "cpp":
        return _covariance_cpp(features, labels2, weights2, means_acc, path)
    return _covariance_triton(features, labels2, weights2, means_acc, path)
