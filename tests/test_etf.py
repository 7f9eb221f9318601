"""Simplex ETF toolkit: simplex_etf, nearest_etf, etf_error, etf_logits (every backend vs the fp64
reference, gradients), ETFClassifier (dense and sparse), dot_regression_loss."""
import math

import pytest
import torch
import torch.nn.functional as F

import collapsekit as ck
from collapsekit import reference as ref
from collapsekit.nn import ETFClassifier, dot_regression_loss, sparse_simplex_etf
from collapsekit.nn import _sparsity_mask
from collapsekit.ops import etf_logits as el_mod

from conftest import HAS_CUDA, HAS_TRITON, assert_close, backend_devices, gradcheck, opcheck


# ------------------------------------------------------------------------------ simplex_etf ----

@pytest.mark.parametrize("c,d", [(2, 1), (10, 16), (17, 16), (100, 512)])
def test_simplex_etf_properties(c, d):
    e = ck.simplex_etf(c, d, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
    assert e.shape == (c, d) and e.dtype == torch.float64
    g = e @ e.t()
    torch.testing.assert_close(g.diagonal(), torch.ones(c, dtype=torch.float64), rtol=0, atol=1e-12)
    off = g[~torch.eye(c, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / (c - 1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(e.sum(0), torch.zeros(d, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ck.etf_error(e) < 1e-6


def test_simplex_etf_generator_dtype_device_and_randomness():
    a = ck.simplex_etf(10, 16, generator=torch.Generator().manual_seed(3))
    b = ck.simplex_etf(10, 16, generator=torch.Generator().manual_seed(3))
    c = ck.simplex_etf(10, 16, generator=torch.Generator().manual_seed(4))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.allclose(a, c)
    assert ck.simplex_etf(3, 2, dtype=torch.float16).dtype == torch.float16


def test_simplex_etf_frame_is_haar():
    # Haar frame: the first coordinate of a fixed unit row averages 0 over draws, its square 1/D
    d = 5
    x = torch.stack([ck.simplex_etf(3, d, generator=torch.Generator().manual_seed(s), dtype=torch.float64)[0, 0]
                     for s in range(2000)])
    assert abs(float(x.mean())) < 0.05 and abs(float(x.pow(2).mean()) - 1 / d) < 0.03


@pytest.mark.parametrize("c,d,msg", [(1, 4, "at least 2 classes"), (0, 4, "at least 2 classes"),
                                     (18, 16, "dim >= num_classes - 1 = 17"), (3, 1, "dim >= num_classes - 1 = 2")])
def test_simplex_etf_limits(c, d, msg):
    with pytest.raises(ValueError, match=msg):
        ck.simplex_etf(c, d)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        ck.simplex_etf(3.0, 4)


# ------------------------------------------------------------------------------ nearest_etf ----

def _frobenius(a, b):
    return float(torch.linalg.norm(a.double() - b.double()))


def test_nearest_etf_is_a_scaled_etf_and_beats_random_etfs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 9, generator=g, dtype=torch.float64)
    n = ck.nearest_etf(w)
    s = float(n.norm(dim=1).mean())
    assert s > 0 and ck.etf_error(n) < 1e-6
    torch.testing.assert_close(n.norm(dim=1), torch.full((7,), s, dtype=torch.float64), rtol=1e-10, atol=0)
    best = _frobenius(w, n)
    for k in range(300):  # no random scaled ETF (each at its optimal scale) is closer
        e = ck.simplex_etf(7, 9, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
        a = max(float((w * e).sum()) / float((e * e).sum()), 0.0)
        assert _frobenius(w, a * e) >= best - 1e-9
    # nor is any small rotation of the answer, within the ETF's own subspace or out of it
    for k in range(50):
        skew = 1e-3 * torch.randn(9, 9, generator=g, dtype=torch.float64)
        rot = torch.linalg.matrix_exp(skew - skew.t())
        for scale in (0.999, 1.0, 1.001):
            assert _frobenius(w, scale * n @ rot) >= best - 1e-12


def test_nearest_etf_recovers_a_rotated_scaled_translated_noisy_etf():
    g = torch.Generator().manual_seed(1)
    e = ck.simplex_etf(12, 20, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    target = 3.7 * e @ q
    noise = 1e-3 * torch.randn(12, 20, generator=g, dtype=torch.float64)
    w = target + torch.randn(1, 20, generator=g, dtype=torch.float64) * 5 + noise
    n = ck.nearest_etf(w)
    # the answer is off by (part of) the noise, nothing more: ‖noise‖ ≈ 0.015 vs ‖target‖ ≈ 12.8
    assert _frobenius(n, target) < float(noise.norm())
    assert ck.etf_error(n) < 1e-6 < ck.etf_error(w)


def test_nearest_etf_translation_invariance_dtype_and_degenerate():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    shifted = w + torch.randn(1, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ck.nearest_etf(shifted), ck.nearest_etf(w), rtol=0, atol=1e-12)
    n32 = ck.nearest_etf(w.float())
    assert n32.dtype == torch.float32
    torch.testing.assert_close(n32.double(), ck.nearest_etf(w), rtol=1e-6, atol=1e-6)
    # all rows equal: no spread around the mean, the nearest scaled ETF is s = 0
    assert torch.equal(ck.nearest_etf(torch.ones(4, 5)), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="dim >= num_classes - 1"):
        ck.nearest_etf(torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 classes"):
        ck.nearest_etf(torch.randn(1, 5))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ck.nearest_etf(torch.randn(5))


# -------------------------------------------------------------------------------- etf_error ----

def _etf_error_literal(w):
    w = w.double() - w.double().mean(0)
    c = w.shape[0]
    g = w @ w.t()
    j = torch.eye(c, dtype=torch.float64) - 1.0 / c
    return float(torch.linalg.norm(g / torch.linalg.norm(g) - j / math.sqrt(c - 1)))


@pytest.mark.parametrize("c,d", [(5, 3), (9, 40), (64, 16)])
def test_etf_error_matches_the_literal_formula(c, d):
    w = torch.randn(c, d, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
    assert abs(ck.etf_error(w) - _etf_error_literal(w)) < 1e-9
    assert abs(ck.etf_error(2.5 * w + 1.0) - ck.etf_error(w)) < 1e-9
    assert 0 < ck.etf_error(w) <= 2


# ------------------------------------------------------------------------------- etf_logits ----

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _sizes(backend, device):
    return (37, 21, 13) if (backend == "triton" and device == "cpu") else (611, 37, 23)


def _problem(n, d, c, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    e = torch.randn(c, d, generator=g, dtype=torch.float64)
    return h.to(dtype).to(device), e.to(device)


def _grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_etf_logits_forward_backward(backend, device, dtype, monkeypatch):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("interpreter: no bf16")
    monkeypatch.setattr(el_mod, "ROW_TILE", 50)  # several C++ row tiles and a ragged last one
    n, d, c = _sizes(backend, device)
    h, e = _problem(n, d, c, dtype, device, 0)
    e_in = (e if dtype == torch.float64 else e.float()).requires_grad_()
    hh = h.clone().requires_grad_()
    out = ck.etf_logits(hh, e_in, 2.5, backend=backend)
    assert out.shape == (n, c) and out.dtype == dtype
    hr, er = h.double().cpu().requires_grad_(), e_in.detach().double().cpu().requires_grad_()
    want = ref.etf_logits(hr, er, 2.5)
    assert_close(out, want, dtype, scale=2.5)
    gout = torch.randn(n, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gh, ge = _grads(out, (hh, e_in), gout.to(dtype).to(device))
    wh, we = _grads(want, (hr, er), gout.to(dtype).double())
    assert gh.dtype == dtype and ge.dtype == e_in.dtype
    # errors relative to each gradient's scale; grad_h is rounded to the features' dtype, grad_etf
    # (an fp32 or fp64 result) only carries the half-precision rounding of its inputs
    assert_close(gh, wh, dtype, scale=float(wh.abs().max()))
    assert_close(ge, we, dtype, scale=float(we.abs().max()))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_etf_logits_strides_leading_dims_zero_rows_empty(backend, device):
    n, d, c = _sizes(backend, device)
    h, e = _problem(n, d, c, torch.float64, device, 2)
    h[5] = 0  # a zero row: F.normalize's clamp (output 0, gradient g / eps)
    hs = torch.cat([h, h], 1)[:, ::2]  # column stride 2
    ht = h.t().contiguous().t()  # column-major
    et = e.t().contiguous().t()
    for x, w in ((hs, e), (ht, et)):
        out = ck.etf_logits(x, w, 0.7, backend=backend)
        assert_close(out, ref.etf_logits(x, w, 0.7), torch.float64)
        assert_close(out, F.normalize(x.cpu(), dim=-1) @ w.cpu().t() * 0.7, torch.float64)
    x3 = h[:30].reshape(2, 15, d)
    assert_close(ck.etf_logits(x3, e, backend=backend), ref.etf_logits(x3.reshape(30, d), e).reshape(2, 15, c),
                 torch.float64)
    # the zero row's gradient, in fp64 (relative: it is ~1/eps)
    hh = h[:8].clone().requires_grad_()
    gout = torch.randn(8, c, dtype=torch.float64, device=device)
    (g1,) = torch.autograd.grad(ck.etf_logits(hh, e, 1.5, backend=backend), hh, gout)
    hr = h[:8].cpu().clone().requires_grad_()
    (g2,) = torch.autograd.grad(ref.etf_logits(hr, e.cpu(), 1.5), hr, gout.cpu())
    torch.testing.assert_close(g1.cpu(), g2, rtol=1e-9, atol=1e-9 * float(g2.abs().max()))
    assert float(g2[5].abs().max()) > 1e9
    # empty: no rows, no classes, no columns
    assert ck.etf_logits(h[:0], e, backend=backend).shape == (0, c)
    assert ck.etf_logits(h, e[:0], backend=backend).shape == (n, 0)
    z = ck.etf_logits(h[:, :0], e[:, :0], backend=backend)
    assert z.shape == (n, c) and not z.any()
    hz = h[:0].clone().requires_grad_()
    ck.etf_logits(hz, e, backend=backend).sum().backward()
    assert hz.grad.shape == (0, d)


def test_etf_logits_gradcheck():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ck.etf_logits(a, b, 1.3, backend="cpp"), (h, e))
    if HAS_TRITON and not HAS_CUDA:
        assert gradcheck(lambda a, b: ck.etf_logits(a, b, 1.3, backend="triton"), (h, e), "triton")


def test_etf_logits_opcheck_and_compile():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(el_mod._etf_logits_cpp, (h, e, 1.5, 1e-12))
    torch._dynamo.reset()
    f = lambda a, b: ck.etf_logits(a, b, 2.0).pow(2).sum()
    hf, ef = h.detach().float(), e.detach().float()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(hf, ef), f(hf, ef))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_etf_logits_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(5)
    h = torch.randn(11, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    e = torch.randn(5, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    opcheck(el_mod._etf_logits_triton, (h, e, 1.5, 1e-12))


def test_etf_logits_bad_input():
    h, e = torch.randn(4, 3), torch.randn(5, 3)
    cases = [
        (lambda: ck.etf_logits(h, torch.randn(5, 4)), ValueError, "D = etf.shape"),
        (lambda: ck.etf_logits(h, e[0]), ValueError, "etf must be 2-D"),
        (lambda: ck.etf_logits(h.long(), e), TypeError, "features must be float"),
        (lambda: ck.etf_logits(h, e, "2"), TypeError, "scale must be"),
        (lambda: ck.etf_logits(h, e, eps=0.0), ValueError, "eps must be > 0"),
        (lambda: ck.etf_logits(h, e, backend="gpu"), ValueError, "backend must be one of"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


# ------------------------------------------------------------------- ETFClassifier / losses ----

def test_etf_classifier_is_a_fixed_buffer():
    head = ETFClassifier(16, 10, scale=4.0, generator=torch.Generator().manual_seed(0))
    assert list(head.parameters()) == [] and "etf" in head.state_dict()
    assert ck.etf_error(head.etf) < 1e-5
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(head(x), 4.0 * F.normalize(x, dim=-1) @ head.etf.t(), rtol=1e-5, atol=1e-5)
    other = ETFClassifier(16, 10)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.etf, head.etf)
    with pytest.raises(ValueError, match="dim >= num_classes - 1"):
        ETFClassifier(4, 10)


def _mixture(n, d, c, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("loss_name", ["cross_entropy", "dot_regression"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_etf_head_trains_a_small_model(loss_name, sparsity):
    torch.manual_seed(0)
    x, y = _mixture(512, 12, 6, 1)
    body = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    head = ETFClassifier(16, 6, sparsity=sparsity, scale=8.0, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(body.parameters(), lr=1e-2)

    def loss_fn():
        h = body(x)
        if loss_name == "cross_entropy":
            return F.cross_entropy(head(h), y)
        return dot_regression_loss(h, y, head.etf)

    first = float(loss_fn().detach())
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = float(loss_fn().detach())
    assert last < 0.5 * first
    accuracy = float((head(body(x)).argmax(1) == y).float().mean())
    assert accuracy > 0.9


@pytest.mark.parametrize("c,d,s", [(30, 64, 0.5), pytest.param(100, 512, 0.5, marks=pytest.mark.slow)])
def test_sparse_etf_exact_zeros_unit_rows_deterministic_and_better_than_masking(c, d, s):
    a = sparse_simplex_etf(c, d, s, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    b = sparse_simplex_etf(c, d, s, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(a, b)
    assert int((a == 0).sum()) == round(s * c * d)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(c, dtype=torch.float64), rtol=0, atol=1e-12)
    # the same mask on the same ETF, only renormalised: the optimisation must beat it
    g = torch.Generator().manual_seed(7)
    e = ck.simplex_etf(c, d, generator=g, dtype=torch.float64)
    m = _sparsity_mask(c, d, s, g)
    assert torch.equal(m, a != 0)
    masked = e * m
    masked = masked / masked.norm(dim=1, keepdim=True)
    off = ~torch.eye(c, dtype=torch.bool)
    before, after = float((masked @ masked.t())[off].max()), float((a @ a.t())[off].max())
    assert after < before - 0.05 and after < 0.0  # back near the ETF's −1/(C−1) = −0.0101


def test_sparse_etf_mask_counts_and_errors():
    m = _sparsity_mask(7, 10, 0.35, torch.Generator().manual_seed(0))
    zeros = (~m).sum(1)
    assert int(zeros.sum()) == round(0.35 * 70) and int(zeros.max() - zeros.min()) <= 1
    with pytest.raises(ValueError, match="sparsity must be in"):
        sparse_simplex_etf(5, 8, 1.0)
    with pytest.raises(ValueError, match="all zero"):
        sparse_simplex_etf(5, 8, 0.9)
    head = ETFClassifier(8, 5, sparsity=0.25, generator=torch.Generator().manual_seed(1))
    assert int((head.etf == 0).sum()) == 10


def test_dot_regression_loss_formula_chunks_and_errors(monkeypatch):
    g = torch.Generator().manual_seed(8)
    e = 2.0 * ck.simplex_etf(5, 7, generator=g, dtype=torch.float64)
    h = torch.randn(23, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (23,), generator=g)
    cos_scaled = (F.normalize(h, dim=1) * e[y]).sum(1)
    want = (cos_scaled - 2.0).pow(2) / 4.0
    torch.testing.assert_close(dot_regression_loss(h, y, e, reduction="none"), want)
    monkeypatch.setattr("collapsekit.nn._LOSS_CHUNK", 4)
    torch.testing.assert_close(dot_regression_loss(h, y, e), want.mean())
    torch.testing.assert_close(dot_regression_loss(h, y.int(), e, reduction="sum"), want.sum())
    # at collapse (features along their class's ETF row) the loss is zero
    assert float(dot_regression_loss(3.0 * e[y], y, e)) < 1e-20
    with pytest.raises(ValueError, match=r"targets\[1\] = 5 is outside"):
        dot_regression_loss(h[:3], torch.tensor([0, 5, 1]), e)
    with pytest.raises(ValueError, match="targets must be int32/int64"):
        dot_regression_loss(h, y.float(), e)
    with pytest.raises(ValueError, match="reduction must be"):
        dot_regression_loss(h, y, e, reduction="avg")
