"""The image-condition interface, its registry and the helpers every condition shares.

A condition decides, for one request, the text and the image (if any) the model gets and the
per-request facts stored next to the response. `inputs(request)` is what a run calls: the
request carries everything a condition reads (its id for seeding, the prompt, the dataset's
`extra` fields, a benchmark's image file). `image_for` / `text_prompt` / `details` are the
pieces a subclass overrides, also usable without a `Request` (gap probes, calibration images).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

import numpy as np
from PIL import Image

from regap.errors import RegapError
from regap.files import stable_seed  # noqa: F401  (re-exported: conditions seed from it)
from regap.images import GENERATED_SIZE
from regap.registry import Registry

if TYPE_CHECKING:
    from regap.safety.sources import Request

DEFAULT_SIZE = GENERATED_SIZE


# --------------------------------------------------------------------------- helpers


def _parse_size(size: int | Iterable[int], what: str) -> tuple[int, int]:
    """`336` -> (336, 336); `(w, h)` -> (w, h); anything else is a `RegapError`."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    else:
        try:
            width, height = size  # type: ignore[misc]
            pair = (int(width), int(height))
        except (TypeError, ValueError):
            raise RegapError(f"{what}: size must be an integer or (width, height), got {size!r}") from None
    if pair[0] <= 0 or pair[1] <= 0 or pair[0] * pair[1] > 64_000_000:
        raise RegapError(f"{what}: size must be positive and at most 64 Mpx, got {pair}")
    return pair


def _extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    return {} if extra is None else extra


def _nonempty_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


# --------------------------------------------------------------------------- base class


class ConditionInputs(NamedTuple):
    """What one request gets under one condition: the text sent, the image (None: text only)
    and the per-request facts stored with the response."""

    text: str
    image: Image.Image | None
    details: dict[str, Any]


class ImageCondition:
    """One way of pairing an image with a request.

    Subclasses set `needs_image` / `use_backbone` and override `image_for`, and where
    they need to, `text_prompt` (a condition may replace the text, as FigStep does),
    `details` (per-request provenance) and `settings` (what `describe()` records).
    """

    #: The name the condition was asked for by (set by `get_condition`).
    name: str = ""
    #: The registered class key (the canonical name when several names share a class).
    kind: str = ""
    #: Whether the model gets an image at all.
    needs_image: bool = True
    #: Whether the request goes to the language backbone alone (no vision tower).
    use_backbone: bool = False

    def image_for(self, request_id: str, prompt: str, extra: dict[str, Any] | None = None) -> Image.Image | None:
        """The RGB image for this request, or None when the condition has no image."""
        return None

    def text_prompt(self, prompt: str, extra: dict[str, Any] | None = None) -> str:
        """The text sent with the image; the request's prompt unless the condition replaces it."""
        return prompt

    def details(self, request_id: str, prompt: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Per-request facts to store next to the response (e.g. which photo was chosen)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The condition's settings (JSON-serialisable)."""
        return {}

    def inputs(self, request: "Request") -> ConditionInputs:
        """The text, image and per-request details this condition gives `request` (a run's call)."""
        extra = dict(request.extra)
        text = self.text_prompt(request.prompt, extra)
        image = self.image_for(request.id, request.prompt, extra) if self.needs_image else None
        return ConditionInputs(text, image, self.details(request.id, request.prompt, extra))

    def input_file(self, request: "Request") -> Path | None:
        """The file `request`'s input is read from under this condition (its sha256 goes into the
        cached row, so a replaced file is generated anew); None for generated images."""
        return None

    def describe(self) -> dict[str, Any]:
        """Everything that decides the images and prompts, for provenance."""
        return {
            "name": self.name or self.kind,
            "kind": self.kind,
            "needs_image": self.needs_image,
            "use_backbone": self.use_backbone,
            **self.settings(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------- registry

#: Every image condition by name; `register_condition` adds to it, `get_condition` builds from it.
CONDITIONS: Registry[type[ImageCondition]] = Registry("image condition", plural="conditions")


def register_condition(*names: Any, **defaults: Any) -> Any:
    """Register an `ImageCondition` subclass.

    `@register_condition` registers the class under its `name` attribute;
    `@register_condition("blank", "blank-white", color="white")` registers it under each
    name with default options (overridable in `get_condition`).
    """
    if len(names) == 1 and isinstance(names[0], type) and not defaults:
        cls = names[0]
        CONDITIONS.add(cls.name, cls)
        return cls

    def decorate(cls: Any) -> Any:
        first, *aliases = names or (cls.name,)
        return CONDITIONS.register(first, *aliases, defaults=defaults)(cls)

    return decorate


def available_conditions() -> list[str]:
    """Registered condition names, sorted."""
    return CONDITIONS.names()


def get_condition(name: str, **options: Any) -> ImageCondition:
    """Build the condition registered as `name` (case-insensitive) with `options`."""
    entry, checked = CONDITIONS.resolve(name, options)
    condition = entry.obj(**{**entry.defaults, **checked})
    condition.name = entry.name
    if not condition.kind:
        condition.kind = entry.obj.name or entry.name
    return condition
