"""ssd_scan (Mamba-2 / SSD): every backend against the fp64 step-by-step reference, every option,
gradients of every input, chaining through initial_states, and bad inputs."""
import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref
from collapsekit.ops import ssd_scan as ssd_mod

from conftest import HAS_CUDA, HAS_TRITON, assert_close, backend_devices

INTERP = HAS_TRITON and not HAS_CUDA


def _small(backend, device):
    return backend == "triton" and device == "cpu"  # the interpreter is slow: tiny shapes


def make(b, l, h, p, g, n, dtype=torch.float64, device="cpu", seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    t = dict(x=r(b, l, h, p), dt=torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.6 - 0.1,
             A=-torch.rand(h, generator=gen, dtype=torch.float64) - 0.1, B=r(b, l, g, n), C=r(b, l, g, n),
             D=r(h, p), z=r(b, l, h, p), dt_bias=0.3 * r(h), initial_states=r(b, h, p, n))
    out = {}
    for k, v in t.items():
        v = v.to(dtype if k in ("x", "B", "C", "z") else (torch.float64 if dtype == torch.float64 else torch.float32))
        out[k] = v.to(device).requires_grad_(grad)
    return out


OPTION_SETS = {
    "plain": dict(),
    "all": dict(D=True, z=True, dt_bias=True, initial_states=True, dt_softplus=True),
    "Dhead": dict(D="head", dt_softplus=True),
    "limit": dict(dt_bias=True, dt_softplus=True, dt_limit=(0.05, 0.4)),
    "collapse": dict(initial_states=True, decay_scale=0.9, state_norm_max=2.0, z=True),
}


def _call(fn, t, opts, **kw):
    args = dict(kw)
    for k in ("D", "z", "dt_bias", "initial_states"):
        if opts.get(k):
            args[k] = t[k][:, 0] if (k == "D" and opts[k] == "head") else t[k]
    for k in ("dt_softplus", "dt_limit", "decay_scale", "state_norm_max"):
        if k in opts:
            args[k] = opts[k]
    return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], **args)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=str)
def test_forward_against_reference(backend, device, opts):
    o = OPTION_SETS[opts]
    shape = (1, 23, 2, 3, 1, 5) if _small(backend, device) else (2, 131, 4, 7, 2, 9)
    cs = 8 if _small(backend, device) else 32
    t = make(*shape, device=device)
    got = _call(ck.ssd_scan, t, o, chunk_size=cs, return_final_states=True, return_state_norms=True, backend=backend)
    want = _call(ref.ssd_scan, {k: v.cpu() for k, v in t.items()}, o, chunk_size=cs, return_final_states=True,
                 return_state_norms=True)
    for a, b_ in zip(got, want):
        assert_close(a, b_, torch.float64)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("chunk_size", [16, 64, 256])
def test_chunk_size_changes_nothing_and_any_length(backend, device, chunk_size):
    l = 37 if _small(backend, device) else 300  # not a multiple of any chunk size
    t = make(1, l, 2, 4, 1, 6, device=device, seed=1)
    o = OPTION_SETS["all"]
    got = _call(ck.ssd_scan, t, o, chunk_size=chunk_size, backend=backend)
    want = _call(ref.ssd_scan, {k: v.cpu() for k, v in t.items()}, o, chunk_size=chunk_size)
    assert_close(got, want, torch.float64)
    if chunk_size != 16:
        other = _call(ck.ssd_scan, t, o, chunk_size=16, backend=backend)
        assert_close(got, other, torch.float64)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_half_and_single_precision(backend, device, dtype):
    if _small(backend, device) and dtype == torch.bfloat16:
        pytest.skip("interpreter: no bf16")
    shape = (1, 19, 2, 4, 1, 8) if _small(backend, device) else (2, 97, 4, 16, 2, 32)
    t = make(*shape, dtype=dtype, device=device, seed=2)
    o = OPTION_SETS["all"]
    out, fin = _call(ck.ssd_scan, t, o, chunk_size=16, return_final_states=True, backend=backend)
    assert out.dtype == dtype and fin.dtype == torch.float32
    want, wfin = _call(ref.ssd_scan, {k: v.cpu() for k, v in t.items()}, o, chunk_size=16, return_final_states=True)
    # inputs are the same rounded values; the state accumulates in fp32, the output is rounded
    scale = float(want.abs().max())
    assert_close(out, want, dtype, scale=scale)
    assert_close(fin, wfin, torch.float32, scale=10 * float(wfin.abs().max()))


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("opts", ["all", "limit", "collapse", "Dhead"], ids=str)
def test_gradients_against_reference(backend, device, opts, monkeypatch):
    o = OPTION_SETS[opts]
    shape = (1, 21, 2, 3, 1, 4) if _small(backend, device) else (2, 75, 4, 5, 2, 6)
    t = make(*shape, device=device, seed=3, grad=True)
    tr = {k: v.detach().cpu().requires_grad_() for k, v in t.items()}
    cs = 8  # several chunks: the backward restarts from checkpoints (and state_norm_max acts)
    out, fin = _call(ck.ssd_scan, t, o, chunk_size=cs, return_final_states=True, backend=backend)
    wout, wfin = _call(ref.ssd_scan, tr, o, chunk_size=cs, return_final_states=True)
    gen = torch.Generator().manual_seed(4)
    go = torch.randn(wout.shape, generator=gen, dtype=torch.float64)
    gf = torch.randn(wfin.shape, generator=gen, dtype=torch.float64)
    names = [k for k in t if k in ("x", "dt", "A", "B", "C") or o.get(k)]
    got = torch.autograd.grad([out, fin], [t[k] for k in names], [go.to(device), gf.to(device)])
    want = torch.autograd.grad([wout, wfin], [tr[k] for k in names], [go, gf])
    for k, a, b_ in zip(names, got, want):
        if k == "D" and o.get("D") == "head":
            continue  # D was passed as t["D"][:, 0]: both grads are w.r.t. the full tensor's column
        assert_close(a, b_, torch.float64, scale=max(1.0, float(b_.abs().max())))


def test_gradcheck_cpp():
    t = make(1, 9, 2, 2, 1, 3, seed=5, grad=True)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]

    def f(*args):
        kw = dict(zip(names, args))
        out, fin = ck.ssd_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"],
                               dt_bias=kw["dt_bias"], initial_states=kw["initial_states"], dt_softplus=True,
                               chunk_size=4, state_norm_max=1.5, decay_scale=0.95, return_final_states=True,
                               backend="cpp")
        return out, fin

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in names))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_chained_calls_equal_one_call(backend, device):
    l = 20 if _small(backend, device) else 200
    t = make(2, l, 2, 3, 1, 4, device=device, seed=6)
    o = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    whole, fin = ck.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=8, return_final_states=True,
                             backend=backend, **o)
    cut = 13  # not a chunk boundary
    s = lambda v, a, b_: v[:, a:b_]
    first, mid = ck.ssd_scan(s(t["x"], 0, cut), s(t["dt"], 0, cut), t["A"], s(t["B"], 0, cut), s(t["C"], 0, cut),
                             chunk_size=8, return_final_states=True, backend=backend,
                             **{**o, "z": s(t["z"], 0, cut)})
    second, fin2 = ck.ssd_scan(s(t["x"], cut, l), s(t["dt"], cut, l), t["A"], s(t["B"], cut, l), s(t["C"], cut, l),
                               chunk_size=8, initial_states=mid, return_final_states=True, backend=backend,
                               **{**o, "z": s(t["z"], cut, l)})
    assert_close(torch.cat([first, second], 1), whole, torch.float64)
    assert_close(fin2, fin, torch.float64)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_state_norms_collapse_options_strides_and_empty(backend, device):
    t = make(1, 40, 2, 3, 1, 4, device=device, seed=7)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    plain = ck.ssd_scan(x, dt, A, B, C, chunk_size=8, return_state_norms=True, backend=backend)[1]
    forget = ck.ssd_scan(x, dt, A, B, C, chunk_size=8, decay_scale=0.5, return_state_norms=True, backend=backend)[1]
    clipped = ck.ssd_scan(x, dt, A, B, C, chunk_size=8, state_norm_max=0.5, return_state_norms=True,
                          backend=backend)[1]
    assert plain.shape == (1, 40, 2) and bool((forget[:, 5:] < plain[:, 5:]).all())
    # the first chunk is untouched; later the rescaled state keeps the norms well below the plain run's
    assert float(clipped[:, 0:8].sub(plain[:, 0:8]).abs().max()) < 1e-12
    assert float(plain[:, 7::8].min()) > 0.6  # so τ = 0.5 is active at every boundary
    assert bool((clipped[:, 8::8] < plain[:, 8::8]).all())
    # non-contiguous inputs (strided views of larger tensors)
    xs = torch.cat([x, x], 3)[..., ::2]
    Bs = B.transpose(1, 2).contiguous().transpose(1, 2)
    dts = torch.cat([dt, dt], 2)[..., ::2]
    got = ck.ssd_scan(xs, dts, A, Bs, C, chunk_size=8, backend=backend)
    want = ref.ssd_scan(xs.cpu(), dts.cpu(), A.cpu(), Bs.cpu(), C.cpu(), chunk_size=8)
    assert_close(got, want, torch.float64)
    # empty sequence: the final state is the initial state; no steps, no norms
    out, fin, nrm = ck.ssd_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], initial_states=t["initial_states"],
                                return_final_states=True, return_state_norms=True, backend=backend)
    assert out.shape == (1, 0, 2, 3) and nrm.shape == (1, 0, 2)
    assert torch.equal(fin.cpu(), t["initial_states"].cpu())
    assert ck.ssd_scan(x[:0], dt[:0], A, B[:0], C[:0], backend=backend).shape == (0, 40, 2, 3)


def test_opcheck_and_compile():
    t = make(1, 12, 2, 3, 1, 4, seed=8, grad=True)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], t["initial_states"], 4, True,
            0.0, float("inf"), False, 0.9, 1.5, True, True, 2)
    torch.library.opcheck(ssd_mod._ssd_scan_cpp, args)
    torch._dynamo.reset()
    f = lambda x, dt, A, B, C: ck.ssd_scan(x, dt, A, B, C, chunk_size=4, dt_softplus=True).sum()
    fl = [t[k].detach().float() for k in ("x", "dt", "A", "B", "C")]
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*fl), f(*fl))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    t = make(1, 10, 2, 3, 1, 4, seed=9, device=device, grad=True)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], None, None, None, 4, False, 0.0, float("inf"), False,
            1.0, 0.0, True, False, 0)
    kwargs = {} if HAS_CUDA else dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ssd_mod._ssd_scan_triton, args, **kwargs)


def test_bad_input():
    t = make(2, 10, 4, 3, 2, 5, seed=10)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    cases = [
        (lambda: ck.ssd_scan(x[0], dt, A, B, C), ValueError, "x must be 4-D"),
        (lambda: ck.ssd_scan(x, dt[:, :5], A, B, C), ValueError, r"dt must be \(batch, seqlen, nheads\)"),
        (lambda: ck.ssd_scan(x, dt, A[:3], B, C), ValueError, r"A must be \(nheads,\)"),
        (lambda: ck.ssd_scan(x, dt, torch.complex(A, A), B, C), TypeError, "complex A is not supported"),
        (lambda: ck.ssd_scan(x, dt, A, B[:, :, :, :4], C), ValueError, "C must have B's shape"),
        (lambda: ck.ssd_scan(x, dt, A, B[:1], C[:1]), ValueError, "batch=2"),
        (lambda: ck.ssd_scan(x, dt, A, torch.cat([B, B[:, :, :1]], 2), torch.cat([C, C[:, :, :1]], 2)), ValueError,
         "ngroups=3 .* must divide nheads=4"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, D=torch.zeros(4, 2)), ValueError, "D must be"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, z=x[:, :5]), ValueError, "z must have x's shape"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, dt_bias=torch.zeros(3)), ValueError, "dt_bias must be"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, initial_states=torch.zeros(2, 4, 3, 4)), ValueError,
         "initial_states must be"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, dt_limit=(1.0, 0.5)), ValueError, "dt_limit must be"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, decay_scale=0.0), ValueError, "decay_scale must be"),
        (lambda: ck.ssd_scan(x, dt, A, B, C, state_norm_max=-1.0), ValueError, "state_norm_max must be"),
        (lambda: ck.ssd_scan(x.long(), dt, A, B, C), TypeError, "x must be float"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    if INTERP:  # the recurrent Triton kernel holds a (p, n) state in registers; the chunked one tiles it
        big = make(1, 2, 1, 200, 1, 100)
        with pytest.raises(ValueError, match="need next_pow2"):
            ck.ssd_scan(big["x"], big["dt"], big["A"], big["B"], big["C"], backend="triton", path="recurrent")


def test_state_collapse_example_runs_and_shows_the_mitigations():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "state_collapse.py"
    spec = importlib.util.spec_from_file_location("state_collapse", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    norms = mod.run(length=1500, train_length=300, decay_scale=0.99, state_norm_max=1.0, chunk_size=64)
    plain, forget, capped, windowed = norms.values()
    assert plain.shape == (1500, 8)
    # the slowest-forgetting head keeps growing past the training length without a mitigation
    slow = int(plain[-1].argmax())
    assert float(plain[300:, slow].max()) > 1.2 * float(plain[:300, slow].max())
    assert float(forget[300:].max()) < float(plain[300:].max())
    # right after each chunk boundary the capped state is at most τ, grown by one step
    assert float(capped[64::64].max()) < float(plain[64::64].max())
    # the window (= the training length) keeps the slow head within what it reached while training
    torch.testing.assert_close(windowed[:300], plain[:300], rtol=1e-4, atol=1e-5)  # the window holds everything
    assert float(windowed[300:, slow].max()) < 1.05 * float(plain[:300, slow].max())


@pytest.mark.parametrize("backend,device", backend_devices())
def test_dt_limit_always_clamps_and_chunk_size_positional(backend, device):
    # mamba-ssm parity: the default (0, inf) clamps a negative dt + dt_bias to 0, gradient 0 there
    t = make(1, 12 if _small(backend, device) else 20, 2, 3, 1, 4, device=device, seed=11, grad=True)
    dt = (t["dt"].detach() - 0.3).requires_grad_()  # about half the steps negative
    assert bool((dt < 0).any())
    out = ck.ssd_scan(t["x"], dt, t["A"], t["B"], t["C"], 8, backend=backend)  # chunk_size positional
    want = ref.ssd_scan(t["x"].cpu(), dt.cpu().clamp_min(0.0), t["A"].cpu(), t["B"].cpu(), t["C"].cpu(), 8)
    assert_close(out, want, torch.float64)
    (g,) = torch.autograd.grad(out.sum(), [dt])
    assert bool((g[dt < 0] == 0).all()) and bool((g[dt > 0] != 0).any())
    assert_close(ck.ssd_scan(t["x"], dt, t["A"], t["B"], t["C"], chunk_size=8, backend=backend), out, torch.float64)


# shapes for the two cpp forward paths: odd l, l < chunk, l not a multiple of the chunk, groups,
# headdim / dstate around the vector widths (16 fp32 lanes, 4-row register blocks)
PATH_SHAPES = [(2, 131, 4, 7, 2, 9, 32), (1, 45, 3, 37, 1, 40, 16), (1, 11, 2, 17, 1, 33, 16), (1, 70, 4, 64, 2, 20, 64)]


_REF_CACHE = {}


def _ref_cached(i, opts):
    # the fp64 step loop is the slow part of these tests: computed once per shape and option set
    if (i, opts) not in _REF_CACHE:
        b, l, h, p, g, n, cs = PATH_SHAPES[i]
        t = make(b, l, h, p, g, n, seed=20 + i)
        _REF_CACHE[i, opts] = (t, _call(ref.ssd_scan, t, OPTION_SETS[opts], chunk_size=cs, return_final_states=True))
    return _REF_CACHE[i, opts]


@pytest.mark.parametrize("path", ["chunked", "recurrent"])
def test_cpp_paths_each_isa(cpu_isa, path):
    for i, (b, l, h, p, g, n, cs) in enumerate(PATH_SHAPES):
        for opts in ("all", "collapse", "Dhead", "plain"):
            t, want = _ref_cached(i, opts)
            got = _call(ck.ssd_scan, t, OPTION_SETS[opts], chunk_size=cs, return_final_states=True, backend="cpp",
                        path=path)
            for a, b_ in zip(got, want):
                assert_close(a, b_, torch.float64)
        # fp32, strided B (not unit-stride rows: the chunked path converts them)
        t = make(b, l, h, p, g, n, dtype=torch.float32, seed=30 + i)
        Bs = t["B"].transpose(1, 3).contiguous().transpose(1, 3)
        got = ck.ssd_scan(t["x"], t["dt"], t["A"], Bs, t["C"], cs, D=t["D"], backend="cpp", path=path)
        want = ref.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], cs, D=t["D"])
        assert_close(got, want, torch.float32, scale=float(want.abs().max()))


@pytest.mark.parametrize("path", ["chunked", "recurrent"])
def test_cpp_path_gradients_and_gradcheck(path):
    # both backward algorithms run from the same checkpoints (the states entering every chunk)
    o = OPTION_SETS["collapse"]
    t = make(1, 50, 4, 9, 2, 10, seed=40, grad=True)
    tr = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    out, fin = _call(ck.ssd_scan, t, o, chunk_size=16, return_final_states=True, backend="cpp", path=path)
    wout, wfin = _call(ref.ssd_scan, tr, o, chunk_size=16, return_final_states=True)
    names = ["x", "dt", "A", "B", "C", "z", "initial_states"]
    gen = torch.Generator().manual_seed(41)
    go, gf = torch.randn(wout.shape, generator=gen, dtype=torch.float64), torch.randn(wfin.shape, generator=gen,
                                                                                          dtype=torch.float64)
    got = torch.autograd.grad([out, fin], [t[k] for k in names], [go, gf])
    want = torch.autograd.grad([wout, wfin], [tr[k] for k in names], [go, gf])
    for a, b_ in zip(got, want):
        assert_close(a, b_, torch.float64, scale=max(1.0, float(b_.abs().max())))
    s = make(1, 7, 2, 2, 1, 3, seed=42, grad=True)
    f = lambda dt, A, B, C: ck.ssd_scan(s["x"], dt, A, B, C, 3, D=s["D"], dt_softplus=True, backend="cpp",
                                         path=path, state_norm_max=1.0)
    assert torch.autograd.gradcheck(f, tuple(s[k] for k in ("dt", "A", "B", "C")))


def test_path_argument_and_auto_rule():
    t = make(1, 10, 2, 3, 1, 4, seed=43)
    with pytest.raises(ValueError, match="path for the cpp backend must be one of"):
        ck.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], backend="cpp", path="fast")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="path for the triton backend"):
            ck.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], backend="triton", path="fast")
    C_ = ck._dispatch.cpp()
    a = C_.SsdArgs()
    a.l, a.p, a.n, a.chunk_size = 2048, 64, 128, 64
    assert C_.choose_ssd_path(a, False) == 2 and C_.choose_ssd_path(a, True) == 1  # norms: recurrence
    a.l = 100
    assert C_.choose_ssd_path(a, False) == 1  # short sequences (decode-like): recurrence


@pytest.mark.parametrize("backend,device", backend_devices())
def test_window_against_reference(backend, device):
    # W = 1, < chunk, = chunk, > chunk, l − 1 and >= l (the window covers everything: the plain scan)
    small = _small(backend, device)
    l = 19 if small else 45
    t = make(1, l, 4, 3, 2, 5, device=device, seed=50)
    paths = ["chunked", "recurrent"] if backend == "cpp" else ["auto"]
    for W in ((11,) if small else (1, 5, 8, 13, l - 1, l + 3)):
        kw = dict(D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, decay_scale=0.97, window=W,
                  return_final_states=True, return_state_norms=True)
        want = ref.ssd_scan(*(t[k].cpu() for k in ("x", "dt", "A", "B", "C")), 8,
                            **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
        for path in paths:
            got = ck.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, backend=backend, path=path, **kw)
            for a, b_ in zip(got, want):
                assert_close(a, b_, torch.float64)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_window_gradients(backend, device):
    small = _small(backend, device)
    t = make(1, 14 if small else 24, 2, 3, 1, 4, device=device, seed=51, grad=True)
    tr = {k: v.detach().cpu().requires_grad_() for k, v in t.items()}
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
    gen = torch.Generator().manual_seed(52)
    for W in ((3,) if small else (3, 11)):
        f = lambda d, **kw: ck.ssd_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], 8, D=d["D"], z=d["z"],
                                        dt_bias=d["dt_bias"], dt_softplus=True, window=W, return_final_states=True,
                                        **kw)
        out, fin = f(t, backend=backend)
        wout, wfin = f(tr, backend="reference")
        go = torch.randn(wout.shape, generator=gen, dtype=torch.float64)
        gf = torch.randn(wfin.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad([out, fin], [t[k] for k in names], [go.to(device), gf.to(device)])
        want = torch.autograd.grad([wout, wfin], [tr[k] for k in names], [go, gf])
        for a, b_ in zip(got, want):
            assert_close(a, b_, torch.float64, scale=max(1.0, float(b_.abs().max())))
    if backend == "cpp":
        s = make(1, 7, 1, 2, 1, 2, seed=53, grad=True)
        g_ = lambda x, dt, C: ck.ssd_scan(x, dt, s["A"], s["B"], C, 4, dt_softplus=True, window=3, backend="cpp",
                                          path="chunked")
        assert torch.autograd.gradcheck(g_, tuple(s[k] for k in ("x", "dt", "C")))


def test_window_bad_input():
    t = make(1, 10, 2, 3, 1, 4, seed=54)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        ck.ssd_scan(x, dt, A, B, C, window=0)
    with pytest.raises(ValueError, match="window cannot be combined with initial_states"):
        ck.ssd_scan(x, dt, A, B, C, window=4, initial_states=t["initial_states"])
    with pytest.raises(ValueError, match="window cannot be combined with state_norm_max"):
        ck.ssd_scan(x, dt, A, B, C, window=4, state_norm_max=1.0)


@pytest.mark.slow
def test_one_million_tokens_forward_with_norms_linear_memory():
    # b=1 h=8 p=64 n=64 over 2^20 tokens (b·l·h·p = 2^29 elements: int64 offsets throughout). The
    # per-step norms come from the recurrence; the plain forward from the chunked path: the two
    # algorithms agree, and neither needs more than the output (+ l/chunk·state) beyond its inputs.
    from collapsekit.benchmarks.measure import peak_extra_bytes

    b, l, h, p, g, n = 1, 1 << 20, 8, 64, 1, 64
    gen = torch.Generator().manual_seed(60)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.1
    A = -torch.rand(h, generator=gen) - 0.05
    B = torch.randn(b, l, g, n, generator=gen) / 8
    C = torch.randn(b, l, g, n, generator=gen) / 8
    res = {}

    def with_norms():
        res["norms"] = ck.ssd_scan(x, dt, A, B, C, return_state_norms=True, return_final_states=True)

    def plain():
        res["plain"] = ck.ssd_scan(x, dt, A, B, C, return_final_states=True)

    out_bytes = x.numel() * 4
    peak_n = peak_extra_bytes(with_norms, torch.device("cpu"))
    out_n, fin_n, norms = res.pop("norms")
    peak_p = peak_extra_bytes(plain, torch.device("cpu"))
    out_p, fin_p = res.pop("plain")
    if peak_n is not None:
        assert peak_n <= 1.5 * out_bytes and peak_p <= 1.5 * out_bytes, (peak_n / out_bytes, peak_p / out_bytes)
    assert norms.shape == (b, l, h) and bool(torch.isfinite(norms).all())
    scale = float(out_n.abs().max())
    for i in (0, l // 3, l - 1):  # a few rows (a full comparison would double the memory)
        torch.testing.assert_close(out_p[:, i], out_n[:, i], rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(fin_p, fin_n, rtol=1e-4, atol=1e-4 * float(fin_n.abs().max()))
    torch.testing.assert_close(norms[:, -1], fin_n.flatten(2).norm(dim=2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_packed_sequences_equal_separate_runs(backend, device):
    small = _small(backend, device)
    l = 23 if small else 70
    t = make(1, l, 2, 3, 1, 4, device=device, seed=70, grad=True)
    cuts = [0, 5, 5, 14, l] if small else [0, 9, 9, 40, l]  # an empty sequence included
    cu = torch.tensor(cuts, dtype=torch.int32, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(len(cuts) - 1, device=device),
                                      torch.tensor([cuts[i + 1] - cuts[i] for i in range(len(cuts) - 1)],
                                                   device=device))[None].int()
    kw = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, state_norm_max=1.5, backend=backend)
    out, fin, vs, nrm = ck.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, z=t["z"],
                                    initial_states=t["initial_states"], seq_idx=seq_idx, cu_seqlens=cu,
                                    return_final_states=True, return_varlen_states=True, return_state_norms=True, **kw)
    assert vs.shape == (len(cuts) - 1, 2, 3, 4)
    sep_out, sep_n = [], []
    for j in range(len(cuts) - 1):
        s0, s1 = cuts[j], cuts[j + 1]
        if s1 == s0:
            assert float(vs[j].abs().max()) == 0.0
            continue
        sl = lambda v: v[:, s0:s1]
        o, f, nn_ = ck.ssd_scan(sl(t["x"]), sl(t["dt"]), t["A"], sl(t["B"]), sl(t["C"]), 8, z=sl(t["z"]),
                                initial_states=t["initial_states"] if j == 0 else None, return_final_states=True,
                                return_state_norms=True, **kw)
        sep_out.append(o)
        sep_n.append(nn_)
        assert_close(vs[j], f[0], torch.float64)
    assert_close(out, torch.cat(sep_out, 1), torch.float64)
    assert_close(nrm, torch.cat(sep_n, 1), torch.float64)
    assert_close(fin[0], vs[-1], torch.float64)
    # against the fp64 reference, gradients included
    tr = {k: v.detach().cpu().requires_grad_() for k, v in t.items()}
    want = ck.ssd_scan(tr["x"], tr["dt"], tr["A"], tr["B"], tr["C"], 8, z=tr["z"], initial_states=tr["initial_states"],
                       seq_idx=seq_idx.cpu(), **{**kw, "D": tr["D"], "dt_bias": tr["dt_bias"], "backend": "reference"})
    assert_close(out, want, torch.float64)
    if small:
        return  # the interpreter is slow; the gradients go through the same composition as for cpp
    names = ["x", "dt", "A", "B", "C", "initial_states"]
    got = torch.autograd.grad(out.sum(), [t[k] for k in names])
    ref_g = torch.autograd.grad(want.sum(), [tr[k] for k in names])
    for a, b_ in zip(got, ref_g):
        assert_close(a, b_, torch.float64, scale=max(1.0, float(b_.abs().max())))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_split_calls_equal_one_call_with_state_norm_max(backend, device):
    # prefill in pieces (not at chunk boundaries), then single decode-like steps, with seq_offset
    l = 18 if _small(backend, device) else 60
    t = make(1 if _small(backend, device) else 2, l, 2, 3, 1, 4, device=device, seed=71)
    kw = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, state_norm_max=1.2, decay_scale=0.98,
              backend=backend, return_final_states=True, return_state_norms=True)
    whole, fin, nrm = ck.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, z=t["z"], **kw)
    cuts = [0, 5, 16, l - 2, l - 1, l]  # positions 5, 16 are not multiples of 8; 16 is
    outs, norms, state = [], [], None
    for s0, s1 in zip(cuts, cuts[1:]):
        sl = lambda v: v[:, s0:s1]
        o, state, nn_ = ck.ssd_scan(sl(t["x"]), sl(t["dt"]), t["A"], sl(t["B"]), sl(t["C"]), 8, z=sl(t["z"]),
                                    initial_states=state, seq_offset=s0, **kw)
        outs.append(o)
        norms.append(nn_)
    assert_close(torch.cat(outs, 1), whole, torch.float64)
    assert_close(torch.cat(norms, 1), nrm, torch.float64)
    assert_close(state, fin, torch.float64)


def test_packed_bad_input():
    t = make(2, 10, 2, 3, 1, 4, seed=72)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    si = torch.zeros(2, 10, dtype=torch.int32)
    bad = si.clone()
    bad[0, 5] = 1
    cases = [
        (dict(seq_idx=si[:, :5]), "seq_idx must be an int32"),
        (dict(seq_idx=si.float()), "seq_idx must be an int32"),
        (dict(seq_idx=bad), "seq_idx must be non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 10])), "cu_seqlens needs batch 1"),
        (dict(return_varlen_states=True), "return_varlen_states needs cu_seqlens"),
        (dict(seq_offset=-1), "seq_offset must be an int >= 0"),
        (dict(seq_offset=3, window=2), "window cannot be combined with seq_offset"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ck.ssd_scan(x, dt, A, B, C, **kw)
    x1, dt1, B1, C1 = x[:1], dt[:1], B[:1], C[:1]
    for cu, msg in ((torch.tensor([0, 4, 9]), "cu_seqlens must be non-decreasing from 0"),
                    (torch.tensor([[0, 10]]), "cu_seqlens must be a 1-D int tensor")):
        with pytest.raises(ValueError, match=msg):
            ck.ssd_scan(x1, dt1, A, B1, C1, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens does not match seq_idx"):
        ck.ssd_scan(x1, dt1, A, B1, C1, cu_seqlens=torch.tensor([0, 4, 10]), seq_idx=si[:1])


def test_window_norms_op_opcheck_and_compile():
    t = make(1, 20, 2, 3, 1, 4, dtype=torch.float32, seed=73)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    torch.library.opcheck(ssd_mod._window_norms_cpp, (x, dt, A, B, C, None, False, 0.0, float("inf"), 1.0, 5),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    f = lambda x, dt, A, B, C: ck.ssd_scan(x, dt, A, B, C, 8, window=5, return_state_norms=True)
    for a, b_ in zip(torch.compile(f, fullgraph=True)(x, dt, A, B, C), f(x, dt, A, B, C)):
        torch.testing.assert_close(a, b_)
