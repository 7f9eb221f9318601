"""The one place for the rules every op family shares (docs/adding-an-op.md):

* :func:`acc_dtype` — the accumulation dtype (docs/design.md, Numerics): fp64 for fp64, else fp32;
* :func:`interpreting` — whether a Triton launch for a tensor runs under the Triton interpreter;
* :func:`cpu_op` / :func:`triton_op` — ``torch.library`` registration under ``collapsekit::``.
  ``triton_op`` (torch >= 2.6, with Triton installed) lets ``torch.compile`` see the kernels; without
  Triton the op is registered as an opaque custom op instead, so ``import collapsekit`` is silent
  (torch's ``triton_op`` logs a warning per op when it cannot import triton) and the op raises the
  backend error of :mod:`collapsekit._dispatch` if it is ever called;
* :func:`register` — ``register_fake`` (one shape function per op, also used by the real
  implementation to allocate its outputs) and ``register_autograd`` for a set of ops;
* :func:`expect` — the checks a registered op makes on every tensor its kernels index, so a direct
  ``torch.ops.collapsekit.*`` call can never make a kernel read or write out of bounds;
* :func:`fill_args` — the one way arguments reach C++: every kernel of ``collapsekit._C`` takes one
  named struct (``ClassSumsArgs``, ``SsdArgs``, ... declared in ``csrc/<family>.h``, bound field by
  field in ``csrc/bindings.cpp``), filled here with exactly its declared fields (a misspelt or
  missing field is an error, never a silently zero argument in the kernel).
"""
import importlib.util
import os
import sys
from typing import Callable, Dict, FrozenSet, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

NAMESPACE = "collapsekit"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 / fp32 accumulate in fp32; fp64 in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_installed() -> bool:
    """True when the triton package can be imported (checked without importing it)."""
    if "triton" in sys.modules:  # imported already, or blocked (None) as the no-triton tests do
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting(t: Tensor) -> bool:
    """A Triton launch on ``t`` runs under the interpreter (CPU tensors with TRITON_INTERPRET=1)."""
    return t.device.type == "cpu" and interpreter_enabled()


def cpu_op(name: str, fn: Optional[Callable] = None, *, mutates_args: Sequence[str] = ()):
    """Register ``fn`` as ``collapsekit::<name>`` (a custom op; usable as a decorator)."""
    if fn is None:
        return lambda f: cpu_op(name, f, mutates_args=mutates_args)
    return torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))


def triton_op(name: str, fn: Callable, *, mutates_args: Sequence[str] = ()):
    """Register a function that launches Triton kernels through ``wrap_triton``."""
    if hasattr(torch.library, "triton_op") and triton_installed():
        return torch.library.triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))
    # torch 2.4/2.5, or no triton: an opaque custom op (torch.compile cannot look inside)
    return torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args))


def register(ops: Iterable, *, fake: Callable, backward: Optional[Callable] = None,
             setup_context: Optional[Callable] = None) -> None:
    """``register_fake(fake)`` and, when given, ``register_autograd(backward, setup_context)`` for
    every op of a family (the C++ and the Triton registration share them)."""
    for op in ops:
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)


def expect(op: str, name: str, t: Optional[Tensor], *, shape: Optional[Sequence[int]] = None,
           ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
           contiguous: bool = False, optional: bool = False) -> None:
    """Raise ValueError (naming the registered op and the argument) unless ``t`` is as its kernel
    indexes it: the shape (``-1`` matches any size), the number of dimensions, one of ``dtypes``,
    contiguity."""
    where = f"{op} (registered op)"
    if t is None:
        if optional:
            return
        raise ValueError(f"{where}: {name} is required")
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s != -1 and s != v for s, v in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s == -1 else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{where}: {name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise ValueError(f"{where}: {name} must have dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{where}: {name} must be contiguous")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ACC_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------- C++ argument structs ----

_STRUCTS: Dict[str, Tuple[type, FrozenSet[str]]] = {}


def struct_fields(struct_name: str) -> FrozenSet[str]:
    """The field names of ``collapsekit._C.<struct_name>``: its ``def_readwrite`` properties."""
    return _struct(struct_name)[1]


def _struct(struct_name: str) -> Tuple[type, FrozenSet[str]]:
    """(the class, its declared fields), looked up once per name: fill_args runs once per tile."""
    entry = _STRUCTS.get(struct_name)
    if entry is None:
        from . import _dispatch  # (imports _library: looked up at call time)

        cls = getattr(_dispatch.cpp(), struct_name, None)
        if not isinstance(cls, type):
            raise TypeError(f"fill_args: collapsekit._C has no argument struct {struct_name!r}")
        # def_readwrite binds each field as a plain `property` on the class (pybind11 uses its own
        # type only for static properties); walk the MRO in case a struct's base is bound too.
        fields = frozenset(name for klass in cls.__mro__ for name, v in vars(klass).items()
                           if isinstance(v, property))
        entry = _STRUCTS[struct_name] = (cls, fields)
    return entry


def fill_args(struct_name: str, **fields):
    """A new ``collapsekit._C.<struct_name>`` with every field set from ``fields``.

    A Tensor value becomes its ``data_ptr()`` (it must be a CPU tensor), ``None`` becomes 0 (an
    absent pointer); everything else is assigned as given, and pybind11 rejects a value of the
    wrong type (e.g. a float for an int field). Raises TypeError naming the struct and the fields
    when a name is not a field of the struct or a declared field is left out.
    """
    cls, declared = _struct(struct_name)
    if fields.keys() != declared:
        unknown = fields.keys() - declared
        if unknown:
            raise TypeError(f"fill_args: {struct_name} has no field(s) {sorted(unknown)}; "
                            f"its fields are {sorted(declared)}")
        raise TypeError(f"fill_args: {struct_name} field(s) {sorted(declared - fields.keys())} left unset "
                        "(pass None for an absent pointer)")
    args = cls()
    for name, value in fields.items():
        t = type(value)
        if t is int or t is float:  # most fields; skips torch.Tensor's slow isinstance hook
            pass
        elif value is None:
            value = 0
        elif isinstance(value, torch.Tensor):
            if not value.is_cpu:
                raise ValueError(f"fill_args: {struct_name}.{name} must be a CPU tensor, got one on {value.device}")
            value = value.data_ptr()
        try:
            setattr(args, name, value)
        except TypeError as e:
            raise TypeError(f"fill_args: {struct_name}.{name} cannot hold {value!r} "
                            f"({type(value).__name__}): {e}") from None
    return args
