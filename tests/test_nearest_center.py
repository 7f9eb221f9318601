"""nearest_class_center and classifier_decisions: the fused tile arg-min op family
(ops/nearest_center.py), every backend against the fp64 reference, the registered ops' checks,
opcheck and torch.compile."""
import pytest
import torch

import collapsekit as ck
from collapsekit.ops import nearest_center as ncc_mod
from conftest import HAS_CUDA, HAS_TRITON, opcheck


def _tile_argmin_device(backend, monkeypatch, row_tile, class_tile):
    """Device for a kernel test (skip without triton), with small tiles so several are used."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("needs triton")
    monkeypatch.setattr(ncc_mod, "ROW_TILE", row_tile)
    monkeypatch.setattr(ncc_mod, "CLASS_TILE", class_tile)
    return "cuda" if (backend == "triton" and HAS_CUDA) else "cpu"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nearest_class_center(backend, dtype, monkeypatch):
    device = _tile_argmin_device(backend, monkeypatch, 37, 5)
    g = torch.Generator().manual_seed(5)
    means = torch.randn(23, 7, generator=g, dtype=torch.float64)
    means[17] = means[4]  # an exact duplicate: ties go to the lower index
    h = torch.cat([means[[4, 17, 9]], torch.randn(200, 7, generator=g, dtype=torch.float64)])
    h, means = h.to(dtype), means.to(dtype)  # the reference sees the same rounded values
    got = ck.nearest_class_center(h.to(device), means.to(device), backend=backend).cpu()
    want = ck.nearest_class_center(h, means, backend="reference")
    assert got.dtype == torch.int64
    # a different center only where it is as near up to rounding (e.g. the duplicate of class 4)
    d = torch.stack([(h.double() - m).pow(2).sum(1) for m in means.double()], 1)
    rows = torch.arange(len(h))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2}[dtype]
    assert (d[rows, got] - d[rows, want]).abs().max() < tol
    assert (got == want).float().mean() > 0.9
    assert got[0] == 4 and got[1] == 4 and got[2] == 9
    mask = torch.ones(23, dtype=torch.bool)
    mask[[4, 9]] = False
    got = ck.nearest_class_center(h.to(device), means.to(device), mask.to(device), backend=backend).cpu()
    assert got[0] == 17 and not mask[got].logical_not().any()
    want = ck.nearest_class_center(h, means, mask, backend="reference")
    assert (d[rows, got] - d[rows, want]).abs().max() < tol
    with pytest.raises(ValueError, match="classes selects none"):
        ck.nearest_class_center(h, means, torch.zeros(23, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask of shape"):
        ck.nearest_class_center(h, means, torch.ones(22, dtype=torch.bool))
    with pytest.raises(ValueError, match="means has D=6 columns"):
        ck.nearest_class_center(h, means[:, :6])
    assert ck.nearest_class_center(h[:0].to(device), means.to(device), backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_classifier_decisions(backend, with_bias, monkeypatch):
    device = _tile_argmin_device(backend, monkeypatch, 29, 4)
    g = torch.Generator().manual_seed(8)
    w = torch.randn(19, 6, generator=g)
    w[11] = w[2]  # duplicate row: exact ties go to class 2
    b = torch.randn(19, generator=g) if with_bias else None
    if b is not None:
        b[11] = b[2]
    h = torch.randn(150, 6, generator=g)
    got = ncc_mod.classifier_decisions(h.to(device), w.to(device), None if b is None else b.to(device),
                                       backend=backend).cpu()
    logits = h.double() @ w.double().t() + (0 if b is None else b.double())
    want = logits.argmax(1)
    rows = torch.arange(150)
    assert (logits[rows, got] - logits[rows, want]).abs().max() < 1e-4
    assert (got == want).float().mean() > 0.9
    with pytest.raises(ValueError, match=r"bias must be \[C\]"):
        ncc_mod.classifier_decisions(h, w, torch.zeros(3))


def _op_args(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(41, 6, generator=g).to(device, dtype)
    rows = torch.randn(9, 6, generator=g).to(device, dtype)
    off = torch.randn(9, generator=g).to(device, dtype)
    return h, rows, off, -2.0


def _ops():
    out = [(ncc_mod._tile_argmin_cpp, "cpu")]
    if HAS_TRITON:
        out.append((ncc_mod._tile_argmin_triton, "cuda" if HAS_CUDA else "cpu"))
    return out


@pytest.mark.parametrize("op,device", _ops(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_tile_argmin_opcheck_and_value(op, device, monkeypatch):
    monkeypatch.setattr(ncc_mod, "ROW_TILE", 16)
    monkeypatch.setattr(ncc_mod, "CLASS_TILE", 4)
    h, rows, off, alpha = _op_args(device)
    opcheck(op, (h, rows, off, alpha))
    got = op(h, rows, off, alpha).cpu()
    want = (off.double().cpu()[None] + alpha * (h.double().cpu() @ rows.double().cpu().t())).argmin(1)
    assert torch.equal(got, want)


def test_tile_argmin_compiles():
    h, rows, off, alpha = _op_args("cpu")
    fn = torch.compile(lambda a, b: ck.nearest_class_center(a, b), fullgraph=True, backend="eager")
    assert torch.equal(fn(h, rows), ck.nearest_class_center(h, rows, backend="reference"))


@pytest.mark.parametrize("op,device", _ops(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_tile_argmin_registered_op_checks_shapes(op, device):
    h, rows, off, alpha = _op_args(device)
    with pytest.raises(ValueError, match=r"rows must have shape \(\*, 6\)"):
        op(h, rows[:, :5], off, alpha)
    with pytest.raises(ValueError, match=r"offsets must have shape \(9,\)"):
        op(h, rows, off[:8], alpha)
    with pytest.raises(ValueError, match="features must be 2-D"):
        op(h[0], rows, off, alpha)
