"""CollapseAccumulator one-pass mode (update), merge, means fingerprints and count filters."""
import math

import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref

KEYS = ["nc1", "nc1_quotient", "cdnv", "nc2_equinorm", "nc2_equiangle", "nc2_coherence", "gnc2", "etf_error",
        "nc3", "nc3_cos", "unc3"]


def data(n=611, d=13, c=17, seed=0, soft=False, dtype=torch.float32, spread=1.0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    centers = scale * torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c - 2, (n,), generator=g)          # classes c-2, c-1 absent
    h = centers[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    if soft:
        y = torch.stack([y, torch.randint(0, c - 2, (n,), generator=g)], 1)
        w = torch.rand(n, 2, generator=g, dtype=torch.float64)
        w[::7, 1] = 0                                       # zero-weight entries carry no class
        return h.to(dtype), y, w, centers
    return h.to(dtype), y, None, centers


def feed(acc, h, y, w, batch, one_pass=True):
    chunks = [(h[i:i + batch], y[i:i + batch], None if w is None else w[i:i + batch])
              for i in range(0, h.shape[0], batch)]
    if one_pass:
        for hb, yb, wb in chunks:
            acc.update(hb, yb, wb)
    else:
        for hb, yb, wb in chunks:
            acc.update_means(hb, yb, wb)
        for hb, yb, wb in chunks:
            acc.update_variance(hb, yb, wb)
    return acc


def close(a, b, rtol, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 37, 1000])
def test_one_pass_equals_two_passes(soft, dtype, batch):
    if batch == 1 and dtype == torch.float32:
        pytest.skip("covered in fp64 (a batch of one row: every batch mean is the row)")
    h, y, w, _ = data(n=611 if batch > 1 else 60, soft=soft, dtype=dtype)
    one = feed(ck.CollapseAccumulator(17, 13), h, y, w, batch)
    two = feed(ck.CollapseAccumulator(17, 13), h, y, w, 97, one_pass=False)
    means, counts = ref.class_means(h, y, 17, w)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    close(one.counts, counts, tol)
    close(one.means, means, tol, tol)
    close(one.variance_sums, ref.within_class_variance(h, y, means, w), tol * 10, tol)
    close(one.covariance_sum, ref.within_class_covariance(h, y, means, w), tol * 10, tol * 100)
    close(one.variance_sums, two.variance_sums, tol * 10, tol)
    assert one.mode == "one_pass" and two.mode == "two_pass" and one.batches["update"] == math.ceil(h.shape[0] / batch)
    assert (one.means[15:] == 0).all() and (one.variance_sums[15:] == 0).all()
    m1, m2 = one.metrics(), two.metrics()
    for key in KEYS[:8]:
        assert m1[key] == pytest.approx(m2[key], rel=1e-9 if dtype == torch.float64 else 1e-4), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearly_collapsed(dtype):
    """Within-class spread 1e-4 of the mean norm: Σhhᵀ − nμμᵀ loses every digit; the merges keep them."""
    g = torch.Generator().manual_seed(1)
    c, d, n = 9, 11, 900
    centers = 100 * torch.randn(c, d, generator=g, dtype=torch.float64) + 1000   # norm ~ 3e3
    y = torch.randint(0, c, (n,), generator=g)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    h = (centers[y] + 1e-4 * centers[y].norm(dim=1, keepdim=True) / math.sqrt(d) * noise).to(dtype)
    one = feed(ck.CollapseAccumulator(c, d), h, y, None, 64)
    two = feed(ck.CollapseAccumulator(c, d), h, y, None, 64, one_pass=False)
    means, _ = ref.class_means(h, y, c)
    v_true = ref.within_class_variance(h, y, means)
    cov_true = ref.within_class_covariance(h, y, means)
    rel = (lambda a: float((a - v_true).abs().max() / v_true.abs().max()))
    relc = (lambda a: float((a - cov_true).abs().max() / cov_true.abs().max()))
    # the naive one-pass formula in the same precision, for contrast
    hh = h.double() if dtype == torch.float64 else h
    naive = torch.zeros(c, dtype=hh.dtype).index_add_(0, y, hh.pow(2).sum(1)) - \
        torch.zeros(c, dtype=hh.dtype).index_add_(0, y, torch.ones(n, dtype=hh.dtype)) * means.to(hh.dtype).pow(2).sum(1)
    # fp32 keeps ~4-5 digits here (the per-batch means carry fp32 sum rounding; measured 4e-5),
    # fp64 ~13 (measured 1e-13); the naive formula keeps none in fp32 and 8 in fp64
    assert rel(naive.double()) > (1e-8 if dtype == torch.float64 else 0.5)
    bound = 1e-11 if dtype == torch.float64 else 1e-3
    assert rel(one.variance_sums) < bound and relc(one.covariance_sum) < bound
    assert rel(two.variance_sums) < bound and relc(two.covariance_sum) < bound
    assert float((one.variance_sums - two.variance_sums).abs().max() / two.variance_sums.max()) < bound


def test_soft_labels_weights_and_zero_rows():
    h, y, w, _ = data(soft=True, dtype=torch.float64)
    acc = ck.CollapseAccumulator(17, 13)
    acc.update(h[:0], y[:0], w[:0])                      # empty batch: nothing, no error
    feed(acc, h, y, w, 50)
    ws = torch.rand(611, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    acc2 = feed(ck.CollapseAccumulator(17, 13), h, y, ws, 50)   # per-sample weights with soft labels
    for a, ww in ((acc, w), (acc2, ws)):
        means, counts = ref.class_means(h, y, 17, ww)
        close(a.counts, counts, 1e-12)
        close(a.variance_sums, ref.within_class_variance(h, y, means, ww), 1e-10, 1e-10)
        close(a.covariance_sum, ref.within_class_covariance(h, y, means, ww), 1e-10, 1e-10)


def test_mixing_modes_is_an_error():
    h, y, _, _ = data()
    a = ck.CollapseAccumulator(17, 13)
    a.update(h, y)
    with pytest.raises(RuntimeError, match="runs one pass"):
        a.update_means(h, y)
    with pytest.raises(RuntimeError, match="runs one pass"):
        a.update_variance(h, y)
    b = ck.CollapseAccumulator(17, 13)
    b.update_means(h, y)
    with pytest.raises(RuntimeError, match="runs two passes"):
        b.update(h, y)
    c = ck.CollapseAccumulator(17, 13)
    with pytest.raises(ValueError, match="outside"):
        c.update(h, torch.full_like(y, 17))
    assert c.mode is None and c.batches["update"] == 0     # a rejected batch sets nothing
    c.update_means(h, y)                                    # ... so the accumulator is still free


def test_merge_one_pass_shards_and_resume():
    h, y, w, _ = data(soft=True, dtype=torch.float64)
    whole = feed(ck.CollapseAccumulator(17, 13), h, y, w, 64)
    shards = [feed(ck.CollapseAccumulator(17, 13), h[i::3], y[i::3], w[i::3], 40) for i in range(3)]
    # through files: state_dict -> load -> merge
    loaded = []
    for s in shards:
        a = ck.CollapseAccumulator(17, 13)
        a.load_state_dict(s.state_dict())
        loaded.append(a)
    m = ck.CollapseAccumulator(17, 13)
    for a in loaded:
        m.merge(a)
    for key in ("counts", "means", "variance_sums", "covariance_sum"):
        close(getattr(m, key), getattr(whole, key), 1e-10, 1e-10)
    assert m.batches["update"] == sum(s.batches["update"] for s in shards)
    m.update(h[:5], y[:5], w[:5])                           # keeps going after merging
    with pytest.raises(ValueError, match="num_classes=18"):
        m.merge(ck.CollapseAccumulator(18, 13))
    with pytest.raises(ValueError, match="dim=12"):
        m.merge(ck.CollapseAccumulator(17, 12))
    with pytest.raises(TypeError, match="must be a CollapseAccumulator"):
        m.merge(m.state_dict())
    two = feed(ck.CollapseAccumulator(17, 13), h, y, w, 64, one_pass=False)
    with pytest.raises(ValueError, match="this accumulator is one-pass and other is two-pass"):
        m.merge(two)


def test_merge_two_pass_and_fingerprints():
    h, y, _, _ = data(dtype=torch.float64)
    halves = [(h[:300], y[:300]), (h[300:], y[300:])]
    p1 = []
    for hb, yb in halves:                                   # pass-1 jobs over two shards
        a = ck.CollapseAccumulator(17, 13)
        a.update_means(hb, yb)
        p1.append(a)
    means_state = ck.CollapseAccumulator(17, 13).merge(p1[0]).merge(p1[1]).state_dict()
    p2 = []
    for hb, yb in halves:                                   # pass-2 jobs, each from the merged means
        a = ck.CollapseAccumulator(17, 13)
        a.load_state_dict(means_state)
        a.update_variance(hb, yb)
        p2.append(a)
    assert p2[0].means_fingerprint == p2[1].means_fingerprint is not None
    m = ck.CollapseAccumulator(17, 13).merge(p2[0]).merge(p2[1])
    whole = feed(ck.CollapseAccumulator(17, 13), h, y, None, 300, one_pass=False)
    for key in ("counts", "means", "variance_sums", "covariance_sum"):
        close(getattr(m, key), getattr(whole, key), 1e-10, 1e-10)
    # a shard measured against other means is rejected, on merge and on load of a stitched state
    other = ck.CollapseAccumulator(17, 13)
    other.update_means(h[:300], y[:300])
    other.update_variance(h[300:], y[300:])
    with pytest.raises(ValueError, match="measured against different means"):
        m.merge(other)
    stitched = dict(p2[0].state_dict(), frozen_means=other.frozen_means)
    with pytest.raises(ValueError, match="do not match the recorded fingerprint"):
        ck.CollapseAccumulator(17, 13).load_state_dict(stitched)
    no_means = dict(p2[0].state_dict(), frozen_means=None, frozen_means_fingerprint=None)
    with pytest.raises(ValueError, match="pass-2 totals but no frozen_means"):
        ck.CollapseAccumulator(17, 13).load_state_dict(no_means)
    with pytest.raises(ValueError, match="still in pass 1"):
        p1[0].merge(p2[1])
    with pytest.raises(ValueError, match="cannot merge an accumulator into itself"):
        m.merge(m)


def test_min_max_count_against_reference_on_the_subset():
    h, y, _, centers = data(n=900, d=7, c=23, dtype=torch.float64)
    weight = centers + 0.3 * torch.randn(23, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    acc = feed(ck.CollapseAccumulator(23, 7), h, y, None, 128)
    counts = acc.counts
    lo, hi = float(counts[counts > 0].kthvalue(4).values), float(counts.max()) - 1
    keep_cls = (counts >= lo) & (counts <= hi)
    got = acc.metrics(weight, min_count=lo, max_count=hi)
    rows = keep_cls[y]
    want = ref.collapse_metrics(h[rows], y[rows], 23, weight)
    assert got["num_present"] == int(keep_cls.sum()) < int((counts > 0).sum())
    for key in KEYS:
        if key == "nc1":
            assert "nc1" not in got   # Σ_W cannot be split by class: left out when seen classes are dropped
            continue
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    pc = got["per_class"]
    assert pc["present"].dtype == torch.bool and torch.equal(pc["present"], keep_cls)
    assert pc["counts"].shape == (23,) and (pc["variances"][(counts > 0) & ~keep_cls] > 0).all()
    assert (pc["mean_norms"][counts == 0] == 0).all() and (pc["mean_norms"][counts > 0] > 0).all()
    full = acc.metrics()
    assert torch.equal(full["per_class"]["present"], counts > 0) and "nc1" in full
    with pytest.raises(ValueError, match="below min_count"):
        acc.metrics(min_count=5, max_count=2)
    with pytest.raises(TypeError, match="min_count must be a number"):
        acc.metrics(min_count="5")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_batches(dtype):
    """fp16/bf16 features accumulate in fp32 within a batch, fp64 across batches."""
    h, y, _, _ = data(n=300, dtype=dtype, scale=1.0, spread=0.3)
    acc = feed(ck.CollapseAccumulator(17, 13), h, y, None, 64)
    means, counts = ref.class_means(h, y, 17)
    close(acc.counts, counts, 0)
    close(acc.variance_sums, ref.within_class_variance(h, y, means), 1e-5, 1e-6)
    close(acc.covariance_sum, ref.within_class_covariance(h, y, means), 1e-5, 1e-5)
