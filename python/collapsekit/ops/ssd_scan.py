"""ssd_scan: the Mamba-2 / SSD state-space scan with the state-collapse options of "Stuffed Mamba"
(decay_scale, state_norm_max, per-step state norms). Semantics of mamba-ssm's
``mamba_chunk_scan_combined`` (DESIGN.md, "ssd_scan").

Same pattern as ops/class_sums.py: ``_ssd_scan_cpp`` / ``_ssd_scan_triton`` (forward, returning
out, final state, state norms and the chunk checkpoints the backward needs), a backward op per
backend, ``register_fake`` and ``register_autograd``, and a public function that validates,
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
    return _dispatch.accumulation_dtype(x.dtype)


def _num_chunks(l: int, chunk_size: int) -> int:
    return (l + chunk_size - 1) // chunk_size


# ----------------------------------------------------------------------------------- cpp ------

def _args(x, dt, A, B, C, D, z, dt_bias, init, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp, decay_scale,
          state_norm_max, ckpt, pre):
    C_ = _dispatch.cpp()
    a = C_.SsdArgs()
    a.dtype = _dispatch.FLOAT_CODES[x.dtype]
    a.b, a.l, a.h, a.p = x.shape
    a.g, a.n = B.shape[2], B.shape[3]
    a.x, a.xs = x.data_ptr(), list(x.stride())
    a.dt, a.dts = dt.data_ptr(), list(dt.stride())
    a.A = A.data_ptr()
    a.B, a.bs = B.data_ptr(), list(B.stride())
    a.C, a.cs = C.data_ptr(), list(C.stride())
    a.D = D.data_ptr() if D is not None else 0
    a.z, a.zs = (z.data_ptr(), list(z.stride())) if z is not None else (0, [])
    a.dt_bias = dt_bias.data_ptr() if dt_bias is not None else 0
    a.dt_softplus, a.dt_clamp, a.dt_min, a.dt_max = int(dt_softplus), int(dt_clamp), dt_min, dt_max
    a.decay_scale, a.state_norm_max, a.chunk_size = decay_scale, state_norm_max, chunk_size
    a.init = init.data_ptr() if init is not None else 0
    a.ckpt = ckpt.data_ptr() if ckpt is not None and ckpt.numel() else 0
    a.pre_norms = pre.data_ptr() if pre is not None and pre.numel() else 0
    a.num_threads = _dispatch.num_threads()
    return a


@torch.library.custom_op("collapsekit::ssd_scan_cpp", mutates_args=())
def _ssd_scan_cpp(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                  dt_bias: Optional[Tensor], initial_states: Optional[Tensor], chunk_size: int, dt_softplus: bool,
                  dt_min: float, dt_max: float, dt_clamp: bool, decay_scale: float, state_norm_max: float,
                  save_checkpoints: bool, want_norms: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, l, h, p = x.shape
    n = B.shape[3]
    acc = _acc(x)
    out = torch.empty(b, l, h, p, dtype=x.dtype)
    final = torch.empty(b, h, p, n, dtype=acc)
    norms = torch.empty(b, l, h, dtype=acc) if want_norms else x.new_empty(0, dtype=acc)
    k = _num_chunks(l, chunk_size)
    ckpt = torch.empty(b, h, k, p, n, dtype=acc) if save_checkpoints else x.new_empty(0, dtype=acc)
    pre = torch.zeros(b, h, k, dtype=acc) if save_checkpoints and state_norm_max > 0 else x.new_empty(0, dtype=acc)
    a = _args(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp,
              decay_scale, state_norm_max, ckpt, pre)
    _dispatch.cpp().ssd_scan_forward(a, out.data_ptr(), final.data_ptr(), norms.data_ptr() if want_norms else 0)
    return out, final, norms, ckpt, pre


@torch.library.custom_op("collapsekit::ssd_scan_backward_cpp", mutates_args=())
def _ssd_scan_backward_cpp(gout: Tensor, gfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                           initial_states: Optional[Tensor], ckpt: Tensor, pre: Tensor, chunk_size: int,
                           dt_softplus: bool, dt_min: float, dt_max: float, dt_clamp: bool, decay_scale: float,
                           state_norm_max: float) -> List[Tensor]:
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = _acc(x)
    gout = gout.to(x.dtype)
    dx = torch.empty(b, l, h, p, dtype=x.dtype)
    dz = torch.empty(b, l, h, p, dtype=x.dtype) if z is not None else x.new_empty(0)
    ddt = torch.empty(b, l, h, dtype=acc)
    dA = torch.empty(b, h, dtype=acc)
    dB = torch.empty(b, l, h, n, dtype=acc)  # per head; summed over each group's heads below
    dC = torch.empty(b, l, h, n, dtype=acc)
    dD = torch.empty(b, h, p, dtype=acc) if D is not None else x.new_empty(0, dtype=acc)
    dinit = torch.empty(b, h, p, n, dtype=acc)
    gf = gfinal.to(acc).contiguous() if gfinal is not None else None
    a = _args(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp,
              decay_scale, state_norm_max, ckpt, pre)
    _dispatch.cpp().ssd_scan_backward(a, gout.data_ptr(), list(gout.stride()), gf.data_ptr() if gf is not None else 0,
                                      dx.data_ptr(), dz.data_ptr() if z is not None else 0, ddt.data_ptr(),
                                      dA.data_ptr(), dB.data_ptr(), dC.data_ptr(),
                                      dD.data_ptr() if D is not None else 0, dinit.data_ptr())
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
                          save_checkpoints: bool, want_norms: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels import ssd_scan as k

    out, final, norms, ckpt, pre = k.forward(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus,
                                             dt_min, dt_max, dt_clamp, decay_scale, state_norm_max, save_checkpoints)
    return out, final, norms if want_norms else norms.new_empty(0), ckpt, pre  # (the kernel computes them anyway)


def _ssd_scan_backward_triton_impl(gout: Tensor, gfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor,
                                   B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                                   dt_bias: Optional[Tensor], initial_states: Optional[Tensor], ckpt: Tensor,
                                   pre: Tensor, chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float,
                                   dt_clamp: bool, decay_scale: float, state_norm_max: float) -> List[Tensor]:
    from ..kernels import ssd_scan as k

    grads = k.backward(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size,
                       dt_softplus, dt_min, dt_max, dt_clamp, decay_scale, state_norm_max)
    return _finish_grads(*grads, B, B.shape[2])


_ssd_scan_triton = _library.triton_op("ssd_scan_triton", _ssd_scan_triton_impl)
_ssd_scan_backward_triton = _library.triton_op("ssd_scan_backward_triton", _ssd_scan_backward_triton_impl)


# ------------------------------------------------------------------------ fake + autograd ------

def _fake(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_softplus, dt_min, dt_max, dt_clamp,
          decay_scale, state_norm_max, save_checkpoints, want_norms):
    b, l, h, p = x.shape
    n = B.shape[3]
    acc = _acc(x)
    k = _num_chunks(l, chunk_size)
    ckpt = x.new_empty(b, h, k, p, n, dtype=acc) if save_checkpoints else x.new_empty(0, dtype=acc)
    pre = x.new_empty(b, h, k, dtype=acc) if save_checkpoints and state_norm_max > 0 else x.new_empty(0, dtype=acc)
    norms = x.new_empty(b, l, h, dtype=acc) if want_norms else x.new_empty(0, dtype=acc)
    return (x.new_empty(b, l, h, p), x.new_empty(b, h, p, n, dtype=acc), norms, ckpt, pre)


def _fake_backward(gout, gfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, ckpt, pre, chunk_size, dt_softplus,
                   dt_min, dt_max, dt_clamp, decay_scale, state_norm_max):
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
        ctx.flags = inputs[9:16]
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
                dinit if has_init else None) + (None,) * 9

    return backward, setup_context


for _fwd, _bwd in ((_ssd_scan_cpp, _ssd_scan_backward_cpp), (_ssd_scan_triton, _ssd_scan_backward_triton)):
    _fwd.register_fake(_fake)
    _bwd.register_fake(_fake_backward)
    _b, _s = _make_autograd(_bwd)
    _fwd.register_autograd(_b, setup_context=_s)


# -------------------------------------------------------------------------------- public ------

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


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int = 64,
             D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
             initial_states: Optional[Tensor] = None, dt_softplus: bool = False,
             dt_limit: Tuple[float, float] = (0.0, INF), return_final_states: bool = False,
             return_state_norms: bool = False, decay_scale: float = 1.0, state_norm_max: Optional[float] = None,
             backend: str = "auto"):
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
        dt_limit: ``(min, max)`` clamp of Δ; as in mamba-ssm, the default ``(0, inf)`` clamps nothing.
        decay_scale: λ, "forget more" (Stuffed Mamba): ``a_t = λ · exp(Δ_t A)``.
        state_norm_max: τ: the state entering every chunk after the first is rescaled to Frobenius
            norm τ (per batch and head) where it is larger (state normalisation). Differentiable.
        return_final_states / return_state_norms: also return the final state
            ``(batch, nheads, headdim, dstate)`` and ``‖H_t‖_F`` ``(batch, seqlen, nheads)``
            (accumulation dtype; the norms are not differentiable).

    Returns:
        ``out`` (x's shape and dtype), then the final states, then the state norms, as requested.
        Differentiable in x, dt, A, B, C, D, z, dt_bias and initial_states (and through the final
        states).
    """
    op = "ssd_scan"
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states, chunk_size, dt_limit, decay_scale, state_norm_max)
    backend = _dispatch.resolve_backend(backend, x.device, op)
    if backend == "reference":
        from .. import reference

        res = reference.ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                 initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                                 return_final_states=return_final_states, return_state_norms=return_state_norms,
                                 decay_scale=decay_scale, state_norm_max=state_norm_max)
        if not (return_final_states or return_state_norms):
            return res.to(x.dtype)
        return (res[0].to(x.dtype),) + tuple(res[1:])
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
    dt_clamp = tuple(float(v) for v in dt_limit) != (0.0, INF)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    fn = _ssd_scan_cpp if backend == "cpp" else _ssd_scan_triton
    out, final, norms, _, _ = fn(x, dt_c, A_c, B_c, C_c, D_c, z_c, bias_c, init_c, chunk_size, bool(dt_softplus),
                                 float(dt_limit[0]), float(dt_limit[1]), dt_clamp, float(decay_scale),
                                 float(state_norm_max) if state_norm_max is not None else 0.0, needs_grad,
                                 bool(return_state_norms))
    res = [out]
    if return_final_states:
        res.append(final)
    if return_state_norms:
        res.append(norms)
    return res[0] if len(res) == 1 else tuple(res)
