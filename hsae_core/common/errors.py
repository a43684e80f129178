"""The one error every configuration check raises, whichever package owns the config, and the
strict typing every config class applies to its fields before checking their values.

A config class is a frozen dataclass whose ``__post_init__`` first calls :func:`coerce_fields`
(each field converted to its annotated type or rejected) and then :func:`check_field` for each
allowed range. Both raise :class:`ConfigError` carrying the field, the value and what is
expected, so ``hsae_core.pipeline.params`` can restate it under the ``params.yaml`` key
(``sae.lr = 'abc' is invalid: expected a finite number``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from functools import cache
from typing import Any


class ConfigError(ValueError):
    """A configuration value is of the wrong type or out of its allowed range. ``field``,
    ``value`` and ``expected`` are set when one field is at fault (the message names them)."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 expected: str | None = None):
        super().__init__(message)
        self.field, self.value, self.expected = field, value, expected

    def at(self, key: str) -> ConfigError:
        """The same error named by the key the value was read from (``sae.lr``); unchanged
        when no single field is at fault."""
        if self.field is None:
            return self
        return ConfigError(f"{key} = {show(self.value)} is invalid: expected {self.expected}",
                           field=self.field, value=self.value, expected=self.expected)


def show(value: Any) -> str:
    """A value as params.yaml spells it: ``true``, ``null``, ``'abc'``, ``[8.9, 16]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def check_field(cfg: object, name: str, ok: bool, allowed: str) -> None:
    """Raise :class:`ConfigError` ``<Class>.<name> = <value> is invalid: expected <allowed>``
    unless ``ok``."""
    if not ok:
        value = getattr(cfg, name)
        raise ConfigError(f"{type(cfg).__name__}.{name} = {show(value)} is invalid: "
                          f"expected {allowed}", field=name, value=value, expected=allowed)


def is_int(value: object) -> bool:
    """An int that is not a bool (YAML's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


# -- strict typing of config fields ----------------------------------------------------------

#: A number as YAML 1.2 writes it. PyYAML reads YAML 1.1, where ``3e-3`` (no dot) is a string:
#: such a string is taken as the number it spells.
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


class _Mismatch(Exception):
    """A value that is not of the annotated type; ``expected`` says what would be."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def _number(value: Any, expected: str) -> numbers.Real:
    if isinstance(value, bool):
        raise _Mismatch(f"{expected} (true/false is not a number)")
    if isinstance(value, numbers.Real):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    raise _Mismatch(expected)


def _to_int(value: Any) -> int:
    n = _number(value, "an integer")
    if isinstance(n, numbers.Integral):
        return int(n)
    if math.isfinite(n) and float(n).is_integer():
        return int(n)
    raise _Mismatch("an integer")


def _to_float(value: Any) -> float:
    n = float(_number(value, "a finite number"))
    if not math.isfinite(n):
        raise _Mismatch("a finite number")
    return n


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Mismatch("true or false")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Mismatch("a string")


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}
_NAMES = {int: "integers", float: "finite numbers", bool: "true/false values", str: "strings"}


def _coerce(hint: Any, value: Any) -> Any:
    """``value`` as ``hint`` (int, float, bool, str, ``X | None``, ``tuple[X, ...]``,
    ``tuple[X, Y]``), or :class:`_Mismatch`."""
    if hint in _SCALARS:
        return _SCALARS[hint](value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(inner[0], value)
            except _Mismatch as err:
                raise _Mismatch(f"null or {err.expected}") from None
    if origin is tuple:
        if isinstance(value, str):
            raise _Mismatch(f"{_list_of(args)}, written [a, b, ...] (a string is not a list)")
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_list_of(args))
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise _Mismatch(_list_of(args))
        out = []
        for i, (kind, item) in enumerate(zip(kinds, value)):
            try:
                out.append(_coerce(kind, item))
            except _Mismatch as err:
                raise _Mismatch(f"{_list_of(args)} (item {i} = {show(item)} is not "
                                f"{err.expected.split(' (')[0]})") from None
        return tuple(out)
    raise TypeError(f"coerce_fields: unsupported annotation {hint!r}")


def _list_of(args: tuple) -> str:
    if len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_NAMES.get(args[0], str(args[0]))}"
    return f"a list of {len(args)} " + " and ".join(_NAMES.get(a, str(a)) for a in set(args))


@cache
def _hints(cls: type) -> tuple[tuple[str, Any], ...]:
    resolved = typing.get_type_hints(cls)
    return tuple((f.name, resolved[f.name]) for f in dataclasses.fields(cls))


def coerce_fields(cfg: object) -> None:
    """Convert every field of the frozen dataclass ``cfg`` to its annotated type, in place, or
    raise :class:`ConfigError` naming the field, the value and the expected type.

    Strict: a bool is not a number, a string is not a list, a float with a fractional part is
    not an integer (``8.9`` and ``40.5`` are refused, never cut), NaN and infinities are not
    finite numbers. Converted: an integer-valued number to an int field (``1e6``), an int to a
    float field, a list to a tuple, and a string in YAML 1.2's number syntax (``'3e-3'``, which
    PyYAML leaves a string) to the number it spells."""
    for name, hint in _hints(type(cfg)):
        value = getattr(cfg, name)
        try:
            new = _coerce(hint, value)
        except _Mismatch as err:
            raise ConfigError(f"{type(cfg).__name__}.{name} = {show(value)} is invalid: "
                              f"expected {err.expected}", field=name, value=value,
                              expected=err.expected) from None
        if new is not value:
            object.__setattr__(cfg, name, new)


__all__ = ["ConfigError", "check_field", "coerce_fields", "is_int", "show"]
