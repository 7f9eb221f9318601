"""Argument checks shared by every op. Each error names the argument and the problem."""
from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x, name: str, op: str, ndim: Optional[int] = None) -> torch.Tensor:
    tensor(x, name, op)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def positive_int(v, name: str, op: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {v}")
    return v


def same_device(op: str, **tensors) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{op}: {k} is on {v.device} but {items[0][0]} is on {dev}; "
                             "all tensors must be on the same device")
    return dev


def labels_in_range(labels: torch.Tensor, num_classes: int, op: str, name: str = "labels") -> None:
    """Raise ValueError naming the first label outside [0, num_classes) and its position."""
    if labels.numel() == 0:
        return
    lo, hi = torch.aminmax(labels)  # one pass; locate the culprit only on failure
    if int(lo) < 0 or int(hi) >= num_classes:
        bad = (labels < 0) | (labels >= num_classes)
        pos = tuple(int(i) for i in bad.nonzero()[0])
        where = pos[0] if len(pos) == 1 else pos
        raise ValueError(f"{op}: {name}[{where}] = {int(labels[pos])} is outside [0, num_classes={num_classes})")


def class_labels(features: torch.Tensor, labels, weights, num_classes: int, op: str,
                 check: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate (features [N, D], labels [N] or [N, K], weights [N] or [N, K]) and return the
    canonical 2-D forms: labels [N, K] and weights [N, K] or None (a stride-0 view when per-sample
    weights are given with soft labels; nothing is copied)."""
    floating(features, "features", op, ndim=2)
    tensor(labels, "labels", op)
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: labels must be int32 or int64, got {labels.dtype}")
    positive_int(num_classes, "num_classes", op)
    n = features.shape[0]
    if labels.dim() not in (1, 2):
        raise ValueError(f"{op}: labels must be [N] (hard) or [N, K] (soft), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{op}: labels has {labels.shape[0]} rows but features has {n}")
    labels2 = labels if labels.dim() == 2 else labels.unsqueeze(1)
    k = labels2.shape[1]
    if labels.dim() == 2 and k == 0:
        raise ValueError(f"{op}: soft labels [N, K] need K >= 1, got shape {tuple(labels.shape)}")
    weights2 = None
    if weights is not None:
        tensor(weights, "weights", op)
        if weights.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: weights must be a floating tensor, got {weights.dtype}")
        if weights.dim() == 1 and weights.shape[0] == n:
            weights2 = weights.unsqueeze(1).expand(n, k)
        elif labels.dim() == 2 and tuple(weights.shape) == (n, k):
            weights2 = weights
        else:
            want = f"[N]={n}" if labels.dim() == 1 else f"[N]=({n},) or [N, K]=({n}, {k})"
            raise ValueError(f"{op}: weights must have shape {want}, got {tuple(weights.shape)}")
    same_device(op, features=features, labels=labels, weights=weights)
    if check:
        labels_in_range(labels, num_classes, op)
    return labels2, weights2
