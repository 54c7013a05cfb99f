"""Step markers: a finished step leaves `FOLDER/NAME.json` holding the hash of its parameters and
its duration, so a rerun skips it, and a rerun with other parameters redoes it.

Why: the demo and the study are long chains of steps whose outputs live in their own folders;
an interrupted run must lose at most the step in flight, and a changed setting must never be
answered from a stale result."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from regap.files import write_text_atomic
from regap.provenance import json_hash


class StepMarkers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.timings: dict[str, float] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def done(self, name: str, params: Any) -> bool:
        marker = self.path(name)
        if not marker.exists():
            return False
        try:
            return json.loads(marker.read_text()).get("params") == json_hash(params)
        except json.JSONDecodeError:
            return False

    def seconds(self, name: str) -> float:
        return float(json.loads(self.path(name).read_text())["seconds"])

    def mark(self, name: str, params: Any, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path(name), json.dumps({"params": json_hash(params), "seconds": round(seconds, 1)}))

    def run(self, name: str, params: Any, action: Callable[[], Any], *, label: str | None = None,
            seconds: Callable[[], float] | None = None) -> bool:
        """Run `action` unless `name` is marked with the same params; True when it ran. The time
        goes to `timings[label or name]`: the recorded one, else `seconds()` when given (a step that
        resumes its own work across sittings knows its whole time), else this run's wall time."""
        key = label or name
        if self.done(name, params):
            self.timings[key] = self.seconds(name)
            return False
        started = time.time()
        action()
        took = seconds() if seconds is not None else time.time() - started
        self.mark(name, params, took)
        self.timings[key] = round(took, 1)
        return True
