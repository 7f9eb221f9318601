"""selective_state_update (decode step): every backend against the fp64 reference, both forms."""
import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref

from conftest import TOL, backend_devices

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def interp(backend, device):
    return backend == "triton" and device == "cpu"


def mamba2(b=3, h=6, p=5, n=11, g=2, dtype=torch.float32, seed=0, rows=None, expanded=True, device="cpu",
           D=True, z=True, bias=True, state_dtype=None):
    """HF's call: per-head dt/A/D/dt_bias expanded with stride 0 over (p, n) (or full tensors)."""
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = b if rows is None else rows
    t = dict(state=torch.randn(rows, h, p, n, generator=gen).to(state_dtype or dtype),
             x=torch.randn(b, h, p, generator=gen).to(dtype),
             B=torch.randn(b, g, n, generator=gen).to(dtype), C=torch.randn(b, g, n, generator=gen).to(dtype))
    if expanded:
        t["dt"] = (torch.rand(b, h, 1, generator=gen) - 0.5).to(dtype).expand(b, h, p)
        t["A"] = -torch.exp(torch.rand(h, generator=gen)).to(acc)[:, None, None].expand(h, p, n)
        t["D"] = torch.randn(h, generator=gen).to(acc)[:, None].expand(h, p) if D else None
        t["dt_bias"] = torch.rand(h, generator=gen).to(acc)[:, None].expand(h, p) if bias else None
    else:
        t["dt"] = (torch.rand(b, h, p, generator=gen) - 0.5).to(dtype)
        t["A"] = -torch.exp(torch.rand(h, p, n, generator=gen)).to(acc)
        t["D"] = torch.randn(h, p, generator=gen).to(acc) if D else None
        t["dt_bias"] = torch.rand(h, p, generator=gen).to(acc) if bias else None
    t["z"] = torch.randn(b, h, p, generator=gen).to(dtype) if z else None
    return {k: None if v is None else v.to(device) for k, v in t.items()}


def mamba1(b=3, dim=13, n=7, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = dict(state=torch.randn(b, dim, n, generator=gen).to(dtype), x=torch.randn(b, dim, generator=gen).to(dtype),
             dt=(torch.rand(b, dim, generator=gen) - 0.5).to(dtype),
             A=-torch.exp(torch.rand(dim, n, generator=gen)).to(acc),
             B=torch.randn(b, n, generator=gen).to(dtype), C=torch.randn(b, n, generator=gen).to(dtype),
             D=torch.randn(dim, generator=gen).to(acc), z=torch.randn(b, dim, generator=gen).to(dtype),
             dt_bias=torch.rand(dim, generator=gen).to(acc))
    return {k: v.to(device) for k, v in t.items()}


def run(t, backend, softplus=True, **kw):
    return ck.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                     t["dt_bias"], softplus, backend=backend, **kw)


def expect(t, softplus=True, **kw):
    st = t["state"].clone()
    out = ref.selective_state_update(st, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                                     softplus, **kw)
    return out, st


def check(t, backend, dtype, softplus=True, **kw):
    e_out, e_state = expect(t, softplus, **kw)
    out = run(t, backend, softplus, **kw)
    assert out.dtype == t["x"].dtype and out.shape == t["x"].shape
    tol = TOL[dtype] if dtype != torch.bfloat16 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.double().cpu(), e_out.double().cpu(), **tol)
    torch.testing.assert_close(t["state"].double().cpu(), e_state.double().cpu(), **tol)


@pytest.mark.parametrize("backend,device", backend_devices() + [("auto", "cpu")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("expanded", [True, False])
def test_mamba2_matches_reference(backend, device, dtype, expanded):
    if interp(backend, device) and dtype == torch.bfloat16:
        pytest.skip("no bf16 arithmetic in the Triton interpreter")
    t = mamba2(dtype=dtype, expanded=expanded, device=device)
    check(t, backend, dtype)


@pytest.mark.parametrize("backend,device", backend_devices() + [("auto", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_mamba1_matches_reference(backend, device, dtype):
    t = mamba1(dtype=dtype, device=device)
    check(t, backend, dtype)
    check(mamba1(dtype=dtype, device=device, seed=1), backend, dtype, softplus=False)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_options(backend, device, cpu_isa):
    # no D / z / dt_bias, decay_scale, fp32 state with fp16 inputs, dstate above 16 lanes with a tail
    t = mamba2(n=37, D=False, z=False, bias=False, device=device)
    check(t, backend, torch.float32, softplus=False, decay_scale=0.9)
    t = mamba2(dtype=torch.float16, state_dtype=torch.float32, device=device)
    check(t, backend, torch.float16)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_state_batch_indices(backend, device):
    t = mamba2(b=4, rows=9, device=device)
    idx = torch.tensor([7, 0, -1, 3], dtype=torch.int32, device=device)
    untouched = [r for r in range(9) if r not in (7, 0, 3)]
    before = t["state"][untouched].clone()
    check(t, backend, torch.float32, state_batch_indices=idx)
    assert torch.equal(t["state"][untouched], before)  # incl. nothing written for the pad row
    # int64 indices and a custom pad id
    t = mamba2(b=3, rows=5, device=device)
    check(t, backend, torch.float32, state_batch_indices=torch.tensor([4, 99, 1], device=device), pad_slot_id=99)


@pytest.mark.parametrize("backend,device", backend_devices() + [("auto", "cpu")])
def test_out_of_range_index_never_writes(backend, device):
    t = mamba2(b=3, rows=4, device=device)
    before = t["state"].clone()
    for bad in ([0, 4, 1], [0, -2, 1]):
        with pytest.raises(ValueError, match=r"state_batch_indices\[1\] = -?\d+ is outside \[0, 4\)"):
            run(t, backend, state_batch_indices=torch.tensor(bad, device=device))
    assert torch.equal(t["state"], before)


def test_registered_op_direct_call_checks_shapes():
    t = mamba2()
    with pytest.raises(ValueError, match="A must have shape"):
        torch.ops.collapsekit.selective_state_update_cpp(t["state"], t["x"], t["dt"], t["A"][:, :2], t["B"],
                                                         t["C"], None, None, None, None, -1, True, 1.0)
    out = torch.ops.collapsekit.selective_state_update_cpp(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"],
                                                           None, None, None, None, -1, True, 1.0)
    assert out.shape == t["x"].shape


def test_strided_and_empty():
    t = mamba2(b=2, h=4, p=6, n=9)
    big = torch.randn(2, 4, 6, 20)
    t["state"] = big[..., ::2][..., :9]  # stride 2 over n
    t["x"] = torch.randn(2, 6, 4).transpose(1, 2)
    check(t, "cpp", torch.float32)
    e = mamba2(b=0)
    assert run(e, "cpp").shape == (0, 6, 5)
    e = mamba2(n=0)
    out = run(e, "cpp")
    torch.testing.assert_close(out, (e["D"] * e["x"]) * torch.nn.functional.silu(e["z"]))


def test_decode_steps_equal_scan():
    """Steps of the decode kernel reproduce ssd_scan / selective_scan over the same sequence."""
    g = torch.Generator().manual_seed(3)
    b, L, h, p, n = 2, 9, 4, 3, 8
    x = torch.randn(b, L, h, p, generator=g)
    dt = torch.rand(b, L, h, generator=g) - 0.5
    A = -torch.rand(h, generator=g) - 0.5
    B, C = torch.randn(b, L, 1, n, generator=g), torch.randn(b, L, 1, n, generator=g)
    Dp, bias = torch.randn(h, generator=g), torch.rand(h, generator=g)
    y, fin = ck.ssd_scan(x, dt, A, B, C, D=Dp, dt_bias=bias, dt_softplus=True, return_final_states=True)
    state = torch.zeros(b, h, p, n)
    for t in range(L):
        out = ck.selective_state_update(state, x[:, t], dt[:, t, :, None].expand(b, h, p),
                                        A[:, None, None].expand(h, p, n), B[:, t], C[:, t],
                                        Dp[:, None].expand(h, p), dt_bias=bias[:, None].expand(h, p),
                                        dt_softplus=True)
        torch.testing.assert_close(out, y[:, t], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, fin, rtol=1e-4, atol=1e-4)
    # Mamba-1
    u, delta = torch.randn(b, 6, L, generator=g), torch.rand(b, 6, L, generator=g) - 0.5
    A1, B1, C1 = -torch.rand(6, n, generator=g) - 0.5, torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    y1, last = ck.selective_scan(u, delta, A1, B1, C1, delta_softplus=True, return_last_state=True)
    s1 = torch.zeros(b, 6, n)
    for t in range(L):
        o = ck.selective_state_update(s1, u[..., t], delta[..., t], A1, B1[..., t], C1[..., t], dt_softplus=True)
        torch.testing.assert_close(o, y1[..., t], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, last, rtol=1e-4, atol=1e-4)


def test_compile_and_opcheck():
    t = mamba2(b=2, h=2, p=3, n=4)
    args = (t["state"], t["x"], t["dt"].contiguous(), t["A"].contiguous(), t["B"], t["C"], None, t["z"], None, None,
            -1, True, 1.0)
    torch.library.opcheck(torch.ops.collapsekit.selective_state_update_cpp, args)

    def f(s, x, dt, A, B, C):
        return ck.selective_state_update(s, x, dt, A, B, C, dt_softplus=True) * 2

    s1, s2 = t["state"].clone(), t["state"].clone()
    want = f(s1, t["x"], t["dt"], t["A"], t["B"], t["C"])
    got = torch.compile(f, fullgraph=True)(s2, t["x"], t["dt"], t["A"], t["B"], t["C"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s2, s1)


def test_bad_inputs():
    t = mamba2()
    with pytest.raises(ValueError, match="state must be"):
        ck.selective_state_update(t["state"][0, 0], t["x"], t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(ValueError, match="x must have shape"):
        ck.selective_state_update(t["state"], t["x"][:, :, :2], t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(ValueError, match="ngroups=4, which must divide nheads=6"):
        ck.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"].repeat(1, 2, 1), t["C"].repeat(1, 2, 1))
    with pytest.raises(ValueError, match="D must have shape"):
        ck.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=torch.ones(6))
    with pytest.raises(ValueError, match="state has 5 rows but the batch is 3"):
        ck.selective_state_update(torch.zeros(5, 6, 5, 11), t["x"], t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(TypeError, match="state must be float16"):
        ck.selective_state_update(t["state"].int(), t["x"], t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(TypeError, match="state_batch_indices must be int32 or int64"):
        ck.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"],
                                  state_batch_indices=torch.zeros(3))
    with pytest.raises(ValueError, match="not differentiable"):
        ck.selective_state_update(t["state"], t["x"].requires_grad_(), t["dt"], t["A"], t["B"], t["C"])
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], backend="nope")
