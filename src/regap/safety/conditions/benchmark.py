"""The `benchmark` condition: the image a benchmark ships with each request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from regap.errors import RegapError
from regap.images import load_image
from regap.safety.conditions.base import ImageCondition, _extra, register_condition


@register_condition("benchmark")
class BenchmarkImage(ImageCondition):
    """The image the benchmark ships with the request: `extra["image"]` (or
    `extra["image_path"]`), relative to `root` (default: the working directory)."""

    name = kind = "benchmark"
    KEYS = ("image", "image_path")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(".") if root is None else Path(root).expanduser()

    def path_for(self, request_id: str, extra: dict[str, Any] | None) -> Path:
        data = _extra(extra)
        for key in self.KEYS:
            value = data.get(key)
            if isinstance(value, (str, Path)) and str(value).strip():
                return self.root / value
        raise RegapError(f"benchmark: request {request_id!r} has no image path (field 'image' or 'image_path')")

    def image_for(self, request_id, prompt, extra=None):
        return load_image(self.path_for(request_id, extra))

    def details(self, request_id, prompt, extra=None):
        return {"image_path": str(self.path_for(request_id, extra))}

    def settings(self):
        return {"root": str(self.root)}
