"""The `natural` condition: an unrelated natural photo per request."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from regap.errors import MissingDependencyError, RegapError
from regap.images import load_image
from regap.safety.conditions.base import ImageCondition, _parse_size, register_condition, stable_seed


#: scikit-image sample photos used by the `natural` condition by default: colour photos
#: plus one grayscale photo (camera, converted to RGB). `horse` is a binary silhouette,
#: not a photo, so it is left out by default (it can still be asked for by name).
DEFAULT_NATURAL_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@lru_cache(maxsize=16)
def _skimage_photo(name: str) -> np.ndarray:
    try:
        from skimage import data as skdata
    except ImportError:
        raise MissingDependencyError(
            "the `natural` condition's built-in photos need scikit-image: pip install scikit-image "
            "(or pass folder=... with your own photos)"
        ) from None
    loader = getattr(skdata, name, None)
    if not callable(loader):
        raise RegapError(f"natural: scikit-image has no sample image {name!r}")
    try:
        array = np.asarray(loader())
    except Exception as exc:  # a sample that needs a download, offline
        raise RegapError(f"natural: cannot load scikit-image sample {name!r}: {exc}") from None
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = np.zeros(array.shape, np.uint8) if high <= low else ((array - low) / (high - low) * 255).round()
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 4:
        alpha = array[..., 3:4].astype(np.float64) / 255.0
        array = (array[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    elif array.ndim != 3 or array.shape[-1] != 3:
        raise RegapError(f"natural: scikit-image sample {name!r} has an unusable shape {array.shape}")
    array.setflags(write=False)
    return array


@register_condition("natural")
class Natural(ImageCondition):
    """An irrelevant natural photo, chosen deterministically per request id.

    By default from scikit-image's sample photos (`photos` picks which); with `folder`,
    from the image files in that folder (sorted by name). `size` resizes to a fixed
    size (bicubic); by default the photo keeps its own size and the model's processor
    resizes it.
    """

    name = kind = "natural"

    def __init__(
        self,
        folder: str | Path | None = None,
        photos: Iterable[str] | None = None,
        size: int | tuple[int, int] | None = None,
        seed: int = 0,
    ):
        self.seed = int(seed)
        self.size = None if size is None else _parse_size(size, "natural")
        self.folder = None if folder is None else Path(folder).expanduser()
        if self.folder is not None:
            if photos is not None:
                raise RegapError("natural: give either folder or photos, not both")
            if not self.folder.is_dir():
                raise RegapError(f"natural: photo folder not found: {self.folder}")
            files = sorted(
                p.relative_to(self.folder).as_posix()
                for p in self.folder.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise RegapError(f"natural: no image files ({', '.join(IMAGE_SUFFIXES)}) in {self.folder}")
            self.pool: tuple[str, ...] = tuple(files)
            self.source = "folder"
        else:
            if isinstance(photos, str):
                photos = [photos]
            pool = tuple(DEFAULT_NATURAL_PHOTOS if photos is None else photos)
            if not pool:
                raise RegapError("natural: the photo list is empty")
            self.pool = pool
            self.source = "skimage"

    def photo_for(self, request_id: str) -> str:
        """The name of the photo this request gets."""
        return self.pool[stable_seed("regap-natural", self.seed, request_id) % len(self.pool)]

    def image_for(self, request_id, prompt, extra=None):
        photo = self.photo_for(request_id)
        if self.folder is not None:
            image = load_image(self.folder / photo)
        else:
            image = Image.fromarray(np.array(_skimage_photo(photo)), mode="RGB")
        if self.size is not None and image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BICUBIC)
        return image

    def details(self, request_id, prompt, extra=None):
        return {"photo": self.photo_for(request_id), "photo_source": self.source}

    def settings(self):
        return {
            "source": self.source,
            "folder": None if self.folder is None else str(self.folder),
            "photos": list(self.pool),
            "size": None if self.size is None else list(self.size),
            "seed": self.seed,
            "choice": "pool[sha256(seed, request_id) % len(pool)]",
        }
