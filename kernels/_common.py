"""Helpers shared by the Triton kernels (imported by every kernels/<family>.py; imports triton)."""
import torch
import triton
import triton.language as tl

from .._library import acc_dtype, interpreting  # noqa: F401  (re-exported for the kernels: one rule each)


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation type for inputs of ``dtype`` (fp64 for fp64, else fp32)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def softplus(v):
    """log(1 + exp(v)) as torch computes it (v > 20 -> v), accurate to a few ulps for every v:
    max(v, 0) + log1p(exp(−|v|)), with log1p(e) = log(u)·e/(u − 1), u = 1 + e (there is no log1p)."""
    e = tl.exp(-tl.abs(v))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + lp)


@triton.jit
def sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))
