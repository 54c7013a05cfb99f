"""One registry for everything a run names: image conditions, judges, defenses, request sources.

Each kind keeps one `Registry` (`CONDITIONS`, `JUDGES`, `DEFENSES`, `SOURCES`) and a
`register_*` decorator on top of it, so a user's own class or loader plugs in exactly
like a built-in one, and every kind follows the same rules:

* names are case-folded (`get_judge("Keyword")` is `keyword`) and may not contain ':',
  ',' or whitespace (the CLI splits lists at ',' and specs at ':');
* a second registration of a name is an error (`replace=True` overrides on purpose), so
  two plugins cannot silently shadow each other;
* an unknown name is a one-line `RegapError` listing the valid names, with a "did you
  mean" when one is close;
* options are checked against the constructor's (or loader's) signature before it runs,
  so a misspelt key is a one-line `RegapError` naming it and the accepted ones, not a
  `TypeError` from deep inside; each value is checked against the option's annotation (or,
  without one, its default's type), and against its range where the class declares one in
  `option_ranges` ({key: (low, high)}), so `threshold=abc` or `alpha=2` fails the same way.
  Text where a number or a boolean is declared is read as in `regap.specs.parse_value`
  ("0.5" -> 0.5), so Python callers may pass option text as a command line would.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from regap.errors import RegapError

T = TypeVar("T")

#: Characters a registered name may not contain (list and spec separators on the command line).
FORBIDDEN = (":", ",")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: the class or function, its default options for this name, the
    options it accepts (`any_options`: it also takes `**kwargs`) and kind-specific facts."""

    name: str
    obj: T
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    any_options: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)


def accepted_options(obj: Callable[..., Any], skip: int = 0) -> tuple[tuple[str, ...], bool]:
    """The keyword options `obj` (a class or a function) accepts, in signature order, and whether
    it takes any (`**kwargs`). The first `skip` parameters are the caller's (a loader's path and
    report), not options; `*args` never is one."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: accept anything, let it check
        return (), True
    params = params[skip:]
    names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Names -> classes (or loader functions) of one kind, e.g. `Registry("judge")`.

    `kind` names the things in messages ("unknown judge 'x'"); `plural` lists them ("valid
    judges: ..."); `skip` is how many leading parameters the caller passes itself, so they are
    not options (a source loader gets `path, report`).
    """

    def __init__(self, kind: str, plural: str | None = None, skip: int = 0) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.skip = skip
        self._entries: dict[str, Entry[T]] = {}

    @staticmethod
    def key(name: Any) -> str:
        """The lookup key of a name: stripped and case-folded."""
        return str(name).strip().casefold()

    # -- registering
    def register(self, name: str, *aliases: str, defaults: Mapping[str, Any] | None = None,
                 replace: bool = False, **info: Any) -> Callable[[T], T]:
        """Class (or function) decorator: register under `name` and each alias, with `defaults`
        for options the caller does not give and `info` (kind-specific facts) on the entry."""

        def decorate(obj: T) -> T:
            for each in (name, *aliases):
                self.add(each, obj, defaults=defaults, replace=replace, **info)
            return obj

        return decorate

    def add(self, name: str, obj: T, defaults: Mapping[str, Any] | None = None, replace: bool = False,
            **info: Any) -> Entry[T]:
        """Register `obj` under `name`; a name already taken is a ValueError unless `replace`."""
        key = self.key(name)
        if not key or any(c in key for c in FORBIDDEN) or any(c.isspace() for c in key):
            raise ValueError(f"invalid {self.kind} name {name!r}: not empty, no ':', ',' or whitespace")
        if key in self._entries and not replace:
            held = self._entries[key].obj
            raise ValueError(f"{self.kind} {key!r} is already registered (to {getattr(held, '__qualname__', held)}); "
                             "pick another name or pass replace=True")
        options, any_options = accepted_options(obj, self.skip)  # type: ignore[arg-type]
        defaults = dict(defaults or {})
        unknown = [k for k in defaults if k not in options] if not any_options else []
        if unknown:
            raise ValueError(f"{self.kind} {key!r}: default option(s) {', '.join(unknown)} not accepted by "
                             f"{getattr(obj, '__qualname__', obj)}")
        entry = Entry(key, obj, defaults, options, any_options, dict(info))
        self._entries[key] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove a name (tests and notebooks); an unknown name is ignored."""
        self._entries.pop(self.key(name), None)

    # -- looking up
    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return self.key(name) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """The entry for `name`, or a one-line RegapError listing the valid names."""
        key = self.key(name)
        try:
            return self._entries[key]
        except KeyError:
            names = self.names()
            raise RegapError(f"unknown {self.kind} {str(name).strip()!r}{_did_you_mean(key, names)}; "
                             f"valid {self.plural}: {', '.join(names) or '(none)'}") from None

    def get(self, name: str) -> T:
        """The class (or function) registered as `name`."""
        return self.entry(name).obj

    def check_options(self, name: str, options: Mapping[str, Any] | None) -> Entry[T]:
        """The entry for `name` after checking every key, value type and range of `options`."""
        return self.resolve(name, options)[0]

    def resolve(self, name: str, options: Mapping[str, Any] | None) -> tuple[Entry[T], dict[str, Any]]:
        """The entry for `name` and `options` checked: every key accepted, every value of its
        declared type (text read as the command line reads it) and inside its declared range."""
        from regap.option_types import fit

        entry = self.entry(name)
        unknown = [] if entry.any_options else [key for key in (options or {}) if key not in entry.options]
        if unknown:
            listed = ", ".join(map(repr, unknown))
            raise RegapError(
                f"{self.kind} {entry.name!r} has no option{'s' if len(unknown) > 1 else ''} {listed}"
                f"{_did_you_mean(str(unknown[0]), entry.options)}; accepted: {', '.join(entry.options) or 'none'}")
        what = f"{self.kind} {entry.name!r}"
        checked = {key: fit(entry.obj, what, key, value) for key, value in (options or {}).items()}  # type: ignore[arg-type]
        return entry, checked

    def build(self, name: str, **options: Any) -> Any:
        """Call the class (or function) registered as `name` with its defaults and `options`,
        after checking them (`resolve`)."""
        entry, checked = self.resolve(name, options)
        return entry.obj(**{**entry.defaults, **checked})  # type: ignore[operator]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} names)"


__all__ = ["Entry", "Registry", "accepted_options"]
