"""within_class_variance: every backend against the fp64 reference."""
import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref
from collapsekit.ops import within_class as wc_mod

from conftest import HAS_CUDA, HAS_TRITON, assert_close, backend_devices, gradcheck, opcheck

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def sizes(backend, device):
    return (67, 37, 13) if (backend == "triton" and device == "cpu") else (1013, 37, 13)


def problem(n, d, c, dtype, device, seed, k=0, weighted=False, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    shape = (n,) if k == 0 else (n, k)
    y = torch.randint(0, c, shape, generator=g).to(label_dtype)
    means = ref.class_means(h, y if k == 0 else y[:, 0], c)[0] + 0.1 * torch.randn(c, d, generator=g, dtype=torch.float64)
    w = None
    if weighted:
        w = torch.rand(shape if k else (n,), generator=g, dtype=torch.float64)
    mv = lambda t: None if t is None else t.to(device)
    return mv(h), mv(y), mv(means.to(torch.float32)), mv(w)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_variance_hard(backend, device, dtype, label_dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("interpreter: no bf16")
    n, d, c = sizes(backend, device)
    h, y, means, _ = problem(n, d, c, dtype, device, 1, label_dtype=label_dtype)
    v = ck.within_class_variance(h, y, means, backend=backend)
    assert v.shape == (c,) and v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the reference sees the same (rounded) inputs; fp32 accumulation over D terms
    assert_close(v, ref.within_class_variance(h, y, means), torch.float32 if dtype != torch.float64 else dtype,
                 scale=100)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("k,weighted", [(0, True), (2, False), (3, True)])
def test_variance_soft_weighted(backend, device, k, weighted):
    n, d, c = sizes(backend, device)
    h, y, means, w = problem(n, d, c, torch.float64, device, 2, k=k, weighted=weighted)
    v = ck.within_class_variance(h, y, means.double(), w, backend=backend)
    assert_close(v, ref.within_class_variance(h, y, means, w), torch.float64, scale=100)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_variance_strides_empty_absent_out_of_range(backend, device):
    n, d, c = sizes(backend, device)
    h, y, means, _ = problem(n, d, c, torch.float32, device, 3)
    ht = h.t().contiguous().t()                          # column-major
    hs = torch.cat([h, h], 1)[:, ::2]                    # column stride 2 (values differ from h)
    for feats in (ht, hs, h[:1].expand(n, d)):
        v = ck.within_class_variance(feats, y, means, backend=backend)
        assert_close(v, ref.within_class_variance(feats, y, means), torch.float32, scale=100)
    wide = torch.cat([means, torch.zeros(4, d, device=device)])  # classes c..c+3 absent
    v = ck.within_class_variance(h, y, wide, backend=backend)
    assert (v[c:] == 0).all()
    assert (ck.within_class_variance(h[:0], y[:0], means, backend=backend) == 0).all()
    assert ck.within_class_variance(h[:, :0], y, means[:, :0], backend=backend).abs().max() == 0
    bad = y.clone()
    bad[::5] = c + 2
    v = ck.within_class_variance(h, bad, means, check=False, backend=backend)
    assert_close(v, ref.within_class_variance(h, bad, means), torch.float32, scale=100)


@pytest.mark.parametrize("backend", [b for b, dev in backend_devices() if dev == "cpu"])
@pytest.mark.parametrize("k", [0, 2])
def test_variance_gradcheck(backend, k):
    h, y, means, w = problem(9, 4, 3, torch.float64, "cpu", 4, k=k, weighted=True)
    h.requires_grad_(); w.requires_grad_()
    means = means.double().requires_grad_()
    f = lambda h_, m_, w_: ck.within_class_variance(h_, y, m_, w_, backend=backend)
    assert gradcheck(f, (h, means, w), backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_variance_grads_match_reference(backend, device):
    h, y, means, w = problem(45, 9, 6, torch.float32, device, 5, weighted=True)
    y[::7] = -1  # ignored with check=False
    h.requires_grad_(); means.requires_grad_(); w.requires_grad_()
    g = torch.randn(6, device=device)
    (ck.within_class_variance(h, y, means, w, check=False, backend=backend) * g).sum().backward()
    h2, m2, w2 = (t.detach().double().requires_grad_() for t in (h, means, w))
    (ref.within_class_variance(h2, y, m2, w2) * g.double()).sum().backward()
    for a, b in ((h.grad, h2.grad), (means.grad, m2.grad), (w.grad, w2.grad)):
        assert_close(a, b, torch.float32, scale=20)


def test_variance_opcheck_and_compile():
    h, y, means, w = problem(23, 6, 5, torch.float64, "cpu", 6, weighted=True)
    torch.library.opcheck(wc_mod._variance_cpp, (h.requires_grad_(), y[:, None], w[:, None], means.double()))
    torch._dynamo.reset()
    f = lambda h_, y_, m_: ck.within_class_variance(h_, y_, m_, check=False).sum()
    hh = h.detach().float()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(hh, y, means), f(hh, y, means))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_variance_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    h, y, means, w = problem(23, 6, 5, torch.float64, device, 7, weighted=True)
    opcheck(wc_mod._variance_triton, (h.requires_grad_(), y[:, None], w[:, None], means.double()))


def test_variance_bad_input():
    h = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    m = torch.zeros(3, 3)
    cases = [
        (lambda: ck.within_class_variance(h, torch.tensor([0, 1, 3, 1, 0, 2]), m), ValueError,
         r"labels\[2\] = 3 is outside \[0, num_classes=3\)"),
        (lambda: ck.within_class_variance(h, y, torch.zeros(3, 4)), ValueError, "means has D=4 columns but features has D=3"),
        (lambda: ck.within_class_variance(h, y, torch.zeros(3)), ValueError, "means must be 2-D"),
        (lambda: ck.within_class_variance(h, y, m.long()), TypeError, "means must be float16"),
        (lambda: ck.within_class_variance(h, y.float(), m), TypeError, "labels must be int32 or int64"),
        (lambda: ck.within_class_variance(h, y[:4], m), ValueError, "labels has 4 rows but features has 6"),
        (lambda: ck.within_class_variance(h, y, m, torch.ones(5)), ValueError, "weights must have shape"),
        (lambda: ck.within_class_variance(h.int(), y, m), TypeError, "features must be float16"),
        (lambda: ck.within_class_variance(h, y, m.to("meta")), ValueError, "means is on meta"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


# ------------------------------------------------------------------------------------------------
# within_class_covariance
# ------------------------------------------------------------------------------------------------

COV_PATHS = [(b, dev, p) for b, dev in backend_devices() for p in (("tiles", "fused") if b == "triton" else ("tiles",))]


@pytest.mark.parametrize("backend,device,path", COV_PATHS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_covariance_hard(backend, device, path, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("interpreter: no bf16")
    n, d, c = sizes(backend, device)
    h, y, means, _ = problem(n, d, c, dtype, device, 11)
    cov = ck.within_class_covariance(h, y, means, backend=backend, path=path)
    assert cov.shape == (d, d) and torch.equal(cov, cov.t())
    # fused fp16 products round the centred values to fp16 (as a fp16 torch.mm would)
    tol = dtype if (path == "fused" and dtype == torch.float16) else (torch.float32 if dtype != torch.float64 else dtype)
    assert_close(cov, ref.within_class_covariance(h, y, means), tol, scale=100)


@pytest.mark.parametrize("backend,device,path", COV_PATHS)
@pytest.mark.parametrize("k,weighted", [(0, True), (2, False), (3, True)])
def test_covariance_soft_weighted_strided(backend, device, path, k, weighted, monkeypatch):
    monkeypatch.setattr(wc_mod, "_COV_TILE_ELEMENTS", 37 * 10)  # several tiles, a ragged last one
    n, d, c = sizes(backend, device)
    h, y, means, w = problem(n, d, c, torch.float64, device, 12, k=k, weighted=weighted)
    h = torch.cat([h, h], 1)[:, 1::2]  # column stride 2
    cov = ck.within_class_covariance(h, y, means.double(), w, backend=backend, path=path)
    assert_close(cov, ref.within_class_covariance(h, y, means, w), torch.float64, scale=100)


@pytest.mark.parametrize("backend,device,path", COV_PATHS)
def test_covariance_empty_and_out_of_range(backend, device, path):
    n, d, c = sizes(backend, device)
    h, y, means, _ = problem(n, d, c, torch.float32, device, 13)
    assert ck.within_class_covariance(h[:0], y[:0], means, backend=backend, path=path).abs().max() == 0
    assert ck.within_class_covariance(h[:, :0], y, means[:, :0], backend=backend, path=path).shape == (0, 0)
    bad = y.clone()
    bad[::3] = -4
    cov = ck.within_class_covariance(h, bad, means, check=False, backend=backend, path=path)
    assert_close(cov, ref.within_class_covariance(h, bad, means), torch.float32, scale=100)


@pytest.mark.parametrize("backend", [b for b, dev in backend_devices() if dev == "cpu"])
def test_covariance_gradcheck(backend):
    h, y, means, w = problem(9, 4, 3, torch.float64, "cpu", 14, k=2, weighted=True)
    h.requires_grad_(); w.requires_grad_()
    means = means.double().requires_grad_()
    f = lambda h_, m_, w_: ck.within_class_covariance(h_, y, m_, w_, backend=backend)
    assert gradcheck(f, (h, means, w), backend)


def test_covariance_opcheck_and_bad_input():
    h, y, means, w = problem(23, 6, 5, torch.float64, "cpu", 15, weighted=True)
    torch.library.opcheck(wc_mod._covariance_cpp, (h.requires_grad_(), y[:, None], w[:, None], means.double(), "tiles"))
    with pytest.raises(ValueError, match="path for the cpp backend must be one of"):
        ck.within_class_covariance(h, y, means, backend="cpp", path="fused")
    with pytest.raises(ValueError, match="means has D=7 columns but features has D=6"):
        ck.within_class_covariance(h, y, torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"labels\[0\] = 9 is outside"):
        ck.within_class_covariance(h, torch.full((23,), 9), means)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_fused_covariance_row_splits():
    """The fused kernel splits the rows over programs and adds the splits with atomics."""
    from collapsekit.kernels import within_class

    device = "cuda" if HAS_CUDA else "cpu"
    h, y, means, w = problem(101, 37, 5, torch.float32, device, 16, weighted=True)
    for splits in (1, 3, 7):
        cov = within_class.within_class_covariance(h, y[:, None], w[:, None], means, splits=splits)
        assert_close(cov, ref.within_class_covariance(h, y, means, w), torch.float32, scale=100)
