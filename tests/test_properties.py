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
