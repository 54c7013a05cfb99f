"""`regap playground`: a local web page for red-teaming two models side by side.

    >>> from regap.playground import build_app, launch
    >>> launch(build_app("tiny-llava", "tiny-llava-regap"))      # http://127.0.0.1:7860

Modules: `inputs` (the request and its image), `session` (one side: model pool, defenses,
streamed answer, judges), `gap` (the gap of one input against the model's text statistics),
`cases` (the case file `regap safety` reads back), `page` (the actions, without widgets) and `app`
(the Gradio layout). Gradio comes with the `playground` extra; this package imports without it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from regap.errors import MissingDependencyError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

INSTALL = "pip install 'regap[playground]'"


def require_gradio() -> None:
    """Import Gradio (telemetry off), or a one-line error naming the extra to install."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise MissingDependencyError(f"the playground needs Gradio: {INSTALL}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool


def build_app(model_a: "str | LVLM" = "tiny-llava", model_b: "str | LVLM" = "tiny-llava-regap", **options: Any) -> Any:
    """The playground page as a `gr.Blocks` (see `regap.playground.app.build_app` for the options)."""
    require_gradio()
    from regap.playground import app

    return app.build_app(model_a, model_b, **options)


def launch(blocks: Any, host: str = "127.0.0.1", port: int = 7860, **options: Any) -> Any:
    """Serve a page from `build_app` on host:port, without a share link."""
    require_gradio()
    from regap.playground import app

    return app.launch(blocks, host=host, port=port, **options)


__all__ = ["INSTALL", "build_app", "launch", "require_gradio"]
