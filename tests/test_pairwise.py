"""pairwise_geometry (ops/pairwise.py): the tiled pair sums of every backend against the literal
fp64 full-grid reference, the registered tile ops' checks and opcheck."""
import pytest
import torch

from collapsekit.ops import pairwise as P
from conftest import HAS_CUDA, HAS_TRITON, opcheck


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_tile_kernels_match_torch(backend, dtype):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("needs triton")
    device = "cuda" if (backend == "triton" and HAS_CUDA) else "cpu"
    g = torch.Generator().manual_seed(6)
    m = torch.randn(45, 9, generator=g, dtype=torch.float64)
    centred = (m - m.mean(0)).to(dtype).to(device)
    var = torch.rand(45, generator=g, dtype=torch.float64).to(device)
    want = P.pairwise_geometry(centred, var, tile=13, backend="reference")
    got = P.pairwise_geometry(centred, var, tile=13, backend=backend)
    assert want["pairs"] == 45 * 44 / 2
    for key in want:
        # fp64: summation order only; fp32: the Gram tiles are fp32 products (the reference is fp64
        # from the same rounded inputs); Triton takes the log in fp32
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        if backend == "triton" and key == "log_kernel":
            tol = max(tol, 1e-5)
        assert got[key] == pytest.approx(want[key], rel=tol), key


def test_reference_is_the_literal_formula():
    m = torch.randn(6, 4, dtype=torch.float64)
    var = torch.rand(6, dtype=torch.float64)
    got = P.pairwise_geometry(m, var, backend="reference")
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    cos = [float(torch.dot(m[i], m[j]) / (m[i].norm() * m[j].norm())) for i, j in pairs]
    assert got["pairs"] == 15
    assert got["cos"] == pytest.approx(sum(cos), rel=1e-12)
    assert got["coherence"] == pytest.approx(sum(abs(c + 1 / 5) for c in cos), rel=1e-12)
    cdnv = sum(float((var[i] + var[j]) / (2 * (m[i] - m[j]).pow(2).sum())) for i, j in pairs)
    assert got["cdnv"] == pytest.approx(cdnv, rel=1e-12)
    assert P.pairwise_geometry(m, backend="reference")["cdnv"] == 0.0


def _ops():
    out = [(P._tile_sums_cpp, "cpu")]
    if HAS_TRITON:
        out.append((P._tile_sums_triton, "cuda" if HAS_CUDA else "cpu"))
    return out


def _tile(device):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(11, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, 5, generator=g, dtype=torch.float64)
    n2a, n2b = a.pow(2).sum(1), b.pow(2).sum(1)
    va, vb = torch.rand(11, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (a @ b.t(), n2a, n2b, va, vb)]


@pytest.mark.parametrize("op,device", _ops(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_tile_op_opcheck_and_checks(op, device):
    g, n2a, n2b, va, vb = _tile(device)
    opcheck(op, (g, n2a, n2b, va, vb, False, 0.25))
    out = op(g, n2a, n2b, va, vb, False, 0.25)
    assert float(out[0]) == 77  # an off-diagonal tile: every entry is a pair
    with pytest.raises(ValueError, match=r"norms2_b must have shape \(7,\)"):
        op(g, n2a, n2b[:6], va, vb, False, 0.25)
    with pytest.raises(ValueError, match="var_a and var_b must both"):
        op(g, n2a, n2b, va, None, False, 0.25)
    with pytest.raises(ValueError, match="norms2_a must have dtype"):
        op(g, n2a.float(), n2b, va, vb, False, 0.25)


def test_bad_input():
    with pytest.raises(ValueError, match="centred must be a floating"):
        P.pairwise_geometry(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"variances must be a \[K\]"):
        P.pairwise_geometry(torch.randn(4, 2), torch.rand(3))
