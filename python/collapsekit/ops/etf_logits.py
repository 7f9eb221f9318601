"""etf_logits: ``scale · normalize(h) @ Eᵀ`` (the logits of a fixed simplex-ETF head, a cosine
classifier), forward and backward, without a normalised copy of ``h``.

Same pattern as ops/class_sums.py:

* cpp: row tiles of ``h`` are normalised by a C++ prologue into one tile-sized buffer and
  multiplied by BLAS straight into the output rows; the backward runs the GEMMs on the same tiles
  and a C++ epilogue applies the normalisation's Jacobian in place.
* triton: the forward is one GEMM kernel that sums the row norms from the tiles it loads; the
  backward is a grad-h GEMM kernel with the projection in its epilogue and a grad-E GEMM kernel
  that scales the ``h`` tiles as it loads them (kernels/etf_logits.py).

Backward (``ĥ = h / max(‖h‖, eps)``, ``G`` = grad of the logits):
``∂h = (g − ĥ (ĥ·g)) / ‖h‖`` with ``g = scale · G E`` (``g / eps`` where the clamp is active),
``∂E = scale · Gᵀ ĥ``.
"""
import math
from typing import Tuple

import torch
from torch import Tensor

from .. import _dispatch, _library, _validate
from .._library import fill_args
from .._tiles import row_tiles

# Rows per CPU tile. Measured at N=65536, D=1024, C=1000 fp32 (2-core VM): 128 rows 0.93 s,
# 256 0.87 s, 512-2048 0.79-0.80 s; the bare GEMM h @ Eᵀ 0.74 s. The [1024, D] buffer is the only
# temporary (4 MiB at D=1024).
ROW_TILE = 1024


# ----------------------------------------------------------------------------------- cpp ------

def _check_op(features, etf, grad=None):
    op = "etf_logits"
    _library.expect(op, "features", features, ndim=2, dtypes=_library.FLOAT_DTYPES)
    _library.expect(op, "etf", etf, shape=(-1, features.shape[1]), dtypes=_library.FLOAT_DTYPES)
    if grad is not None:
        _library.expect(op, "grad", grad, shape=(features.shape[0], etf.shape[0]), dtypes=_library.FLOAT_DTYPES)


def _outputs(features, etf, scale, eps):
    return features.new_empty(features.shape[0], etf.shape[0])


def _backward_outputs(grad, logits, features, etf, scale, eps, need_features, need_etf):
    acc = _library.acc_dtype(features.dtype)
    gh = features.new_empty(features.shape) if need_features else features.new_empty(0)
    ge = features.new_empty(etf.shape, dtype=acc) if need_etf else features.new_empty(0, dtype=acc)
    return gh, ge


@_library.cpu_op("etf_logits_cpp")
def _etf_logits_cpp(features: Tensor, etf: Tensor, scale: float, eps: float) -> Tensor:
    _check_op(features, etf)
    acc = _library.acc_dtype(features.dtype)
    n, d = features.shape
    c = etf.shape[0]
    out = _outputs(features, etf, scale, eps)
    if n == 0 or c == 0:
        return out
    et = etf.to(acc).t()  # [D, C]; a strided view is fine for BLAS
    buf = torch.empty(min(ROW_TILE, n), d, dtype=acc)
    tmp = None if features.dtype == acc else torch.empty(min(ROW_TILE, n), c, dtype=acc)
    C, code, nt = _dispatch.cpp(), _dispatch.FLOAT_CODES[features.dtype], _dispatch.num_threads()
    for r0, r in row_tiles(n, ROW_TILE):
        h = features[r0:r0 + r]
        C.normalize_rows(fill_args("NormalizeRowsArgs", features=h, feature_dtype=code, R=r, D=d, fs0=h.stride(0),
                                   fs1=h.stride(1), eps=eps, scale=scale, out=buf, inv_norms=None, num_threads=nt))
        if tmp is None:
            torch.mm(buf[:r], et, out=out[r0:r0 + r])
        else:
            torch.mm(buf[:r], et, out=tmp[:r])
            out[r0:r0 + r].copy_(tmp[:r])
    return out


@_library.cpu_op("etf_logits_backward_cpp")
def _etf_logits_backward_cpp(grad: Tensor, logits: Tensor, features: Tensor, etf: Tensor, scale: float, eps: float,
                             need_features: bool, need_etf: bool) -> Tuple[Tensor, Tensor]:
    _check_op(features, etf, grad)
    acc = _library.acc_dtype(features.dtype)
    n, d = features.shape
    c = etf.shape[0]
    gh, ge = _backward_outputs(grad, logits, features, etf, scale, eps, need_features, need_etf)
    ge.zero_()
    if n == 0 or c == 0 or d == 0:
        return gh.zero_(), ge
    e = etf.to(acc)
    rt = min(ROW_TILE, n)
    buf = torch.empty(rt, d, dtype=acc)
    gbuf = None if features.dtype == acc else torch.empty(rt, d, dtype=acc)
    C, code, nt = _dispatch.cpp(), _dispatch.FLOAT_CODES[features.dtype], _dispatch.num_threads()
    for r0, r in row_tiles(n, ROW_TILE):
        h = features[r0:r0 + r]
        g = grad[r0:r0 + r].to(acc)
        if need_etf:  # ∂E += Gᵀ ĥ (scaled once at the end)
            C.normalize_rows(fill_args("NormalizeRowsArgs", features=h, feature_dtype=code, R=r, D=d,
                                       fs0=h.stride(0), fs1=h.stride(1), eps=eps, scale=1.0, out=buf,
                                       inv_norms=None, num_threads=nt))
            ge.addmm_(g.t(), buf[:r])
        if need_features:  # g = scale · G E, then the Jacobian of the normalisation, in place
            dst = gh[r0:r0 + r] if gbuf is None else gbuf[:r]
            torch.mm(g, e, out=dst)
            dst.mul_(scale)
            C.normalize_rows_backward(fill_args("NormalizeRowsBackwardArgs", features=h, feature_dtype=code, R=r,
                                                D=d, fs0=h.stride(0), fs1=h.stride(1), eps=eps, grad=dst,
                                                num_threads=nt))
            if gbuf is not None:
                gh[r0:r0 + r].copy_(dst)
    if need_etf:
        ge.mul_(scale)
    return gh, ge


# -------------------------------------------------------------------------------- triton ------

def _etf_logits_triton_impl(features: Tensor, etf: Tensor, scale: float, eps: float) -> Tensor:
    _check_op(features, etf)
    from ..kernels import etf_logits as k

    return k.forward(features, etf, scale, eps)


def _etf_logits_backward_triton_impl(grad: Tensor, logits: Tensor, features: Tensor, etf: Tensor, scale: float,
                                     eps: float, need_features: bool, need_etf: bool) -> Tuple[Tensor, Tensor]:
    _check_op(features, etf, grad)
    from ..kernels import etf_logits as k

    return k.backward(grad, logits, features, etf, scale, eps, need_features, need_etf)


_etf_logits_triton = _library.triton_op("etf_logits_triton", _etf_logits_triton_impl)
_etf_logits_backward_triton = _library.triton_op("etf_logits_backward_triton", _etf_logits_backward_triton_impl)


# ------------------------------------------------------------------------ fake + autograd ------

def _make_autograd(backward_op, save_logits: bool):
    def setup_context(ctx, inputs, output):
        features, etf, scale, eps = inputs
        ctx.scale, ctx.eps = scale, eps
        ctx.etf_dtype = etf.dtype
        # The Triton grad-h kernel reads the logits (ĥ·g = Σ_c G_c L_c); the C++ path recomputes
        # ĥ·g from h and does not keep the [N, C] output alive.
        ctx.save_for_backward(features, etf, output if save_logits else None)

    def backward(ctx, grad):
        features, etf, logits = ctx.saved_tensors
        need_h, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if logits is None:
            logits = grad.new_empty(0, 0)
        gh, ge = backward_op(grad, logits, features, etf, ctx.scale, ctx.eps, need_h, need_e)
        return (gh if need_h else None), (ge.to(ctx.etf_dtype) if need_e else None), None, None

    return backward, setup_context


for _fwd, _bwd, _save in ((_etf_logits_cpp, _etf_logits_backward_cpp, False),
                          (_etf_logits_triton, _etf_logits_backward_triton, True)):
    _b, _s = _make_autograd(_bwd, _save)
    _library.register((_fwd,), fake=_outputs, backward=_b, setup_context=_s)
    _library.register((_bwd,), fake=_backward_outputs)


# -------------------------------------------------------------------------------- public ------

def etf_logits(features: Tensor, etf: Tensor, scale: float = 1.0, *, eps: float = 1e-12,
               backend: str = "auto") -> Tensor:
    """``scale · normalize(features) @ etfᵀ`` — the logits of a fixed ETF (cosine) classifier head.

    Equal to ``F.normalize(features, dim=-1, eps=eps) @ etf.T * scale`` without the normalised
    copy of ``features``; differentiable in ``features`` and ``etf``.

    Args:
        features: ``[..., D]`` floating (fp16/bf16/fp32/fp64), any strides.
        etf: ``[C, D]`` floating (e.g. from :func:`collapsekit.simplex_etf`); used in the features'
            dtype (fp32 for the C++ half-precision path).
        scale: logit scale (a temperature's inverse).
        eps: norm clamp, as in ``F.normalize``.
        backend: ``"auto" | "reference" | "cpp" | "triton"``.

    Returns:
        ``[..., C]`` in the features' dtype.
    """
    op = "etf_logits"
    _validate.floating(features, "features", op)
    _validate.floating(etf, "etf", op, ndim=2)
    if features.dim() < 1 or features.shape[-1] != etf.shape[1]:
        raise ValueError(f"{op}: features must be [..., D] with D = etf.shape[1] = {etf.shape[1]}, "
                         f"got {tuple(features.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale:
        raise TypeError(f"{op}: scale must be a finite Python number, got {scale!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{op}: eps must be > 0, got {eps!r}")
    _validate.same_device(op, features=features, etf=etf)
    backend = _dispatch.resolve_backend(backend, features.device, op)
    lead = features.shape[:-1]
    h = features.reshape(math.prod(lead), features.shape[-1])
    if backend == "reference":
        from .. import reference

        out = reference.etf_logits(h, etf, scale, eps).to(features.dtype)
    elif backend == "cpp":
        e = etf if features.dtype == torch.float64 else etf.float()
        out = _etf_logits_cpp(h, e, float(scale), float(eps))
    else:
        # tensor-core operands: E in the features' half type; fp32/fp64 stay as they are
        e = etf.to(features.dtype)
        out = _etf_logits_triton(h, e, float(scale), float(eps))
    return out.reshape(*lead, etf.shape[0])
