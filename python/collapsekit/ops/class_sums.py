"""class_sums / class_means: per-class weighted sums and means of feature rows.

The op pattern every family follows (docs/adding-an-op.md):

1. ``_check_op``: what the kernels index, checked at the registered op (shapes, dtypes), so a
   direct ``torch.ops.collapsekit.*`` call can never go out of bounds;
2. ``_outputs``: the one shape function, used by the real implementations and as the fake;
3. ``_<op>_cpp`` (``_library.cpu_op``; kernel in ``collapsekit._C``) and ``_<op>_triton``
   (``_library.triton_op``; launches ``collapsekit.kernels.<family>`` through ``wrap_triton``);
4. one backward shared by both, registered with ``_library.register``;
5. the public function: validate -> resolve the backend -> call the op (or the reference).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch, _library, _validate, reference
from .._library import fill_args

_PATHS_CPP = {"auto": 0, "sorted": 1, "direct": 2, "rows": 3}
_PATHS_TRITON = ("auto", "sorted", "scan", "atomic")


# ---------------------------------------------------------------------------------------------
# The registered ops. Canonical arguments: features [N, D] (any strides), labels [N, K] int32/int64,
# weights [N, K] (any floating dtype, any strides) or None. Outputs in the accumulation dtype.
# ---------------------------------------------------------------------------------------------

def _check_op(features, labels, weights, num_classes, path, paths, op="class_sums"):
    _library.expect(op, "features", features, ndim=2, dtypes=_library.FLOAT_DTYPES)
    n = features.shape[0]
    _library.expect(op, "labels", labels, ndim=2, dtypes=_library.INDEX_DTYPES)
    if labels.shape[0] != n:
        raise ValueError(f"{op} (registered op): labels must have shape ({n}, K), got {tuple(labels.shape)}")
    _library.expect(op, "weights", weights, shape=tuple(labels.shape), dtypes=_library.FLOAT_DTYPES, optional=True)
    if num_classes < 1:
        raise ValueError(f"{op} (registered op): num_classes must be >= 1, got {num_classes}")
    if path not in paths:
        raise ValueError(f"{op} (registered op): path must be one of {tuple(paths)}, got {path!r}")


def _outputs(features, labels, weights, num_classes, path):
    """(sums [C, D], counts [C]) in the accumulation dtype, on the features' device."""
    acc = _library.acc_dtype(features.dtype)
    return (features.new_empty(num_classes, features.shape[1], dtype=acc),
            features.new_empty(num_classes, dtype=acc))


@_library.cpu_op("class_sums_cpp")
def _class_sums_cpp(features: Tensor, labels: Tensor, weights: Optional[Tensor], num_classes: int,
                    path: str) -> Tuple[Tensor, Tensor]:
    _check_op(features, labels, weights, num_classes, path, _PATHS_CPP)
    acc = _library.acc_dtype(features.dtype)
    n, d = features.shape
    sums, counts = _outputs(features, labels, weights, num_classes, path)
    if weights is not None:
        weights = weights.to(acc)  # [N, K]; small. Stride-0 views stay views.
    _dispatch.cpp().class_sums(fill_args(
        "ClassSumsArgs", **labeled_rows_fields(features, labels, weights),
        C=num_classes, sums=sums, counts=counts, path=_PATHS_CPP[path], num_threads=_dispatch.num_threads()))
    return sums, counts


def labeled_rows_fields(features: Tensor, labels: Tensor, weights: Optional[Tensor]) -> dict:
    """The LabeledRowsArgs fields (csrc/common.h) of features [N, D], labels [N, K] and weights
    [N, K] or None: the block every labelled-rows kernel (class sums, within-class variance) takes."""
    n, d = features.shape
    return dict(features=features, feature_dtype=_dispatch.FLOAT_CODES[features.dtype], N=n, D=d,
                fs0=features.stride(0), fs1=features.stride(1),
                labels=labels, label_dtype=_dispatch.INDEX_CODES[labels.dtype], K=labels.shape[1],
                ls0=labels.stride(0), ls1=labels.stride(1),
                weights=weights, ws0=0 if weights is None else weights.stride(0),
                ws1=0 if weights is None else weights.stride(1))


def _class_sums_triton_impl(features: Tensor, labels: Tensor, weights: Optional[Tensor], num_classes: int,
                            path: str) -> Tuple[Tensor, Tensor]:
    _check_op(features, labels, weights, num_classes, path, _PATHS_TRITON)
    from ..kernels import scatter  # imports triton: only on the first Triton call

    return scatter.class_sums(features, labels, weights, num_classes, path)


_class_sums_triton = _library.triton_op("class_sums_triton", _class_sums_triton_impl)


def _setup_context(ctx, inputs, output):
    features, labels, weights, num_classes, _ = inputs
    ctx.num_classes = num_classes
    ctx.features_dtype = features.dtype
    ctx.weights_dtype = None if weights is None else weights.dtype
    ctx.save_for_backward(features if ctx.needs_input_grad[2] else None, labels, weights)


def _backward(ctx, grad_sums, grad_counts):
    """grad_features[i] = Σ_k w_ik · grad_sums[y_ik];  grad_w[i, k] = <h_i, grad_sums[y_ik]> + grad_counts[y_ik].

    A gather per label column (output-sized; no [N, D] temporary beyond one row-gather per k).
    Out-of-range labels (check=False) contribute nothing."""
    features, labels, weights = ctx.saved_tensors
    C = ctx.num_classes
    n, kk = labels.shape
    valid = (labels >= 0) & (labels < C)
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    w = torch.ones(labels.shape, dtype=grad_sums.dtype, device=labels.device) if weights is None \
        else weights.to(grad_sums.dtype)
    w = w * valid
    grad_features = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.index_select(grad_sums, 0, y[:, 0]).mul_(w[:, :1])
        for k in range(1, kk):
            grad_features.addcmul_(torch.index_select(grad_sums, 0, y[:, k]), w[:, k:k + 1])
        grad_features = grad_features.to(ctx.features_dtype)
    if ctx.needs_input_grad[2]:
        h = features.to(grad_sums.dtype)
        cols = []
        for k in range(kk):
            g = (torch.index_select(grad_sums, 0, y[:, k]) * h).sum(1)
            if grad_counts is not None:
                g = g + grad_counts[y[:, k]]
            cols.append(g * valid[:, k])
        grad_weights = torch.stack(cols, 1).to(ctx.weights_dtype)
    return grad_features, None, grad_weights, None, None


_library.register((_class_sums_cpp, _class_sums_triton), fake=_outputs, backward=_backward,
                  setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def class_sums_acc(features, labels, num_classes, weights, check, backend, path, op):
    """Validated dispatch; returns (sums, counts) in the accumulation dtype."""
    labels2, weights2 = _validate.class_labels(features, labels, weights, num_classes, op, check)
    backend = _dispatch.resolve_backend(backend, features.device, op)
    acc = _library.acc_dtype(features.dtype)
    if backend == "reference":
        sums, counts = reference.class_sums(features, labels, num_classes, weights)
        return sums.to(acc), counts.to(acc)
    if backend == "cpp":
        if path not in _PATHS_CPP:
            raise ValueError(f"{op}: path for the cpp backend must be one of {tuple(_PATHS_CPP)}, got {path!r}")
        return _class_sums_cpp(features, labels2, weights2, num_classes, path)
    if path not in _PATHS_TRITON:
        raise ValueError(f"{op}: path for the triton backend must be one of {_PATHS_TRITON}, got {path!r}")
    return _class_sums_triton(features, labels2, weights2, num_classes, path)


def class_sums(features: Tensor, labels: Tensor, num_classes: int, weights: Optional[Tensor] = None, *,
               check: bool = True, backend: str = "auto", path: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-class weighted sums of feature rows.

    Args:
        features: ``[N, D]`` float16/bfloat16/float32/float64, any strides.
        labels: ``[N]`` int32/int64 class ids (hard labels) or ``[N, K]`` (soft labels: row i adds
            to each of its K classes, e.g. mixup or label smoothing).
        num_classes: ``C >= 1``.
        weights: optional ``[N]`` per-sample weights, or ``[N, K]`` per-entry weights with soft labels.
        check: verify every label lies in ``[0, C)`` (ValueError naming the first bad one). With
            ``check=False`` the scan is skipped and out-of-range entries are ignored (never written).
        backend: ``"auto" | "reference" | "cpp" | "triton"``.
        path: kernel choice for tuning and tests; ``"auto"`` (measured rule), cpp: ``"sorted"`` /
            ``"direct"`` / ``"rows"``, triton: ``"sorted"`` / ``"scan"`` / ``"atomic"``. Never changes the result beyond rounding.

    Returns:
        ``(sums [C, D], counts [C])``: ``sums[c] = Σ_{y_ik = c} w_ik · h_i`` in the dtype of
        ``features`` (accumulated in fp32, fp64 for fp64) and ``counts[c] = Σ_{y_ik = c} w_ik``
        in the accumulation dtype. Differentiable in ``features`` and ``weights``.
    """
    sums, counts = class_sums_acc(features, labels, num_classes, weights, check, backend, path, "class_sums")
    return sums.to(features.dtype), counts


def class_means(features: Tensor, labels: Tensor, num_classes: int, weights: Optional[Tensor] = None, *,
                check: bool = True, backend: str = "auto", path: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-class weighted means of feature rows.

    Same arguments as :func:`class_sums`. Returns ``(means [C, D], counts [C])`` with
    ``means[c] = sums[c] / counts[c]`` (divided in the accumulation dtype, returned in the dtype of
    ``features``) and a zero row for absent classes (``counts[c] == 0``).
    """
    sums, counts = class_sums_acc(features, labels, num_classes, weights, check, backend, path, "class_means")
    safe = torch.where(counts != 0, counts, torch.ones_like(counts))
    # in place: a second [C, D] buffer would cost as much as the scatter at large C
    return sums.div_(safe[:, None]).to(features.dtype), counts
