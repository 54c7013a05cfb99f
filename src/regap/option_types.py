"""Whether an option's value fits what the option declares: its annotation (or, without one, its
default's type) and the range its class declares in `option_ranges`.

`regap.registry` checks every option with `fit(...)` before a class or loader runs, so a bad
value is one line naming the option and what it takes (`judge 'relevance': threshold='abc' is
not a number`), instead of a ValueError from inside. A value that already fits is returned as
it is (option hashes stay the same); text where a number or a boolean is declared is read as
the command line reads it ("0.5" -> 0.5, "yes" -> True), and 0 / 1 count as booleans.
"""

from __future__ import annotations

import builtins
import collections.abc
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from regap.specs import parse_value

#: One declared type and how an error names it.
_LABELS: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "text",
                            os.PathLike: "a path", list: "a list", tuple: "a list", dict: "a JSON object",
                            type(None): "null"}
_SEQUENCES = (collections.abc.Iterable, collections.abc.Sequence, collections.abc.Collection, list, tuple, set,
              frozenset)
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


@dataclass(frozen=True)
class Declared:
    """What one option accepts: the Python types (None: anything) and how to name them."""

    types: tuple[type, ...] | None

    def label(self) -> str:
        shown = [t for t in self.types or () if t is not type(None) and not (t is int and float in self.types)]
        return " or ".join(dict.fromkeys(_LABELS.get(t, t.__name__) for t in shown)) or "null"

    def fits(self, value: Any) -> bool:
        if self.types is None:
            return True
        if isinstance(value, bool):
            return bool in self.types
        if isinstance(value, int) and float in self.types:
            return True
        return isinstance(value, self.types)


def _accepted(annotation: Any) -> tuple[type, ...] | None:
    """The types an annotation admits; None when it admits anything or cannot be read."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_accepted(arg) for arg in typing.get_args(annotation)]
        return None if any(part is None for part in parts) else tuple(t for part in parts for t in part)  # type: ignore[union-attr]
    if origin is typing.Literal:
        return None
    base = origin if origin is not None else annotation
    if base is None or base is type(None):
        return (type(None),)
    if base in (bool, int, str):
        return (base,)
    if base is float:
        return (float, int)
    if isinstance(base, type) and (issubclass(base, PurePath) or base is os.PathLike):
        return (str, os.PathLike)
    if base in _SEQUENCES:
        return (list, tuple)
    if base in (dict, Mapping, collections.abc.Mapping):
        return (dict,)
    if base is Callable or base is collections.abc.Callable or not isinstance(base, type):
        return None
    return (base,)


class _UnknownIsAny(dict):
    """Names for `typing.get_type_hints`: the module's, the builtins, and `Any` for a name the module
    imports only for type checking (so that option goes unchecked instead of failing the lookup)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__()
        self.namespace = namespace

    def __missing__(self, name: str) -> Any:
        return self.namespace.get(name, getattr(builtins, name, Any))


def _hints(obj: Callable[..., Any]) -> dict[str, Any]:
    """Evaluated annotations of `obj` (a class: its __init__)."""
    target = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
    try:
        return typing.get_type_hints(target, localns=_UnknownIsAny(getattr(target, "__globals__", {})))
    except Exception:  # noqa: BLE001  (an annotation that is no type at all: check nothing)
        return {}


@functools.lru_cache(maxsize=None)
def declared_options(obj: Callable[..., Any]) -> dict[str, Declared]:
    """Option name -> what it accepts, from `obj`'s signature (annotation, else the default's type)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return {}
    hints = _hints(obj)
    declared: dict[str, Declared] = {}
    for param in params:
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        annotation = hints.get(param.name, inspect.Parameter.empty)
        accepted = _accepted(annotation)
        if annotation is inspect.Parameter.empty and param.default not in (inspect.Parameter.empty, None) \
                and type(param.default) in (bool, int, float, str):
            accepted = _accepted(type(param.default))
        if accepted is not None and param.default is None:
            accepted = (*accepted, type(None))  # None is how an option says "not given"
        declared[param.name] = Declared(tuple(dict.fromkeys(accepted)) if accepted is not None else None)
    return declared


def _coerced(value: Any, declared: Declared) -> tuple[bool, Any]:
    """(True, value) when `value` fits as given or read as the command line reads it."""
    if declared.fits(value):
        return True, value
    types_ = declared.types or ()
    if bool in types_ and not isinstance(value, bool):
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return True, _BOOL_WORDS[value.strip().lower()]
    if isinstance(value, str):
        parsed = parse_value(value)
        if not isinstance(parsed, str):
            return _coerced(parsed, declared)
    return False, value


def _bound(value: float | None, infinite: str) -> str:
    return infinite if value is None else f"{value:g}"


def range_text(bounds: tuple[float | None, float | None]) -> str:
    """`(0, 1)` -> "[0, 1]"; an open end reads -inf / inf."""
    return f"[{_bound(bounds[0], '-inf')}, {_bound(bounds[1], 'inf')}]"


def in_range(value: Any, bounds: tuple[float | None, float | None]) -> bool:
    low, high = bounds
    number = float(value)
    return not math.isnan(number) and (low is None or number >= low) and (high is None or number <= high)


def fit(obj: Callable[..., Any], what: str, key: str, value: Any) -> Any:
    """`value` checked (and read) for `obj`'s option `key`; `what` names the owner in the error
    (`judge 'relevance'`). Raises a one-line RegapError."""
    from regap.errors import RegapError

    declared = declared_options(obj).get(key)
    if declared is not None:
        ok, value = _coerced(value, declared)
        if not ok:
            quote = (f" (as text, quote it as JSON: {key}='\"{value}\"')"
                     if str in (declared.types or ()) and isinstance(value, (int, float)) else "")
            raise RegapError(f"{what}: {key}={value!r} is not {declared.label()}{quote}")
    bounds = (getattr(obj, "option_ranges", None) or {}).get(key)
    if bounds is not None and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RegapError(f"{what}: {key}={value!r} is not a number")
        if not in_range(value, bounds):
            raise RegapError(f"{what}: {key}={value!r} is outside its range {range_text(bounds)}")
    return value


__all__ = ["Declared", "declared_options", "fit", "in_range", "range_text"]
