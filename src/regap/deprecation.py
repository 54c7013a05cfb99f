"""One-line notes for old spellings that still work: printed once per process on stderr, with
the release that drops them, so scripts keep running while their authors learn the new form."""

from __future__ import annotations

import sys

#: The release that stops accepting the spellings deprecated in this one.
REMOVED_IN = "0.3"

_noted: set[str] = set()


def deprecated(old: str, new: str) -> None:
    """Say once that `old` is deprecated in favour of `new`."""
    if old in _noted:
        return
    _noted.add(old)
    print(f"note: {old} is deprecated and stops working in regap {REMOVED_IN}; use {new}", file=sys.stderr)


__all__ = ["REMOVED_IN", "deprecated"]
