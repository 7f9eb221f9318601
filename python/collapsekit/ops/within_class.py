"""within_class_variance (and, next, within_class_covariance): within-class scatter against
given class means. Same pattern as ops/class_sums.py."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch, _validate, reference
from .class_sums import _class_sums_acc


# ---------------------------------------------------------------------------------------------
# Registered ops. Canonical arguments: features [N, D] (any strides), labels [N, K], weights
# [N, K] or None, means [C, D] contiguous in the accumulation dtype. Output in that dtype.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("collapsekit::within_class_variance_cpp", mutates_args=())
def _variance_cpp(features: Tensor, labels: Tensor, weights: Optional[Tensor], means: Tensor) -> Tensor:
    n, d = features.shape
    c = means.shape[0]
    out = torch.empty(c, dtype=means.dtype)
    if weights is not None:
        weights = weights.to(means.dtype)
    _dispatch.cpp().within_class_variance(
        features.data_ptr(), _dispatch.FLOAT_CODES[features.dtype], n, d, features.stride(0), features.stride(1),
        labels.data_ptr(), _dispatch.INDEX_CODES[labels.dtype], labels.shape[1], labels.stride(0), labels.stride(1),
        0 if weights is None else weights.data_ptr(),
        0 if weights is None else weights.stride(0), 0 if weights is None else weights.stride(1),
        c, means.data_ptr(), out.data_ptr(), _dispatch.num_threads())
    return out


def _variance_triton_impl(features: Tensor, labels: Tensor, weights: Optional[Tensor], means: Tensor) -> Tensor:
    from ..kernels import within_class  # imports triton: only on the first Triton call

    return within_class.within_class_variance(features, labels, weights, means)


if hasattr(torch.library, "triton_op"):  # torch >= 2.6
    _variance_triton = torch.library.triton_op("collapsekit::within_class_variance_triton", _variance_triton_impl,
                                               mutates_args=())
else:  # torch 2.4/2.5
    _variance_triton = torch.library.custom_op("collapsekit::within_class_variance_triton", _variance_triton_impl,
                                               mutates_args=())


def _variance_fake(features, labels, weights, means):
    return means.new_empty(means.shape[0])


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
        sums, counts = _class_sums_acc(features.detach(), labels, c, w, False, "auto", "auto", "within_class_variance")
        grad_means = -2 * g[:, None] * (sums - counts[:, None] * means)
    if ctx.needs_input_grad[2]:
        h = features.to(acc)
        cols = [g[y[:, k]] * (h - torch.index_select(means, 0, y[:, k])).pow(2).sum(1) * valid[:, k]
                for k in range(labels.shape[1])]
        grad_weights = torch.stack(cols, 1).to(ctx.weights_dtype)
    return grad_features, None, grad_weights, grad_means


for _op in (_variance_cpp, _variance_triton):
    _op.register_fake(_variance_fake)
    _op.register_autograd(_variance_backward, setup_context=_variance_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _means_arg(features: Tensor, means, op: str) -> Tensor:
    _validate.floating(means, "means", op, ndim=2)
    if means.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: means has D={means.shape[1]} columns but features has D={features.shape[1]}")
    if means.shape[0] < 1:
        raise ValueError(f"{op}: means must have at least one class row, got shape {tuple(means.shape)}")
    return means


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
    _validate.floating(features, "features", op, ndim=2)
    _means_arg(features, means, op)
    c = means.shape[0]
    labels2, weights2 = _validate.class_labels(features, labels, weights, c, op, check)
    _validate.same_device(op, features=features, means=means)
    backend = _dispatch.resolve_backend(backend, features.device, op)
    acc = _dispatch.accumulation_dtype(features.dtype)
    if backend == "reference":
        return reference.within_class_variance(features, labels, means, weights).to(acc)
    means_acc = means.to(acc).contiguous()  # [C, D], read by every row: one compact copy
    if backend == "cpp":
        return _variance_cpp(features, labels2, weights2, means_acc)
    return _variance_triton(features, labels2, weights2, means_acc)
