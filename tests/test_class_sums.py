"""class_sums / class_means: every backend and path against the fp64 reference."""
import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref
from collapsekit.ops import class_sums as cs_mod

from conftest import HAS_CUDA, HAS_TRITON, assert_close, backend_devices, gradcheck, opcheck

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PATHS = {"cpp": ["sorted", "direct", "rows"], "triton": ["sorted", "scan", "atomic"]}


def shapes(backend, device):
    # odd, non-power-of-two sizes; the interpreter is slow, so it gets smaller ones
    if backend == "triton" and device == "cpu":
        return dict(n=67, d=37, c=13)
    return dict(n=1013, d=37, c=13)


def triton_dtype_ok(backend, device, dtype):
    # the Triton interpreter has no bf16 arithmetic
    return not (backend == "triton" and device == "cpu" and dtype == torch.bfloat16)


def cases():
    for backend, device in backend_devices():
        for path in PATHS[backend]:
            yield pytest.param(backend, device, path, id=f"{backend}-{device}-{path}")


@pytest.mark.parametrize("backend,device,path", list(cases()))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_hard_labels(backend, device, path, dtype, label_dtype):
    if not triton_dtype_ok(backend, device, dtype):
        pytest.skip("interpreter: no bf16")
    s = shapes(backend, device)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(s["n"], s["d"], generator=g).to(dtype).to(device)
    y = torch.randint(0, s["c"], (s["n"],), generator=g).to(label_dtype).to(device)
    sums, counts = ck.class_sums(h, y, s["c"], backend=backend, path=path)
    rs, rc = ref.class_sums(h, y, s["c"])
    assert sums.dtype == dtype and sums.shape == (s["c"], s["d"])
    assert counts.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(sums, rs, dtype, scale=10)
    assert_close(counts, rc, torch.float64)
    means, mcounts = ck.class_means(h, y, s["c"], backend=backend, path=path)
    rm, _ = ref.class_means(h, y, s["c"])
    assert_close(means, rm, dtype)
    torch.testing.assert_close(mcounts, counts)


@pytest.mark.parametrize("backend,device,path", list(cases()))
@pytest.mark.parametrize("weight_kind", ["sample", "none", "entry"])
def test_soft_labels_and_weights(backend, device, path, weight_kind):
    s = shapes(backend, device)
    g = torch.Generator().manual_seed(2)
    n, d, c, k = s["n"], s["d"], s["c"], 3
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, c, (n, k), generator=g).to(device)
    w = {"sample": torch.rand(n, generator=g, dtype=torch.float64),
         "entry": torch.rand(n, k, generator=g, dtype=torch.float64), "none": None}[weight_kind]
    w = None if w is None else w.to(device)
    sums, counts = ck.class_sums(h, y, c, w, backend=backend, path=path)
    rs, rc = ref.class_sums(h, y, c, w)
    assert_close(sums, rs, torch.float64)
    assert_close(counts, rc, torch.float64)
    # hard labels with per-sample weights (fp32 features, fp64 weights)
    w1 = torch.rand(n, generator=g).to(device)
    sums, counts = ck.class_sums(h.float(), y[:, 0], c, w1, backend=backend, path=path)
    rs, rc = ref.class_sums(h.float(), y[:, 0], c, w1)
    assert_close(sums, rs, torch.float32, scale=10)
    assert_close(counts, rc, torch.float32, scale=10)


@pytest.mark.parametrize("backend,device,path", list(cases()))
def test_non_contiguous_and_absent(backend, device, path):
    s = shapes(backend, device)
    g = torch.Generator().manual_seed(3)
    n, d, c = s["n"], s["d"], s["c"] + 7  # classes 13..19 absent
    base = torch.randn(d * 2, n + 5, generator=g).to(device)
    variants = {
        "transposed": base[:d, :n].t(),            # column stride != 1
        "column-slice": base.t()[:n, ::2][:, :d],  # row stride 2*d, column stride 2
        "row-slice": base.t()[5:, :d],             # storage offset
        "expanded": base[:1, :d].expand(n, d),    # row stride 0
    }
    y = torch.randint(0, s["c"], (2 * n,), generator=g).to(device)[::2]  # strided labels
    for name, h in variants.items():
        assert not h.is_contiguous(), name
        sums, counts = ck.class_sums(h, y, c, backend=backend, path=path)
        rs, rc = ref.class_sums(h, y, c)
        assert_close(sums, rs, torch.float32, scale=10)
        assert (sums[s["c"]:] == 0).all() and (counts[s["c"]:] == 0).all()
        means, _ = ck.class_means(h, y, c, backend=backend, path=path)
        assert torch.isfinite(means).all() and (means[s["c"]:] == 0).all()


@pytest.mark.parametrize("backend,device,path", list(cases()))
def test_empty_and_degenerate(backend, device, path):
    for n, d, c in [(0, 5, 3), (4, 0, 3), (0, 0, 1), (7, 3, 1), (1, 1, 1)]:
        h = torch.randn(n, d, device=device)
        y = torch.zeros(n, dtype=torch.long, device=device)
        sums, counts = ck.class_sums(h, y, c, backend=backend, path=path)
        rs, rc = ref.class_sums(h, y, c)
        assert sums.shape == (c, d) and counts.shape == (c,)
        assert_close(sums, rs, torch.float32)
        assert_close(counts, rc, torch.float32)


@pytest.mark.parametrize("backend,device,path", list(cases()))
def test_check_false_ignores_out_of_range(backend, device, path):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(50, 7, generator=g).to(device)
    y = torch.randint(-3, 9, (50,), generator=g).to(device)  # C = 5: -3..-1 and 5..8 are out of range
    sums, counts = ck.class_sums(h, y, 5, check=False, backend=backend, path=path)
    rs, rc = ref.class_sums(h, y, 5)
    assert_close(sums, rs, torch.float32)
    assert_close(counts, rc, torch.float32)


def test_large_class_skew_cpp(cpu_isa):
    """One class holding most rows (segments cut it) and many tiny ones, both cpp paths."""
    g = torch.Generator().manual_seed(5)
    n, d, c = 5003, 1100, 257  # D > the 1024-column block
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.7] = 3
    h = torch.randn(n, d, generator=g)
    rs, rc = ref.class_sums(h, y, c)
    for path in ("sorted", "direct", "rows"):
        for threads in (1, 2, 3):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                sums, counts = ck.class_sums(h, y, c, backend="cpp", path=path)
            finally:
                torch.set_num_threads(old)
            assert_close(sums, rs, torch.float32, scale=20)
            assert_close(counts, rc, torch.float32)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_cpp_isa_builds_agree(cpu_isa, dtype):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(301, 45, generator=g).to(dtype)
    h[0, :4] = torch.tensor([1e-6, -7e-8, 65000.0, 0.0]).to(dtype)  # fp16 subnormals, large values
    y = torch.randint(0, 11, (301,), generator=g)
    for path in ("sorted", "direct", "rows"):
        sums, counts = ck.class_sums(h, y, 11, backend="cpp", path=path)
        rs, rc = ref.class_sums(h, y, 11)
        assert_close(sums, rs, dtype, scale=10)


def test_fp16_special_values_cpp(cpu_isa):
    vals = torch.tensor([float("inf"), float("-inf"), 6e-8, -6e-8, 1e-5, 65504.0, -0.0], dtype=torch.float16)
    h = vals[:, None]
    y = torch.arange(len(vals))
    sums, _ = ck.class_sums(h, y, len(vals), backend="cpp")
    torch.testing.assert_close(sums[:, 0], vals)
    nan = torch.tensor([[float("nan")]], dtype=torch.float16)
    assert torch.isnan(ck.class_sums(nan, torch.zeros(1, dtype=torch.long), 1, backend="cpp")[0]).all()


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,path", [c for c in cases() if c.values[1] == "cpu"])
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(backend, device, path, soft):
    g = torch.Generator().manual_seed(7)
    n, d, c = 11, 5, 4
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    if soft:
        y = torch.randint(0, c, (n, 2), generator=g)
        w = torch.rand(n, 2, generator=g, dtype=torch.float64, requires_grad=True)
    else:
        y = torch.randint(0, c, (n,), generator=g)
        w = torch.rand(n, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda h_, w_: ck.class_sums(h_, y, c, w_, backend=backend, path=path)
    assert gradcheck(f, (h, w), backend)
    fm = lambda h_, w_: ck.class_means(h_, y, c, w_, backend=backend, path=path)[0]
    assert gradcheck(fm, (h, w), backend)


@pytest.mark.parametrize("backend,device,path", list(cases()))
def test_grads_match_reference(backend, device, path):
    g = torch.Generator().manual_seed(8)
    n, d, c = 45, 9, 6
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    y = torch.randint(-1, c, (n,), generator=g).to(device)  # with check=False: -1 is dropped
    w = torch.rand(n, generator=g).to(device).requires_grad_()
    gs = torch.randn(c, d, generator=g).to(device)
    gc = torch.randn(c, generator=g).to(device)
    sums, counts = ck.class_sums(h, y, c, w, check=False, backend=backend, path=path)
    (sums * gs).sum().add((counts * gc).sum()).backward()
    h2 = h.detach().double().requires_grad_()
    w2 = w.detach().double().requires_grad_()
    rs, rc = ref.class_sums(h2, y, c, w2)
    (rs * gs.double()).sum().add((rc * gc.double()).sum()).backward()
    assert_close(h.grad, h2.grad, torch.float32)
    assert_close(w.grad, w2.grad, torch.float32, scale=10)


# ------------------------------------------------------------------------------------------------
# torch.library integration
# ------------------------------------------------------------------------------------------------

def _opcheck_args(device):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(23, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randint(0, 5, (23, 1), generator=g).to(device)
    w = torch.rand(23, 1, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return [(h, y, w, 5, "auto"), (h.detach(), y, None, 5, "sorted")]


def test_opcheck_cpp():
    for args in _opcheck_args("cpu"):
        torch.library.opcheck(cs_mod._class_sums_cpp, args)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    for args in _opcheck_args(device):
        opcheck(cs_mod._class_sums_triton, args)


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(10)
    h = torch.randn(101, 17, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (101,), generator=g)

    def f(h_, y_):
        means, counts = ck.class_means(h_, y_, 7, check=False)
        return (means * 2).sum(), counts

    compiled = torch.compile(f, fullgraph=True)
    out, counts = compiled(h, y)
    ref_out, ref_counts = f(h, y)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(counts, ref_counts)
    out.backward()
    # d/dh_i of Σ 2·μ = 2 / n_{y_i} in every column (a mean's gradient spreads over its rows)
    want = (2.0 / torch.bincount(y, minlength=7).float())[y][:, None].expand(101, 17)
    torch.testing.assert_close(h.grad, want)
    g_eager, = torch.autograd.grad(f(h, y)[0], h)
    torch.testing.assert_close(h.grad, g_eager)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: torch.compile lowers the Triton kernels for CUDA")
def test_torch_compile_fullgraph_cuda():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    h = torch.randn(1001, 65, generator=g).cuda().requires_grad_()
    y = torch.randint(0, 13, (1001,), generator=g).cuda()

    def f(h_, y_):
        means, counts = ck.class_means(h_, y_, 13, check=False)
        return (means * 2).sum(), counts

    out, counts = torch.compile(f, fullgraph=True)(h, y)
    ref_out, ref_counts = f(h, y)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(counts, ref_counts)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_input():
    h = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    cases = [
        (lambda: ck.class_sums(h, torch.tensor([0, 1, 2, 7, 0, -1]), 3), ValueError, r"labels\[3\] = 7 is outside \[0, num_classes=3\)"),
        (lambda: ck.class_sums(h, torch.tensor([0, 1, -2, 1, 0, 2]), 3), ValueError, r"labels\[2\] = -2"),
        (lambda: ck.class_sums(h, torch.tensor([[0, 5]] * 6), 3), ValueError, r"labels\[\(0, 1\)\] = 5"),
        (lambda: ck.class_sums(h, y.float(), 3), TypeError, "labels must be int32 or int64"),
        (lambda: ck.class_sums(h, y[:5], 3), ValueError, "labels has 5 rows but features has 6"),
        (lambda: ck.class_sums(h, y[:, None, None], 3), ValueError, "labels must be"),
        (lambda: ck.class_sums(h[0], y, 3), ValueError, "features must be 2-D"),
        (lambda: ck.class_sums(h, y, 0), ValueError, "num_classes must be >= 1"),
        (lambda: ck.class_sums(h, y, 3.0), TypeError, "num_classes must be an int"),
        (lambda: ck.class_sums(h, y, 3, torch.ones(5)), ValueError, "weights must have shape"),
        (lambda: ck.class_sums(h, y, 3, torch.ones(6, 2)), ValueError, "weights must have shape"),
        (lambda: ck.class_sums(h, y, 3, torch.ones(6, dtype=torch.long)), TypeError, "weights must be a floating"),
        (lambda: ck.class_sums(h.long(), y, 3), TypeError, "features must be float16"),
        (lambda: ck.class_sums(h, y, 3, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: ck.class_sums(h, y, 3, backend="cpp", path="atomic"), ValueError, "path for the cpp backend"),
        (lambda: ck.class_sums(h, y.numpy(), 3), TypeError, "labels must be a torch.Tensor"),
        (lambda: ck.class_means(h, torch.zeros(6, 0, dtype=torch.long), 3), ValueError, "K >= 1"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.skipif(not HAS_CUDA, reason="needs two devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match="same device"):
        ck.class_sums(torch.randn(4, 3, device="cuda"), torch.zeros(4, dtype=torch.long), 2)


def test_mixed_devices_meta():
    # meta tensors stand in for a second device on machines without a GPU
    with pytest.raises(ValueError, match="labels is on meta"):
        ck.class_sums(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"), 2)


def test_cpp_rejects_cuda_and_interpreter_gate(monkeypatch):
    from collapsekit import _dispatch
    with pytest.raises(ValueError, match="needs CPU tensors"):
        _dispatch.resolve_backend("cpp", torch.device("cuda"), "class_sums")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            _dispatch.resolve_backend("triton", torch.device("cpu"), "class_sums")
