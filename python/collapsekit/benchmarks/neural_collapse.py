"""Neural-collapse workloads: class means, within-class variance and covariance, pairwise class
geometry, nearest class center, ETF logits. Baselines are what a user writes today in eager PyTorch."""
import torch

import collapsekit as ck

from .workload import Workload, register


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
    """The same four quantities from the tiled pair sums (C++ tile reduction on CPU, Triton on CUDA)."""
    from ..ops.pairwise import pairwise_geometry

    s = pairwise_geometry(centred, variances)
    p = s["pairs"]
    mean_cos = s["cos"] / p
    return dict(cdnv=s["cdnv"] / p, equiangle=max(s["cos2"] / p - mean_cos * mean_cos, 0.0) ** 0.5,
                coherence=s["coherence"] / p, gnc2=s["log_kernel"] / p)


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


def _same_decisions(got, want, inp):
    """Indices: equal except where two centers are as near up to rounding (ties)."""
    assert float((got.cpu() == want.cpu()).double().mean()) > 0.999, "nearest centers disagree"


def eager_nearest_class_center(features, means):
    """What a user writes today: the full [N, C] distance matrix."""
    return torch.cdist(features, means).argmin(1)


def _ncc_workload(n, d, c, quick=False, full=True):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        return dict(features=torch.randn(n, d, generator=g, device=device),
                    means=torch.randn(c, d, generator=g, device=device))

    return Workload(op="nearest_class_center", check=_same_decisions, shape=dict(N=n, D=d, C=c), dtype=torch.float32, make=make,
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
