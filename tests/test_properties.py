"""Property-based tests (hypothesis): random shapes, dtypes, strides and label distributions for
the C++ kernels; the result equals the fp64 reference or the call raises a clear error."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collapsekit as ck
from collapsekit import reference as ref

from conftest import assert_close

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def class_sum_problems(draw):
    n = draw(st.integers(0, 60))
    d = draw(st.integers(0, 33))
    kind = draw(st.sampled_from(["uniform", "one-class", "huge-C", "few-classes"]))
    c = {"uniform": draw(st.integers(1, 20)), "one-class": draw(st.integers(1, 5)),
         "huge-C": draw(st.integers(1000, 200_000)), "few-classes": draw(st.integers(2, 4))}[kind]
    k = draw(st.sampled_from([0, 1, 2, 3]))  # 0: hard labels [N]
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k == 0 else (n, k)
    if kind == "one-class":
        labels = torch.full(shape, c - 1, dtype=torch.long)
    else:
        labels = torch.randint(0, c, shape, generator=g)
    if draw(st.booleans()):
        labels = labels.int()
    dtype = draw(st.sampled_from(FLOATS))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        feats = torch.randn(d, n, generator=g).to(dtype).t()
    elif layout == "strided":
        feats = torch.randn(n, 2 * d + 1, generator=g).to(dtype)[:, 1::2]
    else:
        feats = torch.randn(n, d, generator=g).to(dtype)
    weights = None
    if draw(st.booleans()):
        wshape = (n,) if (k == 0 or draw(st.booleans())) else (n, k)
        weights = torch.rand(wshape, generator=g, dtype=torch.float64).to(draw(st.sampled_from(FLOATS)))
    return feats, labels, c, weights, dtype


@settings(max_examples=150, deadline=None)
@given(problem=class_sum_problems(), path=st.sampled_from(["auto", "sorted", "direct", "rows"]),
       threads=st.sampled_from([1, 2, 3]))
def test_class_sums_cpp_matches_reference(problem, path, threads):
    feats, labels, c, weights, dtype = problem
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sums, counts = ck.class_sums(feats, labels, c, weights, backend="cpp", path=path)
        means, _ = ck.class_means(feats, labels, c, weights, backend="cpp", path=path)
    finally:
        torch.set_num_threads(old)
    rs, rc = ref.class_sums(feats, labels, c, weights)
    assert sums.shape == (c, feats.shape[1]) and counts.shape == (c,)
    # weights given in fp16/bf16 are rounded before use; compare at the coarser of the two dtypes
    wdt = weights.dtype if weights is not None else torch.float64
    tol_dtype = dtype if torch.finfo(dtype).eps >= torch.finfo(wdt).eps else wdt
    assert_close(sums, rs, tol_dtype, scale=10)
    assert_close(counts, rc, tol_dtype, scale=10)
    assert torch.isfinite(means).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), c=st.integers(1, 10), bad=st.sampled_from([-5, -1, 0, 1, 7]))
def test_out_of_range_labels_rejected_or_ignored(n, c, bad):
    labels = torch.randint(0, c, (n,))
    pos = n // 2
    labels[pos] = c + bad if bad >= 0 else bad
    feats = torch.randn(n, 3)
    with pytest.raises(ValueError, match=rf"labels\[{pos}\] = {int(labels[pos])} is outside"):
        ck.class_sums(feats, labels, c)
    for path in ("sorted", "direct", "rows"):  # check=False: the bad entry is skipped, nothing else changes
        sums, counts = ck.class_sums(feats, labels, c, check=False, backend="cpp", path=path)
        rs, rc = ref.class_sums(feats, labels, c)
        assert_close(sums, rs, torch.float32)
        assert_close(counts, rc, torch.float32)


# ------------------------------------------------------------------ the other op families ------

def _features(draw, g, n, d, dtype):
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":
        return torch.randn(d, n, generator=g).to(dtype).t()
    if layout == "strided":
        return torch.randn(n, 2 * d + 1, generator=g).to(dtype)[:, 1::2]
    return torch.randn(n, d, generator=g).to(dtype)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 50), d=st.integers(0, 17), c=st.sampled_from([1, 2, 7, 5000]),
       one_class=st.booleans(), dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1))
def test_within_class_cpp_matches_reference(n, d, c, one_class, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g).to(dtype)
    labels = torch.full((n,), c - 1) if one_class else torch.randint(0, c, (n,), generator=g)
    means = torch.randn(c, d, generator=g)
    v = ck.within_class_variance(feats, labels, means, backend="cpp")
    s = ck.within_class_covariance(feats, labels, means, backend="cpp")
    assert_close(v, ref.within_class_variance(feats, labels, means), torch.float32, scale=50)
    assert_close(s, ref.within_class_covariance(feats, labels, means), torch.float32, scale=50)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), d=st.integers(1, 17), c=st.sampled_from([1, 3, 11, 3000]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_nearest_class_center_and_decisions_match_reference(data, n, d, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    feats = _features(data.draw, g, n, d, dtype)
    means = torch.randn(c, d, generator=g).to(dtype)
    got = ck.nearest_class_center(feats, means, backend="cpp")
    want = ck.nearest_class_center(feats, means, backend="reference")
    # random data has no near-ties at these sizes; where the fp64 scores tie, either is correct
    d2 = torch.cdist(feats.double(), means.double()).pow(2) if n else torch.zeros(0, c)
    assert got.shape == (n,)
    if n:
        picked = d2.gather(1, got[:, None])[:, 0]
        assert torch.allclose(picked, d2.min(1).values, rtol=1e-5, atol=1e-5)
        assert bool((want == d2.argmin(1)).all())
    from collapsekit.ops.nearest_center import classifier_decisions

    b = torch.randn(c, generator=g).to(dtype)
    dec = classifier_decisions(feats, means, b, backend="cpp")
    if n:
        logits = feats.double() @ means.double().t() + b.double()
        assert torch.allclose(logits.gather(1, dec[:, None])[:, 0], logits.max(1).values, rtol=1e-5, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), d=st.integers(0, 19), c=st.integers(0, 13),
       dtype=st.sampled_from(FLOATS), scale=st.floats(0.1, 30), seed=st.integers(0, 2**31 - 1))
def test_etf_logits_cpp_matches_reference(data, n, d, c, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    feats = _features(data.draw, g, n, d, dtype)
    if n and data.draw(st.booleans()):
        feats = feats.clone()
        feats[0] = 0  # a zero row (the eps clamp)
    etf = torch.randn(c, d, generator=g)
    out = ck.etf_logits(feats, etf, scale, backend="cpp")
    assert out.shape == (n, c) and out.dtype == dtype
    assert_close(out, ref.etf_logits(feats, etf.to(dtype).float() if dtype != torch.float64 else etf, scale), dtype,
                 scale=scale * max(1.0, float(etf.norm(dim=1).max()) if c else 1.0))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(0, 2), l=st.integers(0, 40), h=st.sampled_from([1, 2, 4]), p=st.integers(1, 9),
       n=st.integers(1, 12), gsel=st.sampled_from([1, "h"]), chunk=st.sampled_from([1, 3, 16, 64]),
       opts=st.fixed_dictionaries({"D": st.booleans(), "z": st.booleans(), "bias": st.booleans(),
                                   "init": st.booleans(), "softplus": st.booleans(),
                                   "tau": st.sampled_from([None, 0.5, 5.0]), "lam": st.sampled_from([1.0, 0.9])}),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_ssd_scan_cpp_matches_reference(b, l, h, p, n, gsel, chunk, opts, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = h if gsel == "h" else 1
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    x, B, C = r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
    dt, A = torch.rand(b, l, h, generator=gen).to(dtype) * 0.5, -torch.rand(h, generator=gen).to(dtype)
    kw = dict(chunk_size=chunk, D=r(h, p) if opts["D"] else None, z=r(b, l, h, p) if opts["z"] else None,
              dt_bias=r(h) if opts["bias"] else None, initial_states=r(b, h, p, n) if opts["init"] else None,
              dt_softplus=opts["softplus"], state_norm_max=opts["tau"], decay_scale=opts["lam"],
              return_final_states=True, return_state_norms=True)
    got = ck.ssd_scan(x, dt, A, B, C, backend="cpp", **kw)
    want = ref.ssd_scan(x, dt, A, B, C, **kw)
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert_close(a, w, dtype, scale=max(1.0, float(w.abs().max()) if w.numel() else 1.0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 9), c=st.sampled_from([1, 2, 5, 40, 100_000]),
       one_class=st.booleans(), classifier=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_collapse_metrics_match_the_literal_formulas(n, d, c, one_class, classifier, seed):
    """Huge C with few samples (most classes absent), all-one-class and C = 1 included: the tiled
    metrics equal docs/design.md's formulas written out with full grids, key for key."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.full((n,), c - 1) if one_class else torch.randint(0, c, (n,), generator=g)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) if classifier else None
    got = ck.collapse_metrics(feats, labels, c, weight=w)
    want = ref.collapse_metrics(feats, labels, c, weight=w)
    keys = set(got) - {"per_class", "num_present"}
    assert keys == set(want), (keys, set(want))
    for k in keys:
        a, b_ = got[k], want[k]
        if b_ != b_:  # NaN (e.g. coincident means): both must say so
            assert a != a
        else:
            assert abs(a - b_) <= 1e-6 * max(1.0, abs(b_)), (k, a, b_)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), dim=st.sampled_from([1, 3, 8, 12]), L=st.integers(1, 40), N=st.integers(1, 20),
       form=st.sampled_from(["const", "var", "group"]), opts=st.fixed_dictionaries(
           {"D": st.booleans(), "z": st.booleans(), "bias": st.booleans(), "init": st.booleans(),
            "softplus": st.booleans()}),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_selective_scan_cpp_matches_reference(batch, dim, L, N, form, opts, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    u, delta = r(batch, dim, L).to(dtype), (torch.rand(batch, dim, L, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    A = -torch.rand(dim, N, generator=gen, dtype=torch.float64).float() - 0.1
    groups = [g for g in (1, 2, 3, 4) if dim % g == 0]
    if form == "const":
        B, C = r(dim, N).float(), r(dim, N).float()
    elif form == "var":
        B, C = r(batch, N, L).to(dtype), r(batch, N, L).to(dtype)
    else:
        g = groups[seed % len(groups)]
        B, C = r(batch, g, N, L).to(dtype), r(batch, g, N, L).to(dtype)
    kw = dict(D=r(dim).float() if opts["D"] else None, z=r(batch, dim, L).to(dtype) if opts["z"] else None,
              # Δ = delta + bias stays >= 0 without softplus (a negative Δ makes exp(ΔA) grow: overflow)
              delta_bias=r(dim).abs().float() * 0.3 if opts["bias"] else None, delta_softplus=opts["softplus"],
              return_last_state=True, initial_state=r(batch, dim, N).float() if opts["init"] else None,
              return_state_norms=True)
    got = ck.selective_scan(u, delta, A, B, C, backend="cpp", **kw)
    want = ref.selective_scan(u, delta, A, B, C, **kw)
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert_close(a, w, torch.float32, scale=max(1.0, float(w.abs().max())))
