"""Benchmark workloads and the runner behind ``collapsekit bench`` and ``bench/`` (pytest-benchmark).

A workload names an op, a shape, a dtype, how to build its inputs, the baselines a user writes in
eager PyTorch today (each also run under ``torch.compile``), the collapsekit call, and the bytes
the op must move at least (for GB/s). Future ops add workloads with :func:`register`.

Every row is measured side by side in one process: providers are called in turn inside each
repetition, so machine noise hits them alike; times are medians. The bandwidth floor is the
time of ``buf.sum()`` over a buffer as large as the workload's main input, measured in the same run.
"""
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

import collapsekit as ck


@dataclasses.dataclass
class Workload:
    op: str
    shape: Dict[str, int]
    dtype: torch.dtype
    make: Callable[[torch.device], Dict[str, Any]]        # inputs on a device
    baselines: Dict[str, Callable[..., Any]]              # name -> fn(**inputs), eager PyTorch
    collapsekit: Callable[..., Any]                       # fn(**inputs)
    bytes_moved: Callable[[Dict[str, Any]], int]          # minimum bytes read + written
    floor_bytes: Callable[[Dict[str, Any]], int]          # size of the main input
    variants: Dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)  # kernel paths
    devices: tuple = ("cpu", "cuda")
    quick: bool = False                                   # part of `bench --quick`
    full: bool = True                                     # part of the full run
    compile: bool = True                                  # also time baselines under torch.compile
    no_compile: tuple = ()                                # baselines never compiled (e.g. Python loops over L)
    flops: Optional[Callable[[Dict[str, Any]], int]] = None  # GEMM-bound ops: FLOPs of the work

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


WORKLOADS: List[Workload] = []


def register(w: Workload) -> Workload:
    WORKLOADS.append(w)
    return w


# ------------------------------------------------------------------------------------------------
# class_means
# ------------------------------------------------------------------------------------------------

def eager_class_means(features, labels, num_classes):
    """What a user writes today: index_add_ + bincount, then divide."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype,
                       device=features.device).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp_min(1).to(features.dtype)[:, None], counts


def _class_means_workload(n, d, c, dtype, devices, quick=False, full=True):
    def make(device):
        # generated on the target device in chunks: no fp32 N x D temporary, fast for 1M x 4096
        g = torch.Generator(device=device).manual_seed(0)
        labels = torch.randint(0, c, (n,), generator=g, device=device)
        feats = torch.empty(n, d, dtype=dtype, device=device)
        step = max(1, (1 << 26) // max(d, 1))
        for i in range(0, n, step):
            feats[i:i + step] = torch.randn(min(step, n - i), d, generator=g, device=device).to(dtype)
        return dict(features=feats, labels=labels, num_classes=c)

    def nbytes(inp):
        f = inp["features"]
        return f.numel() * f.element_size() + inp["labels"].numel() * 8 + c * d * f.element_size() + c * 4

    variants = {
        "cpu": {p: (lambda p: lambda **k: ck.class_means(**k, path=p))(p) for p in ("sorted", "direct", "rows")},
        "cuda": {p: (lambda p: lambda **k: ck.class_means(**k, path=p))(p) for p in ("sorted", "scan", "atomic")},
    }
    return Workload(
        op="class_means", shape=dict(N=n, D=d, C=c), dtype=dtype, make=make,
        baselines={"eager": eager_class_means}, collapsekit=ck.class_means, bytes_moved=nbytes,
        floor_bytes=lambda inp: inp["features"].numel() * inp["features"].element_size(),
        variants=variants, devices=devices, quick=quick, full=full)


for _n, _d, _c in [(200_000, 512, 8192), (100_000, 768, 50257)]:
    register(_class_means_workload(_n, _d, _c, torch.float32, ("cpu", "cuda")))
register(_class_means_workload(1_000_000, 4096, 50257, torch.bfloat16, ("cuda",)))
# GPU only, for the atomic-vs-sorted rule: few classes (atomics contend) and a medium C
for _c in (16, 1024):
    _w = register(_class_means_workload(1_000_000, 1024, _c, torch.bfloat16, ("cuda",)))
    _w.compile = False
register(_class_means_workload(20_000, 256, 1024, torch.float32, ("cpu", "cuda"), quick=True, full=False))
register(_class_means_workload(10_000, 128, 16384, torch.float32, ("cpu", "cuda"), quick=True, full=False))


# ------------------------------------------------------------------------------------------------
# within_class_variance
# ------------------------------------------------------------------------------------------------

def eager_within_class_variance(features, labels, means):
    """What a user writes today: gather the means, subtract, square, reduce, index_add_."""
    dist = (features - means[labels]).pow(2).sum(1)
    return torch.zeros(means.shape[0], dtype=dist.dtype, device=features.device).index_add_(0, labels, dist)


def eager_within_class_covariance(features, labels, means):
    """What a user writes today: the full centred copy and one Gram."""
    centred = features - means[labels]
    return centred.t() @ centred


def plain_gram(features, labels, means):
    """The speed reference for covariance on a GPU: one uncentred torch.mm of the same size."""
    return features.t() @ features


def _variance_workload(n, d, c, dtype, devices, quick=False, full=True, covariance=False, reference_mm=False):
    base = _class_means_workload(n, d, c, dtype, devices)

    def make(device):
        inp = base.make(device)
        means = ck.class_means(inp["features"], inp["labels"], c)[0]
        return dict(features=inp["features"], labels=inp["labels"], means=means)

    def nbytes(inp):
        f, m = inp["features"], inp["means"]
        return f.numel() * f.element_size() + inp["labels"].numel() * 8 + m.numel() * m.element_size() + c * 4

    if covariance:
        return Workload(
            op="within_class_covariance", shape=dict(N=n, D=d, C=c), dtype=dtype, make=make,
            # plain_mm is a speed reference (the GPU goal), not the same computation
            baselines={"eager": eager_within_class_covariance, **({"plain_mm": plain_gram} if reference_mm else {})},
            collapsekit=ck.within_class_covariance,
            variants={"cuda": {"fused": lambda **k: ck.within_class_covariance(**k, path="fused")}},
            bytes_moved=lambda inp: nbytes(inp) + d * d * 4,
            floor_bytes=lambda inp: inp["features"].numel() * inp["features"].element_size(),
            devices=devices, quick=quick, full=full)
    return Workload(
        op="within_class_variance", shape=dict(N=n, D=d, C=c), dtype=dtype, make=make,
        baselines={"eager": eager_within_class_variance}, collapsekit=ck.within_class_variance,
        bytes_moved=nbytes, floor_bytes=lambda inp: inp["features"].numel() * inp["features"].element_size(),
        devices=devices, quick=quick, full=full)


register(_variance_workload(200_000, 512, 8192, torch.float32, ("cpu", "cuda")))
register(_variance_workload(1_000_000, 4096, 50257, torch.bfloat16, ("cuda",)))
register(_variance_workload(20_000, 256, 1024, torch.float32, ("cpu", "cuda"), quick=True, full=False))
register(_variance_workload(200_000, 512, 8192, torch.float32, ("cpu", "cuda"), covariance=True))
register(_variance_workload(1_000_000, 4096, 50257, torch.bfloat16, ("cuda",), covariance=True, reference_mm=True))
register(_variance_workload(20_000, 256, 1024, torch.float32, ("cpu", "cuda"), quick=True, full=False, covariance=True))


# ------------------------------------------------------------------------------------------------
# pairwise class geometry and nearest class center (issue 4)
# ------------------------------------------------------------------------------------------------

def eager_pairwise_geometry(centred, variances):
    """The neural-collapse-library style: full C x C grids and a triangle mask."""
    k = centred.shape[0]
    g = centred @ centred.t()
    norms = g.diagonal().sqrt()
    cos = g / (norms[:, None] * norms[None, :])
    d2 = torch.cdist(centred, centred).pow(2)
    mask = torch.ones(k, k, dtype=torch.bool, device=centred.device).triu(1)
    pc = cos[mask]
    u = centred / norms[:, None]
    return dict(cdnv=((variances[:, None] + variances[None, :]) / (2 * d2))[mask].mean(),
                equiangle=pc.std(unbiased=False), coherence=(pc + 1 / (k - 1)).abs().mean(),
                gnc2=torch.log(1 / torch.cdist(u, u)[mask]).mean())


def _collapsekit_pairwise(centred, variances):
    from .metrics import pairwise_geometry

    return pairwise_geometry(centred, variances)  # auto: C++ tile reduction on CPU, Triton on CUDA


def _pairwise_workload(c, d, quick=False, full=True, devices=("cpu", "cuda"), baseline=True):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        m = torch.randn(c, d, generator=g, device=device)
        return dict(centred=m - m.mean(0), variances=torch.rand(c, generator=g, device=device).double())

    # The upper-triangle Gram: C^2 D multiply-adds (half of the C x C grid, 2 FLOPs each).
    return Workload(op="pairwise_geometry", shape=dict(C=c, D=d), dtype=torch.float32, make=make,
                    baselines={"eager": eager_pairwise_geometry} if baseline else {},
                    collapsekit=_collapsekit_pairwise,
                    bytes_moved=lambda inp: c * d * 4, floor_bytes=lambda inp: c * d * 4,
                    devices=devices, quick=quick, full=full, flops=lambda inp: c * c * d)


def eager_nearest_class_center(features, means):
    """What a user writes today: the full [N, C] distance matrix."""
    return torch.cdist(features, means).argmin(1)


def _ncc_workload(n, d, c, quick=False, full=True):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        return dict(features=torch.randn(n, d, generator=g, device=device),
                    means=torch.randn(c, d, generator=g, device=device))

    return Workload(op="nearest_class_center", shape=dict(N=n, D=d, C=c), dtype=torch.float32, make=make,
                    baselines={"eager": eager_nearest_class_center}, collapsekit=ck.nearest_class_center,
                    bytes_moved=lambda inp: (n + c) * d * 4 + n * 8, floor_bytes=lambda inp: n * d * 4,
                    devices=("cpu", "cuda"), quick=quick, full=full, flops=lambda inp: 2 * n * c * d)


register(_pairwise_workload(8192, 512))
register(_pairwise_workload(1024, 128, quick=True, full=False))
# Issue 4's GPU goal: a Llama-3-size vocabulary. No baseline: the eager C x C grids would need
# ~350 GB; the row reports time and TFLOP/s against the matmul rate measured in the same run.
register(_pairwise_workload(131_072, 4096, devices=("cuda",), baseline=False))
register(_ncc_workload(50_000, 512, 8192))
register(_ncc_workload(5_000, 128, 1024, quick=True, full=False))


# ------------------------------------------------------------------------------------------------
# etf_logits (issue 5)
# ------------------------------------------------------------------------------------------------

def eager_etf_logits(features, etf, scale):
    """What a user writes today: a normalised copy of h, the GEMM, then the scale (another [N, C])."""
    return torch.nn.functional.normalize(features, dim=-1) @ etf.t() * scale


def _etf_logits_workload(n, d, c, dtype, devices, quick=False, full=True):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        return dict(features=torch.randn(n, d, generator=g, device=device).to(dtype),
                    etf=ck.simplex_etf(c, d, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype),
                    scale=16.0)

    return Workload(op="etf_logits", shape=dict(N=n, D=d, C=c), dtype=dtype, make=make,
                    baselines={"eager": eager_etf_logits}, collapsekit=ck.etf_logits,
                    bytes_moved=lambda inp: (n * d + c * d + n * c) * inp["features"].element_size(),
                    floor_bytes=lambda inp: n * d * inp["features"].element_size(),
                    devices=devices, quick=quick, full=full, flops=lambda inp: 2 * n * c * d)


register(_etf_logits_workload(65536, 1024, 1000, torch.float32, ("cpu",)))
register(_etf_logits_workload(65536, 1024, 1000, torch.bfloat16, ("cuda",)))
register(_etf_logits_workload(65536, 1024, 1000, torch.float32, ("cuda",)))
register(_etf_logits_workload(2048, 256, 100, torch.float32, ("cpu", "cuda"), quick=True, full=False))


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


def _fwd_bwd(fn):
    """Forward and backward (shared by the scan workloads): sum of the output, .backward() into
    every input's .grad (cleared after, so repetitions do not accumulate)."""
    def run(**inp):
        out = fn(**inp)
        out.float().sum().backward()
        for v in inp.values():
            v.grad = None
        return out.detach()
    run.__name__ = getattr(fn, "__name__", "fn") + "_fwd_bwd"
    return run


def _ssd_workload(b, l, h, p, g, n, dtype, devices, backward=False, quick=False, full=True, loop=True):
    baselines = {"eager": eager_ssd_chunked}
    if loop:
        baselines["eager_loop"] = eager_ssd_loop
    if backward:
        baselines = {k: _fwd_bwd(v) for k, v in baselines.items()}
    elt = torch.finfo(dtype).bits // 8
    return Workload(op="ssd_scan_fwd_bwd" if backward else "ssd_scan", shape=dict(b=b, l=l, h=h, p=p, g=g, n=n),
                    dtype=dtype, make=lambda device: _ssd_inputs(b, l, h, p, g, n, dtype, device, grad=backward),
                    baselines=baselines, collapsekit=_fwd_bwd(ck.ssd_scan) if backward else ck.ssd_scan,
                    # x in + out (+ B, C, dt); the backward reads them again and writes their grads
                    bytes_moved=lambda inp: (2 * b * l * h * p + 2 * b * l * g * n + b * l * h) * elt * (3 if backward else 1),
                    floor_bytes=lambda inp: b * l * h * p * elt,
                    devices=devices, quick=quick, full=full, no_compile=("eager_loop",))


# the issue-7 CPU goal shape, forward and forward+backward
register(_ssd_workload(2, 2048, 24, 64, 1, 128, torch.float32, ("cpu",)))
register(_ssd_workload(2, 2048, 24, 64, 1, 128, torch.float32, ("cpu",), backward=True))
# the GPU shape (bf16); the Python loop over 8192 steps is left out there
register(_ssd_workload(8, 8192, 32, 64, 1, 128, torch.bfloat16, ("cuda",), loop=False))
register(_ssd_workload(8, 8192, 32, 64, 1, 128, torch.bfloat16, ("cuda",), backward=True, loop=False))
register(_ssd_workload(1, 130, 4, 16, 2, 16, torch.float32, ("cpu", "cuda"), quick=True, full=False))
register(_ssd_workload(1, 130, 4, 16, 2, 16, torch.float32, ("cpu", "cuda"), backward=True, quick=True, full=False))


# ------------------------------------------------------------------------------------------------
# selective_scan (Mamba-1, issue 6)
# ------------------------------------------------------------------------------------------------

def eager_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """What a user writes today, in the style of mamba-ssm's selective_scan_ref: the (batch, dim,
    L, N) decays exp(dt A) and inputs dt B u built by einsum, then a Python loop over L. The
    per-step readout <x_t, C_t> is a multiply-sum rather than selective_scan_ref's per-step einsum:
    on the 2-core CPU the einsum (a bmm per step) made the loop 5x slower (3.2 s vs 0.6 s), and the
    baseline should be the faster of the two. Steps are taken with unbind (see below)."""
    dtype_in = u.dtype
    u, delta = u.float(), torch.nn.functional.softplus(delta.float() + delta_bias[:, None])
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    x = A.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # unbind rather than dA[:, :, t]: the same forward, but autograd's backward of 2048 slices would
    # write 2048 full-size (batch, dim, L, N) zero gradients; unbind's backward is one stack
    for dA_t, dBu_t, C_t in zip(dA.unbind(2), dBu.unbind(2), C.float().unbind(2)):
        x = dA_t * x + dBu_t
        ys.append((x * C_t[:, None]).sum(-1))
    y = torch.stack(ys, 2) + u * D[:, None]
    return (y * torch.nn.functional.silu(z.float())).to(dtype_in)


def _pscan(a, x):
    """Log-depth parallel linear recurrence h_t = a_t h_{t-1} + x_t over dim -2 (h_{-1} = 0), pure
    PyTorch, in the style of mamba.py's pscan: pairs are combined (up-sweep) until one element is
    left, then the even positions are filled in on the way down. O(L) work, log2(L) levels."""
    L = x.shape[-2]
    if L == 1:
        return x
    if L % 2:  # pad to even with an identity step
        a = torch.cat([a, torch.ones_like(a[..., :1, :])], -2)
        x = torch.cat([x, torch.zeros_like(x[..., :1, :])], -2)
    a0, a1 = a[..., 0::2, :], a[..., 1::2, :]
    x0, x1 = x[..., 0::2, :], x[..., 1::2, :]
    h_odd = _pscan(a1 * a0, a1 * x0 + x1)
    h_even = torch.cat([x0[..., :1, :], a0[..., 1:, :] * h_odd[..., :-1, :] + x0[..., 1:, :]], -2)
    return torch.stack([h_even, h_odd], -2).flatten(-3, -2)[..., :L, :]


def pscan_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same scan through _pscan: every (batch, dim, L, N) state is materialised."""
    dtype_in = u.dtype
    u, delta = u.float(), torch.nn.functional.softplus(delta.float() + delta_bias[:, None])
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
    h = _pscan(dA, dBu)
    y = torch.einsum("bdln,bnl->bdl", h, C.float()) + u * D[:, None]
    return (y * torch.nn.functional.silu(z.float())).to(dtype_in)


def _ck_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    return ck.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)


def _scan_workload(b, d, L, n, dtype, devices, quick=False, full=True, backward=False):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g, device=device)
        inp = dict(u=r(b, d, L).to(dtype), delta=(0.5 * torch.rand(b, d, L, generator=g, device=device) - 1).to(dtype),
                   A=-torch.exp(torch.rand(d, n, generator=g, device=device) * 2 - 1),
                   B=r(b, n, L).to(dtype), C=r(b, n, L).to(dtype), D=r(d), z=r(b, d, L).to(dtype),
                   delta_bias=0.5 * torch.rand(d, generator=g, device=device))
        if backward:
            for t in inp.values():
                t.requires_grad_()
        return inp

    def nbytes(inp):  # u, delta, z, B, C read, out written (+ the same again for the gradients)
        e = inp["u"].element_size()
        fwd = 4 * b * d * L * e + 2 * b * n * L * e
        return fwd * (3 if backward else 1)

    baselines = {"eager": eager_selective_scan, "pscan": pscan_selective_scan}
    if backward:
        baselines = {k: _fwd_bwd(f) for k, f in baselines.items()}
    return Workload(
        op="selective_scan_fwd_bwd" if backward else "selective_scan", shape=dict(batch=b, dim=d, L=L, N=n),
        dtype=dtype, make=make, baselines=baselines,
        collapsekit=_fwd_bwd(_ck_selective_scan) if backward else _ck_selective_scan,
        bytes_moved=nbytes, floor_bytes=lambda inp: inp["u"].numel() * inp["u"].element_size(),
        # torch.compile unrolls the 2048-4096-step loop (tens of minutes): baselines run eager only
        devices=devices, quick=quick, full=full, compile=False)


for _bw in (False, True):
    register(_scan_workload(2, 768, 2048, 16, torch.float32, ("cpu",), backward=_bw))
    register(_scan_workload(8, 2048, 4096, 16, torch.bfloat16, ("cuda",), backward=_bw))
    register(_scan_workload(1, 64, 128, 16, torch.float32, ("cpu", "cuda"), quick=True, full=False, backward=_bw))


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    dt = time.perf_counter() - t0
    del out
    return dt


def _read_proc_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn, device) -> Optional[int]:
    """Peak memory above what was in use before the call (outputs included). CUDA: the caching
    allocator's peak. CPU (Linux): peak resident set, after resetting the high-water mark
    through /proc/self/clear_refs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _read_proc_kb("VmRSS")
    out = fn()
    peak = _read_proc_kb("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def bandwidth_floor(nbytes: int, device, reps: int) -> float:
    """GB/s of a plain reduction over nbytes (the memory-read floor of this machine, now)."""
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    buf.sum()
    t = statistics.median(time_call(buf.sum, device) for _ in range(reps))
    del buf
    return nbytes / t / 1e9


def copy_bandwidth(nbytes: int, device, reps: int) -> float:
    """GB/s of a device copy, counting bytes read + written."""
    a = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    t = statistics.median(time_call(lambda: b.copy_(a), device) for _ in range(reps))
    del a, b
    return 2 * nbytes / t / 1e9


def matmul_rate(dtype, device, reps: int, n: int = 2048) -> float:
    """FLOP/s of a plain n x n x n matmul in `dtype` (the GEMM ceiling of this machine, now)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    t = statistics.median(time_call(lambda: a @ b, device) for _ in range(reps))
    del a, b
    return 2 * n ** 3 / t


def run_workload(w: Workload, device: torch.device, reps: int, compile_baselines: bool,
                 variants: bool = True) -> Dict[str, Any]:
    inp = w.make(device)
    providers: Dict[str, Callable[[], Any]] = {}
    compile_s: Dict[str, float] = {}
    for name, fn in w.baselines.items():
        providers[name] = (lambda fn: lambda: fn(**inp))(fn)
    if compile_baselines and w.compile:
        for name, fn in w.baselines.items():
            if name in w.no_compile:
                continue
            torch._dynamo.reset()
            cfn = torch.compile(fn)
            try:
                compile_s[name + "_compiled"] = time_call(lambda: cfn(**inp), device)
            except Exception as e:  # a baseline that does not compile is reported, not fatal
                compile_s[name + "_compiled"] = float("nan")
                print(f"  (torch.compile of {name} failed: {type(e).__name__}: {str(e)[:120]})")
                continue
            providers[name + "_compiled"] = (lambda cfn: lambda: cfn(**inp))(cfn)
    providers["collapsekit"] = lambda: w.collapsekit(**inp)
    if variants:
        for name, fn in w.variants.get(device.type, {}).items():
            providers["collapsekit:" + name] = (lambda fn: lambda: fn(**inp))(fn)

    for fn in providers.values():  # warm-up (and first-call costs) outside the timings
        time_call(fn, device)
    times = {k: [] for k in providers}
    for _ in range(reps):  # side by side: every provider once per repetition
        for k, fn in providers.items():
            times[k].append(time_call(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: peak_extra_bytes(providers[k], device) for k in providers if ":" not in k}
    floor = bandwidth_floor(w.floor_bytes(inp), device, max(3, reps))
    nbytes = w.bytes_moved(inp)
    baseline_names = [k for k in med if k != "collapsekit" and not k.startswith("collapsekit:")]
    best = min(baseline_names, key=lambda k: med[k]) if baseline_names else None
    row = dict(
        op=w.op, shape=w.shape, dtype=str(w.dtype).replace("torch.", ""), device=device.type,
        median_s=med, compile_s=compile_s, best_baseline=best,
        speedup=med[best] / med["collapsekit"] if best else math.nan,
        speedup_vs_eager=med.get("eager", math.nan) / med["collapsekit"],
        bytes_moved=nbytes, achieved_GBps=nbytes / med["collapsekit"] / 1e9, floor_GBps=floor,
        peak_extra_bytes=peak, reps=reps,
    )
    if device.type == "cuda":
        row["copy_GBps"] = copy_bandwidth(w.floor_bytes(inp), device, max(3, reps))
    if w.flops is not None:  # GEMM-bound: the ceiling is the matmul rate, not the bandwidth
        row["TFLOPs"] = w.flops(inp) / med["collapsekit"] / 1e12
        row["matmul_TFLOPs"] = matmul_rate(w.dtype, device, max(3, reps)) / 1e12
    del inp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = dict(date=time.strftime("%Y-%m-%d"), python=platform.python_version(), torch=torch.__version__,
                collapsekit=ck.__version__, platform=platform.platform(), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    try:
        from . import _dispatch
        info["cpu_isa"] = _dispatch.cpp().isa()
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def _fmt_ms(s):
    return "-" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:.2f}"


def _fmt_mb(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _fmt_speedup(r):
    if r["best_baseline"] is None:
        return "no baseline"
    if r["best_baseline"] == "eager":
        return f"{r['speedup']:.2f}x vs eager"
    return f"{r['speedup_vs_eager']:.1f}x vs eager, {r['speedup']:.2f}x vs {r['best_baseline']}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ["op", "shape", "dtype", "dev", "eager ms", "compiled ms (compile s)", "collapsekit ms",
            "speedup", "GB/s", "floor GB/s", "TFLOP/s (matmul)", "peak MB eager/ck", "kernel paths ms"]
    lines = []
    for r in rows:
        m = r["median_s"]
        comp = m.get("eager_compiled")
        comp_s = f"{_fmt_ms(comp)} ({r['compile_s'].get('eager_compiled', math.nan):.0f})" if comp is not None else "-"
        paths = " ".join(f"{k.split(':')[1]}={_fmt_ms(v)}" for k, v in m.items() if k.startswith("collapsekit:"))
        lines.append([r["op"], " ".join(f"{k}={v}" for k, v in r["shape"].items()), r["dtype"], r["device"],
                      _fmt_ms(m.get("eager")), comp_s, _fmt_ms(m["collapsekit"]),
                      _fmt_speedup(r), f"{r['achieved_GBps']:.1f}",
                      f"{r['floor_GBps']:.1f}",
                      f"{r['TFLOPs']:.2f} ({r['matmul_TFLOPs']:.2f})" if "TFLOPs" in r else "-",
                      f"{_fmt_mb(r['peak_extra_bytes'].get('eager'))}/{_fmt_mb(r['peak_extra_bytes'].get('collapsekit'))}",
                      paths])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep] + [fmt(r) for r in lines])


def select(device: str, quick: bool, op: Optional[str] = None) -> List[Workload]:
    return [w for w in WORKLOADS if device in w.devices and (w.quick if quick else w.full)
            and (op is None or w.op == op)]


def run(device: str = "cpu", quick: bool = False, json_path: Optional[str] = None, compile_baselines: bool = True,
        reps: Optional[int] = None, op: Optional[str] = None, echo=print) -> List[Dict[str, Any]]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("collapsekit bench: --device cuda but torch sees no CUDA device")
    reps = reps or (5 if quick else (20 if dev.type == "cuda" else 11))
    rows = []
    info = machine_info(dev)
    echo(f"collapsekit bench on {info.get('gpu', info['cpu'])} ({dev.type}, {info['threads']} threads, "
         f"torch {info['torch']}, {info['date']}); medians of {reps} side-by-side repetitions")
    failed = []
    for w in select(dev.type, quick, op):
        echo(f"  {w.op} {w.label} {str(w.dtype).replace('torch.', '')} ...")
        try:
            rows.append(run_workload(w, dev, reps, compile_baselines))
        except Exception as e:  # one workload that cannot run (e.g. out of memory) must not lose the rest
            failed.append(dict(op=w.op, shape=w.shape, error=f"{type(e).__name__}: {str(e)[:300]}"))
            echo(f"    failed: {failed[-1]['error']}")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if json_path:  # rewritten after every workload, so a run cut short keeps what it measured
            with open(json_path, "w") as f:
                json.dump(dict(machine=info, rows=rows, failed=failed), f, indent=1)
    echo(format_table(rows))
    if json_path:
        echo(f"wrote {json_path}")
    if failed and not rows:
        raise SystemExit("collapsekit bench: every workload failed")
    return rows
