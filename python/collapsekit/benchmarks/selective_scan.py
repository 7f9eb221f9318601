"""selective_scan workloads (Mamba-1): a Python loop over L in the style of mamba-ssm's
``selective_scan_ref`` and a Blelloch parallel scan in the style of mamba.py as baselines."""
import torch

import collapsekit as ck

from .workload import Workload, fwd_bwd, register


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
        baselines = {k: fwd_bwd(f) for k, f in baselines.items()}
    return Workload(
        op="selective_scan_fwd_bwd" if backward else "selective_scan", shape=dict(batch=b, dim=d, L=L, N=n),
        dtype=dtype, make=make, baselines=baselines,
        collapsekit=fwd_bwd(_ck_selective_scan) if backward else _ck_selective_scan,
        bytes_moved=nbytes, floor_bytes=lambda inp: inp["u"].numel() * inp["u"].element_size(),
        # torch.compile unrolls the 2048-4096-step loop (tens of minutes): baselines run eager only
        devices=devices, quick=quick, full=full, compile=False)


for _bw in (False, True):
    register(_scan_workload(2, 768, 2048, 16, torch.float32, ("cpu",), backward=_bw))
    register(_scan_workload(8, 2048, 4096, 16, torch.bfloat16, ("cuda",), backward=_bw))
    register(_scan_workload(1, 64, 128, 16, torch.float32, ("cpu", "cuda"), quick=True, full=False, backward=_bw))
