"""Append-only JSONL caches that survive being killed mid-write.

Rows are appended and flushed one batch at a time. A run killed while writing leaves at
most one partial last line; opening the store cuts it off, so a rerun neither loses
finished rows nor duplicates them. A damaged line elsewhere (not UTF-8, not JSON, no key;
an edit or a disk fault) is skipped and listed in `skipped`, so its item is redone rather
than the whole run failing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


class JsonlStore:
    """Rows keyed by their `key` field; `add` appends, `rows` reads back the last row per key."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        #: Lines that could not be read back: {"line": number, "reason": ...}.
        self.skipped: list[dict[str, Any]] = []
        self._rows: dict[str, dict[str, Any]] = {row["key"]: row for row in self._read()}

    def _repair(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1  # keep everything up to the last complete line
            handle.truncate(cut)

    def _read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:  # bytes: one undecodable line must not stop the rest
            for number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    self.skipped.append({"line": number, "reason": f"not UTF-8 ({exc.reason} at byte {exc.start})"})
                    continue
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:  # only foreign edits after _repair
                    self.skipped.append({"line": number, "reason": f"not JSON ({exc.msg})"})
                    continue
                if isinstance(row, dict) and "key" in row:
                    yield row
                else:
                    self.skipped.append({"line": number, "reason": "not a row with a 'key'"})

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._rows.get(key)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for row in rows:
            self._rows[row["key"]] = row

    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

