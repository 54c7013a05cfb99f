"""A disk cache of frozen vision-tower features, so images are encoded once, not once per run.

Why: in stage 1 (and stage 2) the vision tower is frozen, and a study trains several λ
values and seeds on the same images. Each image's features are stored once under
`$REGAP_CACHE/features/<tower fingerprint>/`, keyed by the decoded pixels, so a changed
image, preprocessing, dtype or encoder weight never hits a stale entry (the fingerprint
covers the tower's config, its image processor, its dtype and a sample of its weights).
Files are written atomically under per-process names, so several processes may share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image

from regap.files import atomic_path

if TYPE_CHECKING:
    from regap.models.vision import VisionTower

FEATURE_CACHE_CHOICES = ("auto", "on", "off")


def image_key(image: Image.Image) -> str:
    """sha256 of an image's decoded pixels, mode and size (what the preprocessing sees)."""
    digest = hashlib.sha256(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class CacheUnwritable(Exception):
    """The cache folder cannot be created or written (read-only, full, a file in its place)."""


class VisionFeatureCache:
    """`features(keys, pixel_values)` returns the tower's output for each image, encoding only
    the images whose features are not cached yet. The tower must be frozen (no gradient flows
    into cached features).

    An entry is used only when it holds a finite tensor of the tower's output shape and dtype;
    anything else (a truncated or foreign file, another shape, NaN) is a miss, encoded again and
    overwritten. A folder that cannot be written raises `CacheUnwritable` at construction (train
    without the cache); a write that fails later (a full disk) stops storing, with one warning."""

    def __init__(self, vision: VisionTower, root: str | Path | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        from regap.cache import announce, cache_root, ensure_writable
        from regap.models.fingerprint import vision_fingerprint

        self.vision = vision
        self.fingerprint = vision_fingerprint(vision)
        self.folder = (Path(root) if root is not None else cache_root() / "features") / self.fingerprint
        self.warn = warn or announce
        try:
            ensure_writable(self.folder)
        except OSError as exc:
            raise CacheUnwritable(f"{self.folder}: {exc.strerror or exc}") from None
        self.writable = True
        #: (tokens, hidden) and dtype of the tower's output: what a usable entry holds
        self.shape = (vision.num_tokens, vision.hidden_size)
        self.dtype = next(vision.parameters()).dtype
        self.hits = 0
        self.misses = 0
        self.rejected = 0

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def _load(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            value = load_file(path)["features"]
        except Exception:  # a truncated or foreign file: encode again and overwrite it
            self.rejected += 1
            return None
        if tuple(value.shape) != self.shape or value.dtype != self.dtype or not torch.isfinite(value).all():
            self.rejected += 1  # another tower's shape or dtype, or a corrupted value: a miss
            return None
        return value

    def _store(self, key: str, features: torch.Tensor) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        if not self.writable:
            return
        path = self._path(key)
        try:
            with atomic_path(path) as tmp:
                save_file({"features": features.detach().to("cpu").contiguous()}, str(tmp))
        except (OSError, SafetensorError) as exc:  # a full or read-only disk only costs re-encoding later
            self.writable = False
            self.warn(f"vision-feature cache {self.folder} cannot be written ({_reason(exc)}); "
                      "training goes on without storing features")

    @torch.no_grad()
    def features(self, keys: Sequence[str], pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, tokens, vision hidden] for `pixel_values` [n_images, 3, H, W], cached by `keys`."""
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {pixel_values.shape[0]} images")
        device = next(self.vision.parameters()).device
        found = [self._load(key) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            encoded = self.vision(pixel_values[missing].to(device))
            self.shape, self.dtype = tuple(encoded.shape[1:]), encoded.dtype  # the tower's own output rules
            for row, index in enumerate(missing):
                found[index] = encoded[row]
                self._store(keys[index], encoded[row])
        return torch.stack([value.to(device) for value in found])

    def stats(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "folder": str(self.folder), "hits": self.hits, "misses": self.misses,
                "rejected": self.rejected}


def _reason(exc: BaseException) -> str:
    """An OS error's message, or a safetensors I/O error's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
