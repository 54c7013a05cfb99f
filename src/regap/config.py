"""Typed configs from YAML: one reader, one set of coercion rules, one `key=value` override parser.

`TrainConfig` (regap.train.config) and `StudyConfig` (regap.study.config) are nested dataclasses;
both are read through this module, so a value means the same in either file and on either
command line. The rules are strict, because a silently converted value is a silent default:

* a value must already have the field's type: `2.0` is not an integer, `7` is not a string, a
  single value is not a list, only `true` / `false` are booleans; an integer is accepted where a
  number (float) is meant;
* YAML is read with the YAML 1.2 core rules for booleans and numbers, not PyYAML's YAML 1.1 ones:
  `no`, `off`, `yes` and `on` stay strings (so `mixed_precision: no` means "no"), and `1e-3`, which
  YAML 1.1 reads as a string, is a number;
* an override's value is read as a YAML value, except that a key holding a string takes the text as
  written (`name=2024`, `dtype=auto`); `null` sets an optional key to null.

Every error is one line naming the key, the type expected and where the value came from (the file,
or the override as typed).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from regap.errors import RegapError

T = TypeVar("T")

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (true / false) and floats (`1e-3` included)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)
                   |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse config YAML text with the rules above (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path, what: str = "config") -> dict[str, Any]:
    """A config file's top-level mapping (an empty file is an empty mapping)."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RegapError(f"invalid YAML in {path}: {str(exc).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegapError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegapError(f"{path}: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------- types


def _optional_inner(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (hint, False)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true or false")}


def type_name(hint: Any) -> str:
    """How an error names a field's type: 'an integer', 'a list of strings or null', ..."""
    inner, optional = _optional_inner(hint)
    if dataclasses.is_dataclass(inner) or typing.get_origin(inner) is dict:
        name = "a mapping of keys"
    elif inner is Any:
        name = "any value"
    elif typing.get_origin(inner) is list:
        name = "a list of " + _NAMES.get(typing.get_args(inner)[0], ("", "values"))[1]
    else:
        name = _NAMES.get(inner, (getattr(inner, "__name__", str(inner)), ""))[0]
    return name + (" or null" if optional else "")


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def coerce(hint: Any, value: Any, key: str, *, label: str = "config", source: str = "") -> Any:
    """`value` as the field's type `hint`, by the strict rules of this module."""
    inner, optional = _optional_inner(hint)
    if value is None:
        if optional:
            return None
        raise RegapError(f"{label} key '{key}'{_where(source)} must be {type_name(hint)}, not null")
    if inner is Any:
        return value
    if dataclasses.is_dataclass(inner):
        return build(inner, value, label=label, source=source, prefix=key)
    if typing.get_origin(inner) is dict and isinstance(value, dict):  # free-form keys (e.g. a judge's options)
        key_hint, value_hint = typing.get_args(inner) or (Any, Any)
        return {coerce(key_hint, k, f"{key} (a key)", label=label, source=source):
                coerce(value_hint, v, f"{key}.{k}", label=label, source=source) for k, v in value.items()}
    if typing.get_origin(inner) is list and isinstance(value, list):
        (item,) = typing.get_args(inner)
        return [coerce(item, v, f"{key}[{i}]", label=label, source=source) for i, v in enumerate(value)]
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner in (int, str, bool) and type(value) is inner:
        return value
    hint_text = ""
    if inner is str and isinstance(value, bool):
        hint_text = " (quote it)"
    elif typing.get_origin(inner) is list and not isinstance(value, (dict, list)):
        hint_text = f" (write [{value}] for a list of one)"
    raise RegapError(f"{label} key '{key}'{_where(source)} must be {type_name(hint)}, got {value!r}{hint_text}")


def build(cls: type[T], data: Any, *, label: str = "config", source: str = "", prefix: str = "") -> T:
    """An instance of the dataclass `cls` from a mapping, every key checked and coerced."""
    if not isinstance(data, dict):
        what = f"{label} key '{prefix}'" if prefix else label
        raise RegapError(f"{what}{_where(source)} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise RegapError(_unknown(label, path, str(key), names, source))
        kwargs[key] = coerce(hints[key], value, path, label=label, source=source)
    return cls(**kwargs)


def _unknown(label: str, path: str, key: str, names: list[str], source: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"unknown {label} key '{path}'{_where(source)}; did you mean '{close[0]}'?"
    under = path.rpartition(".")[0]
    return f"unknown {label} key '{path}'{_where(source)}; valid keys{f' under {under!r}' if under else ''}: " \
           + ", ".join(names)


# ---------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], str]:
    """`a.b=value` -> (["a", "b"], "value"); the value is read later, against the key's type."""
    if "=" not in text:
        raise RegapError(f"override {text!r} must look like key=value (e.g. regap.lam=0.5)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if any(not part for part in path):
        raise RegapError(f"override {text!r} has an empty key")
    return path, raw.strip()


def override_hint(cls: type, path: list[str], *, label: str = "config", source: str = "") -> Any:
    """The type hint of the dotted key `path` of dataclass `cls` (an unknown key is an error; below a
    free-form mapping field, any key is allowed and has the mapping's value type)."""
    node: Any = cls
    hint: Any = None
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if typing.get_origin(node) is dict:
            hint = (typing.get_args(node) or (Any, Any))[1]
            node = _optional_inner(hint)[0]
            continue
        if node is Any:
            return Any
        hints = typing.get_type_hints(node)
        if part not in hints:
            raise RegapError(_unknown(label, dotted, part, list(hints), source))
        hint = hints[part]
        inner, _ = _optional_inner(hint)
        if depth < len(path) - 1:
            if not (dataclasses.is_dataclass(inner) or typing.get_origin(inner) is dict):
                raise RegapError(f"{label} key '{dotted}'{_where(source)} has no sub-keys")
            node = inner
    return hint


def override_value(hint: Any, raw: str, key: str, *, label: str = "config", source: str = "") -> Any:
    """An override's text as a value of type `hint` (a string key takes the text as written)."""
    try:
        value = load_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    inner, _ = _optional_inner(hint)
    if inner is str and isinstance(value, (bool, int, float)):
        value = raw
    coerce(hint, value, key, label=label, source=source)  # checked now, so the error names the override
    return value


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str], *, label: str = "config") -> dict[str, Any]:
    """A copy of the raw mapping `data` with `key=value` overrides set, each checked against `cls`."""
    out = _deep_copy(data)
    for text in overrides:
        path, raw = parse_override(text)
        source = f"override {text!r}"
        value = override_value(override_hint(cls, path, label=label, source=source), raw, ".".join(path),
                               label=label, source=source)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def load(cls: type[T], path: Path, overrides: list[str] | None = None, *, label: str = "config",
         what: str = "config") -> T:
    """Read `path`, apply `overrides`, and build `cls` (the caller validates values)."""
    data = apply_overrides(cls, read_yaml(path, what), list(overrides or []), label=label)
    return build(cls, data, label=label, source=str(path))


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
