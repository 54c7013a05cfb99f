"""Where converted weights and other derived artefacts live (never in git)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$REGAP_CACHE`, else `$XDG_CACHE_HOME/regap`, else `~/.cache/regap`."""
    explicit = os.environ.get("REGAP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "regap"


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
