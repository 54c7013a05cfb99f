"""What the page sends the models: the request, checked, and its image, from regap's attack
conditions or from an upload checked by `regap.images`.

An image that depends on the request id (noise seeds, the natural photo) is made with the id
`request_id(prompt)`, the same id a saved case carries (`regap.playground.cases`), so
`regap safety --prompts jsonl:CASES --conditions noise` draws the same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from regap.errors import RegapError

#: The longest request the page takes: far beyond any starter or benchmark request, short
#: enough that a CPU answers it in seconds, not in the minutes a 100k-character prompt takes.
MAX_REQUEST_CHARS = 4000

#: Image choices on the page: regap's attack conditions by name, and an uploaded file.
UPLOAD = "upload"
TEXT_ONLY = "text"
IMAGE_CHOICES: dict[str, str] = {
    TEXT_ONLY: "no image (text only)",
    "blank": "blank (white)",
    "noise": "noise (Gaussian)",
    "natural": "natural photo (unrelated)",
    "typo": "typographic (the request drawn as FigStep)",
    UPLOAD: "upload an image",
}

#: Starter requests offered on the page: the first few of regap's starter sets.
STARTER_HARMFUL = 6
STARTER_BENIGN = 3


@dataclass
class PageInput:
    """One request as the models get it: the text sent (a condition may replace the request,
    as FigStep does), the image (None: text only), and what made them."""

    request: str
    request_id: str
    condition: str
    text: str
    image: Image.Image | None
    details: dict[str, Any] = field(default_factory=dict)
    upload: Path | None = None  # the uploaded file, when the image was uploaded


def check_request(text: str | None) -> str:
    """The request without surrounding white space, or a one-line RegapError."""
    request = (text or "").strip()
    if not request:
        raise RegapError("the request is empty: type one or pick a starter request")
    if len(request) > MAX_REQUEST_CHARS:
        raise RegapError(f"the request has {len(request):,} characters; the playground takes at most "
                         f"{MAX_REQUEST_CHARS:,} (use `regap safety` for long inputs)")
    return request


def request_id(request: str) -> str:
    """A stable id for a request: what seeds its condition images and names its saved case."""
    return "pg-" + hashlib.sha256(request.encode("utf-8")).hexdigest()[:12]


def page_input(request: str | None, choice: str, upload: str | Path | None = None) -> PageInput:
    """The request and its image under `choice` (a condition name or `upload`); bad input is a
    RegapError naming the problem (an empty or overlong request, no file, a file that is not an
    image or is too large)."""
    from regap.images import load_image
    from regap.safety.conditions import get_condition
    from regap.safety.sources import Request

    text = check_request(request)
    identifier = request_id(text)
    if choice == UPLOAD:
        if upload is None or not str(upload).strip():
            raise RegapError("no image uploaded: choose an image file, or pick a condition instead of upload")
        path = Path(upload)
        image = load_image(path)
        return PageInput(text, identifier, UPLOAD, text, image, {"file": path.name}, path)
    if choice not in IMAGE_CHOICES:
        raise RegapError(f"unknown image choice {choice!r}; valid: {', '.join(IMAGE_CHOICES)}")
    condition = get_condition(choice)
    inputs = condition.inputs(Request(id=identifier, prompt=text, category="playground", source="playground"))
    return PageInput(text, identifier, choice, inputs.text, inputs.image,
                     {"condition": condition.describe(), **inputs.details})


def starter_requests() -> list[tuple[str, str]]:
    """(label, request) pairs for the page's starter list: harmful requests first, then benign
    ones that sound alarming (an over-refusal check)."""
    from regap.safety.sources import load_requests

    requests = load_requests("starter-harmful", limit=STARTER_HARMFUL) + \
        load_requests("starter-benign", limit=STARTER_BENIGN)
    return [(f"[{r.label}] {r.prompt}", r.prompt) for r in requests]


def starter_label(request: str) -> str:
    """`harmful` or `benign` for a starter request, `harmful` for anything else (a red-teaming page's
    requests are attacks unless they come from the benign set)."""
    from regap.safety.sources import load_requests

    benign = {r.prompt for r in load_requests("starter-benign", limit=STARTER_BENIGN)}
    return "benign" if request.strip() in benign else "harmful"
