"""Loading from a local folder or a model hub, with one-line errors instead of deep tracebacks."""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

from regap.errors import RegapError

T = TypeVar("T")


def hub_call(name: str, loader: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a `from_pretrained`-style loader; never with trust_remote_code unless asked.

    A name that is neither a local folder nor reachable on the hub (no network, unknown id)
    becomes a `RegapError` naming it.
    """
    kwargs.setdefault("trust_remote_code", False)
    try:
        return loader(*args, **kwargs)
    except RegapError:
        raise
    except (OSError, ValueError) as exc:
        where = "local folder" if os.path.isdir(name) else "hub id (no local folder of that name)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegapError(f"cannot load {name!r} as a {where}: {first_line}") from None
