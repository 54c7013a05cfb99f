"""File helpers shared by the loaders: tolerant CSV/JSON reading and image-path checks.

Real benchmark files differ in small ways (a BOM, `goal` vs `Goal`, quoted multi-line
fields, pandas index columns), so columns are matched case-insensitively and rows are
numbered by the line they start on, which is what an editor shows.
"""

from __future__ import annotations

import csv
import json
import posixpath
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from regap.errors import RegapError

from regap.safety.sources.core import ImageIssue, LoadReport

# HarmBench context strings can be long; the stdlib default (128 KiB) is fine for every
# known file, but a larger limit costs nothing and avoids a confusing csv.Error.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

#: A required column: one name, or a tuple of accepted alternatives (first found wins).
Column = str | tuple[str, ...]


def require_file(path: Path, what: str) -> Path:
    """The path as a readable file, or a RegapError naming it."""
    if not path.exists():
        raise RegapError(f"{what}: file not found: {path}")
    if not path.is_file():
        raise RegapError(f"{what}: expected a file, got a directory: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise RegapError(f"{what}: folder not found: {path}")
    if not path.is_dir():
        raise RegapError(f"{what}: expected a folder, got a file: {path}")
    return path


def _norm(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class CsvRow:
    """One data row: `line` where it starts (header = 1), `index` its 1-based data-row
    number (stable id material), values keyed by lower-cased column name."""

    line: int
    index: int
    values: dict[str, str]

    def get(self, *names: str, default: str = "") -> str:
        """First non-empty value among `names` (case-insensitive), stripped."""
        for name in names:
            value = self.values.get(_norm(name))
            if value is not None and value.strip():
                return value.strip()
        return default

    def has(self, name: str) -> bool:
        return _norm(name) in self.values


def read_csv(path: Path, *, source: str, required: Sequence[Column], report: LoadReport) -> Iterator[CsvRow]:
    """Yield rows of a CSV file after checking its header.

    Rows with more fields than the header (an unquoted comma) are reported and skipped;
    short rows are padded, since trailing empty cells are often dropped by tools.
    """
    require_file(path, source)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise RegapError(f"{source}: {path} is empty (no header row)")
            columns = [_norm(c) for c in header]
            _check_columns(path, source, header, columns, required)
            index = 0
            while True:
                start = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise RegapError(f"{source}: {path} line {start}: unreadable CSV ({exc})") from None
                if not cells or all(not c.strip() for c in cells):
                    continue  # blank line
                index += 1
                if len(cells) > len(columns):
                    report.skip(start, f"{len(cells)} fields but the header has {len(columns)}")
                    continue
                cells = cells + [""] * (len(columns) - len(cells))
                yield CsvRow(start, index, dict(zip(columns, cells)))
    except UnicodeDecodeError as exc:
        raise RegapError(f"{source}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_columns(
    path: Path, source: str, header: list[str], columns: list[str], required: Sequence[Column]
) -> None:
    present = set(columns)
    missing = []
    for column in required:
        options = (column,) if isinstance(column, str) else column
        if not any(_norm(o) in present for o in options):
            missing.append(" or ".join(options))
    if missing:
        found = ", ".join(h.strip() for h in header) or "(none)"
        raise RegapError(
            f"{source}: {path} is missing required column(s) {', '.join(missing)}; found columns: {found}"
        )


def read_json(path: Path, *, source: str) -> Any:
    """Parse a whole JSON file, or raise a RegapError naming the file and position."""
    require_file(path, source)
    try:
        with path.open(encoding="utf-8-sig") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise RegapError(f"{source}: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise RegapError(f"{source}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def safe_relative(raw: str) -> str | None:
    """Normalise a data-file image path to a POSIX path inside its root, or None.

    The check is lexical on purpose: absolute paths, drive letters and `..` that climb
    out are refused, while symlinks *inside* the root are followed, as Hugging Face cache
    snapshots link every file to a blob outside the snapshot folder.
    """
    if not raw or "\x00" in raw:
        return None
    text = raw.strip().replace("\\", "/")
    if not text or text.startswith("/") or PureWindowsPath(raw.strip()).drive or text.startswith("~"):
        return None
    normal = posixpath.normpath(text)
    if normal in (".", "..") or normal.startswith("../"):
        return None
    return normal


def check_image(
    report: LoadReport, root: Path, raw: str, item: str, *, alternatives: Sequence[str] = ()
) -> str | None:
    """The safe relative path of an existing image, or None after recording why not.

    `alternatives` are other relative candidates tried when `raw` is missing (e.g. a
    `.png` where `.jpg` was expected).
    """
    relative = safe_relative(raw)
    if relative is None:
        report.unsafe_paths.append(ImageIssue(item, raw))
        return None
    for candidate in (relative, *alternatives):
        candidate_rel = safe_relative(candidate)
        if candidate_rel is not None and (root / candidate_rel).is_file():
            return candidate_rel
    report.missing_images.append(ImageIssue(item, relative))
    return None

