"""Conditions with no image or a generated one: text only, the backbone, blank, noise."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image, ImageColor

from regap.errors import RegapError
from regap.images import blank_image, gaussian_noise_image, noise_seed
from regap.safety.conditions.base import DEFAULT_SIZE, ImageCondition, _parse_size, register_condition


def _parse_color(color: str | Iterable[int], what: str) -> tuple[int, int, int]:
    try:
        if isinstance(color, str):
            rgb = ImageColor.getrgb(color)
        else:
            rgb = tuple(int(c) for c in color)  # type: ignore[union-attr]
        if len(rgb) == 4:
            rgb = rgb[:3]
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError
        return (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    except (TypeError, ValueError):
        raise RegapError(f"{what}: not a colour: {color!r} (use a name, '#rrggbb' or (r, g, b))") from None


@register_condition("text")
class TextOnly(ImageCondition):
    """The request alone, no image (the VLM's text-only path)."""

    name = kind = "text"
    needs_image = False


@register_condition("backbone")
class Backbone(ImageCondition):
    """The request alone, to the language backbone as it was before stage 2 (no vision tower,
    no image): the LoRA-tuned model with its adapter disabled, or the original LLM weights of a
    fully tuned one (`regap.models.backbone`; the safety runner reads `use_backbone`)."""

    name = kind = "backbone"
    needs_image = False
    use_backbone = True

    def settings(self):
        # Part of the cache key: rows cached when `backbone` still generated like `text` are not reused.
        return {"llm": "as before stage 2 (regap.models.backbone)"}


@register_condition("blank", "blank-white", color="white")
@register_condition("blank-black", color="black")
class Blank(ImageCondition):
    """A uniform image (white by default, black for `blank-black`), 336x336 unless `size` says otherwise."""

    name = kind = "blank"

    def __init__(self, size: int | tuple[int, int] = DEFAULT_SIZE, color: str | tuple[int, int, int] = "white"):
        self.size = _parse_size(size, "blank")
        self.color = _parse_color(color, "blank")

    def image_for(self, request_id, prompt, extra=None):
        return blank_image(self.size, self.color)

    def settings(self):
        return {"size": list(self.size), "color": list(self.color)}


class _Noise(ImageCondition):
    def __init__(self, size: int | tuple[int, int] = DEFAULT_SIZE, seed: int = 0):
        self.size = _parse_size(size, self.kind)
        self.seed = int(seed)

    def _rng(self, request_id: str) -> np.random.Generator:
        return np.random.default_rng(noise_seed(self.kind, self.seed, request_id))

    def settings(self):
        return {"size": list(self.size), "seed": self.seed, "seeding": "sha256(kind, seed, request_id)"}


@register_condition("noise", "noise-gaussian")
class GaussianNoise(_Noise):
    """Per-pixel Gaussian noise (mean 127.5, std 64), clipped to [0, 255], seeded by request id."""

    name = kind = "noise-gaussian"

    def __init__(
        self, size: int | tuple[int, int] = DEFAULT_SIZE, mean: float = 127.5, std: float = 64.0, seed: int = 0
    ):
        super().__init__(size, seed)
        if std < 0:
            raise RegapError(f"noise-gaussian: std must be >= 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def image_for(self, request_id, prompt, extra=None):
        return gaussian_noise_image(request_id, self.size, self.mean, self.std, self.seed)

    def settings(self):
        return {**super().settings(), "mean": self.mean, "std": self.std, "clip": [0, 255]}


@register_condition("noise-uniform")
class UniformNoise(_Noise):
    """Per-pixel uniform noise over the integers 0..255, seeded by request id."""

    name = kind = "noise-uniform"

    def image_for(self, request_id, prompt, extra=None):
        width, height = self.size
        values = self._rng(request_id).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        return Image.fromarray(values, mode="RGB")

    def settings(self):
        return {**super().settings(), "low": 0, "high": 255}
