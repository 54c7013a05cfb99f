"""Kept cases: one JSON line per saved case, in the `jsonl` request-source format, so
`regap safety --prompts jsonl:FILE` reads the file back as a request set.

A line holds the fields that source reads (`id`, `prompt`, `category`, `label`, and `image` for an
uploaded image, relative to the file's folder) and, under `extra`, what the page showed: the
condition, the text sent, the decoding settings, and per side the model, its fingerprint, its
defenses, the answer, the verdicts and the gap. An uploaded image is copied beside the file as
`images/SHA256.EXT`, so the same image saved twice is stored once and the file's folder moves as
one piece. Replay an uploaded case with `--conditions benchmark`, a generated one with its
condition (`extra.condition`): conditions seed their images from the case id, which is the id the
page used, except that a request saved again gets a suffix (`-2`, ...), as ids must be unique.
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from regap.errors import RegapError
from regap.files import file_sha256

IMAGE_FOLDER = "images"
CATEGORY = "playground"
_LOCK = threading.Lock()  # sessions of one server append to the same file


def check_cases_path(path: str | Path) -> Path:
    """The case file's path: a .jsonl file whose folder exists or can be made."""
    path = Path(path).expanduser()
    if path.suffix != ".jsonl":
        raise RegapError(f"case file {path} must end in .jsonl (the format `regap safety --prompts jsonl:FILE` reads)")
    if path.is_dir():
        raise RegapError(f"case file {path} is a folder; give a .jsonl file path")
    return path


def _existing_ids(path: Path) -> set[str]:
    ids: set[str] = set()
    if not path.is_file():
        return ids
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("id") is not None:
                ids.add(str(record["id"]))
    return ids


def _unique_id(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"


def store_upload(path: Path, upload: Path) -> str:
    """Copy an uploaded image beside the case file as `images/SHA256.EXT`; its path relative to
    the case file's folder (what the jsonl source resolves `image` against)."""
    sha = file_sha256(upload)
    suffix = upload.suffix.lower() if upload.suffix.lower().lstrip(".").isalnum() else ""
    relative = Path(IMAGE_FOLDER) / f"{sha}{suffix}"
    target = path.parent / relative
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload, target)
    return relative.as_posix()


def save_case(path: str | Path, *, request: str, request_id: str, label: str, condition: str,
              text_sent: str, upload: Path | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Append one case to `path` (created with its folder if needed); returns the line written."""
    path = check_cases_path(path)
    if label not in ("harmful", "benign"):
        raise RegapError(f"case label must be harmful or benign, got {label!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        record: dict[str, Any] = {"id": _unique_id(request_id, _existing_ids(path)), "prompt": request,
                                  "category": CATEGORY, "label": label}
        if upload is not None:
            record["image"] = store_upload(path, upload)
        record["extra"] = {"condition": condition, "request_id": request_id, "text_sent": text_sent,
                           "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}
        line = json.dumps(record, ensure_ascii=False, default=str)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return record
