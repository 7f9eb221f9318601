"""Filling the argument structs of the C++ kernels.

Every kernel in ``collapsekit._C`` takes one named struct (``ClassSumsArgs``, ``ArgminTileArgs``,
... declared in ``csrc/<family>.h`` and bound field by field in ``csrc/bindings.cpp``), so a call
site names every argument and no positional order has to match between Python and C++::

    _dispatch.cpp().class_sums(fill_args("ClassSumsArgs", features=f, feature_dtype=code, ...))

:func:`fill_args` insists on exactly the declared fields: a misspelt or missing field is an error
here, not a silently zero argument in the kernel.
"""
from typing import Dict, FrozenSet, Tuple

import torch

from . import _dispatch

_STRUCTS: Dict[str, Tuple[type, FrozenSet[str]]] = {}


def struct_fields(struct_name: str) -> FrozenSet[str]:
    """The field names of ``collapsekit._C.<struct_name>``: its ``def_readwrite`` properties."""
    return _struct(struct_name)[1]


def _struct(struct_name: str) -> Tuple[type, FrozenSet[str]]:
    """(the class, its declared fields), looked up once per name: fill_args runs once per tile."""
    entry = _STRUCTS.get(struct_name)
    if entry is None:
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
