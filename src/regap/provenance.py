"""Provenance: what produced a number (library versions, host, seeds, settings)."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from regap.files import file_sha256  # re-exported: regap.train imports it from here

_LIBRARIES = ("regap", "torch", "transformers", "accelerate", "peft", "safetensors", "numpy", "scipy", "pillow")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose behaviour can change a number."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """Host facts that matter for reproducing a run."""
    import torch

    from regap.precision import cpu_capability, usable_cpu_count

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_capability": cpu_capability(),
        "usable_cpus": usable_cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def text_hash(text: str) -> str:
    """Short, stable hash of a prompt template or other text (sha256, first 16 hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def json_hash(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    return text_hash(json.dumps(obj, sort_keys=True, default=str))


def provenance(**fields: Any) -> dict[str, Any]:
    """A provenance record: the caller's fields plus versions, host, the process's dtype choices
    (`dtype: auto` and why) and a UTC time stamp."""
    from regap.precision import resolutions

    return {
        **fields,
        "precision": resolutions(),
        "versions": library_versions(),
        "environment": environment(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
