"""ssd_scan: the Mamba-2 / SSD state-space scan with the state-collapse options of "Stuffed Mamba"
(decay_scale, state_norm_max, per-step state norms). Semantics of mamba-ssm's
``mamba_chunk_scan_combined`` (docs/design.md, "ssd_scan").

Same pattern as ops/class_sums.py: ``_check_op`` / ``_outputs`` (checks and the one shape
function), ``_ssd_scan_cpp`` / ``_ssd_scan_triton`` (forward, returning out, final state, state norms
and the chunk checkpoints the backward needs; arguments reach C++ in one ``SsdArgs``), a backward
op per backend, ``_library.register``, and a public function that validates,
brings the arguments to canonical form (differentiably, so gradients reach the caller's dtypes
and shapes) and dispatches. Kernels: csrc/ssd_scan.cpp, kernels/ssd_scan.py.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch, _library, _validate

INF = float("inf")


def _acc(x: Tensor) -> torch.dtype:
    return _library.acc_dtype(x.dtype)


def _num_chunks(l: int, chunk_size: int) -> int:
    return (l + chunk_size - 1) // chunk_size


# ----------------------------------------------------------------------------------- cpp ------

_OUTPUT_FIELDS = ("out", "final_state", "norms", "dout", "dfinal", "dx", "dz", "ddt", "dA", "dB", "dC", "dD", "dinit")


def _args(x, dt, A, B, C, D, z, dt_bias, init, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp, decay_scale,
          state_norm_max, ckpt, pre, path=0, window=0, **outputs):
    """The one SsdArgs of a C++ call (fill_args: every field named); ``outputs`` are the forward's
    or the backward's pointers (Tensors or None), ``dos`` the strides of ``dout``."""
    fields = dict.fromkeys(_OUTPUT_FIELDS)
    fields["dos"] = []
    fields.update(outputs)
    b, l, h, p = x.shape
    return _library.fill_args(
        "SsdArgs", dtype=_dispatch.FLOAT_CODES[x.dtype], b=b, l=l, h=h, p=p, g=B.shape[2], n=B.shape[3],
        x=x, xs=list(x.stride()), dt=dt, dts=list(dt.stride()), A=A, B=B, bs=list(B.stride()), C=C,
        cs=list(C.stride()), D=D, z=z, zs=list(z.stride()) if z is not None else [], dt_bias=dt_bias,
        dt_softplus=int(dt_softplus), dt_clamp=int(dt_clamp), dt_min=float(dt_min), dt_max=float(dt_max),
        decay_scale=float(decay_scale), state_norm_max=float(state_norm_max), chunk_size=int(chunk_size), init=init,
        ckpt=ckpt if ckpt is not None and ckpt.numel() else None, pre_norms=pre if pre is not None and pre.numel() else None,
        path=int(path), window=int(window), num_threads=_dispatch.num_threads(), **fields)


def _check_op(x, dt, A, B, C, D, z, dt_bias, init, chunk_size, op="ssd_scan"):
    """What the kernels index (a direct torch.ops.collapsekit.* call is checked too): every shape
    against x (b, l, h, p) and B (b, l, g, n), the accumulation-dtype operands contiguous."""
    e = _library.expect
    e(op, "x", x, ndim=4, dtypes=_library.FLOAT_DTYPES)
    b, l, h, p = x.shape
    acc = (_acc(x),)
    e(op, "dt", dt, shape=(b, l, h), dtypes=acc)
    e(op, "A", A, shape=(h,), dtypes=acc, contiguous=True)
    e(op, "B", B, shape=(b, l, -1, -1), dtypes=(x.dtype,))
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g:
        raise ValueError(f"{op} (registered op): B's ngroups={g} must divide nheads={h}")
    e(op, "C", C, shape=(b, l, g, n), dtypes=(x.dtype,))
    e(op, "D", D, shape=(h, p), dtypes=acc, contiguous=True, optional=True)
    e(op, "z", z, shape=(b, l, h, p), dtypes=(x.dtype,), optional=True)
    e(op, "dt_bias", dt_bias, shape=(h,), dtypes=acc, contiguous=True, optional=True)
    e(op, "initial_states", init, shape=(b, h, p, n), dtypes=acc, contiguous=True, optional=True)
    if chunk_size < 1:
        raise ValueError(f"{op} (registered op): chunk_size must be >= 1, got {chunk_size}")


def _outputs(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp,
             decay_scale, state_norm_max, save_checkpoints, want_norms, path):
    """(out, final, norms, checkpoints, pre-normalisation norms): the one shape function (real
    implementations allocate with it; it is also the fake)."""
    b, l, h, p = x.shape
    n = B.shape[3]
    acc = _acc(x)
    k = _num_chunks(l, chunk_size)
    def empty():  # a fresh one each (outputs must not alias)
        return x.new_empty(0, dtype=acc)

    return (x.new_empty(b, l, h, p), x.new_empty(b, h, p, n, dtype=acc),
            x.new_empty(b, l, h, dtype=acc) if want_norms else empty(),
            x.new_empty(b, h, k, p, n, dtype=acc) if save_checkpoints else empty(),
            x.new_zeros(b, h, k, dtype=acc) if save_checkpoints and state_norm_max > 0 else empty())


@_library.cpu_op("ssd_scan_cpp")
def _ssd_scan_cpp(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                  dt_bias: Optional[Tensor], initial_states: Optional[Tensor], chunk_size: int, dt_softplus: bool,
                  dt_min: float, dt_max: float, dt_clamp: bool, decay_scale: float, state_norm_max: float,
                  save_checkpoints: bool, want_norms: bool, path: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size)
    if path not in (0, 1, 2):
        raise ValueError(f"collapsekit::ssd_scan_cpp: path must be 0 (auto), 1 (recurrent) or 2 (chunked), got {path}")
    out, final, norms, ckpt, pre = _outputs(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus,
                                            dt_min, dt_max, dt_clamp, decay_scale, state_norm_max, save_checkpoints,
                                            want_norms, path)
    a = _args(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp,
              decay_scale, state_norm_max, ckpt, pre, path, out=out, final_state=final,
              norms=norms if want_norms else None)
    _dispatch.cpp().ssd_scan_forward(a)
    return out, final, norms, ckpt, pre


def _check_backward_op(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size,
                       state_norm_max, op="ssd_scan_backward"):
    _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, op)
    b, l, h, p = x.shape
    n = B.shape[3]
    acc = (_acc(x),)
    k = _num_chunks(l, chunk_size)
    _library.expect(op, "gout", gout, shape=(b, l, h, p), dtypes=_library.FLOAT_DTYPES)
    _library.expect(op, "gfinal", gfinal, shape=(b, h, p, n), dtypes=_library.FLOAT_DTYPES, optional=True)
    if x.numel() and n:
        _library.expect(op, "checkpoints", ckpt, shape=(b, h, k, p, n), dtypes=acc, contiguous=True)
        if state_norm_max > 0:
            _library.expect(op, "pre_norms", pre, shape=(b, h, k), dtypes=acc, contiguous=True)


@_library.cpu_op("ssd_scan_backward_cpp")
def _ssd_scan_backward_cpp(gout: Tensor, gfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                           initial_states: Optional[Tensor], ckpt: Tensor, pre: Tensor, chunk_size: int,
                           dt_softplus: bool, dt_min: float, dt_max: float, dt_clamp: bool, decay_scale: float,
                           state_norm_max: float, path: int) -> List[Tensor]:
    _check_backward_op(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size,
                       state_norm_max)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = _acc(x)
    gout = gout.to(x.dtype)
    # per batch row and head: dA, dD and the group sums of dB / dC are reduced in _finish_grads
    dx = torch.empty(b, l, h, p, dtype=x.dtype)
    dz = torch.empty(b, l, h, p, dtype=x.dtype) if z is not None else x.new_empty(0)
    ddt = torch.empty(b, l, h, dtype=acc)
    dA = torch.empty(b, h, dtype=acc)
    dB = torch.empty(b, l, h, n, dtype=acc)
    dC = torch.empty(b, l, h, n, dtype=acc)
    dD = torch.empty(b, h, p, dtype=acc) if D is not None else x.new_empty(0, dtype=acc)
    dinit = torch.empty(b, h, p, n, dtype=acc)
    gf = gfinal.to(acc).contiguous() if gfinal is not None else None
    a = _args(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp,
              decay_scale, state_norm_max, ckpt, pre, path if path in (0, 1, 2) else 0,
              dout=gout, dos=list(gout.stride()), dfinal=gf, dx=dx, dz=dz if z is not None else None, ddt=ddt,
              dA=dA, dB=dB, dC=dC, dD=dD if D is not None else None, dinit=dinit)
    _dispatch.cpp().ssd_scan_backward(a)
    return _finish_grads(dx, dz, ddt, dA, dB, dC, dD, dinit, B, g)


def _finish_grads(dx, dz, ddt, dA, dB, dC, dD, dinit, B, g):
    b, l, h, n = dB.shape
    dB = dB.view(b, l, g, h // g, n).sum(3).to(B.dtype)
    dC = dC.view(b, l, g, h // g, n).sum(3).to(B.dtype)
    return [dx, dz, ddt, dA.sum(0), dB, dC, dD.sum(0) if dD.numel() else dD, ddt.sum((0, 1)), dinit]


# -------------------------------------------------------------------------------- triton ------

def _ssd_scan_triton_impl(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
                          chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float, dt_clamp: bool,
                          decay_scale: float, state_norm_max: float,
                          save_checkpoints: bool, want_norms: bool, path: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size)
    from ..kernels import ssd_scan as k

    out, final, norms, ckpt, pre = k.forward(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus,
                                             dt_min, dt_max, dt_clamp, decay_scale, state_norm_max, save_checkpoints)
    return out, final, norms if want_norms else norms.new_empty(0), ckpt, pre  # (the kernel computes them anyway)


def _ssd_scan_backward_triton_impl(gout: Tensor, gfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor,
                                   B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                                   dt_bias: Optional[Tensor], initial_states: Optional[Tensor], ckpt: Tensor,
                                   pre: Tensor, chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float,
                                   dt_clamp: bool, decay_scale: float, state_norm_max: float,
                                   path: int) -> List[Tensor]:
    _check_backward_op(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size,
                       state_norm_max)
    from ..kernels import ssd_scan as k

    grads = k.backward(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size,
                       dt_softplus, dt_min, dt_max, dt_clamp, decay_scale, state_norm_max)
    return _finish_grads(*grads, B, B.shape[2])


_ssd_scan_triton = _library.triton_op("ssd_scan_triton", _ssd_scan_triton_impl)
_ssd_scan_backward_triton = _library.triton_op("ssd_scan_backward_triton", _ssd_scan_backward_triton_impl)


# ------------------------------------------------------------------------ fake + autograd ------

def _fake_backward(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size, dt_softplus,
                   dt_min, dt_max, dt_clamp, decay_scale, state_norm_max, path):
    b, l, h, p = x.shape
    acc = _acc(x)
    return [x.new_empty(x.shape), x.new_empty(x.shape) if z is not None else x.new_empty(0),
            x.new_empty(b, l, h, dtype=acc), x.new_empty(h, dtype=acc), B.new_empty(B.shape), B.new_empty(B.shape),
            x.new_empty(h, p, dtype=acc) if D is not None else x.new_empty(0, dtype=acc), x.new_empty(h, dtype=acc),
            x.new_empty(b, h, p, B.shape[3], dtype=acc)]


_FLAGS = ("chunk_size", "dt_softplus", "dt_min", "dt_max", "dt_clamp", "decay_scale", "state_norm_max")


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, dt, A, B, C, D, z, dt_bias, init = inputs[:9]
        ctx.flags = inputs[9:16] + (inputs[18],)  # (+ the path: the backward uses the same one)
        ctx.has = (D is not None, z is not None, dt_bias is not None, init is not None)
        _, _, _, ckpt, pre = output
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, init, ckpt, pre)
        ctx.mark_non_differentiable(output[2], ckpt, pre)  # state norms are a diagnostic

    def backward(ctx, gout, gfinal, _gnorms, _gckpt, _gpre):
        x, dt, A, B, C, D, z, dt_bias, init, ckpt, pre = ctx.saved_tensors
        if ckpt.numel() == 0 and x.numel() and B.shape[3]:
            raise RuntimeError("ssd_scan: the forward ran without checkpoints (inputs did not require grad when "
                               "it ran), so there is nothing to differentiate from")
        if gout is None:
            gout = torch.zeros_like(x)
        dx, dz, ddt, dA, dB, dC, dD, dbias, dinit = backward_op(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, init,
                                                                ckpt, pre, *ctx.flags)
        has_d, has_z, has_bias, has_init = ctx.has
        return (dx, ddt, dA, dB, dC, dD if has_d else None, dz if has_z else None, dbias if has_bias else None,
                dinit if has_init else None) + (None,) * 10

    return backward, setup_context


for _fwd, _bwd in ((_ssd_scan_cpp, _ssd_scan_backward_cpp), (_ssd_scan_triton, _ssd_scan_backward_triton)):
    _b, _s = _make_autograd(_bwd)
    _library.register((_fwd,), fake=_outputs, backward=_b, setup_context=_s)
    _library.register((_bwd,), fake=_fake_backward)


# -------------------------------------------------------------------------------- public ------

# ------------------------------------------------------------------ triton: the chunked path ------
# kernels/ssd_chunked.py: the chunked (matmul) SSD in mamba-ssm's stage structure, tl.dot on tensor
# cores. Its registered forward returns the tensors its backward needs (the chunks' entering states
# S, C·Bᵀ per group and chunk, Δ and the cumulated log-decays, the boundary norms when τ is set, and y
# before the gate when z is given), so nothing is recomputed.

def _chunk_shapes(x, B, chunk_size, state_norm_max):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = _num_chunks(l, chunk_size)
    return dict(dtp=(b, h, k, chunk_size), cum=(b, h, k, chunk_size), S=(b, k, h, p, n),
                norms=(b, h, k) if state_norm_max > 0 else (0,), cb=(b, k, g, chunk_size, chunk_size), par=(4,))


def _chunked_outputs(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max,
                     decay_scale, state_norm_max, save):
    b, l, h, p = x.shape
    acc = _acc(x)
    outs = [x.new_empty(b, l, h, p), x.new_empty(b, h, p, B.shape[3], dtype=acc)]
    if save:
        outs += [x.new_empty(sh, dtype=acc) for sh in _chunk_shapes(x, B, chunk_size, state_norm_max).values()]
        outs.append(x.new_empty(b, l, h, p) if z is not None else x.new_empty(0))   # y before the gate
    return outs


def _chunked_fwd_impl(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
                      chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float, decay_scale: float,
                      state_norm_max: float, save: bool) -> List[Tensor]:
    _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size)
    from ..kernels import ssd_chunked as k

    out, final, saved = k.forward(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min,
                                  dt_max, decay_scale, state_norm_max, save)
    if not save:
        return [out, final]
    acc = _acc(x)
    keys = ("dtp", "cum", "S", "norms", "cb", "par")
    rest = [saved[key] if saved[key] is not None else x.new_empty(0, dtype=acc) for key in keys]
    y = saved["y"]
    return [out, final] + rest + [y if z is not None else x.new_empty(0)]


def _chunked_bwd_impl(gout: Tensor, gfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                      C: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                      initial_states: Optional[Tensor], out: Tensor, dtp: Tensor, cum: Tensor, S: Tensor,
                      norms: Tensor, cb: Tensor, par: Tensor, y: Tensor, chunk_size: int, dt_softplus: bool,
                      dt_min: float, dt_max: float, decay_scale: float, state_norm_max: float) -> List[Tensor]:
    _check_op(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, "ssd_scan_backward")
    want = _chunk_shapes(x, B, chunk_size, state_norm_max)
    for name, t in (("dtp", dtp), ("cum", cum), ("S", S), ("norms", norms), ("cb", cb), ("par", par)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"ssd_scan_backward (registered op): {name} must have shape {want[name]}, "
                             f"got {tuple(t.shape)}")
    from ..kernels import ssd_chunked as k

    saved = dict(dtp=dtp, cum=cum, S=S, norms=norms if norms.numel() else None, cb=cb, par=par,
                 y=y if z is not None else out, seq_idx=None, window=None)
    dx, dz, ddt, dA, dB, dC, dD, dbias, dinit = k.backward(
        gout.to(x.dtype), gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, saved, chunk_size, dt_softplus,
        dt_min, dt_max, decay_scale, state_norm_max)
    acc = _acc(x)
    none = x.new_empty(0, dtype=acc)
    return [dx, dz if dz is not None else x.new_empty(0), ddt, dA, dB.to(B.dtype), dC.to(B.dtype),
            dD if dD is not None else none, dbias if dbias is not None else x.new_empty(0, dtype=acc),
            dinit if dinit is not None else x.new_empty(0, dtype=acc)]


def _chunked_bwd_fake(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, out, dtp, cum, S, norms, cb, par,
                      y, chunk_size, dt_softplus, dt_min, dt_max, decay_scale, state_norm_max):
    b, l, h, p = x.shape
    acc = _acc(x)
    return [x.new_empty(x.shape), x.new_empty(x.shape) if z is not None else x.new_empty(0),
            x.new_empty(b, l, h, dtype=acc), x.new_empty(h, dtype=acc), B.new_empty(B.shape), B.new_empty(B.shape),
            x.new_empty(h, p, dtype=acc) if D is not None else x.new_empty(0, dtype=acc),
            x.new_empty(h, dtype=acc) if dt_bias is not None else x.new_empty(0, dtype=acc),
            x.new_empty(b, h, p, B.shape[3], dtype=acc) if initial_states is not None else x.new_empty(0, dtype=acc)]


_ssd_chunked_triton = _library.triton_op("ssd_scan_chunked_triton", _chunked_fwd_impl)
_ssd_chunked_backward_triton = _library.triton_op("ssd_scan_chunked_backward_triton", _chunked_bwd_impl)


def _chunked_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, init = inputs[:9]
    ctx.flags = inputs[9:15]
    ctx.has = (D is not None, z is not None, dt_bias is not None, init is not None)
    if len(output) == 2:
        ctx.save_for_backward()
        ctx.saved_nothing = True
        return
    ctx.saved_nothing = False
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, init, *output[:1], *output[2:])
    ctx.mark_non_differentiable(*output[2:])


def _chunked_backward(ctx, grads):
    gout, gfinal = grads[0], grads[1]  # (a List[Tensor] output gets a list of gradients)
    if ctx.saved_nothing:
        raise RuntimeError("ssd_scan: the forward ran without saving for the backward (inputs did not require grad "
                           "when it ran), so there is nothing to differentiate from")
    x, dt, A, B, C, D, z, dt_bias, init, out, dtp, cum, S, norms, cb, par, y = ctx.saved_tensors
    if gout is None:
        gout = torch.zeros_like(x)
    dx, dz, ddt, dA, dB, dC, dD, dbias, dinit = _ssd_chunked_backward_triton(
        gout, gfinal, x, dt, A, B, C, D, z, dt_bias, init, out, dtp, cum, S, norms, cb, par, y,
        ctx.flags[0], *ctx.flags[1:])
    has_d, has_z, has_bias, has_init = ctx.has
    return (dx, ddt, dA, dB, dC, dD if has_d else None, dz if has_z else None, dbias if has_bias else None,
            dinit if has_init else None) + (None,) * 7


_library.register((_ssd_chunked_triton,), fake=_chunked_outputs, backward=_chunked_backward,
                  setup_context=_chunked_setup_context)
_library.register((_ssd_chunked_backward_triton,), fake=_chunked_bwd_fake)


def _triton_chunked_applies(x, want_norms, path):
    """The Triton path rule: chunked unless per-step norms are asked (only the recurrence gives them
    cheaply) or the input is empty; "recurrent" / "chunked" force one."""
    if path == "recurrent" or want_norms:
        return False
    return path == "chunked" or x.numel() > 0


_PATHS = {"cpp": ("auto", "recurrent", "chunked"), "triton": ("auto", "recurrent", "chunked")}


def _check(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_limit, decay_scale, state_norm_max):
    op = "ssd_scan"
    _validate.floating(x, "x", op, ndim=4)
    b, l, h, p = x.shape
    _validate.floating(dt, "dt", op, ndim=3)
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"{op}: dt must be (batch, seqlen, nheads) = {(b, l, h)}, got {tuple(dt.shape)}")
    _validate.tensor(A, "A", op)
    if A.is_complex():
        raise TypeError(f"{op}: complex A is not supported (SSD uses a real scalar decay per head)")
    _validate.floating(A, "A", op)
    if tuple(A.shape) != (h,):
        raise ValueError(f"{op}: A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        _validate.floating(t, name, op, ndim=4)
        if t.shape[0] != b or t.shape[1] != l:
            raise ValueError(f"{op}: {name} must be (batch, seqlen, ngroups, dstate) with batch={b}, seqlen={l}, "
                             f"got {tuple(t.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"{op}: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise ValueError(f"{op}: ngroups={g} (B.shape[2]) must divide nheads={h}")
    if D is not None:
        _validate.floating(D, "D", op)
        if tuple(D.shape) not in ((h,), (h, p)):
            raise ValueError(f"{op}: D must be (nheads,) = ({h},) or (nheads, headdim) = {(h, p)}, got {tuple(D.shape)}")
    if z is not None:
        _validate.floating(z, "z", op)
        if z.shape != x.shape:
            raise ValueError(f"{op}: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None:
        _validate.floating(dt_bias, "dt_bias", op)
        if tuple(dt_bias.shape) != (h,):
            raise ValueError(f"{op}: dt_bias must be (nheads,) = ({h},), got {tuple(dt_bias.shape)}")
    if initial_states is not None:
        _validate.floating(initial_states, "initial_states", op)
        if tuple(initial_states.shape) != (b, h, p, n):
            raise ValueError(f"{op}: initial_states must be (batch, nheads, headdim, dstate) = {(b, h, p, n)}, "
                             f"got {tuple(initial_states.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if len(tuple(dt_limit)) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"{op}: dt_limit must be (min, max) with min <= max, got {dt_limit!r}")
    if not (isinstance(decay_scale, (int, float)) and 0 < decay_scale):
        raise ValueError(f"{op}: decay_scale must be a number > 0, got {decay_scale!r}")
    if state_norm_max is not None and not (isinstance(state_norm_max, (int, float)) and state_norm_max > 0):
        raise ValueError(f"{op}: state_norm_max must be None or a number > 0, got {state_norm_max!r}")
    _validate.same_device(op, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64, *,
             D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
             initial_states: Optional[Tensor] = None, dt_softplus: bool = False,
             dt_limit: Tuple[float, float] = (0.0, INF), return_final_states: bool = False,
             return_state_norms: bool = False, decay_scale: float = 1.0, state_norm_max: Optional[float] = None,
             backend: str = "auto", path: str = "auto", window: Optional[int] = None,
             seq_idx: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
             return_varlen_states: bool = False, seq_offset: int = 0):
    """The SSD (Mamba-2) scan, with the semantics of mamba-ssm's ``mamba_chunk_scan_combined``.

    ::

        Δ_t = softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias   (then clamped to dt_limit)
        a_t = decay_scale · exp(Δ_t · A_h)
        H_t = a_t · H_{t−1} + Δ_t · x_t ⊗ B_t          (H_t is [headdim, dstate] per batch and head)
        y_t = H_t · C_t + D · x_t ;  out = y · silu(z) if z is given

    Args:
        x: ``(batch, seqlen, nheads, headdim)``; fp16/bf16/fp32/fp64, any strides.
        dt: ``(batch, seqlen, nheads)``. A: ``(nheads,)`` real.
        B, C: ``(batch, seqlen, ngroups, dstate)``; head h uses group ``h // (nheads // ngroups)``.
        chunk_size: the chunk length: where ``state_norm_max`` acts and the backward's checkpoint
            spacing; it changes nothing else (beyond rounding). Any ``seqlen`` works.
        D: ``(nheads,)`` or ``(nheads, headdim)``. z: like x. dt_bias: ``(nheads,)``.
        initial_states: ``(batch, nheads, headdim, dstate)``.
        dt_limit: ``(min, max)`` clamp of Δ, always applied as in mamba-ssm's kernel: with the
            default ``(0, inf)`` a negative Δ becomes 0 (gradient 0).
        decay_scale: λ, "forget more" (Stuffed Mamba): ``a_t = λ · exp(Δ_t A)``.
        state_norm_max: τ: the state entering every chunk after the first is rescaled to Frobenius
            norm τ (per batch and head) where it is larger (state normalisation). Differentiable.
        return_final_states / return_state_norms: also return the final state
            ``(batch, nheads, headdim, dstate)`` and ``‖H_t‖_F`` ``(batch, seqlen, nheads)``
            (accumulation dtype; the norms are not differentiable).
        window: W, the sliding-window mitigation of state collapse: the state holds only the last W
            inputs, ``y_t = C_t·Σ_{s=t−W+1..t} (Π_{r=s+1..t} a_r) Δ_s x_s B_sᵀ + D x_t`` (any W >= 1;
            differentiable). Not with ``initial_states`` or ``state_norm_max`` (ValueError).
        seq_idx: ``(batch, seqlen)`` int32, non-decreasing: the state resets to zero where it
            changes (packed sequences); ``initial_states`` applies to each row's first sequence.
        cu_seqlens: ``(num_seqs + 1,)`` sequence starts (batch 1); with ``return_varlen_states``
            each sequence's final state ``(num_seqs, nheads, headdim, dstate)`` is returned too.
        seq_offset: k: ``x[:, 0]`` is position k of its sequence (for split calls); state_norm_max
            acts at multiples of chunk_size from the sequence start, so split calls equal one call.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        path: the forward algorithm, for tuning and tests: ``"auto"`` (the measured rule of
            docs/ssd_scan.md), ``"recurrent"`` or (cpp) ``"chunked"``. Same result up to rounding.

    Returns:
        ``out`` (x's shape and dtype), then the final states, then the state norms, as requested.
        Differentiable in x, dt, A, B, C, D, z, dt_bias and initial_states (and through the final
        states).
    """
    op = "ssd_scan"
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_limit, decay_scale, state_norm_max)
    backend = _dispatch.resolve_backend(backend, x.device, op)
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states or seq_offset != 0:
        return _packed(x, dt, A, B, C, chunk_size, dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                                        dt_limit=dt_limit, decay_scale=decay_scale, backend=backend,
                                                        path=path, window=window),
                       initial_states, state_norm_max, return_final_states, return_state_norms, seq_idx, cu_seqlens,
                       return_varlen_states, seq_offset)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{op}: window must be None or an int >= 1, got {window!r}")
        if initial_states is not None:
            raise ValueError(f"{op}: window cannot be combined with initial_states (the window would have to "
                             "reach into the inputs that made the initial state; not exact)")
        if state_norm_max is not None:
            raise ValueError(f"{op}: window cannot be combined with state_norm_max (pick one mitigation)")
    if backend == "reference":
        from .. import reference

        res = reference.ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                 initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                                 return_final_states=return_final_states, return_state_norms=return_state_norms,
                                 decay_scale=decay_scale, state_norm_max=state_norm_max, window=window)
        if not (return_final_states or return_state_norms):
            return res.to(x.dtype)
        return (res[0].to(x.dtype),) + tuple(res[1:])
    if path not in _PATHS.get(backend, ()):
        raise ValueError(f"{op}: path for the {backend} backend must be one of {_PATHS.get(backend, ('auto',))}, "
                         f"got {path!r}")
    if window is not None and window < x.shape[1]:
        return _windowed(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, return_final_states,
                         return_state_norms, decay_scale, backend, path, window)
    b, l, h, p = x.shape
    acc = _acc(x)
    # canonical forms (differentiable casts/expands: autograd maps the gradients back)
    dt_c = dt.to(acc)
    A_c = A.to(acc).contiguous()
    B_c, C_c = B.to(x.dtype), C.to(x.dtype)
    D_c = None if D is None else (D.to(acc)[:, None].expand(h, p) if D.dim() == 1 else D.to(acc)).contiguous()
    z_c = None if z is None else z.to(x.dtype)
    bias_c = None if dt_bias is None else dt_bias.to(acc).contiguous()
    init_c = None if initial_states is None else initial_states.to(acc).contiguous()
    dt_clamp = True  # always (mamba-ssm's kernel clamps even with the default (0, inf))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    sm = float(state_norm_max) if state_norm_max is not None else 0.0
    if backend == "triton" and _triton_chunked_applies(x, return_state_norms, path):
        if path == "chunked" and return_state_norms:
            raise ValueError(f"{op}: the chunked Triton path gives no per-step state norms; use path='auto'")
        out, final = _ssd_chunked_triton(x, dt_c, A_c, B_c, C_c, D_c, z_c, bias_c, init_c, chunk_size,
                                         bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]),
                                         float(decay_scale), sm, needs_grad)[:2]
        res = [out] + ([final] if return_final_states else [])
        return res[0] if len(res) == 1 else tuple(res)
    if backend == "triton" and path == "chunked":
        path = "auto"  # (norms asked: the recurrence)
    fn = _ssd_scan_cpp if backend == "cpp" else _ssd_scan_triton
    out, final, norms, _, _ = fn(x, dt_c, A_c, B_c, C_c, D_c, z_c, bias_c, init_c, chunk_size, bool(dt_softplus),
                                 float(dt_limit[0]), float(dt_limit[1]), dt_clamp, float(decay_scale),
                                 float(state_norm_max) if state_norm_max is not None else 0.0, needs_grad,
                                 bool(return_state_norms), _PATHS[backend].index(path))
    res = [out]
    if return_final_states:
        res.append(final)
    if return_state_norms:
        res.append(norms)
    return res[0] if len(res) == 1 else tuple(res)


def _windowed(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, return_final_states,
              return_state_norms, decay_scale, backend, path, W):
    """window=W < seqlen as the state difference of two plain scans over the same states H:

        y^W_t = y_t − C_t · P_t · H_{t−W},   P_t = Π_{r=t−W+1..t} a_r
              = y_t − (second scan's output at τ = t − W),  its C'_τ = C_{τ+W} · P_{τ+W}

    The second scan runs over the first l − W steps (its states are H_0..H_{l−W−1}) with C' per head
    (groups = heads); its final state gives the windowed final state H_{l−1} − P_{l−1} H_{l−W−1}. Both
    scans are the fast chunked/recurrent kernels, so forward and backward (autograd through both and
    the torch ops here) cost about two plain scans. P comes from an fp64 cumulative sum of log a.
    The subtraction loses accuracy relative to ‖H_t‖ (the unwindowed state), so a fast-growing
    state costs relative error ~ eps·‖H_t‖/‖H^W_t‖ (docs/ssd_scan.md). Per-step norms of the windowed
    state come from the windowed recurrence kernel (forward only: they are not differentiable)."""
    import torch.nn.functional as F

    b, l, h, p = x.shape
    g = B.shape[2]
    acc = _acc(x)
    d = dt.to(acc) + (dt_bias.to(acc) if dt_bias is not None else 0.0)
    if dt_softplus:
        d = F.softplus(d)
    d = d.clamp(float(dt_limit[0]), float(dt_limit[1]))
    loga = d.double() * A.double() + math.log(decay_scale)
    S = torch.cumsum(loga, 1)                                        # (b, l, h)
    P = torch.exp(S[:, W:] - S[:, :l - W]).to(acc)                   # P_{τ+W}, τ = 0..l−W−1
    Ch = C.to(acc).repeat_interleave(h // g, dim=2)[:, W:] * P[..., None]
    Bh = B.to(x.dtype).repeat_interleave(h // g, dim=2)[:, :l - W]
    kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, decay_scale=decay_scale,
              return_final_states=True, backend=backend, path=path)
    y1, f1 = ssd_scan(x, dt, A, B, C, chunk_size, **kw)
    y2, f2 = ssd_scan(x[:, :l - W], dt[:, :l - W], A, Bh, Ch.to(x.dtype), chunk_size, **kw)
    y = y1.to(acc) - F.pad(y2.to(acc), (0, 0, 0, 0, W, 0))
    if D is not None:
        y = y + (D.to(acc)[:, None] if D.dim() == 1 else D.to(acc)) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    res = [y.to(x.dtype)]
    if return_final_states:
        res.append(f1 - P[:, -1, :, None, None] * f2)
    if return_state_norms:
        res.append(_window_norms(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit, decay_scale, backend, W))
    return res[0] if len(res) == 1 else tuple(res)


def _window_norms(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit, decay_scale, backend, W):
    """‖H^W_t‖_F (b, l, h) from the windowed recurrence H_t = a_t H_{t−1} + Δ_t x_t B_tᵀ − P_t Δ_{t−W} x_{t−W} B_{t−W}ᵀ
    (no autograd: the norms are a diagnostic)."""
    acc = _acc(x)
    with torch.no_grad():
        args = (x.detach(), dt.detach().to(acc), A.detach().to(acc).contiguous(), B.detach().to(x.dtype),
                C.detach().to(x.dtype), dt_bias.detach().to(acc).contiguous() if dt_bias is not None else None,
                bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]), float(decay_scale), W)
        if backend == "cpp":
            return _window_norms_cpp(*args)
        from ..kernels import ssd_scan as k

        return k.window_norms(*args)


@_library.cpu_op("ssd_window_norms_cpp")
def _window_norms_cpp(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, dt_bias: Optional[Tensor],
                      dt_softplus: bool, dt_min: float, dt_max: float, decay_scale: float, W: int) -> Tensor:
    _check_op(x, dt, A, B, C, None, None, dt_bias, None, 64, "ssd_window_norms")
    if W < 1:
        raise ValueError(f"ssd_window_norms (registered op): W must be >= 1, got {W}")
    b, l, h, p = x.shape
    n = B.shape[3]
    acc = _acc(x)
    out = torch.empty(b, l, h, p, dtype=x.dtype)
    final = torch.empty(b, h, p, n, dtype=acc)
    norms = torch.empty(b, l, h, dtype=acc)
    a = _args(x, dt, A, B, C, None, None, dt_bias, None, 64, dt_softplus, dt_min, dt_max, True, decay_scale, 0.0,
              None, None, 1, window=W, out=out, final_state=final, norms=norms)
    _dispatch.cpp().ssd_scan_forward(a)
    return norms


# ------------------------------------------------------------------ packed sequences, offsets ------

def _segments(seq_idx, cu_seqlens, b, l, return_varlen_states, x):
    """Per batch row, the [start, end) runs of the packed sequences (from seq_idx and/or cu_seqlens),
    validated; cu_seqlens' own list (with empty sequences) is returned for the varlen states."""
    op = "ssd_scan"
    runs = [[(0, l)] for _ in range(b)]
    if seq_idx is not None:
        _validate.tensor(seq_idx, "seq_idx", op)
        if seq_idx.dtype not in (torch.int32, torch.int64) or tuple(seq_idx.shape) != (b, l):
            raise ValueError(f"{op}: seq_idx must be an int32 (batch, seqlen) = {(b, l)} tensor, got "
                             f"{seq_idx.dtype} {tuple(seq_idx.shape)}")
        if seq_idx.device != x.device:
            raise ValueError(f"{op}: seq_idx must be on x's device {x.device}, got {seq_idx.device}")
        si = seq_idx.cpu()
        if l > 1 and bool((si[:, 1:] < si[:, :-1]).any()):
            raise ValueError(f"{op}: seq_idx must be non-decreasing along the sequence")
        runs = []
        for r in si:
            cut = [0] + (torch.nonzero(r[1:] != r[:-1]).flatten() + 1).tolist() + [l]
            runs.append([(cut[i], cut[i + 1]) for i in range(len(cut) - 1) if cut[i + 1] > cut[i]])
    seqs = None
    if cu_seqlens is not None:
        _validate.tensor(cu_seqlens, "cu_seqlens", op)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: cu_seqlens must be a 1-D int tensor (num_seqs + 1,), got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if b != 1:
            raise ValueError(f"{op}: cu_seqlens needs batch 1 (packed sequences in one row), got batch={b}")
        cu = cu_seqlens.cpu().tolist()
        if cu[0] != 0 or cu[-1] != l or any(cu[i + 1] < cu[i] for i in range(len(cu) - 1)):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to seqlen={l}, got {cu}")
        seqs = [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
        nonempty = [r for r in seqs if r[1] > r[0]]
        if seq_idx is not None and nonempty != runs[0]:
            raise ValueError(f"{op}: cu_seqlens does not match seq_idx (sequence boundaries {cu} vs the changes of "
                             "seq_idx)")
        runs = [nonempty or [(0, l)]]
    elif return_varlen_states:
        raise ValueError(f"{op}: return_varlen_states needs cu_seqlens")
    return runs, seqs


def _rescale(H, tau):
    nrm = H.flatten(2).norm(dim=2)
    f = torch.where(nrm > tau, tau / nrm.clamp_min(1e-300), torch.ones_like(nrm))
    return H * f[..., None, None]


def _offset_call(x, dt, A, B, C, chunk_size, kw, init, tau, want_norms, k):
    """One sequence piece whose first step is position k of its sequence: state_norm_max acts before
    the steps at positions that are positive multiples of chunk_size. Split at the first such
    boundary; the boundary's rescaling of the carried state is applied here (differentiably) and
    the rest runs aligned with the kernels' chunks."""
    l = x.shape[1]
    r = (-k) % chunk_size
    call = lambda sl, h0: ssd_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], chunk_size,
                                   initial_states=h0, state_norm_max=tau, return_final_states=True,
                                   return_state_norms=want_norms, **{**kw, "z": kw["z"][:, sl] if kw["z"] is not None
                                                                     else None})
    if tau is None or k == 0 or (r == 0 and init is None) or r >= l:
        if r == 0 and k > 0 and init is not None and tau is not None:
            init = _rescale(init, tau)
        return call(slice(0, l), init)
    first = call(slice(0, r), init)
    rest = call(slice(r, l), _rescale(first[1], tau))
    return tuple(torch.cat([u, v], 1) if i != 1 else v for i, (u, v) in enumerate(zip(first, rest)))


def _packed(x, dt, A, B, C, chunk_size, kw, init, tau, return_final_states, want_norms, seq_idx, cu_seqlens,
            return_varlen_states, seq_offset):
    """seq_idx / cu_seqlens / seq_offset: each packed sequence (a run of equal seq_idx) runs as its own
    scan call (state reset to zero at its start; initial_states for each row's first sequence;
    seq_offset for each row's first sequence), outputs concatenated (autograd through the slices).
    Exactly "the sequences run separately"; one kernel call per sequence (docs/ssd_scan.md)."""
    op = "ssd_scan"
    if isinstance(seq_offset, bool) or not isinstance(seq_offset, int) or seq_offset < 0:
        raise ValueError(f"{op}: seq_offset must be an int >= 0, got {seq_offset!r}")
    if kw["window"] is not None and seq_offset > 0:
        raise ValueError(f"{op}: window cannot be combined with seq_offset > 0 (the window would reach into "
                         "the previous call's inputs; not exact)")
    b, l, h, p = x.shape
    n = B.shape[3]
    runs, seqs = _segments(seq_idx, cu_seqlens, b, l, return_varlen_states, x)
    outs, finals, norms, seq_states = [], [], [], {}
    for bi in range(b):
        ro, rn = [], []
        fin = None
        for j, (s0, s1) in enumerate(runs[bi]):
            sl = slice(s0, s1)
            sub_kw = {**kw, "z": kw["z"][bi:bi + 1, sl] if kw["z"] is not None else None}
            h0 = init[bi:bi + 1] if (init is not None and j == 0) else None
            res = _offset_call(x[bi:bi + 1, sl], dt[bi:bi + 1, sl], A, B[bi:bi + 1, sl], C[bi:bi + 1, sl],
                               chunk_size, {**sub_kw, "z": None} if sub_kw["z"] is None else sub_kw, h0, tau,
                               want_norms, seq_offset if j == 0 else 0) if s1 > s0 else None
            if res is None:
                continue
            ro.append(res[0])
            fin = res[1]
            if want_norms:
                rn.append(res[2])
            seq_states[s0, s1] = fin
        if not ro:  # empty sequence: the final state is the initial state (or zeros)
            ro = [x[bi:bi + 1, :0]]
            rn = [x.new_zeros(1, 0, h, dtype=_acc(x))]
            fin = (init[bi:bi + 1].to(_acc(x)) if init is not None else x.new_zeros(1, h, p, n, dtype=_acc(x)))
        outs.append(torch.cat(ro, 1))
        finals.append(fin)
        if want_norms:
            norms.append(torch.cat(rn, 1))
    out = torch.cat(outs, 0) if outs else x.new_empty(x.shape)
    res = [out]
    if return_final_states:
        res.append(torch.cat(finals, 0) if finals else x.new_zeros(0, h, p, n, dtype=_acc(x)))
    if return_varlen_states:
        zero = x.new_zeros(h, p, n, dtype=_acc(x))
        vs = []
        for j, (s0, s1) in enumerate(seqs):
            if s1 > s0:
                vs.append(seq_states[s0, s1][0])
            else:  # an empty sequence: its state is zero (the initial state for the first one)
                vs.append(init[0].to(_acc(x)) if (init is not None and s0 == 0) else zero)
        res.append(torch.stack(vs, 0))
    if want_norms:
        res.append(torch.cat(norms, 0) if norms else x.new_zeros(0, l, h, dtype=_acc(x)))
    return res[0] if len(res) == 1 else tuple(res)


@_window_norms_cpp.register_fake
def _(x, dt, A, B, C, dt_bias, dt_softplus, dt_min, dt_max, decay_scale, W):
    b, l, h, _ = x.shape
    return x.new_empty(b, l, h, dtype=_acc(x))
