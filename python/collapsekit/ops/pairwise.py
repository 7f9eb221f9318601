"""pairwise_geometry: one sweep over the class pairs ``c < c'`` of the centred class means,
returning the pair sums behind ``cdnv``, ``nc2_equiangle``, ``nc2_coherence`` and ``gnc2``
(docs/design.md, "Streaming and metrics"; docs/metrics.md) without a ``K × K`` matrix in memory.

Same pattern as ops/class_sums.py. The Gram tiles ``[tile, tile]`` of the upper triangle come
from the device's BLAS (``ops/_tiles.py``); each tile is reduced by a registered op — a fused C++
pass (csrc/pairwise.cpp) or a Triton kernel (kernels/pairwise.py) — into six fp64 sums:

    pairs        number of pairs
    cos          Σ cos(μ̃_c, μ̃_c')
    cos2         Σ cos²
    coherence    Σ |cos + 1/(K−1)|
    log_kernel   Σ log(1 / ‖u_c − u_c'‖) = Σ −½ log(2 − 2 cos)
    cdnv         Σ (σ_c² + σ_c'²) / (2 ‖μ_c − μ_c'‖²)         (only when variances are given)
"""
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import _dispatch, _library, reference
from .._library import fill_args
from .._tiles import gram_tiles

PAIR_TILE = 2048     # classes per side of a Gram tile: 2048^2 fp64 = 32 MiB
PAIR_KEYS = ("pairs", "cos", "cos2", "coherence", "log_kernel", "cdnv")


# ---------------------------------------------------------------------------------------------
# Registered ops: the six pair sums of one Gram tile g [ta, tb] (fp32/fp64, unit column stride),
# with the rows' squared norms n2a [ta], n2b [tb] and variances va [ta], vb [tb] (fp64, or None).
# ---------------------------------------------------------------------------------------------

def _check_op(g, n2a, n2b, va, vb):
    op = "pairwise_tile_sums"
    _library.expect(op, "gram", g, ndim=2, dtypes=_library.ACC_DTYPES)
    if g.shape[1] > 1 and g.stride(1) != 1:
        raise ValueError(f"{op} (registered op): gram must have unit column stride")
    ta, tb = g.shape
    f64 = (torch.float64,)
    _library.expect(op, "norms2_a", n2a, shape=(ta,), dtypes=f64, contiguous=True)
    _library.expect(op, "norms2_b", n2b, shape=(tb,), dtypes=f64, contiguous=True)
    _library.expect(op, "var_a", va, shape=(ta,), dtypes=f64, contiguous=True, optional=True)
    _library.expect(op, "var_b", vb, shape=(tb,), dtypes=f64, contiguous=True, optional=True)
    if (va is None) != (vb is None):
        raise ValueError(f"{op} (registered op): var_a and var_b must both be given or both be None")


def _outputs(g, n2a, n2b, va, vb, strict_upper, inv_k1):
    return g.new_zeros(len(PAIR_KEYS), dtype=torch.float64)


@_library.cpu_op("pairwise_tile_sums_cpp")
def _tile_sums_cpp(g: Tensor, n2a: Tensor, n2b: Tensor, va: Optional[Tensor], vb: Optional[Tensor],
                   strict_upper: bool, inv_k1: float) -> Tensor:
    _check_op(g, n2a, n2b, va, vb)
    out = _outputs(g, n2a, n2b, va, vb, strict_upper, inv_k1)
    _dispatch.cpp().pairwise_tile_sums(fill_args(
        "PairwiseTileArgs", gram=g, gram_dtype=_dispatch.FLOAT_CODES[g.dtype], ta=g.shape[0], tb=g.shape[1],
        gs0=g.stride(0), norms2_a=n2a, norms2_b=n2b, var_a=va, var_b=vb, strict_upper=int(strict_upper),
        inv_k1=inv_k1, out=out, num_threads=_dispatch.num_threads()))
    return out


def _tile_sums_triton_impl(g: Tensor, n2a: Tensor, n2b: Tensor, va: Optional[Tensor], vb: Optional[Tensor],
                           strict_upper: bool, inv_k1: float) -> Tensor:
    _check_op(g, n2a, n2b, va, vb)
    from ..kernels import pairwise

    out = _outputs(g, n2a, n2b, va, vb, strict_upper, inv_k1)
    pairwise.pairwise_tile_sums(g, n2a, n2b, va, vb, strict_upper, inv_k1, out)
    return out


_tile_sums_triton = _library.triton_op("pairwise_tile_sums_triton", _tile_sums_triton_impl)
_library.register((_tile_sums_cpp, _tile_sums_triton), fake=_outputs)  # sums of a diagnostic: no autograd


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def pairwise_geometry(centred: Tensor, variances: Optional[Tensor] = None, *, tile: Optional[int] = None,
                      backend: str = "auto") -> Dict[str, float]:
    """The pair sums over ``c < c'`` of the rows of ``centred``.

    Args:
        centred: ``[K, D]`` floating, the centred means ``μ̃_c`` of the present classes.
        variances: optional ``[K]`` class variances ``σ_c²`` (for the ``cdnv`` sum).
        tile: classes per side of a Gram tile (default :data:`PAIR_TILE`); memory O(tile²).
        backend: ``"auto" | "reference" | "cpp" | "triton"``; ``"reference"`` is the literal fp64
            formula over the full ``K × K`` grid (small K only).

    Returns:
        ``dict`` with the float sums named in :data:`PAIR_KEYS` (``cdnv`` is 0 without variances).
    """
    op = "pairwise_geometry"
    if not isinstance(centred, Tensor) or centred.dim() != 2 or not centred.is_floating_point():
        raise ValueError(f"{op}: centred must be a floating [K, D] tensor")
    k = centred.shape[0]
    if variances is not None and (not isinstance(variances, Tensor) or tuple(variances.shape) != (k,)):
        raise ValueError(f"{op}: variances must be a [K]=({k},) tensor")
    backend = _dispatch.resolve_backend(backend, centred.device, op)
    if backend == "reference":
        return reference.pairwise_geometry(centred, variances)
    reduce = _tile_sums_cpp if backend == "cpp" else _tile_sums_triton
    c = centred if centred.dtype in _library.ACC_DTYPES else centred.float()
    n2 = c.double().pow(2).sum(1)
    var = None if variances is None else variances.to(centred.device, torch.float64).contiguous()
    out = torch.zeros(len(PAIR_KEYS), dtype=torch.float64, device=centred.device)
    inv_k1 = 1.0 / (k - 1) if k > 1 else 0.0
    for (a0, a1), (b0, b1), g in gram_tiles(c, tile or PAIR_TILE):
        out += reduce(g, n2[a0:a1], n2[b0:b1], None if var is None else var[a0:a1],
                      None if var is None else var[b0:b1], a0 == b0, inv_k1)
    return dict(zip(PAIR_KEYS, (float(v) for v in out)))
