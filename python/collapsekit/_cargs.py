"""Filling the argument structs of the C++ kernels.

Every kernel in ``collapsekit._C`` takes one named struct (``ClassSumsArgs``, ``ArgminTileArgs``,
... declared in ``csrc/<family>.h`` and bound field by field in ``csrc/bindings.cpp``), so a call
site names every argument and no positional order has to match between Python and C++::

    _dispatch.cpp().class_sums(fill_args("ClassSumsArgs", features=f, feature_dtype=code, ...))

:func:`fill_args` insists on exactly the declared fields: a misspelt or missing field is an error
here, not a silently zero argument in the kernel.
"""
from typing import Dict, FrozenSet

import torch

from . import _dispatch

_FIELDS: Dict[type, FrozenSet[str]] = {}


def struct_fields(struct_name: str) -> FrozenSet[str]:
    """The field names of ``collapsekit._C.<struct_name>``: its ``def_readwrite`` properties."""
    return _declared(_struct_class(struct_name))


def _struct_class(struct_name: str) -> type:
    cls = getattr(_dispatch.cpp(), struct_name, None)
    if not isinstance(cls, type):
        raise TypeError(f"fill_args: collapsekit._C has no argument struct {struct_name!r}")
    return cls


def _declared(cls: type) -> FrozenSet[str]:
    fields = _FIELDS.get(cls)
    if fields is None:
        # def_readwrite binds each field as a plain `property` on the class (pybind11 uses its own
        # type only for static properties); walk the MRO in case a struct's base is bound too.
        fields = frozenset(name for klass in cls.__mro__ for name, v in vars(klass).items()
                           if isinstance(v, property))
        _FIELDS[cls] = fields
    return fields


def fill_args(struct_name: str, **fields):
    """A new ``collapsekit._C.<struct_name>`` with every field set from ``fields``.

    A Tensor value becomes its ``data_ptr()`` (it must be a CPU tensor), ``None`` becomes 0 (an
    absent pointer); everything else is assigned as given, and pybind11 rejects a value of the
    wrong type (e.g. a float for an int field). Raises TypeError naming the struct and the fields
    when a name is not a field of the struct or a declared field is left out.
    """
    cls = _struct_class(struct_name)
    declared = _declared(cls)
    unknown = fields.keys() - declared
    if unknown:
        raise TypeError(f"fill_args: {struct_name} has no field(s) {sorted(unknown)}; "
                        f"its fields are {sorted(declared)}")
    missing = declared - fields.keys()
    if missing:
        raise TypeError(f"fill_args: {struct_name} field(s) {sorted(missing)} left unset "
                        "(pass None for an absent pointer)")
    args = cls()
    for name, value in fields.items():
        if value is None:
            value = 0
        elif isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise ValueError(f"fill_args: {struct_name}.{name} must be a CPU tensor, got one on {value.device}")
            value = value.data_ptr()
        try:
            setattr(args, name, value)
        except TypeError as e:
            raise TypeError(f"fill_args: {struct_name}.{name} cannot hold {value!r} "
                            f"({type(value).__name__}): {e}") from None
    return args
