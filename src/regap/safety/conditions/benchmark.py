"""The `benchmark` condition: the image a benchmark ships with each request."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from regap.errors import RegapError
from regap.images import load_image
from regap.safety.conditions.base import ConditionInputs, ImageCondition, _extra, register_condition

if TYPE_CHECKING:
    from regap.safety.sources import Request


@register_condition("benchmark")
class BenchmarkImage(ImageCondition):
    """The image the benchmark ships with the request.

    In a run (`inputs`) that is the request's own image, which its source resolved against
    the benchmark's folder (`Request.resolved_image()`); the file's sha256 keys the cached row.
    Without a request (`image_for`), it is `extra["image"]` (or `extra["image_path"]`),
    relative to `root` (default: the working directory).
    """

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

    def inputs(self, request: "Request") -> ConditionInputs:
        path = request.resolved_image()
        if path is None:
            raise RegapError(f"request {request.id} has no benchmark image")
        return ConditionInputs(self.text_prompt(request.prompt, dict(request.extra)), load_image(path),
                               {"image": request.image})

    def input_file(self, request: "Request") -> Path | None:
        return request.resolved_image()

    def details(self, request_id, prompt, extra=None):
        return {"image_path": str(self.path_for(request_id, extra))}

    def settings(self):
        return {"root": str(self.root)}
