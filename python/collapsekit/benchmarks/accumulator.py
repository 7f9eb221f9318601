"""CollapseAccumulator workloads (issue 15): the one-pass ``update`` against the two passes
(``update_means`` over every batch, then ``update_variance``) on in-memory features streamed in
batches, and against what a user writes today in eager PyTorch for the same totals."""
import torch

import collapsekit as ck

from .workload import Workload, register

def _batches(features, labels, batch):
    return [(features[i:i + batch], labels[i:i + batch]) for i in range(0, features.shape[0], batch)]


def _out(acc):
    return acc.counts, acc.variance_sums, acc.covariance_sum


def two_passes(features, labels, num_classes, batch):
    """collapsekit's two passes: the baseline the one-pass goal is stated against."""
    acc = ck.CollapseAccumulator(num_classes, features.shape[1], device=features.device)
    for h, y in _batches(features, labels, batch):
        acc.update_means(h, y)
    for h, y in _batches(features, labels, batch):
        acc.update_variance(h, y)
    return _out(acc)


def eager_two_passes(features, labels, num_classes, batch):
    """What a user writes today: index_add_ sums, then the centred rows materialised per batch."""
    d = features.shape[1]
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=features.device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    for h, y in _batches(features, labels, batch):
        sums.index_add_(0, y, h.double())
        counts += torch.bincount(y, minlength=num_classes)
    means = (sums / counts.clamp_min(1)[:, None]).to(features.dtype)
    var = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    cov = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for h, y in _batches(features, labels, batch):
        c = h - means[y]
        var.index_add_(0, y, c.pow(2).sum(1).double())
        cov += (c.t() @ c).double()
    return counts, var, cov


def one_pass(features, labels, num_classes, batch):
    acc = ck.CollapseAccumulator(num_classes, features.shape[1], device=features.device)
    for h, y in _batches(features, labels, batch):
        acc.update(h, y)
    return _out(acc)


def _workload(n, d, c, dtype, batch, quick=False, full=True):
    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        labels = torch.randint(0, c, (n,), generator=g, device=device)
        centers = torch.randn(c, d, generator=g, device=device)
        feats = (centers[labels] + 0.5 * torch.randn(n, d, generator=g, device=device)).to(dtype)
        return dict(features=feats, labels=labels, num_classes=c, batch=batch)

    def nbytes(inp):  # the features are read three times in either mode (sums, V_c, Σ_W)
        f = inp["features"]
        return 3 * f.numel() * f.element_size()

    return Workload(
        op="accumulator_one_pass", shape=dict(N=n, D=d, C=c, batch=batch), dtype=dtype, make=make,
        baselines={"eager": eager_two_passes, "two_passes": two_passes}, collapsekit=one_pass,
        bytes_moved=nbytes, floor_bytes=lambda inp: inp["features"].numel() * inp["features"].element_size(),
        flops=lambda inp: 2 * n * d * d, compile=False, quick=quick, full=full, rtol=1e-4)


register(_workload(200_000, 512, 8192, torch.float32, 65536))
register(_workload(20_000, 128, 1024, torch.float32, 4096, quick=True, full=False))
