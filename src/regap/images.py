"""Loading images safely: clear errors, every mode converted to RGB, EXIF orientation applied,
no decompression bombs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from regap.errors import RegapError
from regap.files import stable_seed

#: Side of the images regap generates (blank, noise), LLaVA-1.5's input size.
GENERATED_SIZE = 336

#: Largest image we agree to decode (pixels). Pillow's own default warns at ~89 Mpx and
#: fails at twice that; we fail at the limit itself so a bomb never gets decoded.
MAX_IMAGE_PIXELS = 64_000_000
#: A URL (scheme://...): not fetched; a drive letter (C:/...) is a path, so the scheme has two letters or more.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency is composited on white (what a viewer shows), 16/32-bit grayscale is
    rescaled to its own range instead of being clipped to white.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as upright RGB, or raise a one-line `RegapError` naming the file."""
    if isinstance(path, str) and _URL.match(path):
        raise RegapError(f"{path}: URLs are not supported (http://, https://, s3://, ...); download the image "
                         "and give its file path")
    path = Path(path)
    if not path.exists():
        raise RegapError(f"image not found: {path}")
    if not path.is_file():
        raise RegapError(f"image path is not a file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                width, height = handle.size
                if width * height > max_pixels:
                    raise RegapError(
                        f"image too large: {path} is {width}x{height} "
                        f"({width * height:,} pixels > limit {max_pixels:,})"
                    )
                handle.load()
                # Upright as a viewer (and transformers' `load_image`) shows it: cameras store
                # the sensor's pixels and record the rotation in the EXIF orientation tag.
                return to_rgb(ImageOps.exif_transpose(handle))
    except RegapError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RegapError(f"image too large (decompression bomb guard): {path}: {exc}") from None
    except UnidentifiedImageError:
        raise RegapError(f"not a readable image file: {path}") from None
    except PermissionError:
        raise RegapError(f"image not readable (permission denied): {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RegapError(f"corrupt or truncated image: {path}: {exc}") from None


def blank_image(size: tuple[int, int] = (GENERATED_SIZE, GENERATED_SIZE),
                color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A uniform RGB image: the `blank` condition's image and CMRM's meaningless image."""
    return Image.new("RGB", size, color)


def noise_seed(kind: str, seed: int, key: str) -> int:
    """The seed of one noise image: the kind is part of it, so Gaussian and uniform noise are
    independent draws, and `key` (a request id) gives each request its own image."""
    return stable_seed("regap-noise", kind, seed, key)


def gaussian_noise_image(key: str, size: tuple[int, int] = (GENERATED_SIZE, GENERATED_SIZE), mean: float = 127.5,
                         std: float = 64.0, seed: int = 0) -> Image.Image:
    """Per-pixel Gaussian noise clipped to [0, 255], seeded by `key`: the `noise` condition's
    image and CMRM's noise image."""
    width, height = size
    values = np.random.default_rng(noise_seed("noise-gaussian", seed, key)).normal(mean, std, size=(height, width, 3))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="RGB")
