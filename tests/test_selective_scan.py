"""selective_scan (Mamba-1): every backend against the fp64 reference, forward and backward."""
import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref
from collapsekit.ops import selective_scan as ss_mod

from conftest import HAS_CUDA, HAS_TRITON, TOL, backend_devices, close, gradcheck

FORMS = ["constant", "variable", "grouped"]


def interp(backend, device):
    return backend == "triton" and device == "cpu"


def dims(backend, device):
    """(batch, dim, L, N): the interpreter is slow, so Triton on CPU gets tiny shapes."""
    return (2, 12, 13, 5) if interp(backend, device) else (2, 37, 37, 7)


def matrix(form, batch, dim, n, L, groups, dtype, g):
    if form == "constant":
        return torch.randn(dim, n, generator=g)  # fp32 weights, as in Mamba
    if form == "variable":
        return torch.randn(batch, n, L, generator=g).to(dtype)
    return torch.randn(batch, groups, n, L, generator=g).to(dtype)


def problem(batch, dim, L, n, bform="variable", cform="variable", dtype=torch.float32, device="cpu", seed=0,
            groups=(1, 1), D=True, z=True, bias=True, init=True):
    """Mamba-like magnitudes: A = -exp(.) in [-2.7, -0.4], delta ~ 0.5 U(0, 1) - 1 (softplus'd)."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = dict(
        u=torch.randn(batch, dim, L, generator=g).to(dtype),
        delta=(0.5 * torch.rand(batch, dim, L, generator=g) - 1).to(dtype),
        A=-torch.exp(torch.rand(dim, n, generator=g) * 2 - 1).to(acc),
        B=matrix(bform, batch, dim, n, L, groups[0], dtype, g),
        C=matrix(cform, batch, dim, n, L, groups[1], dtype, g),
        D=torch.randn(dim, generator=g).to(acc) if D else None,
        z=torch.randn(batch, dim, L, generator=g).to(dtype) if z else None,
        delta_bias=(0.5 * torch.rand(dim, generator=g)).to(acc) if bias else None,
        initial_state=torch.randn(batch, dim, n, generator=g).to(acc) if init else None,
    )
    if dtype == torch.float64:
        t = {k: None if v is None else v.double() for k, v in t.items()}
    return {k: None if v is None else v.to(device) for k, v in t.items()}


def call(fn, t, softplus=True, last=True, norms=True, **kw):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus, last,
              initial_state=t["initial_state"], return_state_norms=norms, **kw)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("bform", FORMS)
@pytest.mark.parametrize("cform", FORMS)
def test_forward_forms(backend, device, bform, cform):
    batch, dim, L, n = dims(backend, device)
    dim = 12 if interp(backend, device) else 36  # divisible by both group counts
    t = problem(batch, dim, L, n, bform, cform, device=device, groups=(3, 2))
    out, last, norms = call(ck.selective_scan, t, backend=backend)
    r_out, r_last, r_norms = call(ref.selective_scan, t)
    assert out.dtype == torch.float32 and last.dtype == torch.float32 and norms.dtype == torch.float32
    assert last.shape == t["initial_state"].shape and norms.shape == t["u"].shape
    close(out, r_out, 1e-5, 1e-5)
    close(last, r_last, 1e-5, 1e-5)
    close(norms, r_norms, 1e-5, 1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("opts", [dict(D=False, z=False, bias=False, init=False, softplus=False),
                                  dict(D=True, z=False, bias=True, init=False, softplus=True),
                                  dict(D=False, z=True, bias=False, init=True, softplus=False)],
                         ids=["bare", "D-bias-softplus", "z-init"])
def test_forward_optional_inputs(backend, device, opts):
    opts = dict(opts)
    softplus = opts.pop("softplus")
    batch, dim, L, n = dims(backend, device)
    t = problem(batch, dim, L, n, device=device, **opts)
    if not softplus:
        t["delta"] = t["delta"] + 1.2  # positive steps without softplus
    out = call(ck.selective_scan, t, softplus=softplus, last=False, norms=False, backend=backend)
    assert isinstance(out, torch.Tensor)
    close(out, call(ref.selective_scan, t, softplus=softplus, last=False, norms=False), 1e-5, 1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_forward_odd_lengths(backend, device):
    lengths = (1, 2, 7) if interp(backend, device) else (1, 37, 300)
    for L in lengths:
        t = problem(2, 12 if interp(backend, device) else 21, L, 4, "variable", "grouped", device=device,
                    groups=(1, 3), seed=L)
        for r, e in zip(call(ck.selective_scan, t, backend=backend), call(ref.selective_scan, t)):
            close(r, e, 1e-5, 1e-5)


@pytest.mark.parametrize("n", [1, 16, 256])
def test_forward_state_sizes_cpp(n):
    t = problem(1, 20, 9, n, "grouped", "constant", groups=(4, 1))
    for r, e in zip(call(ck.selective_scan, t, backend="cpp"), call(ref.selective_scan, t)):
        close(r, e, 1e-5, 1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_forward_dtypes(backend, device, dtype):
    if interp(backend, device) and dtype == torch.bfloat16:
        pytest.skip("interpreter: no bf16 arithmetic")
    batch, dim, L, n = dims(backend, device)
    t = problem(batch, dim, L, n, "variable", "variable", dtype=dtype, device=device)
    out, last, norms = call(ck.selective_scan, t, backend=backend)
    r_out, r_last, r_norms = call(ref.selective_scan, t)  # the same rounded inputs, in fp64
    assert out.dtype == dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert last.dtype == acc and norms.dtype == acc
    tol = TOL[dtype]
    # out is rounded to its dtype; the states and norms are returned in fp32 (fp64)
    close(out, r_out, tol["rtol"], tol["atol"])
    tol_acc = TOL[acc]
    close(last, r_last, tol_acc["rtol"] * 10, tol_acc["atol"] * 10)
    close(norms, r_norms, tol_acc["rtol"] * 10, tol_acc["atol"] * 10)


def test_forward_mixed_dtypes_cpp():
    t = problem(2, 24, 30, 6, "variable", "grouped", dtype=torch.bfloat16, groups=(1, 2))
    t["delta"] = t["delta"].float()  # fp32 delta with bf16 u, B, C, z (as Mamba's mixed precision runs)
    out = call(ck.selective_scan, t, last=False, norms=False, backend="cpp")
    assert out.dtype == torch.bfloat16
    close(out, call(ref.selective_scan, t, last=False, norms=False), TOL[torch.bfloat16]["rtol"],
          TOL[torch.bfloat16]["atol"])


def test_forward_isa(cpu_isa):
    t = problem(2, 40, 45, 16, "variable", "constant")
    for r, e in zip(call(ck.selective_scan, t, backend="cpp"), call(ref.selective_scan, t)):
        close(r, e, 1e-5, 1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_chunked_equals_one_call(backend, device):
    batch, dim, L, n = dims(backend, device)
    L = 12 if interp(backend, device) else 50
    t = problem(batch, dim, L, n, "variable", "variable", device=device)
    full_out, full_last = call(ck.selective_scan, t, norms=False, backend=backend)
    k = L // 3
    first = {**t, "u": t["u"][..., :k], "delta": t["delta"][..., :k], "z": t["z"][..., :k],
             "B": t["B"][..., :k], "C": t["C"][..., :k]}
    out1, last1 = call(ck.selective_scan, first, norms=False, backend=backend)
    second = {**t, "u": t["u"][..., k:], "delta": t["delta"][..., k:], "z": t["z"][..., k:],
              "B": t["B"][..., k:], "C": t["C"][..., k:], "initial_state": last1}
    out2, last2 = call(ck.selective_scan, second, norms=False, backend=backend)
    close(torch.cat([out1, out2], -1), full_out, 1e-6, 1e-6)
    close(last2, full_last, 1e-6, 1e-6)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_non_contiguous_inputs(backend, device):
    batch, dim, L, n = dims(backend, device)
    t = problem(batch, dim - dim % 2, L, n, "variable", "grouped", device=device, groups=(1, 2))
    nc = dict(t)
    # (batch, L, dim) storage seen as (batch, dim, L), as Mamba's in_proj produces; B/C as (batch, L, N)
    nc["u"] = t["u"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["delta"] = torch.cat([t["delta"], t["delta"]], -1)[..., ::2]  # a stride-2 view of different values
    nc["z"] = t["z"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["B"] = t["B"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["C"] = t["C"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    nc["A"] = t["A"].t().contiguous().t()
    assert not nc["u"].is_contiguous() and not nc["B"].is_contiguous() and not nc["C"].is_contiguous()
    for r, e in zip(call(ck.selective_scan, nc, backend=backend), call(ref.selective_scan, nc)):
        close(r, e, 1e-5, 1e-5)


def test_reference_backend_and_auto():
    t = problem(2, 10, 8, 3)
    a = call(ck.selective_scan, t, backend="reference")
    b = call(ck.selective_scan, t)  # auto: the C++ kernels on CPU
    for x, y in zip(a, b):
        close(y, x, 1e-5, 1e-5)
    assert a[0].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def grads(fn, t, weights, **kw):
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in t.items()}
    outs = call(fn, leaves, **kw)
    loss = sum((o.double() * w.double()).sum() for o, w in zip(outs, weights))
    loss.backward()
    return {k: v.grad for k, v in leaves.items() if v is not None}


def check_grads(backend, device, t, rtol=1e-4, atol_rel=1e-5, norms=True, softplus=True):
    g = torch.Generator().manual_seed(99)
    shapes = [t["u"].shape, t["initial_state"].shape if t["initial_state"] is not None else
              (t["u"].shape[0], t["u"].shape[1], t["A"].shape[1]), t["u"].shape]
    weights = [torch.randn(s, generator=g).to(device) for s in shapes][:3 if norms else 2]
    got = grads(lambda *a, **k: ck.selective_scan(*a, **k, backend=backend), t, weights, norms=norms,
                softplus=softplus)
    want = grads(ref.selective_scan, t, weights, norms=norms, softplus=softplus)
    assert set(got) == set(want)
    for k in want:
        assert got[k] is not None, k
        assert got[k].dtype == t[k].dtype and got[k].shape == t[k].shape, k
        close(got[k], want[k], rtol, atol_rel)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("bform,cform", [("variable", "variable"), ("constant", "constant"),
                                         ("grouped", "variable"), ("constant", "grouped")])
@pytest.mark.parametrize("steps", [64, 4], ids=["ckpt64", "ckpt4"])
def test_grads_match_reference(backend, device, bform, cform, steps, monkeypatch):
    """Every input's gradient (out, last_state and state_norms all in the loss); with a checkpoint
    every 4 steps the backward recomputes many segments (and the last one is partial)."""
    monkeypatch.setattr(ss_mod, "CHECKPOINT_STEPS", steps)
    batch, dim, L, n = dims(backend, device)
    dim = 12 if interp(backend, device) else 36
    t = problem(batch, dim, L, n, bform, cform, device=device, groups=(3, 2))
    check_grads(backend, device, t)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_grads_without_optional_inputs(backend, device, monkeypatch):
    monkeypatch.setattr(ss_mod, "CHECKPOINT_STEPS", 5)
    batch, dim, L, n = dims(backend, device)
    t = problem(batch, dim, L, n, device=device, D=False, z=False, bias=False, init=False)
    t["delta"] = t["delta"] + 1.2
    check_grads(backend, device, t, norms=False, softplus=False)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_grads_half_inputs(backend, device):
    batch, dim, L, n = dims(backend, device)
    t = problem(batch, dim, L, n, device=device, dtype=torch.float16)
    # fp16 gradients: fp32 accumulation, then rounded to fp16
    check_grads(backend, device, t, rtol=2e-3, atol_rel=2e-3)


def test_grads_only_some_inputs_and_isa(cpu_isa):
    t = problem(2, 20, 30, 4, "grouped", "grouped", groups=(2, 5))
    u = t["u"].clone().requires_grad_()
    out = ck.selective_scan(u, t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    out.sum().backward()
    u2 = t["u"].double().requires_grad_()
    ref.selective_scan(u2, t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True).sum().backward()
    close(u.grad, u2.grad, 1e-4, 1e-5)


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(ss_mod, "CHECKPOINT_STEPS", 3)
    for bform, cform in [("variable", "grouped"), ("constant", "constant")]:
        t = problem(2, 4, 7, 3, bform, cform, dtype=torch.float64, groups=(1, 2))
        keys = [k for k in NAMES if t[k] is not None]

        def f(*xs):
            d = dict(zip(keys, xs))
            return call(ck.selective_scan, d, backend="cpp")

        assert torch.autograd.gradcheck(f, tuple(t[k].requires_grad_() for k in keys))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_gradcheck_fp64_triton(monkeypatch):
    monkeypatch.setattr(ss_mod, "CHECKPOINT_STEPS", 2)
    device = "cuda" if HAS_CUDA else "cpu"
    t = problem(1, 4, 5, 2, "variable", "constant", dtype=torch.float64, device=device)
    keys = [k for k in NAMES if t[k] is not None]

    def f(*xs):
        return call(ck.selective_scan, dict(zip(keys, xs)), backend="triton")

    assert gradcheck(f, tuple(t[k].requires_grad_() for k in keys), "triton")


def test_no_checkpoints_without_grad():
    """Inference keeps no per-step or per-chunk state: the registered forward returns an empty
    checkpoint buffer when nothing requires grad."""
    t = problem(1, 16, 200, 4)
    args = (t["u"], t["delta"], t["A"], t["B"].unsqueeze(1), t["C"].unsqueeze(1), None, None, None, None, None,
            False, False)
    _, _, norms, ckpt = ss_mod._fwd_cpp(*args, False, 64)
    assert ckpt.numel() == 0 and norms.numel() == 0
    _, _, _, ckpt = ss_mod._fwd_cpp(*args, True, 64)
    assert ckpt.shape == (1, 16, 4, 4)


def test_opcheck_and_compile():
    t = problem(2, 8, 6, 3, dtype=torch.float64)
    args = (t["u"].requires_grad_(), t["delta"], t["A"], t["B"].unsqueeze(1), t["C"].unsqueeze(1), t["D"], t["z"],
            t["delta_bias"], t["initial_state"], None, True, True, True, 4)
    torch.library.opcheck(ss_mod._fwd_cpp, args)
    torch._dynamo.reset()
    t = problem(2, 8, 6, 3)
    f = lambda u, dl, A, B, C: ck.selective_scan(u, dl, A, B, C, delta_softplus=True, return_last_state=True)
    want = f(t["u"], t["delta"], t["A"], t["B"], t["C"])
    got = torch.compile(f, fullgraph=True)(t["u"], t["delta"], t["A"], t["B"], t["C"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    t = problem(1, 4, 5, 2, dtype=torch.float64, device=device)
    args = (t["u"].requires_grad_(), t["delta"], t["A"], t["B"].unsqueeze(1), t["C"].unsqueeze(1), t["D"], t["z"],
            t["delta_bias"], t["initial_state"], None, True, True, True, 2)
    kwargs = {} if HAS_CUDA else dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ss_mod._fwd_triton, args, **kwargs)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_input():
    t = problem(2, 6, 5, 3)
    u, delta, A, B, C = t["u"], t["delta"], t["A"], t["B"], t["C"]
    f = ck.selective_scan
    cases = [
        (lambda: f(u.numpy(), delta, A, B, C), TypeError, "u must be a torch.Tensor"),
        (lambda: f(u.long(), delta, A, B, C), TypeError, "u must be float16"),
        (lambda: f(u[0], delta, A, B, C), ValueError, "u must be (batch, dim, L)"),
        (lambda: f(u[..., :0], delta[..., :0], A, B[..., :0], C[..., :0]), ValueError, "L >= 1"),
        (lambda: f(u, delta[..., :4], A, B, C), ValueError, "delta must have shape"),
        (lambda: f(u, delta, A[:5], B, C), ValueError, "A must be (dim, N)"),
        (lambda: f(u, delta, A.to(torch.complex64), B, C), TypeError, "complex A is not supported"),
        (lambda: f(u, delta, torch.zeros(6, 257), torch.zeros(2, 257, 5), C), ValueError, "N must be in [1, 256]"),
        (lambda: f(u, delta, A, B[:, :2], C), ValueError, "B must have shape (batch, N, L)"),
        (lambda: f(u, delta, A, B, C[:1]), ValueError, "C must have shape (batch, N, L)"),
        (lambda: f(u, delta, A, torch.zeros(6, 4), C), ValueError, "B must have shape (dim, N)"),
        (lambda: f(u, delta, A, torch.zeros(2, 4, 3, 5), C), ValueError, "B has G=4 groups, which must divide dim=6"),
        (lambda: f(u, delta, A, B, torch.zeros(2, 2, 3, 4)), ValueError, "C must have shape (batch, G, N, L)"),
        (lambda: f(u, delta, A, B, torch.zeros(2, 1, 1, 3, 5)), ValueError, "C must be (dim, N), (batch, N, L)"),
        (lambda: f(u, delta, A, B.to(torch.complex64), C), TypeError, "complex B is not supported"),
        (lambda: f(u, delta, A, B, C, D=torch.zeros(5)), ValueError, "D must have shape (dim,)"),
        (lambda: f(u, delta, A, B, C, delta_bias=torch.zeros(6, 1)), ValueError, "delta_bias must have shape"),
        (lambda: f(u, delta, A, B, C, z=u[:1]), ValueError, "z must have shape"),
        (lambda: f(u, delta, A, B, C, initial_state=torch.zeros(2, 6, 4)), ValueError, "initial_state must have shape"),
        (lambda: f(u, delta, A, B, C, delta_softplus=1), TypeError, "delta_softplus must be a bool"),
        (lambda: f(u, delta, A, B, C, D=torch.zeros(6, dtype=torch.int32)), TypeError, "D must be float16"),
        (lambda: f(u, delta, A, B, C, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: f(u, delta, A, B, C, initial_state=torch.zeros(2, 6, 3, device="meta")), ValueError,
         "initial_state is on meta"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc) as info:
            fn()
        assert msg in str(info.value), (msg, str(info.value))
        assert "selective_scan" in str(info.value)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("which", [1, 2], ids=["last_state_only", "state_norms_only"])
def test_grads_through_one_extra_output(backend, device, which, monkeypatch):
    """A loss on last_state or state_norms alone (out unused: its gradient is None)."""
    monkeypatch.setattr(ss_mod, "CHECKPOINT_STEPS", 4)
    batch, dim, L, n = dims(backend, device)
    t = problem(batch, dim, L, n, device=device)
    got, want = {}, {}
    for fn, res in ((lambda *a, **k: ck.selective_scan(*a, **k, backend=backend), got), (ref.selective_scan, want)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
        call(fn, leaves)[which].double().pow(2).sum().backward()
        res.update({k: v.grad for k, v in leaves.items()})
    for k in want:
        if want[k] is None:  # z / D have no path to the state
            assert got[k] is None or got[k].abs().max() == 0, k
        else:
            close(got[k], want[k], 1e-4, 1e-5)


def test_threads_large_enough_problem(monkeypatch):
    """Above 2^18 state updates the C++ kernels use several threads (smaller problems run on one):
    per-thread B/C gradient copies and their final sum must still match the reference."""
    monkeypatch.setattr(ss_mod, "CHECKPOINT_STEPS", 16)
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        t = problem(2, 64, 130, 16, "variable", "grouped", groups=(1, 4))
        assert 2 * 64 * 130 * 16 >= 1 << 18
        check_grads("cpp", "cpu", t)
    finally:
        torch.set_num_threads(old)


def test_registered_op_rejects_what_the_kernels_cannot_index():
    t = problem(2, 8, 6, 3)
    B4, C4 = t["B"].unsqueeze(1), t["C"].unsqueeze(1)
    base = [t["u"], t["delta"], t["A"], B4, C4, t["D"], t["z"], t["delta_bias"], t["initial_state"], None, True, False,
            False, 4]
    ops = [ss_mod._fwd_cpp] + ([ss_mod._fwd_triton] if HAS_TRITON else [])
    for i, bad in [(1, t["delta"][..., :5]), (2, t["A"].t().contiguous().t()), (3, t["B"]), (4, C4[..., :5]),
                   (5, t["D"].double()), (8, t["initial_state"][:1]),
                   (9, torch.zeros(2, 5, dtype=torch.int32)), (13, 0)]:
        args = list(base)
        args[i] = bad
        for op in ops:
            with pytest.raises(ValueError, match="selective_scan"):
                op(*args)


def test_cpp_exp_accuracy(cpu_isa):
    """The C++ kernel's vectorised exp, read through the op: with N = 1, delta = 1, B = 0, C = 1 and
    initial_state = 1 the last state is exp(A). Within 1 ulp of exp (torch.exp: 0.5) over the whole
    normal range; below FLT_MIN 0, above FLT_MAX inf, NaN stays NaN."""
    x = torch.cat([torch.linspace(-87.33, 88.72, 100_001), torch.randn(20_000) * 3,
                   torch.tensor([0.0, -1e-8, 1e-8, -87.3, 88.5, 88.7])])
    dim = x.numel()
    last = ck.selective_scan(torch.zeros(1, dim, 1), torch.ones(1, dim, 1), x[:, None], torch.zeros(dim, 1),
                             torch.ones(dim, 1), return_last_state=True, initial_state=torch.ones(1, dim, 1),
                             backend="cpp")[1][0, :, 0].double()
    ref = torch.exp(x.double())
    ref32 = ref.float()
    ulp = (torch.nextafter(ref32, torch.tensor(float("inf"))) - ref32).double()
    assert float(((last - ref).abs() / ulp).max()) <= 1.0
    edge = torch.tensor([-88.0, -104.0, -1e30, 88.8, 1e30, float("nan")])
    n = edge.numel()
    last = ck.selective_scan(torch.zeros(1, n, 1), torch.ones(1, n, 1), edge[:, None], torch.zeros(n, 1),
                             torch.ones(n, 1), return_last_state=True, initial_state=torch.ones(1, n, 1),
                             backend="cpp")[1][0, :, 0]
    assert last[:3].eq(0).all() and last[3:5].eq(float("inf")).all() and last[5].isnan()


# ------------------------------------------------------------------------------------------------
# packed sequences (seq_idx) and mamba-ssm's delta_softplus=None
# ------------------------------------------------------------------------------------------------


def _pack(ts, lengths):
    """Concatenate per-sequence problems (batch 1 each) along L: (u, delta, B, C, z) and seq_idx."""
    cat = lambda k: torch.cat([t[k] for t in ts], dim=-1)
    seq = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    return {k: cat(k) for k in ("u", "delta", "B", "C", "z")}, seq


@pytest.mark.parametrize("backend,device", backend_devices())
def test_seq_idx_equals_separate_sequences(backend, device):
    """A packed row with seq_idx gives each sequence's separate result, forward and gradients; the
    initial state applies to the first sequence only."""
    lengths = [5, 1, 7] if interp(backend, device) else [9, 1, 23, 4]
    n, dim = 3, 10
    base = problem(1, dim, 2, n, dtype=torch.float64, device=device)
    ts = [problem(1, dim, L, n, dtype=torch.float64, device=device, seed=i + 1) for i, L in enumerate(lengths)]
    packed, seq = _pack(ts, lengths)
    seq = seq.to(device)
    leaves = {k: v.clone().requires_grad_() for k, v in packed.items()}
    shared = {k: base[k].clone().requires_grad_() for k in ("A", "D", "delta_bias", "initial_state")}
    chunk = ss_mod.CHECKPOINT_STEPS
    ss_mod.CHECKPOINT_STEPS = 4  # resets inside and at the edge of checkpoint segments
    try:
        out, last = ck.selective_scan(leaves["u"], leaves["delta"], shared["A"], leaves["B"], leaves["C"],
                                      shared["D"], leaves["z"], shared["delta_bias"], True, True,
                                      initial_state=shared["initial_state"], seq_idx=seq, backend=backend)
    finally:
        ss_mod.CHECKPOINT_STEPS = chunk
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # separately, with the reference (the initial state only for the first sequence)
    r_leaves = {k: v.detach().clone().requires_grad_() for k, v in packed.items()}
    r_shared = {k: v.detach().clone().requires_grad_() for k, v in shared.items()}
    outs, pos = [], 0
    for i, L in enumerate(lengths):
        piece = lambda k: r_leaves[k][..., pos:pos + L]
        o, lst = ref.selective_scan(piece("u"), piece("delta"), r_shared["A"], piece("B"), piece("C"), r_shared["D"],
                                    piece("z"), r_shared["delta_bias"], True, True,
                                    initial_state=r_shared["initial_state"] if i == 0 else None)
        outs.append(o)
        pos += L
    want = torch.cat(outs, -1)
    (want * g).sum().backward()
    close(out, want, 1e-9, 1e-9)
    close(last, lst, 1e-9, 1e-9)
    for k in leaves:
        close(leaves[k].grad, r_leaves[k].grad, 1e-8, 1e-8)
    for k in shared:
        close(shared[k].grad, r_shared[k].grad, 1e-8, 1e-8)
    # the reference's own seq_idx path agrees
    r = ref.selective_scan(packed["u"], packed["delta"], base["A"], packed["B"], packed["C"], base["D"], packed["z"],
                           base["delta_bias"], True, False, initial_state=base["initial_state"], seq_idx=seq)
    close(r, want, 1e-12, 1e-12)


def test_seq_idx_bad_input_and_softplus_none():
    t = problem(2, 8, 6, 3)
    run = lambda **kw: ck.selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], **kw)
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        run(seq_idx=torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_idx must be int32 or int64"):
        run(seq_idx=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="non-decreasing"):
        run(seq_idx=torch.tensor([[0, 0, 1, 0, 1, 1], [0] * 6]))
    torch.testing.assert_close(run(delta_softplus=None), run(delta_softplus=False))
    same = run(seq_idx=torch.zeros(2, 6, dtype=torch.int64))  # one sequence per row: no reset
    torch.testing.assert_close(same, run())
