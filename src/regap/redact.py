"""Masking secrets before anything is recorded.

Why: options, error messages and judge answers end up in provenance.json, verdict caches,
reports and logs. A password inside a URL (``http://user:pw@host``) or an API key that a
server echoes back must never land there, so everything a judge records passes through
`redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "***"

# scheme://userinfo@ - the userinfo ends at the last '@' before the path; '/', '?', '#' and
# whitespace cannot occur in it unencoded.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*(?:@[^/?#@\s]*)*)@")


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _password = match["userinfo"].partition(":")
    # With a password the user name is an identity and stays readable; alone it is often a token.
    return f"{match['scheme']}{user}:{MASK}@" if sep else f"{match['scheme']}{MASK}@"


def mask_url(text: str) -> str:
    """`text` with the password (or a lone user token) of every ``scheme://user:pw@`` URL masked."""
    return _USERINFO.sub(_mask_userinfo, text)


def redact(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """`value` (a string, or dicts / lists / tuples of them, nested) with URL credentials masked
    and every one of `secrets` replaced by ``***``. Other values are returned unchanged."""
    known = sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first: no partial leftovers
    return _redact(value, known)


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return mask_url(value)
    if isinstance(value, dict):
        return {_redact(k, secrets) if isinstance(k, str) else k: _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, secrets) for v in value)
    return value


__all__ = ["MASK", "mask_url", "redact"]
