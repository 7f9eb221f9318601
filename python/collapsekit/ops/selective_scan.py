"""selective_scan: the Mamba-1 selective scan (drop-in for mamba-ssm's ``selective_scan_fn``).
Same pattern as ops/class_sums.py; shapes, numerics and checkpointing in docs/selective_scan.md.

Canonical forms fixed by the public wrapper (views or tiny copies, never of u/delta/z):
``B``/``C`` are ``(dim, N)`` (constant) or ``(batch, G, N, L)`` (a 3-D ``(batch, N, L)`` gets a
unit group axis); ``A``, ``D``, ``delta_bias``, ``initial_state`` are contiguous in the
accumulation dtype (fp32, or fp64 when ``u`` is fp64). The registered forward returns
``(out, last_state, state_norms, checkpoints)`` in the accumulation dtype; ``state_norms`` and
``checkpoints`` are empty when not asked for. The backward recomputes states from the
checkpoints, which hold the state every ``CHECKPOINT_STEPS`` steps.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch, _library, _validate, reference

# States are stored every CHECKPOINT_STEPS steps for the backward (memory batch*dim*N*ceil(L/K));
# the backward recomputes the K states of one segment at a time. Read at call time (tests lower it).
CHECKPOINT_STEPS = 64
MAX_N = 256

# Field order of SelectiveScanArgs in csrc/selective_scan.h.
_ARG_FIELDS = (
    "batch", "dim", "L", "N", "b_mode", "b_groups", "c_mode", "c_groups",
    "softplus", "chunk", "acc_code", "num_threads",
    "u", "u_code", "u_s0", "u_s1", "u_s2",
    "delta", "delta_code", "delta_s0", "delta_s1", "delta_s2",
    "z", "z_code", "z_s0", "z_s1", "z_s2",
    "B", "B_code", "B_s0", "B_s1", "B_s2", "B_s3",
    "C", "C_code", "C_s0", "C_s1", "C_s2", "C_s3",
    "A", "D", "bias", "init",
    "out", "last", "norms", "ckpt",
    "gout", "gout_code", "gout_s0", "gout_s1", "gout_s2", "glast", "gnorms",
    "gu", "gdelta", "gz", "gA", "gB", "gC", "gD", "ginit", "gbias",
)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _strided(name: str, t: Optional[Tensor]) -> dict:
    if t is None:
        return {}
    d = {name: t.data_ptr(), name + "_code": _dispatch.FLOAT_CODES[t.dtype]}
    d.update({f"{name}_s{i}": s for i, s in enumerate(t.stride())})
    return d


def _canonical(B: Tensor, C: Tensor) -> None:
    """The registered ops address B and C only in the public wrapper's canonical forms."""
    for name, M in (("B", B), ("C", C)):
        if M.dim() not in (2, 4):
            raise ValueError(f"selective_scan: the registered op needs {name} as (dim, N) or (batch, G, N, L), "
                             f"got shape {tuple(M.shape)}")


def _check_op_args(u, delta, A, B, C, D, z, delta_bias, init, chunk, **more) -> None:
    """What the kernels index, checked at the registered op (cheap: shapes, dtypes, layout), so a
    direct call of the op can never make a kernel read or write out of bounds."""
    batch, dim, L = u.shape
    n = A.shape[1] if A.dim() == 2 else -1
    acc = A.dtype
    _canonical(B, C)
    bad = []
    if tuple(delta.shape) != tuple(u.shape) or (z is not None and tuple(z.shape) != tuple(u.shape)):
        bad.append("delta/z must have u's shape")
    if A.dim() != 2 or A.shape[0] != dim or not A.is_contiguous() or acc not in (torch.float32, torch.float64):
        bad.append("A must be a contiguous fp32/fp64 (dim, N)")
    for name, M in (("B", B), ("C", C)):
        want = (dim, n) if M.dim() == 2 else (batch, M.shape[1], n, L)
        if tuple(M.shape) != want or (M.dim() == 4 and (M.shape[1] < 1 or dim % M.shape[1])):
            bad.append(f"{name} has shape {tuple(M.shape)}")
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("initial_state", init, (batch, dim, n)),
                           *((k, v, sh) for k, (v, sh) in more.items())):
        if t is not None and (tuple(t.shape) != shape or t.dtype != acc or not t.is_contiguous()):
            bad.append(f"{name} must be a contiguous {acc} {shape}")
    if chunk < 1:
        bad.append("chunk must be >= 1")
    if bad:
        raise ValueError("selective_scan (registered op): " + "; ".join(bad))


def _base_args(u, delta, A, B, C, D, z, delta_bias, init, softplus, chunk) -> dict:
    batch, dim, L = u.shape
    _check_op_args(u, delta, A, B, C, D, z, delta_bias, init, chunk)
    a = dict.fromkeys(_ARG_FIELDS, 0)
    a.update(batch=batch, dim=dim, L=L, N=A.shape[1], softplus=int(softplus), chunk=chunk,
             acc_code=_dispatch.FLOAT_CODES[A.dtype], num_threads=_dispatch.num_threads(),
             b_mode=int(B.dim() == 4), b_groups=B.shape[1] if B.dim() == 4 else 0,
             c_mode=int(C.dim() == 4), c_groups=C.shape[1] if C.dim() == 4 else 0,
             A=A.data_ptr(), D=_ptr(D), bias=_ptr(delta_bias), init=_ptr(init))
    for name, t in (("u", u), ("delta", delta), ("z", z), ("B", B), ("C", C)):
        a.update(_strided(name, t))
    return a


def _call(fn, a: dict) -> None:
    fn([int(a[k]) for k in _ARG_FIELDS])


def _empty_outputs(u, A, want_norms, save, chunk):
    if chunk < 1:
        raise ValueError(f"selective_scan (registered op): chunk must be >= 1, got {chunk}")
    batch, dim, L = u.shape
    acc = A.dtype
    out = torch.empty(batch, dim, L, dtype=acc, device=u.device)
    last = torch.empty(batch, dim, A.shape[1], dtype=acc, device=u.device)
    norms = torch.empty((batch, dim, L) if want_norms else (0,), dtype=acc, device=u.device)
    nck = -(-L // chunk)
    ckpt = torch.empty((batch, dim, nck, A.shape[1]) if save else (0,), dtype=acc, device=u.device)
    return out, last, norms, ckpt


# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("collapsekit::selective_scan_fwd_cpp", mutates_args=())
def _fwd_cpp(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], initial_state: Optional[Tensor], softplus: bool, want_norms: bool,
             save: bool, chunk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out, last, norms, ckpt = _empty_outputs(u, A, want_norms, save, chunk)
    a = _base_args(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk)
    a.update(out=out.data_ptr(), last=last.data_ptr(), norms=_ptr(norms), ckpt=_ptr(ckpt))
    _call(_dispatch.cpp().selective_scan_fwd, a)
    return out, last, norms, ckpt


@torch.library.custom_op("collapsekit::selective_scan_bwd_cpp", mutates_args=())
def _bwd_cpp(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], ckpt: Tensor, gout: Tensor, glast: Optional[Tensor],
             gnorms: Optional[Tensor], softplus: bool, chunk: int
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch, dim, L = u.shape
    n = A.shape[1]
    acc = A.dtype
    new = lambda *s: torch.empty(*s, dtype=acc, device=u.device)
    gu, gdelta = new(batch, dim, L), new(batch, dim, L)
    gz = new(batch, dim, L) if z is not None else new(0)
    gA, gD, ginit, gbias = new(batch, dim, n), new(batch, dim), new(batch, dim, n), new(batch, dim)
    gB = new(B.shape) if B.dim() == 4 else new(batch, dim, n)  # (batch, G, N, L): zeroed and summed in C++
    gC = new(C.shape) if C.dim() == 4 else new(batch, dim, n)
    nck = -(-L // chunk)
    _check_op_args(u, delta, A, B, C, D, z, delta_bias, None, chunk, ckpt=(ckpt, (batch, dim, nck, n)),
                   glast=(glast, (batch, dim, n)), gnorms=(gnorms, (batch, dim, L)))
    if tuple(gout.shape) != (batch, dim, L):
        raise ValueError(f"selective_scan (registered op): gout has shape {tuple(gout.shape)}")
    a = _base_args(u, delta, A, B, C, D, z, delta_bias, None, softplus, chunk)
    a.update(_strided("gout", gout))
    a.update(ckpt=ckpt.data_ptr(), glast=_ptr(glast), gnorms=_ptr(gnorms), gu=gu.data_ptr(),
             gdelta=gdelta.data_ptr(), gz=_ptr(gz), gA=gA.data_ptr(), gB=gB.data_ptr(), gC=gC.data_ptr(),
             gD=gD.data_ptr(), ginit=ginit.data_ptr(), gbias=gbias.data_ptr())
    _call(_dispatch.cpp().selective_scan_bwd, a)
    return (gu, gdelta, gz, gA.sum(0), gB if B.dim() == 4 else gB.sum(0), gC if C.dim() == 4 else gC.sum(0),
            gD.sum(0), ginit, gbias.sum(0))


def _fwd_triton_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                     softplus: bool, want_norms: bool, save: bool, chunk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels import selective_scan as k  # imports triton: only on the first Triton call

    _check_op_args(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk)
    outs = _empty_outputs(u, A, want_norms, save, chunk)
    k.forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk, *outs)
    return outs


def _bwd_triton_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], ckpt: Tensor, gout: Tensor,
                     glast: Optional[Tensor], gnorms: Optional[Tensor], softplus: bool, chunk: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels import selective_scan as k

    batch, dim, L = u.shape
    n = A.shape[1]
    _check_op_args(u, delta, A, B, C, D, z, delta_bias, None, chunk, ckpt=(ckpt, (batch, dim, -(-L // chunk), n)),
                   glast=(glast, (batch, dim, n)), gnorms=(gnorms, (batch, dim, L)))
    if tuple(gout.shape) != (batch, dim, L):
        raise ValueError(f"selective_scan (registered op): gout has shape {tuple(gout.shape)}")
    return k.backward(u, delta, A, B, C, D, z, delta_bias, ckpt, gout, glast, gnorms, softplus, chunk)


_fwd_triton = _library.triton_op("selective_scan_fwd_triton", _fwd_triton_impl)
_bwd_triton = _library.triton_op("selective_scan_bwd_triton", _bwd_triton_impl)


def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, want_norms, save, chunk):
    return _empty_outputs(u, A, want_norms, save, chunk)


def _bwd_fake(u, delta, A, B, C, D, z, delta_bias, ckpt, gout, glast, gnorms, softplus, chunk):
    batch, dim, L = u.shape
    new = lambda *s: u.new_empty(*s, dtype=A.dtype)
    return (new(batch, dim, L), new(batch, dim, L), new(batch, dim, L) if z is not None else new(0),
            new(A.shape), new(B.shape), new(C.shape), new(dim), new(batch, dim, A.shape[1]), new(dim))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, want_norms, save, chunk = inputs
    ckpt = output[3]
    ctx.set_materialize_grads(False)  # unused outputs (checkpoints, often last_state/norms) get None, not zeros
    ctx.softplus, ctx.chunk, ctx.saved = softplus, chunk, save
    ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)


def _make_backward(bwd_op):
    def backward(ctx, gout, glast, gnorms, _gckpt):
        if not ctx.saved:
            raise RuntimeError("selective_scan: the forward ran without checkpoints (no input required grad "
                               "when it was called), so it cannot be differentiated")
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        gnorms = gnorms.to(A.dtype).contiguous() if gnorms is not None and gnorms.numel() else None
        glast = glast.to(A.dtype).contiguous() if glast is not None else None
        gout = gout if gout is not None else torch.zeros(u.shape, dtype=A.dtype, device=u.device)
        gu, gdelta, gz, gA, gB, gC, gD, ginit, gbias = bwd_op(u, delta, A, B, C, D, z, delta_bias, ckpt, gout,
                                                       glast, gnorms, ctx.softplus, ctx.chunk)
        need = ctx.needs_input_grad
        dt = ctx.dtypes
        cast = lambda g, i: g.to(dt[i]) if need[i] else None
        return (cast(gu, 0), cast(gdelta, 1), cast(gA, 2), cast(gB, 3), cast(gC, 4),
                gD.to(dt[5]) if D is not None and need[5] else None,
                gz.to(dt[6]) if z is not None and need[6] else None,
                gbias.to(dt[7]) if delta_bias is not None and need[7] else None,
                ginit.to(dt[8]) if dt[8] is not None and need[8] else None,
                None, None, None, None)
    return backward


for _fwd, _bwd in ((_fwd_cpp, _bwd_cpp), (_fwd_triton, _bwd_triton)):
    _fwd.register_fake(_fwd_fake)
    _bwd.register_fake(_bwd_fake)
    _fwd.register_autograd(_make_backward(_bwd), setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _real(x, name: str, op: str) -> Tensor:
    _validate.tensor(x, name, op)
    if x.is_complex():
        raise TypeError(f"{op}: complex {name} is not supported (real Mamba-1 only), got {x.dtype}")
    if x.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _shape(x: Tensor, want: tuple, name: str, op: str, what: str) -> None:
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"{op}: {name} must have shape {what} = {tuple(want)}, got {tuple(x.shape)}")


def _check_BC(M, name: str, batch: int, dim: int, n: int, L: int, op: str) -> Tensor:
    _real(M, name, op)
    if M.dim() == 2:
        _shape(M, (dim, n), name, op, "(dim, N) (constant)")
        return M
    if M.dim() == 3:
        _shape(M, (batch, n, L), name, op, "(batch, N, L) (variable)")
        return M.unsqueeze(1)
    if M.dim() == 4:
        g = M.shape[1]
        if g < 1 or dim % g:
            raise ValueError(f"{op}: {name} has G={g} groups, which must divide dim={dim} (shape "
                             f"{tuple(M.shape)})")
        _shape(M, (batch, g, n, L), name, op, "(batch, G, N, L) (grouped)")
        return M
    raise ValueError(f"{op}: {name} must be (dim, N), (batch, N, L) or (batch, G, N, L), got shape "
                     f"{tuple(M.shape)}")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, initial_state: Optional[Tensor] = None,
                   return_state_norms: bool = False, backend: str = "auto"):
    """Mamba-1 selective scan, a drop-in for ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    ``dt = softplus(delta + delta_bias)`` (or without softplus), ``x_t = exp(dt_t A) x_{t-1} +
    dt_t B_t u_t`` from ``x_{-1} = initial_state`` (or 0), ``y_t = <x_t, C_t> + D u_t``, ``out =
    y * silu(z)``.

    Args:
        u, delta: ``(batch, dim, L)`` float16/bfloat16/float32/float64, any strides; L >= 1.
        A: ``(dim, N)`` real (fp32 as in Mamba; fp64 for gradcheck), N <= 256.
        B, C: ``(dim, N)`` constant, ``(batch, N, L)`` variable or ``(batch, G, N, L)`` grouped
            (``dim % G == 0``; channel d uses group ``d // (dim // G)``).
        D, delta_bias: optional ``(dim,)``.  z: optional ``(batch, dim, L)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state ``(batch, dim, N)``.
        initial_state: keyword-only ``(batch, dim, N)`` state before step 0.
        return_state_norms: also return ``||x_t[d, :]||_2`` as ``(batch, dim, L)``.
        backend: ``"auto" | "reference" | "cpp" | "triton"``.

    Returns:
        ``out`` (dtype of u), then ``last_state`` if asked, then ``state_norms`` if asked; both
        in the accumulation dtype (fp32; fp64 for fp64 u). Differentiable in every floating input.
    """
    op = "selective_scan"
    _real(u, "u", op)
    if u.dim() != 3:
        raise ValueError(f"{op}: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if batch < 1 or dim < 1 or L < 1:
        raise ValueError(f"{op}: u must have batch, dim and L >= 1, got shape {tuple(u.shape)}")
    _real(delta, "delta", op)
    _shape(delta, u.shape, "delta", op, "(batch, dim, L) like u")
    _real(A, "A", op)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{op}: A must be (dim, N) with dim={dim}, got shape {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{op}: A has N={n} states; N must be in [1, {MAX_N}]")
    B4 = _check_BC(B, "B", batch, dim, n, L, op)
    C4 = _check_BC(C, "C", batch, dim, n, L, op)
    for name, t, shape, what in (("D", D, (dim,), "(dim,)"), ("delta_bias", delta_bias, (dim,), "(dim,)"),
                                 ("z", z, u.shape, "(batch, dim, L) like u"),
                                 ("initial_state", initial_state, (batch, dim, n), "(batch, dim, N)")):
        if t is not None:
            _real(t, name, op)
            _shape(t, shape, name, op, what)
    for name, v in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state),
                    ("return_state_norms", return_state_norms)):
        if not isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    _validate.same_device(op, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                          initial_state=initial_state)
    backend = _dispatch.resolve_backend(backend, u.device, op)
    acc = _dispatch.accumulation_dtype(u.dtype)

    if backend == "reference":
        res = reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                       initial_state=initial_state, return_state_norms=return_state_norms)
        res = res if isinstance(res, tuple) else (res,)
        res = (res[0].to(u.dtype),) + tuple(r.to(acc) for r in res[1:])
        return res[0] if len(res) == 1 else res

    small = lambda t: None if t is None else t.to(acc).contiguous()
    chunk = int(CHECKPOINT_STEPS)
    if chunk < 1:
        raise ValueError(f"{op}: CHECKPOINT_STEPS must be >= 1, got {chunk}")
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    fwd = _fwd_cpp if backend == "cpp" else _fwd_triton
    out, last, norms, _ = fwd(u, delta, small(A), B4, C4, small(D), z, small(delta_bias), small(initial_state),
                              delta_softplus, return_state_norms, save, chunk)
    res = [out.to(u.dtype)]
    if return_last_state:
        res.append(last)
    if return_state_norms:
        res.append(norms)
    return res[0] if len(res) == 1 else tuple(res)
