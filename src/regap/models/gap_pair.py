"""An image-text pair and the two protocols that turn it into a conversation: what the gap is
measured on (`regap.gap`) and what the hidden-state defenses are calibrated on (`regap.defenses`).

* `reference` (MIR's): the image alone in the user turn and an unrelated text as the assistant
  turn; text tokens are the positions after the image block;
* `prompt` (safety): the image plus a request in the user turn, ready for generation.

The pairs themselves are built from image and text sources by `regap.safety.pairs`.
"""

from __future__ import annotations

from typing import Callable

from PIL import Image

from regap.errors import RegapError

PROTOCOLS = ("reference", "prompt")


class GapPair:
    """One pair. `image` may be given as a function that makes it, so a long list of pairs holds
    no pixels until a batch reads them (each read makes the image anew)."""

    __slots__ = ("id", "text", "image_source", "_image")

    def __init__(self, id: str, image: Image.Image | Callable[[], Image.Image], text: str, image_source: str) -> None:
        self.id, self.text, self.image_source, self._image = id, text, image_source, image

    @property
    def image(self) -> Image.Image:
        return self._image() if callable(self._image) else self._image

    def __repr__(self) -> str:
        return f"GapPair(id={self.id!r}, text={self.text[:40]!r}, image_source={self.image_source!r})"


def conversation(pair: GapPair, protocol: str) -> list[dict[str, str]]:
    """The chat messages of `pair` under `protocol` (the image marker first)."""
    if protocol == "reference":
        return [{"role": "user", "content": "<image>\n"}, {"role": "assistant", "content": pair.text}]
    if protocol == "prompt":
        return [{"role": "user", "content": "<image>\n" + pair.text}]
    raise RegapError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
