"""Reading LLaVA-format conversation data (JSON list or JSONL), validated at load time.

A row is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.
Malformed rows, image paths that escape the image root and images missing from disk are
reported (``dataset.report``) and skipped; images themselves are decoded lazily, in
``__getitem__``. The rules are listed in ``docs/data.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

from PIL import Image

from regap.errors import RegapError
from regap.images import load_image

IMAGE_TOKEN = "<image>"
ROLE_MAP = {"human": "user", "gpt": "assistant"}
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_RESERVED_KEYS = ("id", "image", "conversations")


@dataclass
class ConversationSample:
    """One training conversation; ``image`` is ``None`` for text-only samples.

    ``messages`` are ``{"role": "user"|"assistant", "content": str}``; ``<image>`` markers
    stay in the content. ``meta`` holds the row's other keys (e.g. a category).
    """

    id: str
    image: Image.Image | None
    messages: list[dict[str, str]]
    image_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetReport:
    """What loading skipped, and why. ``malformed`` holds ``(index, reason)`` pairs.

    The index is the 0-based position in a JSON list, or the 1-based line number in a
    JSONL file (``index_kind`` says which).
    """

    source: str
    image_root: str
    index_kind: str = "list_index"
    rows_seen: int = 0
    loaded: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    image_marker_added: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "image_root": self.image_root,
            "index_kind": self.index_kind,
            "rows_seen": self.rows_seen,
            "loaded": self.loaded,
            "n_malformed": len(self.malformed),
            "n_missing_images": len(self.missing_images),
            "image_marker_added": self.image_marker_added,
            "malformed": [{"index": index, "reason": reason} for index, reason in self.malformed],
            "missing_images": list(self.missing_images),
        }


@dataclass(frozen=True)
class _Record:
    id: str
    image: str | None
    messages: tuple[tuple[str, str], ...]
    meta: dict[str, Any]


class _Malformed(Exception):
    """A row that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class _BadLine:
    """A JSONL line that did not parse."""

    reason: str


# --------------------------------------------------------------------------- file reading


def read_rows(path: str | Path) -> tuple[list[tuple[int, Any]], list[tuple[int, str]], str]:
    """Rows of a JSON list or JSONL file as ``(index, row)``, plus unparsable JSONL lines.

    JSON: index is the 0-based list position; a file that is not valid JSON raises a
    `RegapError` naming the file, line and column. JSONL (``.jsonl``/``.ndjson``): index
    is the 1-based line number, blank lines are skipped and a bad line is reported.
    """
    path = Path(path)
    if not path.exists():
        raise RegapError(f"data file not found: {path}")
    if not path.is_file():
        raise RegapError(f"data path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RegapError(f"data file is not UTF-8 text: {path}: {exc}") from None
    if path.suffix.lower() in _JSONL_SUFFIXES:
        rows: list[tuple[int, Any]] = []
        bad: list[tuple[int, str]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                bad.append((lineno, f"invalid JSON at column {exc.colno}: {exc.msg}"))
        return rows, bad, "line_number"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegapError(
            f"invalid JSON in {path} at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise RegapError(
            f"{path}: expected a JSON list of rows, got {type(data).__name__} "
            f"(use a .jsonl suffix for one object per line)"
        )
    return list(enumerate(data)), [], "list_index"


def safe_relative_path(image: str) -> str:
    """Return ``image`` if it is a relative path inside its root, else raise `_Malformed`."""
    if "\x00" in image:
        raise _Malformed("image path contains a NUL byte")
    posix = PurePosixPath(image.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(image).is_absolute() or PureWindowsPath(image).drive:
        raise _Malformed(f"image path escapes the image root (absolute): {image!r}")
    if ".." in posix.parts:
        raise _Malformed(f"image path escapes the image root ('..'): {image!r}")
    return image


def _is_inside(root_real: str, real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


class _RootGuard:
    """Checks that a path under the root does not leave it through a symlink.

    Resolved parent folders are cached, so a large file costs ~one ``lstat`` per row.
    """

    def __init__(self, root: Path) -> None:
        self.root_real = os.path.realpath(root)
        self._parents: dict[str, bool] = {}

    def inside(self, full: Path) -> bool:
        text = os.fspath(full)
        parent = os.path.dirname(text)
        ok = self._parents.get(parent)
        if ok is None:
            ok = self._parents[parent] = _is_inside(self.root_real, os.path.realpath(parent))
        if ok and os.path.islink(text):
            ok = _is_inside(self.root_real, os.path.realpath(text))
        return ok


# --------------------------------------------------------------------------- validation


def _parse_conversation(conversations: Any) -> list[list[str]]:
    if not isinstance(conversations, list):
        raise _Malformed(f"'conversations' must be a list, got {type(conversations).__name__}")
    if not conversations:
        raise _Malformed("'conversations' is empty")
    turns: list[list[str]] = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Malformed(f"turn {k} is not an object")
        speaker = turn.get("from")
        if speaker not in ROLE_MAP:
            raise _Malformed(f"turn {k} has unknown 'from': {speaker!r} (expected 'human' or 'gpt')")
        value = turn.get("value")
        if not isinstance(value, str):
            raise _Malformed(f"turn {k} 'value' is not a string ({type(value).__name__})")
        expected = "human" if k % 2 == 0 else "gpt"
        if speaker != expected:
            raise _Malformed(f"turn {k} is from {speaker!r}, expected {expected!r} (turns must alternate, human first)")
        turns.append([ROLE_MAP[speaker], value])
    return turns


def _check_markers(turns: list[list[str]], has_image: bool) -> bool:
    """Validate ``<image>`` markers; prepend one to the first user turn if needed."""
    if any(IMAGE_TOKEN in content for role, content in turns if role == "assistant"):
        raise _Malformed(f"{IMAGE_TOKEN} marker in an assistant ('gpt') turn")
    markers = sum(content.count(IMAGE_TOKEN) for _, content in turns)
    if has_image:
        if markers > 1:
            raise _Malformed(f"{markers} {IMAGE_TOKEN} markers for one image (at most 1)")
        if markers == 0:
            turns[0][1] = f"{IMAGE_TOKEN}\n{turns[0][1]}"
            return True
    elif markers:
        raise _Malformed(f"{markers} {IMAGE_TOKEN} marker(s) but the row has no image")
    return False


class LlavaJsonDataset:
    """LLaVA conversations from a JSON list or JSONL file; images load on access.

    ``image_root`` defaults to the data file's folder. ``max_items`` stops after that many
    valid samples (the report then covers only the rows read).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path | None = None,
        *,
        max_items: int | None = None,
    ) -> None:
        self.json_path = Path(json_path)
        rows, bad_lines, index_kind = read_rows(self.json_path)
        self._init(rows, image_root if image_root is not None else self.json_path.parent,
                   source=str(self.json_path), index_kind=index_kind, max_items=max_items,
                   bad_lines=bad_lines)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Any],
        image_root: str | Path,
        *,
        source: str = "<rows>",
        max_items: int | None = None,
    ) -> "LlavaJsonDataset":
        """Validate in-memory LLaVA rows exactly as a file's rows (indices are 0-based)."""
        self = cls.__new__(cls)
        self.json_path = None  # type: ignore[assignment]
        self._init(list(enumerate(rows)), image_root, source=source, index_kind="list_index",
                   max_items=max_items, bad_lines=[])
        return self

    def _init(
        self,
        rows: list[tuple[int, Any]],
        image_root: str | Path,
        *,
        source: str,
        index_kind: str,
        max_items: int | None,
        bad_lines: list[tuple[int, str]],
    ) -> None:
        if max_items is not None and max_items < 0:
            raise RegapError(f"max_items must be >= 0 (got {max_items})")
        self.image_root = Path(image_root)
        self.report = DatasetReport(source=source, image_root=str(self.image_root), index_kind=index_kind)
        guard = _RootGuard(self.image_root)
        self._records: list[_Record] = []
        entries: list[tuple[int, Any]] = list(rows) + [(i, _BadLine(reason)) for i, reason in bad_lines]
        entries.sort(key=lambda entry: entry[0])
        for index, row in entries:
            if max_items is not None and len(self._records) >= max_items:
                break
            self.report.rows_seen += 1
            try:
                if isinstance(row, _BadLine):
                    raise _Malformed(row.reason)
                record, added = self._validate(index, row, guard)
            except _Malformed as exc:
                self.report.malformed.append((index, str(exc)))
                continue
            if record is None:
                continue
            self.report.image_marker_added += int(added)
            self._records.append(record)
        self.report.loaded = len(self._records)

    def _validate(self, index: int, row: Any, guard: "_RootGuard") -> tuple[_Record | None, bool]:
        if not isinstance(row, dict):
            raise _Malformed(f"row is not an object ({type(row).__name__})")
        if "conversations" not in row:
            raise _Malformed("missing 'conversations'")
        turns = _parse_conversation(row["conversations"])
        raw_id = row.get("id", index)
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            raise _Malformed(f"'id' must be a string or integer, got {type(raw_id).__name__}")
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image.strip():
                raise _Malformed(f"'image' must be a non-empty string, got {image!r}")
            safe_relative_path(image)
        added = _check_markers(turns, has_image=image is not None)
        if image is not None:
            full = self.image_root / image
            if not guard.inside(full):
                raise _Malformed(f"image path escapes the image root (symlink): {image!r}")
            if not os.path.exists(full):
                self.report.missing_images.append(image)
                return None, False
        meta = {k: v for k, v in row.items() if k not in _RESERVED_KEYS}
        return _Record(str(raw_id), image, tuple((r, c) for r, c in turns), meta), added

    # ----------------------------------------------------------------- sequence protocol

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> ConversationSample:
        record = self._records[index]
        image = load_image(self.image_root / record.image) if record.image is not None else None
        return ConversationSample(
            id=record.id,
            image=image,
            messages=[{"role": role, "content": content} for role, content in record.messages],
            image_path=record.image,
            meta=dict(record.meta),
        )

    def __iter__(self) -> Iterator[ConversationSample]:
        for index in range(len(self)):
            yield self[index]

    # ----------------------------------------------------------------- helpers

    def image_paths(self) -> list[str | None]:
        """The (relative) image path of every loaded sample, without decoding anything."""
        return [record.image for record in self._records]

    def to_llava_rows(self) -> list[dict[str, Any]]:
        """The loaded samples back in LLaVA row form (with any auto-added markers)."""
        rows = []
        for record in self._records:
            row: dict[str, Any] = {"id": record.id}
            if record.image is not None:
                row["image"] = record.image
            row["conversations"] = [
                {"from": "human" if role == "user" else "gpt", "value": content}
                for role, content in record.messages
            ]
            row.update(record.meta)
            rows.append(row)
        return rows

    def write_report(self, path: str | Path) -> Path:
        """Write ``report`` as JSON; a folder gets ``data_report.json`` inside it."""
        target = Path(path)
        if target.is_dir():
            target = target / "data_report.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return target
