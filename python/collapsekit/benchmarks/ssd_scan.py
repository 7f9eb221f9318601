"""ssd_scan workloads (Mamba-2): the chunked ``ssd_minimal`` algorithm in eager PyTorch (and under
torch.compile) and the step loop as baselines."""
import torch

import collapsekit as ck

from .workload import Workload, fwd_bwd, register


# ------------------------------------------------------------------------------------------------
# ssd_scan (issue 7)
# ------------------------------------------------------------------------------------------------

def _segment_sums(a):
    """[..., T] -> [..., T, T]: out[..., i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal."""
    t = a.shape[-1]
    cs = torch.cumsum(a, -1)
    out = cs[..., :, None] - cs[..., None, :]
    return out.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def eager_ssd_chunked(x, dt, A, B, C, chunk=64):
    """The chunked SSD algorithm as users write it in eager PyTorch (mamba-ssm's ``ssd_minimal``
    style: einsums over [chunk, chunk] decay blocks, chunk states, inter-chunk passing)."""
    b, l, h, p = x.shape
    g = B.shape[2]
    pad = (-l) % chunk
    X = (x * dt[..., None])
    Adt = A * dt                                                     # (b, l, h)
    Bh = B.repeat_interleave(h // g, dim=2)
    Ch = C.repeat_interleave(h // g, dim=2)
    if pad:
        X, Adt, Bh, Ch = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, Adt, Bh, Ch))
    c = (l + pad) // chunk
    X, Bh, Ch = (t.reshape(b, c, chunk, h, -1) for t in (X, Bh, Ch))
    Ac = Adt.reshape(b, c, chunk, h).permute(0, 3, 1, 2)               # (b, h, c, chunk)
    Acum = torch.cumsum(Ac, -1)
    L = torch.exp(_segment_sums(Ac))                                 # (b, h, c, chunk, chunk)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X)
    decay_states = torch.exp(Acum[..., -1:] - Acum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], 1)
    decay_chunk = torch.exp(_segment_sums(torch.nn.functional.pad(Acum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(Acum))
    return (y_diag + y_off).reshape(b, c * chunk, h, p)[:, :l]


def eager_ssd_loop(x, dt, A, B, C):
    """The step-by-step recurrence in eager PyTorch (a Python loop over the sequence)."""
    b, l, h, p = x.shape
    g = B.shape[2]
    Bh = B.repeat_interleave(h // g, dim=2)
    Ch = C.repeat_interleave(h // g, dim=2)
    a = torch.exp(dt * A)
    H = x.new_zeros(b, h, p, B.shape[3])
    ys = []
    for t in range(l):
        H = a[:, t, :, None, None] * H + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", H, Ch[:, t]))
    return torch.stack(ys, 1)


def _ssd_inputs(b, l, h, p, g, n, dtype, device, grad=False):
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    inp = dict(x=r(b, l, h, p).to(dtype), dt=(torch.rand(b, l, h, generator=gen, device=device) * 0.1).to(dtype),
               A=-torch.rand(h, generator=gen, device=device), B=r(b, l, g, n).to(dtype), C=r(b, l, g, n).to(dtype))
    if grad:
        for v in inp.values():
            v.requires_grad_(True)
    return inp


def _ssd_flops(b, l, h, p, g, n, chunk=64, backward=False):
    """Multiply-adds x 2 of the chunked algorithm's products (forward: intra-chunk (C Bᵀ ∘ L) X̃ on
    the lower triangle, the chunk states and the state-to-output product; C Bᵀ once per group).
    The backward's products are ~2.5x the forward's (csrc/ssd_scan.cpp)."""
    fwd = 2 * b * l * (h * (2 * p * n + chunk * p / 2) + g * chunk * n)
    return int(fwd * (3.5 if backward else 1))


def _ssd_path(path):
    f = lambda **k: ck.ssd_scan(**k, backend="cpp", path=path)
    f.__name__ = "ssd_scan_" + path
    return f


def _ssd_workload(b, l, h, p, g, n, dtype, devices, backward=False, quick=False, full=True, loop=True,
                  compile=True):
    baselines = {"eager": eager_ssd_chunked}
    if loop:
        baselines["eager_loop"] = eager_ssd_loop
    variants = {"cpu": {"chunked": _ssd_path("chunked"), "recurrent": _ssd_path("recurrent")}}
    if backward:
        baselines = {k: fwd_bwd(v) for k, v in baselines.items()}
        variants = {"cpu": {k: fwd_bwd(v) for k, v in variants["cpu"].items()}}
    elt = torch.finfo(dtype).bits // 8
    return Workload(op="ssd_scan_fwd_bwd" if backward else "ssd_scan", shape=dict(b=b, l=l, h=h, p=p, g=g, n=n),
                    dtype=dtype, make=lambda device: _ssd_inputs(b, l, h, p, g, n, dtype, device, grad=backward),
                    baselines=baselines, collapsekit=fwd_bwd(ck.ssd_scan) if backward else ck.ssd_scan,
                    # x in + out (+ B, C, dt); the backward reads them again and writes their grads
                    bytes_moved=lambda inp: (2 * b * l * h * p + 2 * b * l * g * n + b * l * h) * elt * (3 if backward else 1),
                    floor_bytes=lambda inp: b * l * h * p * elt,
                    devices=devices, quick=quick, full=full, no_compile=("eager_loop",), variants=variants,
                    flops=lambda inp: _ssd_flops(b, l, h, p, g, n, backward=backward), compile=compile)


# the issue-7/13 CPU goal shape, forward and forward+backward. The step loop's forward+backward
# (~42 s a call on 2 cores, 140x the compiled chunked algorithm) is left out of the second row: it
# is never the best baseline and would take the row ten minutes.
register(_ssd_workload(2, 2048, 24, 64, 1, 128, torch.float32, ("cpu",)))
register(_ssd_workload(2, 2048, 24, 64, 1, 128, torch.float32, ("cpu",), backward=True, loop=False))
# the GPU shape (bf16); the Python loop over 8192 steps is left out there
register(_ssd_workload(8, 8192, 32, 64, 1, 128, torch.bfloat16, ("cuda",), loop=False))
register(_ssd_workload(8, 8192, 32, 64, 1, 128, torch.bfloat16, ("cuda",), backward=True, loop=False))
# long contexts (issue 13): linear time and O(output + l/chunk·state) extra memory; compare the
# two rows' collapsekit times (goal <= 9.5x for 8x the length) and peak extra memory (<= 1.5x output)
register(_ssd_workload(1, 32768, 8, 64, 1, 64, torch.float32, ("cpu",), loop=False))
register(_ssd_workload(1, 262144, 8, 64, 1, 64, torch.float32, ("cpu",), loop=False))
register(_ssd_workload(1, 130, 4, 16, 2, 16, torch.float32, ("cpu", "cuda"), quick=True, full=False))
register(_ssd_workload(1, 130, 4, 16, 2, 16, torch.float32, ("cpu", "cuda"), backward=True, quick=True, full=False))
