"""collapse_metrics / CollapseAccumulator.metrics against docs/design.md's formulas written out in fp64."""
import math

import pytest
import torch

import collapsekit as ck
from collapsekit.ops import pairwise
from collapsekit import reference as ref

KEYS = ["nc1", "nc1_quotient", "cdnv", "nc2_equinorm", "nc2_equiangle", "nc2_coherence", "gnc2", "etf_error"]
CLASSIFIER_KEYS = ["nc3", "nc3_cos", "unc3", "nc4"]


def make(n, d, c, seed, soft=False, absent=(1, 5)):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    for a in absent:
        y[y == a] = (a + 1) % c
    h = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = centers + 0.5 * torch.randn(c, d, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
    if soft:
        y = torch.stack([y, torch.randint(0, c, (n,), generator=g)], 1)
        y[:, 1][torch.isin(y[:, 1], torch.tensor(absent))] = y[:, 0][torch.isin(y[:, 1], torch.tensor(absent))]
        w = torch.rand(n, 2, generator=g, dtype=torch.float64)
        return h, y, weight, bias, w
    return h, y, weight, bias, None


def check(got, want, keys, rtol=1e-7):
    for key in keys:
        assert key in got, key
        assert math.isclose(got[key], want[key], rel_tol=rtol, abs_tol=1e-9), (key, got[key], want[key])


@pytest.mark.parametrize("n,d,c", [(400, 32, 10), (600, 6, 23)], ids=["K<D", "K>D"])
@pytest.mark.parametrize("soft", [False, True])
def test_against_reference(n, d, c, soft, monkeypatch):
    # small tiles: several Gram tiles, row tiles and class tiles, ragged edges
    from collapsekit.ops import nearest_center as ncc_mod
    monkeypatch.setattr(pairwise, "PAIR_TILE", 7)
    monkeypatch.setattr(ncc_mod, "ROW_TILE", 53)
    monkeypatch.setattr(ncc_mod, "CLASS_TILE", 6)
    h, y, weight, bias, w = make(n, d, c, 0, soft)
    got = ck.collapse_metrics(h, y, c, weight, bias, weights=w)
    want = ref.collapse_metrics(h, y, c, weight, bias, weights=w)
    check(got, want, KEYS + ["nc3", "nc3_cos", "unc3"])
    if not soft:  # nc4 compares hard decisions
        assert got["nc4"] == pytest.approx(want["nc4"])
    assert got["num_present"] == c - 2
    pc = got["per_class"]
    assert set(pc) == {"counts", "mean_norms", "variances", "weight_norms", "present"}
    assert pc["counts"][1] == 0 and pc["mean_norms"][1] == 0 and pc["variances"][5] == 0


def test_without_classifier_keys_absent():
    h, y, *_ = make(300, 8, 6, 1)
    got = ck.collapse_metrics(h, y, 6)
    for key in CLASSIFIER_KEYS:
        assert key not in got
    assert "weight_norms" not in got["per_class"]
    check(got, ref.collapse_metrics(h, y, 6), KEYS)


def test_collapsed_configuration():
    c, d = 8, 12
    g = torch.Generator().manual_seed(2)
    # a simplex ETF: the centred identity, scaled to unit rows, rotated into D dims
    e = torch.eye(c, dtype=torch.float64) - 1.0 / c
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    etf = (e @ q[:c]) * math.sqrt(c / (c - 1))
    y = torch.arange(c).repeat(50)
    h = 5 * etf[y] + 1e-6 * torch.randn(len(y), d, generator=g, dtype=torch.float64)
    got = ck.collapse_metrics(h, y, c, weight=etf, bias=None)
    assert got["nc1"] < 1e-10 and got["etf_error"] < 1e-6 and got["nc2_equiangle"] < 1e-6
    assert got["nc3_cos"] == pytest.approx(1, abs=1e-9) and got["nc4"] == 0


def test_two_point_cdnv():
    # class 0: (±1, 0) around (0, 0), variance 1; class 1: (2 ± √3, 0) around (2, 0), variance 3
    s3 = math.sqrt(3)
    h = torch.tensor([[-1.0, 0], [1.0, 0], [2 - s3, 0], [2 + s3, 0]], dtype=torch.float64)
    got = ck.collapse_metrics(h, torch.tensor([0, 0, 1, 1]), 2)
    assert got["cdnv"] == pytest.approx(0.5)


def test_streaming_uneven_batches_equals_one_shot():
    h, y, weight, bias, _ = make(701, 9, 12, 3)
    acc = ck.CollapseAccumulator(12, 9)
    edges = [0, 5, 230, 231, 600, 701]
    for a, b in zip(edges, edges[1:]):
        acc.update_means(h[a:b], y[a:b])
    for a, b in zip(edges, edges[1:]):
        acc.update_variance(h[a:b], y[a:b])
    for a, b in zip(edges, edges[1:]):
        acc.update_decisions(h[a:b], h[a:b] @ weight.t() + bias)  # logits
    got = acc.metrics(weight, bias)
    one = ck.collapse_metrics(h, y, 12, weight, bias)
    check(got, one, KEYS + CLASSIFIER_KEYS, rtol=1e-9)


def test_metric_errors():
    h, y, weight, *_ = make(50, 4, 5, 4)
    acc = ck.CollapseAccumulator(5, 4)
    with pytest.raises(RuntimeError, match="pass 1"):
        acc.update_decisions(h, y)
    acc.update_means(h, y)
    with pytest.raises(RuntimeError, match="pass 2"):
        acc.metrics()
    acc.update_variance(h, y)
    with pytest.raises(ValueError, match=r"weight must be \[C, D\]"):
        acc.metrics(weight[:, :3])
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        acc.update_decisions(h, torch.zeros(50, 3))
    assert "nc1" not in ck.collapse_metrics(h, y, 5, covariance=False)


def test_single_present_class_has_no_geometry_keys():
    h = torch.randn(20, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    got = ck.collapse_metrics(h, torch.zeros(20, dtype=torch.long), 4, weight=w)
    assert got["num_present"] == 1
    for key in KEYS + ["nc3", "nc3_cos", "unc3"]:
        assert key not in got
    # the only center is class 0: nc4 is the fraction of rows the classifier sends elsewhere
    assert got["nc4"] == pytest.approx(float(((h @ w.t()).argmax(1) != 0).double().mean()))
    assert got["per_class"]["weight_norms"].shape == (4,)
