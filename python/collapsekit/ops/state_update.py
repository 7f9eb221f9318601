"""selective_state_update: one decode step of a Mamba-1 / Mamba-2 state (mamba-ssm semantics).
Shapes, semantics, the fast path and its measured cost in docs/state_update.md.

The public function is on the decode hot path (one call per layer and token), so for CPU tensors
in eager mode it validates with plain shape/stride reads and calls ``_C`` directly: the
``torch.library`` dispatch of a custom op alone costs more than the whole step (measured in
docs/state_update.md). The same kernel is registered as ``collapsekit::selective_state_update_cpp``
(``mutates_args=("state",)``) and used under ``torch.compile`` and for direct calls;
``collapsekit::selective_state_update_triton`` is the GPU path. Both registered ops check every
shape and stride they index, so a direct call can never read or write out of bounds.
"""
import threading
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, _library, reference

_FLOAT = _dispatch.FLOAT_CODES
_INDEX = _dispatch.INDEX_CODES
OP = "selective_state_update"


def _err(msg: str) -> ValueError:
    return ValueError(f"{OP}: {msg}")


def _shape_error(name: str, t: Tensor, want) -> ValueError:
    return _err(f"{name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def _canonical(state, x, dt, A, B, C, D, z, dt_bias, idx):
    """Validate and return (sizes, 4-D/3-D stride tuples) of the canonical (b, h, p, n) form:
    Mamba-1 tensors get a zero stride for the missing head/group axis (no views are made)."""
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{OP}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias)):
        if t is not None:
            if not isinstance(t, Tensor):
                raise TypeError(f"{OP}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dtype not in _FLOAT:
                raise TypeError(f"{OP}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    sd = state.dim()
    if sd == 3:  # Mamba-1: state (rows, dim, n)
        rows, P, n = state.shape
        if x.dim() != 2:
            raise _err(f"x must be (batch, dim) for a (batch, dim, dstate) state, got shape {tuple(x.shape)}")
        b = x.shape[0]
        h = g = 1
        if x.shape[1] != P:
            raise _shape_error("x", x, (b, P))
        if dt.shape != x.shape:
            raise _shape_error("dt", dt, x.shape)
        if A.shape != (P, n):
            raise _shape_error("A", A, (P, n))
        if B.shape != (b, n):
            raise _shape_error("B", B, (b, n))
        if C.shape != (b, n):
            raise _shape_error("C", C, (b, n))
        s = state.stride()
        ss = (s[0], 0, s[1], s[2])
        xs = x.stride(); xs = (xs[0], 0, xs[1])
        ds_ = dt.stride(); ds_ = (ds_[0], 0, ds_[1])
        As = A.stride(); As = (0, As[0], As[1])
        bs = B.stride(); bs = (bs[0], 0, bs[1])
        cs = C.stride(); cs = (cs[0], 0, cs[1])
        hp = (P,)
    elif sd == 4:  # Mamba-2: state (rows, h, p, n)
        rows, h, P, n = state.shape
        if x.dim() != 3:
            raise _err(f"x must be (batch, nheads, headdim) for a (batch, nheads, headdim, dstate) state, "
                       f"got shape {tuple(x.shape)}")
        b = x.shape[0]
        if x.shape[1] != h or x.shape[2] != P:
            raise _shape_error("x", x, (b, h, P))
        if dt.shape != x.shape:
            raise _shape_error("dt", dt, x.shape)
        if A.shape != (h, P, n):
            raise _shape_error("A", A, (h, P, n))
        if B.dim() != 3 or B.shape[0] != b or B.shape[2] != n:
            raise _err(f"B must be (batch, ngroups, dstate) = ({b}, G, {n}), got shape {tuple(B.shape)}")
        g = B.shape[1]
        if g < 1 or h % g:
            raise _err(f"B has ngroups={g}, which must divide nheads={h}")
        if C.shape != B.shape:
            raise _shape_error("C", C, B.shape)
        ss = state.stride()
        xs = x.stride()
        ds_ = dt.stride()
        As = A.stride()
        bs = B.stride()
        cs = C.stride()
        hp = (h, P)
    else:
        raise _err(f"state must be (batch, dim, dstate) (Mamba-1) or (batch, nheads, headdim, dstate) "
                   f"(Mamba-2), got shape {tuple(state.shape)}")
    two = sd == 4
    Ds = dbs = zs = None
    if D is not None:
        if D.shape != hp:
            raise _shape_error("D", D, hp)
        Ds = D.stride() if two else (0, D.stride(0))
    if dt_bias is not None:
        if dt_bias.shape != hp:
            raise _shape_error("dt_bias", dt_bias, hp)
        dbs = dt_bias.stride() if two else (0, dt_bias.stride(0))
    if z is not None:
        if z.shape != x.shape:
            raise _shape_error("z", z, x.shape)
        zs = z.stride() if two else (z.stride(0), 0, z.stride(1))
    if idx is None:
        if rows != b:
            raise _err(f"state has {rows} rows but the batch is {b} (pass state_batch_indices to address "
                       "rows of a larger state cache)")
    else:
        if not isinstance(idx, Tensor):
            raise TypeError(f"{OP}: state_batch_indices must be a torch.Tensor, got {type(idx).__name__}")
        if idx.dtype not in _INDEX:
            raise TypeError(f"{OP}: state_batch_indices must be int32 or int64, got {idx.dtype}")
        if idx.shape != (b,):
            raise _shape_error("state_batch_indices", idx, (b,))
    return (b, h, P, n, g, rows), (ss, xs, ds_, As, bs, cs, Ds, zs, dbs)


def _args(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id, dt_softplus, decay_scale, out, sizes, strides):
    """The one place that fills _C.StateUpdateArgs (field meanings in csrc/state_update.h)."""
    b, h, P, n, g, rows = sizes
    ss, xs, ds_, As, bs, cs, Ds, zs, dbs = strides
    code = lambda t: 0 if t is None else _FLOAT[t.dtype]
    os_ = out.stride()
    return _library.fill_args(
        "StateUpdateArgs", b=b, h=h, p=P, n=n, g=g, rows=rows,
        acc=1 if (x.dtype == torch.float64 or state.dtype == torch.float64) else 0,
        state=state, state_code=code(state), ss=ss, x=x, x_code=code(x), xs=xs, dt=dt, dt_code=code(dt), dts=ds_,
        A=A, A_code=code(A), As=As, B=B, B_code=code(B), bs=bs, C=C, C_code=code(C), cs=cs,
        D=D, D_code=code(D), Ds=Ds or (), z=z, z_code=code(z), zs=zs or (),
        dt_bias=dt_bias, dt_bias_code=code(dt_bias), dbs=dbs or (),
        idx=idx, idx_code=0 if idx is None else _INDEX[idx.dtype], idx_s=0 if idx is None else idx.stride(0),
        pad_slot_id=int(pad_slot_id), out=out, out_code=code(out),
        os=os_ if out.dim() == 3 else (os_[0], 0, os_[1]),
        dt_softplus=int(dt_softplus), decay_scale=float(decay_scale), num_threads=torch.get_num_threads())


# Filled StateUpdateArgs per thread, keyed by everything except the data pointers: a decode loop
# calls with the same layout every step, so a step sets 6-9 pointers instead of ~45 fields.
_tls = threading.local()
_CACHE_MAX = 64


def _args_for(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id, dt_softplus, decay_scale, out, sizes, strides):
    key = (sizes, strides, state.dtype, x.dtype, dt.dtype, A.dtype, B.dtype, C.dtype,
           None if D is None else D.dtype, None if z is None else z.dtype,
           None if dt_bias is None else dt_bias.dtype, None if idx is None else (idx.dtype, idx.stride(0)),
           pad_slot_id, bool(dt_softplus), float(decay_scale), torch.get_num_threads())
    cache = getattr(_tls, "cache", None)
    if cache is None:
        cache = _tls.cache = {}
    a = cache.get(key)
    if a is None:
        a = _args(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id, dt_softplus, decay_scale, out, sizes,
                  strides)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = a
        return a
    a.state, a.x, a.dt, a.A, a.B, a.C = (state.data_ptr(), x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(),
                                         C.data_ptr())
    a.out = out.data_ptr()
    if D is not None:
        a.D = D.data_ptr()
    if z is not None:
        a.z = z.data_ptr()
    if dt_bias is not None:
        a.dt_bias = dt_bias.data_ptr()
    if idx is not None:
        a.idx = idx.data_ptr()
    return a


def _run_cpp(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id, dt_softplus, decay_scale, out=None):
    sizes, strides = _canonical(state, x, dt, A, B, C, D, z, dt_bias, idx)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    a = _args_for(state, x, dt, A, B, C, D, z, dt_bias, idx, pad_slot_id, dt_softplus, decay_scale, out, sizes,
                  strides)
    try:
        _dispatch.cpp().selective_state_update(a)
    except ValueError as e:  # the kernel's range check of state_batch_indices (nothing was written)
        raise ValueError(f"{OP}: {str(e).split(': ', 1)[-1]}") from None
    return out


def _check_devices(state, others):
    dev = state.device
    for name, t in others:
        if t is not None and t.device != dev:
            raise _err(f"{name} is on {t.device} but state is on {dev}; all tensors must be on the same device")


# ---------------------------------------------------------------------------------------------
# Registered ops (torch.compile, direct calls, CUDA)
# ---------------------------------------------------------------------------------------------

@_library.cpu_op("selective_state_update_cpp", mutates_args=("state",))
def _op_cpp(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], dt_bias: Optional[Tensor], state_batch_indices: Optional[Tensor], pad_slot_id: int,
            dt_softplus: bool, decay_scale: float) -> Tensor:
    if state.device.type != "cpu":
        raise _err(f"the C++ kernel needs CPU tensors, got state on {state.device}")
    _check_devices(state, (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                           ("dt_bias", dt_bias), ("state_batch_indices", state_batch_indices)))
    return _run_cpp(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id, dt_softplus, decay_scale)


def _triton_impl(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], dt_bias: Optional[Tensor], state_batch_indices: Optional[Tensor],
                 pad_slot_id: int, dt_softplus: bool, decay_scale: float) -> Tensor:
    from ..kernels import state_update as k  # imports triton: only on the first Triton call

    sizes, strides = _canonical(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    k.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id, dt_softplus,
                             decay_scale, out, sizes, strides)
    return out


_op_triton = _library.triton_op("selective_state_update_triton", _triton_impl, mutates_args=("state",))


def _fake(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id, dt_softplus, decay_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_library.register((_op_cpp, _op_triton), fake=_fake)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False, *, state_batch_indices: Optional[Tensor] = None,
                           pad_slot_id: int = -1, decay_scale: float = 1.0, backend: str = "auto") -> Tensor:
    """One decode step of a selective state space model, in place on ``state`` (semantics of
    mamba-ssm's ``selective_state_update``).

    ``dt' = softplus(dt + dt_bias)`` (or without softplus), ``state = decay_scale * exp(dt' A) *
    state + dt' x B``, ``out = <state, C> + D x``, times ``silu(z)`` if ``z`` is given.

    Mamba-1: ``state (batch, dim, dstate)``; ``x, dt, z (batch, dim)``; ``A (dim, dstate)``;
    ``B, C (batch, dstate)``; ``D, dt_bias (dim,)``.
    Mamba-2: ``state (batch, nheads, headdim, dstate)``; ``x, dt, z (batch, nheads, headdim)``;
    ``A (nheads, headdim, dstate)``; ``B, C (batch, ngroups, dstate)`` (head h uses group
    ``h // (nheads // ngroups)``); ``D, dt_bias (nheads, headdim)``. Any strides, including the
    stride-0 expansions of per-head ``dt``/``A``/``D``/``dt_bias`` that transformers passes (these
    take a fast path: one exponential per head).

    ``state_batch_indices (batch,)`` int32/int64: batch row i updates ``state[state_batch_indices[i]]``
    (continuous batching; ``state`` may then have more rows than the batch). A row whose index is
    ``pad_slot_id`` (-1) is padding: its state is read as zero and not written; its output is still
    written. Any other index outside ``[0, state.shape[0])`` raises ``ValueError`` before anything is
    written. Indices should be distinct (duplicates update one state row twice in unspecified order).

    The state may be fp16/bf16/fp32/fp64 and is updated in its own dtype; arithmetic is fp32 (fp64
    when ``x`` or ``state`` is fp64). Returns ``out`` in x's dtype, shaped like ``x``. Not
    differentiable (a decode step; train with ``selective_scan`` / ``ssd_scan``).
    """
    if backend == "auto" and type(state) is Tensor and state.device.type == "cpu" and not _is_compiling():
        # the hot path: plain checks and one _C call (see the module docstring)
        if torch.is_grad_enabled() and (x.requires_grad or dt.requires_grad or B.requires_grad or C.requires_grad
                                        or state.requires_grad):
            raise _err("it is not differentiable (a decode step); use selective_scan / ssd_scan for training")
        if not isinstance(decay_scale, (int, float)) or isinstance(decay_scale, bool):
            raise TypeError(f"{OP}: decay_scale must be a float, got {type(decay_scale).__name__}")
        if not (x.is_cpu and dt.is_cpu and A.is_cpu and B.is_cpu and C.is_cpu and (D is None or D.is_cpu)
                and (z is None or z.is_cpu) and (dt_bias is None or dt_bias.is_cpu)
                and (state_batch_indices is None or state_batch_indices.is_cpu)):
            _check_devices(state, (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                                   ("dt_bias", dt_bias), ("state_batch_indices", state_batch_indices)))
        return _run_cpp(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id, dt_softplus,
                        decay_scale)
    if not isinstance(state, Tensor):
        raise TypeError(f"{OP}: state must be a torch.Tensor, got {type(state).__name__}")
    if not isinstance(decay_scale, (int, float)) or isinstance(decay_scale, bool):
        raise TypeError(f"{OP}: decay_scale must be a float, got {type(decay_scale).__name__}")
    if isinstance(pad_slot_id, bool) or not isinstance(pad_slot_id, int):
        raise TypeError(f"{OP}: pad_slot_id must be an int, got {type(pad_slot_id).__name__}")
    backend = _dispatch.resolve_backend(backend, state.device, OP)
    if backend == "reference":
        _canonical(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id,
                                                decay_scale=decay_scale)
    if backend == "triton" and state_batch_indices is not None and state_batch_indices.numel():
        # the kernel masks out-of-range rows; this check (a device sync) makes them an error
        bad = (state_batch_indices != pad_slot_id) & ((state_batch_indices < 0) |
                                                      (state_batch_indices >= state.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise _err(f"state_batch_indices[{i}] = {int(state_batch_indices[i])} is outside "
                       f"[0, {state.shape[0]}) (the rows of state)")
    op = _op_cpp if backend == "cpp" else _op_triton
    return op(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, int(pad_slot_id), bool(dt_softplus),
              float(decay_scale))
