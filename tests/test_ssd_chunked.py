"""The chunked SSD Triton kernels (kernels/ssd_chunked.py) against the fp64 step-by-step reference.

Runs under the Triton interpreter on CPU (tests/conftest.py), so shapes are tiny: chunk 16 with l
below, equal to and not a multiple of the chunk, 1 and 2 groups, every option, gradients of every
input against torch.autograd through collapsekit.reference.ssd_scan. The GPU compile of the same
kernels is tests/_aot_compile.py (slow suite)."""
import math

import pytest
import torch

from conftest import HAS_CUDA, HAS_TRITON, assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    from collapsekit.kernels import ssd_chunked as K
from collapsekit.reference import ssd_scan as ref_ssd

DEV = "cuda" if HAS_CUDA else "cpu"
INF = float("inf")
GRAD_NAMES = ["x", "z", "dt", "A", "B", "C", "D", "dt_bias", "initial_states"]


def make(b, l, h, g, p, n, dtype, *, seed=0, D=True, z=True, bias=True, init=True, neg_dt=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    dt = (r(b, l, h) if neg_dt else torch.rand(b, l, h, generator=gen) * 0.5 + 0.05)
    t = dict(x=r(b, l, h, p).to(dtype), dt=dt, A=-(torch.rand(h, generator=gen) + 0.2),
             B=(0.5 * r(b, l, g, n)).to(dtype), C=(0.5 * r(b, l, g, n)).to(dtype),
             D=r(h, p) if D else None, z=r(b, l, h, p).to(dtype) if z else None,
             dt_bias=0.1 * r(h) if bias else None, initial_states=r(b, h, p, n) if init else None)
    return {k: (v.to(DEV) if v is not None else None) for k, v in t.items()}


def run_kernel(t, cs, softplus, dt_min, dt_max, lam, tau, save=True):
    return K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], t["initial_states"], cs,
                     softplus, dt_min, dt_max, lam, tau, save)


def run_ref(t, cs, softplus, dt_min, dt_max, lam, tau, grads=False):
    """fp64 reference from the same (rounded) input values; the explicit dt_limit always clamps
    (the reference skips the clamp only at the default limit, where positive dt makes it a no-op)."""
    d = {k: (v.detach().double().requires_grad_(grads) if v is not None else None) for k, v in t.items()}
    out, fin = ref_ssd(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=cs, D=d["D"], z=d["z"],
                       dt_bias=d["dt_bias"], initial_states=d["initial_states"], dt_softplus=softplus,
                       dt_limit=(dt_min, dt_max), return_final_states=True, decay_scale=lam,
                       state_norm_max=tau if tau > 0 else None)
    return out, fin, d


def close(actual, expected, dtype, what, scale=1.0):
    """conftest.assert_close (relative to the result's magnitude) with the quantity named."""
    try:
        assert_close(actual, expected.detach(), dtype, scale)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def check(b, l, h, g, p, n, dtype, cs=16, softplus=True, dt_min=0.0, dt_max=INF, lam=1.0, tau=0.0, grads=True,
          slack=1.0, use_gfinal=True, **opts):
    t = make(b, l, h, g, p, n, dtype, **opts)
    out, fin, saved = run_kernel(t, cs, softplus, dt_min, dt_max, lam, tau, save=grads)
    rout, rfin, d = run_ref(t, cs, softplus, dt_min, dt_max, lam, tau, grads)
    assert out.dtype == t["x"].dtype and out.shape == t["x"].shape
    close(out, rout, dtype, "out", slack)
    close(fin, rfin, dtype, "final", slack)  # half inputs: the B weights are rounded to the input dtype
    if not grads:
        return
    gen = torch.Generator().manual_seed(1)
    gout = torch.randn(rout.shape, generator=gen, dtype=torch.float64).to(rout.device)
    gfin = (torch.randn(rfin.shape, generator=gen, dtype=torch.float64) if use_gfinal
            else torch.zeros(rfin.shape, dtype=torch.float64)).to(rfin.device)
    ((rout * gout).sum() + (rfin * gfin).sum()).backward()
    got = K.backward(gout.to(dtype).to(DEV), gfin.float().to(DEV) if use_gfinal else None, t["x"], t["dt"], t["A"],
                     t["B"], t["C"], t["D"], t["z"], t["dt_bias"], t["initial_states"], saved, cs, softplus, dt_min,
                     dt_max, lam, tau)
    for name, gk in zip(GRAD_NAMES, got):
        if t[name] is None:
            assert gk is None, name
            continue
        assert gk.shape == t[name].shape, name
        # dA and d dt_bias sum over b·l terms of alternating sign: scale by the number of terms
        s = slack * (math.sqrt(b * l) if name in ("A", "dt_bias") else 1.0)
        close(gk, d[name].grad, dtype, "grad " + name, s)


# ------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("l", [1, 13, 16, 40, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_every_option(l, dtype):
    """D, z, dt_bias, softplus, initial and final states, λ and τ together; l < chunk, = chunk,
    not a multiple of it; two groups of one head each."""
    check(1, l, 2, 2, 8, 16, dtype, lam=0.97, tau=2.0, grads=False, slack=2.0)


@pytest.mark.parametrize("g", [1, 2])
def test_forward_plain_groups(g):
    """No optional input at all; four heads sharing B/C in 1 or 2 groups."""
    check(2, 40, 4, g, 8, 16, torch.float32, softplus=False, grads=False, D=False, z=False, bias=False, init=False)


def test_forward_state_norm_max_acts():
    """τ below the state norms: the result differs from τ = off and matches the reference."""
    t = make(1, 50, 2, 1, 8, 16, torch.float32)
    a = run_kernel(t, 16, True, 0.0, INF, 1.0, 0.5, save=False)[0]
    b = run_kernel(t, 16, True, 0.0, INF, 1.0, 0.0, save=False)[0]
    assert (a - b).abs().max() > 0.1
    close(a, run_ref(t, 16, True, 0.0, INF, 1.0, 0.5)[0], torch.float32, "out")


def test_forward_strided_inputs():
    """Non-contiguous x/z (a transposed buffer) and stride-0 B/C (one group expanded over batch)."""
    t = make(2, 24, 2, 1, 8, 16, torch.float32)
    t["x"] = t["x"].transpose(2, 3).contiguous().transpose(2, 3)
    t["z"] = t["z"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    t["B"] = t["B"][:1].expand_as(t["B"])
    t["C"] = t["C"][:, :, :, :].flip(0)
    t["dt"] = t["dt"].transpose(0, 1).contiguous().transpose(0, 1)
    out, fin, _ = run_kernel(t, 16, True, 0.0, INF, 1.0, 0.0, save=False)
    rout, rfin, _ = run_ref(t, 16, True, 0.0, INF, 1.0, 0.0)
    close(out, rout, torch.float32, "out")
    close(fin, rfin, torch.float32, "final")


def test_empty():
    """l = 0 returns the initial state as the final state and its gradient as gfinal; b = 0 works."""
    t = make(2, 0, 2, 1, 8, 16, torch.float32)
    out, fin, saved = run_kernel(t, 16, True, 0.0, INF, 1.0, 0.0)
    assert out.shape == (2, 0, 2, 8)
    torch.testing.assert_close(fin, t["initial_states"])
    gf = torch.randn_like(fin)
    got = K.backward(None, gf, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                     t["initial_states"], saved, 16, True, 0.0, INF, 1.0, 0.0)
    torch.testing.assert_close(got[-1], gf)
    assert float(got[3].abs().sum()) == 0.0
    t = make(0, 5, 2, 1, 8, 16, torch.float32)
    out, fin, _ = run_kernel(t, 16, True, 0.0, INF, 1.0, 0.0)
    assert out.shape == (0, 5, 2, 8) and fin.shape == (0, 2, 8, 16)


# ----------------------------------------------------------------------------------- backward

def test_backward_every_option_fp32():
    """Every input's gradient, with λ and an active τ (the clip's backward at each boundary)."""
    check(2, 45, 4, 2, 8, 16, torch.float32, lam=0.97, tau=2.0)


def test_backward_plain_one_group():
    """No optional input, and no gradient at the final state (gfinal None)."""
    check(1, 13, 2, 1, 8, 16, torch.float32, softplus=False, D=False, z=False, bias=False, init=False,
          use_gfinal=False)
    check(1, 21, 2, 1, 8, 16, torch.float32, tau=1.0, use_gfinal=False)


def test_backward_fp16():
    check(1, 40, 2, 1, 8, 16, torch.float16, lam=0.95, tau=3.0, slack=4.0)


def test_dt_limit_clamps():
    """dt_limit always clamps: with (0, inf) and no softplus a negative dt + dt_bias gives Δ = 0 and
    no gradient; an explicit (0.02, 0.3) clamps both ways."""
    check(1, 40, 2, 1, 8, 16, torch.float32, softplus=False, neg_dt=True, dt_min=0.0, dt_max=1e30)
    check(1, 21, 2, 1, 8, 16, torch.float32, softplus=True, neg_dt=True, dt_min=0.02, dt_max=0.3)
    t = make(1, 16, 2, 1, 8, 16, torch.float32, neg_dt=True)
    a = run_kernel(t, 16, False, 0.0, INF, 1.0, 0.0, save=False)[0]
    t2 = dict(t, dt=t["dt"].clamp_min(-t["dt_bias"].max().item() - 1.0))  # more negative values: no change
    t2["dt"] = torch.where(t["dt"] + t["dt_bias"] < 0, t["dt"] - 5.0, t["dt"])
    torch.testing.assert_close(run_kernel(t2, 16, False, 0.0, INF, 1.0, 0.0, save=False)[0], a)


def test_tiled_chunk(monkeypatch):
    """A chunk larger than the tiles (chunk 40 = 3 tiles of 16 rows, the last one partial, and
    p = 20, n = 24 in 2 tiles): the multi-tile paths of every kernel, forward and backward,
    and a state split over several blocks in the state passing."""
    small = {k: {kk: (16 if kk.startswith("BLOCK") else vv) for kk, vv in v.items()} for k, v in K.TILES.items()}
    small["state_passing"]["BLOCK"] = 256
    monkeypatch.setattr(K, "TILES", small)
    check(1, 45, 2, 1, 20, 24, torch.float32, cs=40, lam=0.98, tau=0.0)


def test_tiled_chunk_state_norm_max(monkeypatch):
    small = dict(K.TILES)
    small["state_passing"] = dict(small["state_passing"], BLOCK=64)
    monkeypatch.setattr(K, "TILES", small)
    check(1, 45, 2, 2, 8, 24, torch.float32, cs=16, tau=1.5)


# ------------------------------------------------------------------------------------ seq_idx

def ref_packed(d, seq, softplus, dt_min, dt_max, lam):
    """Packed rows as separate sequences through the reference: each run of equal seq_idx starts
    from zero, except a row's first run, which starts from initial_states. Returns (out, final of
    each row's last run)."""
    outs, fins = [], []
    for bi in range(seq.shape[0]):
        s = seq[bi].tolist()
        starts = [0] + [t for t in range(1, len(s)) if s[t] != s[t - 1]] + [len(s)]
        row = []
        for a, e in zip(starts[:-1], starts[1:]):
            sl = lambda v: v[bi:bi + 1, a:e] if v is not None else None
            init = d["initial_states"][bi:bi + 1] if (a == 0 and d["initial_states"] is not None) else None
            o, f = ref_ssd(sl(d["x"]), sl(d["dt"]), d["A"], sl(d["B"]), sl(d["C"]), D=d["D"], z=sl(d["z"]),
                           dt_bias=d["dt_bias"], initial_states=init, dt_softplus=softplus, dt_limit=(dt_min, dt_max),
                           return_final_states=True, decay_scale=lam)
            row.append(o)
        outs.append(torch.cat(row, 1))
        fins.append(f)
    return torch.cat(outs, 0), torch.cat(fins, 0)


def test_seq_idx_forward_backward():
    """Resets inside a chunk, exactly at a chunk start, and a sequence wholly inside one chunk;
    initial_states belong to each row's first sequence; every gradient."""
    b, l, h, g, p, n, cs = 2, 45, 2, 1, 8, 16, 16
    t = make(b, l, h, g, p, n, torch.float32)
    seq = torch.tensor([[0] * 5 + [1] * 20 + [2] * 20, [3] * 32 + [4] * 13], dtype=torch.int32, device=DEV)
    out, fin, saved = K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                                t["initial_states"], cs, True, 0.0, INF, 0.98, 0.0, True, seq_idx=seq)
    d = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    rout, rfin = ref_packed(d, seq.cpu(), True, 0.0, INF, 0.98)
    close(out, rout, torch.float32, "out")
    close(fin, rfin, torch.float32, "final")
    gen = torch.Generator().manual_seed(1)
    gout = torch.randn(rout.shape, generator=gen, dtype=torch.float64).to(rout.device)
    gfin = torch.randn(rfin.shape, generator=gen, dtype=torch.float64).to(rfin.device)
    ((rout * gout).sum() + (rfin * gfin).sum()).backward()
    got = K.backward(gout.float().to(DEV), gfin.float().to(DEV), t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"],
                     t["z"], t["dt_bias"], t["initial_states"], saved, cs, True, 0.0, INF, 0.98, 0.0)
    for name, gk in zip(GRAD_NAMES, got):
        close(gk, d[name].grad, torch.float32, "grad " + name, math.sqrt(b * l) if name in ("A", "dt_bias") else 1.0)


def test_seq_idx_with_state_norm_max_raises():
    t = make(1, 8, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="state_norm_max"):
        K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], None, None, None, None, 4, True, 0.0, INF, 1.0, 1.0,
                  False, seq_idx=torch.zeros(1, 8, dtype=torch.int32, device=DEV))


# ------------------------------------------------------------------------------------- window

def ref_window(d, W, softplus, dt_min, dt_max, lam, seq=None):
    """fp64 banded form, literally: y_t = C_t·Σ_{s=t−W+1..t} (Π_{r=s+1..t} a_r) Δ_s x_s B_sᵀ + D x_t
    (only s of t's sequence with seq_idx); the final state is the same window at the last step."""
    x, B, C = d["x"], d["B"], d["C"]
    b, l, h, p = x.shape
    hpg = h // B.shape[2]
    dtv = d["dt"] + (d["dt_bias"] if d["dt_bias"] is not None else 0.0)
    if softplus:
        dtv = torch.nn.functional.softplus(dtv)
    dtv = dtv.clamp(dt_min, dt_max)
    G = torch.cumsum(math.log(lam) + dtv * d["A"], dim=1).transpose(1, 2)          # (b, h, l)
    tt = torch.arange(l, device=x.device)
    band = (tt[None, :] <= tt[:, None]) & (tt[:, None] - tt[None, :] < W)          # [t, s]
    band = band[None, None].expand(b, h, l, l)
    if seq is not None:
        seq = seq.to(x.device)
        band = band & (seq[:, None, :, None] == seq[:, None, None, :])
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~band, -math.inf))
    Bh = B.repeat_interleave(hpg, dim=2)
    Ch = C.repeat_interleave(hpg, dim=2)
    CB = torch.einsum("bthn,bshn->bhts", Ch, Bh)
    y = torch.einsum("bhts,bsh,bshp->bthp", CB * decay, dtv, x)
    if d["D"] is not None:
        y = y + d["D"] * x
    if d["z"] is not None:
        y = y * torch.nn.functional.silu(d["z"])
    final = torch.einsum("bhs,bsh,bshp,bshn->bhpn", decay[:, :, -1], dtv, x, Bh)
    return y, final


def check_window(W, l=45, cs=16, grads=True, seq=None, g=1, lam=0.97, b=2):
    h, p, n = 2, 8, 16
    t = make(b, l, h, g, p, n, torch.float32, init=False)
    out, fin, saved = K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], None, cs, True,
                                0.0, INF, lam, 0.0, grads, seq_idx=seq, window=W)
    d = {k: (v.detach().double().requires_grad_(grads) if v is not None else None) for k, v in t.items()}
    rout, rfin = ref_window(d, W, True, 0.0, INF, lam, seq)
    close(out, rout, torch.float32, "out")
    close(fin, rfin, torch.float32, "final")
    if not grads:
        return
    gen = torch.Generator().manual_seed(1)
    gout = torch.randn(rout.shape, generator=gen, dtype=torch.float64).to(rout.device)
    gfin = torch.randn(rfin.shape, generator=gen, dtype=torch.float64).to(rfin.device)
    ((rout * gout).sum() + (rfin * gfin).sum()).backward()
    got = K.backward(gout.float().to(DEV), gfin.float().to(DEV), t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"],
                     t["z"], t["dt_bias"], None, saved, cs, True, 0.0, INF, lam, 0.0)
    for name, gk in zip(GRAD_NAMES, got):
        if name == "initial_states":
            assert gk is None
            continue
        close(gk, d[name].grad, torch.float32, "grad " + name, math.sqrt(b * l) if name in ("A", "dt_bias") else 1.0)


@pytest.mark.parametrize("W", [1, 16, 37])
def test_window_forward(W):
    """W = 1, W = chunk and W spanning three chunks (l = 45, chunk 16; W inside a chunk: the
    backward tests)."""
    check_window(W, grads=False, b=1)


@pytest.mark.parametrize("W", [5, 23])
def test_window_backward(W):
    check_window(W, g=2 if W == 5 else 1)


def test_window_seq_idx():
    seq = torch.tensor([[0] * 5 + [1] * 20 + [2] * 20, [3] * 32 + [4] * 13], dtype=torch.int32, device=DEV)
    check_window(9, seq=seq)


def test_window_longer_than_sequence_is_the_plain_scan():
    t = make(1, 30, 2, 1, 8, 16, torch.float32, init=False)
    a = K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], None, 16, True, 0.0, INF,
                  0.97, 0.0, False, window=1000)
    r = run_ref(t, 16, True, 0.0, INF, 0.97, 0.0)
    close(a[0], r[0], torch.float32, "out")
    close(a[1], r[1], torch.float32, "final")
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}   # and so is the test's reference
    rw = ref_window(d, 1000, True, 0.0, INF, 0.97)
    torch.testing.assert_close(rw[0], r[0].double(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rw[1], r[1].double(), rtol=1e-9, atol=1e-9)


def test_window_rejects_initial_states_and_bad_w():
    t = make(1, 8, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="initial_states"):
        K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], None, None, None, t["initial_states"], 4, True, 0.0, INF,
                  1.0, 0.0, False, window=3)
    with pytest.raises(ValueError, match="window"):
        K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], None, None, None, None, 4, True, 0.0, INF, 1.0, 0.0, False,
                  window=0)


def test_tiny_chunks():
    """chunk_size 1 (τ acts before every step) and 3 (not a power of two), chunked and windowed."""
    check(1, 4, 2, 1, 8, 16, torch.float32, cs=1, tau=0.8, lam=0.9)
    check(1, 7, 2, 1, 8, 16, torch.float32, cs=3, tau=0.8, lam=0.9)
    check_window(2, l=7, cs=3, b=1)


def test_window_matches_library_reference():
    """The banded test reference and collapsekit.reference.ssd_scan(window=W) (the state literally)
    agree, and the kernel matches both."""
    t = make(1, 40, 2, 1, 8, 16, torch.float32, init=False)
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    o, f = ref_ssd(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=16, D=d["D"], z=d["z"], dt_bias=d["dt_bias"],
                   dt_softplus=True, return_final_states=True, decay_scale=0.97, window=23)
    o2, f2 = ref_window(d, 23, True, 0.0, INF, 0.97)
    torch.testing.assert_close(o, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f2, rtol=1e-10, atol=1e-10)
    out, fin, _ = K.forward(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], None, 16, True, 0.0,
                            INF, 0.97, 0.0, False, window=23)
    close(out, o, torch.float32, "out")
    close(fin, f, torch.float32, "final")


# --------------------------------------------------------------- through the public ssd_scan ----

@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_public_ssd_scan_dispatches_to_the_chunked_kernels():
    """ck.ssd_scan(backend="triton") takes the chunked kernels (path auto / chunked) — forward, final
    states and every gradient equal the recurrent path and the fp64 reference; norms asked -> the
    recurrence; registered ops pass opcheck."""
    import collapsekit as ck
    from collapsekit.ops import ssd_scan as mod
    from conftest import opcheck
    g = torch.Generator().manual_seed(21)
    b, l, h, p, grp, n = 2, 37, 4, 8, 2, 16
    dev = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(b, l, h, p, generator=g).to(dev)
    dt = (0.5 * torch.rand(b, l, h, generator=g)).to(dev)
    A = -torch.rand(h, generator=g).to(dev)
    B = torch.randn(b, l, grp, n, generator=g).to(dev)
    C = torch.randn(b, l, grp, n, generator=g).to(dev)
    D = torch.randn(h, generator=g).to(dev)
    z = torch.randn(b, l, h, p, generator=g).to(dev)
    init = torch.randn(b, h, p, n, generator=g).to(dev)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, z, init)]

    def run(path, ts):
        xx, dd, aa, bb, cc, DD, zz, ii = ts
        return ck.ssd_scan(xx, dd, aa, bb, cc, chunk_size=16, D=DD, z=zz, initial_states=ii, dt_softplus=True,
                           return_final_states=True, state_norm_max=3.0, decay_scale=0.97, backend="triton",
                           path=path)

    out, fin = run("chunked", leaves)
    (out.sum() + fin.square().sum()).backward()
    got = [t.grad.clone() for t in leaves]
    ref_leaves = [t.double().cpu().clone().requires_grad_() for t in (x, dt, A, B, C, D, z, init)]
    rx, rd, ra, rb, rc, rD, rz, ri = ref_leaves
    want_out, want_fin = ck.reference.ssd_scan(rx, rd, ra, rb, rc, chunk_size=16, D=rD, z=rz, initial_states=ri,
                                               dt_softplus=True, return_final_states=True, state_norm_max=3.0,
                                               decay_scale=0.97)
    (want_out.sum() + want_fin.square().sum()).backward()
    assert_close(out, want_out, torch.float32, scale=4)
    assert_close(fin, want_fin, torch.float32, scale=4)
    for a, r in zip(got, ref_leaves):
        assert_close(a, r.grad, torch.float32, scale=8)
    # auto takes the chunked kernels; norms asked -> the recurrence (the registered recurrent op)
    calls = []
    real = mod._ssd_chunked_triton
    try:
        mod._ssd_chunked_triton = lambda *a: calls.append(1) or real(*a)
        ck.ssd_scan(x, dt, A, B, C, chunk_size=16, backend="triton")
        assert calls
        calls.clear()
        ck.ssd_scan(x, dt, A, B, C, chunk_size=16, backend="triton", return_state_norms=True)
        assert not calls
    finally:
        mod._ssd_chunked_triton = real
    args = (x, dt, A, B.contiguous(), C.contiguous(), None, None, None, None, 16, False, 0.0, float("inf"), 1.0, 0.0,
            True)
    opcheck(mod._ssd_chunked_triton, args)
    with pytest.raises(ValueError, match=r"dt must have shape"):
        mod._ssd_chunked_triton(x, dt[:, :5], *args[2:])
