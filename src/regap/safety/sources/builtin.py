"""The project's own starter sets, plus the JSONL and JSON-list formats users write by hand.

Starter sets are package data (`regap/safety/data/*.jsonl`) read through importlib.resources,
so they work from a wheel or a zip as well as from a source tree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from regap.errors import RegapError
from regap.safety.sources.core import LABELS, LoadReport, Request, register_source
from regap.safety.sources.files import check_image, read_json, require_file

UNCATEGORIZED = "uncategorized"
_KNOWN_KEYS = {"id", "prompt", "category", "label", "image", "extra"}

#: Built-in set name -> file under regap/safety/data/.
STARTER_SETS = {
    "starter-harmful": "starter_harmful.jsonl",
    "starter-benign": "starter_benign.jsonl",
}


def parse_jsonl(
    lines: Iterable[str],
    report: LoadReport,
    *,
    default_id: str,
    default_label: str = "harmful",
    image_root: Path | None = None,
) -> Iterator[Request]:
    """Yield a request per JSON line; bad lines are reported with their 1-based number.

    Fields: `prompt` (required), `id` (default `{default_id}-{line}`), `category`, `label`,
    `image` (relative to `image_root`), `extra`; any other key is kept in `extra`.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            report.skip(number, f"not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            report.skip(number, f"expected a JSON object, got {type(record).__name__}")
            continue
        request_id = str(record.get("id") or f"{default_id}-{number}").strip()
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            report.skip(number, "empty or missing prompt", request_id)
            continue
        label = record.get("label") or default_label
        if label not in LABELS:
            report.skip(number, f"label {label!r} is not one of {', '.join(LABELS)}", request_id)
            continue
        extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
        extra = {**{k: v for k, v in record.items() if k not in _KNOWN_KEYS}, **extra}
        image = record.get("image")
        if image is not None:
            if image_root is None:
                report.skip(number, "image given but this source has no image folder", request_id)
                continue
            image = check_image(report, image_root, str(image), request_id)
            if image is None:
                continue
        yield Request(
            id=request_id,
            prompt=prompt.strip(),
            category=str(record.get("category") or UNCATEGORIZED),
            source=report.source,
            label=label,
            image=image,
            image_root=str(image_root.absolute()) if image else None,
            extra=extra,
        )


def _starter(report: LoadReport) -> Iterator[Request]:
    data = resources.files("regap.safety").joinpath("data", STARTER_SETS[report.source])
    with data.open("r", encoding="utf-8") as handle:
        yield from parse_jsonl(handle, report, default_id=report.source)


@register_source("starter-harmful", needs_path=False)
def load_starter_harmful(path: None, report: LoadReport) -> Iterator[Request]:
    """Built-in: short, plainly harmful requests (requests only) across many categories."""
    return _starter(report)


@register_source("starter-benign", needs_path=False)
def load_starter_benign(path: None, report: LoadReport) -> Iterator[Request]:
    """Built-in: benign requests, incl. 'scary-but-safe' ones that measure over-refusal."""
    return _starter(report)


@register_source("jsonl")
def load_jsonl(path: Path, report: LoadReport, *, label: str = "harmful") -> Iterator[Request]:
    """Your own requests, one JSON object per line (the starter-set format).

    Images are relative to the file's folder.
    """
    if label not in LABELS:
        raise RegapError(f"jsonl: label must be one of {', '.join(LABELS)}, got {label!r}")
    require_file(path, report.source)
    try:
        with path.open(encoding="utf-8-sig") as handle:
            yield from parse_jsonl(
                handle, report, default_id=path.stem, default_label=label, image_root=path.parent
            )
    except UnicodeDecodeError as exc:
        raise RegapError(f"jsonl: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _instruction_text(record: dict[str, Any]) -> str:
    """Alpaca-style records put optional input after the instruction."""
    instruction = str(record.get("instruction") or "").strip()
    extra_input = str(record.get("input") or "").strip()
    return f"{instruction}\n\n{extra_input}" if instruction and extra_input else instruction


@register_source("instructions")
def load_instructions(path: Path, report: LoadReport, *, label: str = "benign") -> Iterator[Request]:
    """A JSON list of `{"instruction": ..., "category": ...}` objects (Alpaca / refusal-direction style)."""
    if label not in LABELS:
        raise RegapError(f"instructions: label must be one of {', '.join(LABELS)}, got {label!r}")
    data = read_json(path, source=report.source)
    if not isinstance(data, list):
        raise RegapError(f"instructions: {path} must hold a JSON list of objects")
    for number, record in enumerate(data, start=1):
        request_id = f"{path.stem}-{number}"
        prompt = _instruction_text(record) if isinstance(record, dict) else ""
        if not prompt:
            report.skip(None, f"item {number} has no instruction", request_id)
            continue
        yield Request(
            id=request_id,
            prompt=prompt,
            category=str(record.get("category") or UNCATEGORIZED),
            source=report.source,
            label=label,
            extra={k: v for k, v in record.items() if k not in ("instruction", "input", "category")},
        )
