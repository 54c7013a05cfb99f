"""The two ways a command line or a config names things, each parsed by one function here.

* **Options of a registered thing** (judge, request source, image condition, defense):
  `KEY=VALUE` or `NAME:KEY=VALUE` (`--option openai:rpm=60`), and, where a stack of named
  things is given in one string, `NAME[:KEY=VALUE[:KEY=VALUE...]]` (`cmrm:alpha=0.5:layers=8-15`).
  VALUE is read as JSON where it parses (`0.5`, `true`, `[1, 2]`, `"text"`, `null`), `true` /
  `false` in any case as booleans, and as text otherwise; `-` in a KEY reads as `_`. In the
  stacked form a `:` starts a new option only where `KEY=` follows it, so a value may hold a
  URL or a Windows path (`file=C:\\cal\\l0.safetensors`). The registry (`regap.registry`) then
  checks every key, type and range against what the named thing declares.
* **A file with its format**: `FORMAT:PATH` (`xstest:data/xstest`) or, for request sources,
  `NAME` / `NAME:PATH`; split at the first colon, so `C:\\...` paths survive.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from regap.errors import RegapError

#: Where the stacked form `NAME:KEY=VALUE:KEY=VALUE` starts its next option.
_NEXT_OPTION = re.compile(r":(?=\s*[A-Za-z_][\w-]*\s*=)")
#: `KEY` or `NAME:KEY`, the text before the first `=` of an option.
_OPTION_HEAD = re.compile(r"^\s*(?:(?P<scope>[^:=\s/\\][^:=/\\]*?)\s*:)?\s*(?P<key>[A-Za-z_][\w-]*)\s*$")


def parse_value(raw: str) -> Any:
    """An option's VALUE text -> JSON where it parses, a boolean for true/false in any case, else the text."""
    text = str(raw).strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def option_key(key: str) -> str:
    """The keyword an option KEY names (`case-sensitive` -> `case_sensitive`)."""
    return key.strip().replace("-", "_")


def looks_like_option(text: str) -> bool:
    """Whether `text` reads as `KEY=VALUE` / `NAME:KEY=VALUE` (before its first `=`, an identifier,
    optionally scoped, and no path separator), rather than a path that happens to hold `=`."""
    head, sep, _ = str(text).partition("=")
    return bool(sep) and _OPTION_HEAD.match(head) is not None


def parse_option(text: str, flag: str = "option") -> tuple[str | None, str, Any]:
    """`KEY=VALUE` -> (None, key, value); `NAME:KEY=VALUE` -> (NAME, key, value). `flag` names
    where the text came from in the error."""
    head, sep, raw = str(text).partition("=")
    match = _OPTION_HEAD.match(head) if sep else None
    if match is None:
        raise RegapError(f"{flag} must look like KEY=VALUE or NAME:KEY=VALUE, got {text!r}")
    scope = match["scope"].strip() if match["scope"] else None
    return scope, option_key(match["key"]), parse_value(raw)


def parse_spec(spec: str, what: str = "spec") -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME:KEY=VALUE[:KEY=VALUE...]` -> (NAME, {key: value}); a key given twice is an
    error. `what` names the thing in errors ("defense spec")."""
    name, colon, rest = str(spec).partition(":")
    options: dict[str, Any] = {}
    for part in _NEXT_OPTION.split(rest) if colon else []:
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise RegapError(f"{what} {spec!r}: {part.strip()!r} is not key=value")
        key = option_key(key)
        if key in options:
            raise RegapError(f"{what} {spec!r}: {key} is given twice")
        options[key] = parse_value(raw)
    return name.strip(), options


def parse_path_spec(spec: Any, what: str, formats: tuple[str, ...] | None = None) -> tuple[str, Path | None]:
    """`NAME` -> (NAME, None); `NAME:PATH` -> (NAME, PATH), split at the first colon. With `formats`,
    NAME (case-folded) must be one of them and PATH is required (`FORMAT:PATH`)."""
    text = spec.strip() if isinstance(spec, str) else ""
    name, sep, raw_path = text.partition(":")
    name = name.strip()
    if formats is not None:
        name = name.lower()
        if not sep or name not in formats or not raw_path.strip():
            raise RegapError(f"{what} must look like FORMAT:PATH with FORMAT one of {', '.join(formats)}; got {spec!r}")
        return name, Path(raw_path.strip()).expanduser()
    if not name:
        raise RegapError(f"empty {what} spec; use NAME or NAME:PATH")
    if not sep:
        return name, None
    if not raw_path.strip():
        raise RegapError(f"{what} spec {spec!r} has an empty path after ':'")
    return name, Path(raw_path.strip()).expanduser()


__all__ = ["looks_like_option", "option_key", "parse_option", "parse_path_spec", "parse_spec", "parse_value"]
