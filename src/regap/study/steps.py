"""Step markers: a finished step leaves `FOLDER/NAME.json` holding the hash of its parameters and
its duration, so a rerun skips it, and a rerun with other parameters redoes it.

Why: the demo and the study are long chains of steps whose outputs live in their own folders;
an interrupted run must lose at most the step in flight, and a changed setting must never be
answered from a stale result.

A step in flight also keeps `FOLDER/NAME.partial.json`, rewritten every `heartbeat_s` seconds with the
time spent on it so far, so that a step finished in a later sitting reports the time of every sitting
(a process killed at the end of a session cannot write anything as it dies)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from regap.files import write_text_atomic
from regap.provenance import json_hash


class StepMarkers:
    def __init__(self, folder: Path, heartbeat_s: float = 30.0) -> None:
        self.folder = folder
        self.heartbeat_s = heartbeat_s
        self.timings: dict[str, float] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def partial_path(self, name: str) -> Path:
        return self.folder / f"{name}.partial.json"

    def earlier_seconds(self, name: str, params: Any) -> float:
        """Time spent on this step (same params) in sittings that did not finish it; 0 when none."""
        try:
            data = json.loads(self.partial_path(name).read_text())
            return float(data["seconds"]) if data.get("params") == json_hash(params) else 0.0
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def _record_partial(self, name: str, params: Any, seconds: float) -> None:
        self._write(self.partial_path(name), params, seconds)

    def _write(self, path: Path, params: Any, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"params": json_hash(params), "seconds": round(seconds, 1)}))

    def done(self, name: str, params: Any, legacy: Any = None) -> bool:
        """Whether `name` finished with these params (or with `legacy`, an older key for the same work)."""
        marker = self.path(name)
        if not marker.exists():
            return False
        try:
            stored = json.loads(marker.read_text()).get("params")
        except (json.JSONDecodeError, AttributeError):
            return False
        return stored == json_hash(params) or (legacy is not None and stored == json_hash(legacy))

    def seconds(self, name: str) -> float:
        return float(json.loads(self.path(name).read_text())["seconds"])

    def mark(self, name: str, params: Any, seconds: float) -> None:
        self._write(self.path(name), params, seconds)

    def run(self, name: str, params: Any, action: Callable[[], Any], *, label: str | None = None,
            seconds: Callable[[], float] | None = None, legacy: Any = None) -> bool:
        """Run `action` unless `name` is marked with the same params; True when it ran. The time
        goes to `timings[label or name]`: the recorded one, else `seconds()` when given (a step that
        resumes its own work across sittings knows its whole time), else the wall time of this
        sitting plus that of earlier sittings which did not finish the step (their partial record),
        including any work an interruption lost. A marker written under `legacy` (an older key for the
        same work) counts as done and is re-keyed."""
        key = label or name
        if self.done(name, params, legacy):
            self.timings[key] = self.seconds(name)
            if not self.done(name, params):  # re-key a marker written under the older key
                self.mark(name, params, self.timings[key])
            return False
        earlier = self.earlier_seconds(name, params)
        started = time.time()
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    self._record_partial(name, params, earlier + time.time() - started)
                except OSError:  # a full disk must not stop the step itself
                    pass

        beat = threading.Thread(target=heartbeat, name=f"step-heartbeat-{name}", daemon=True)
        beat.start()
        finished = False
        try:
            action()
            finished = True
        finally:
            stop.set()
            beat.join()
            if not finished:  # Ctrl-C or an error: keep this sitting's time for the rerun
                self._record_partial(name, params, earlier + time.time() - started)
        took = seconds() if seconds is not None else earlier + time.time() - started
        self.mark(name, params, took)
        self.partial_path(name).unlink(missing_ok=True)
        self.timings[key] = round(took, 1)
        return True
