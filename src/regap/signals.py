"""SIGTERM as a Ctrl-C: batch schedulers (Slurm, Kubernetes, a CI job's timeout) stop a job with
SIGTERM, then SIGKILL after a grace period. Python's default for SIGTERM is to die on the spot, so a
training run would lose every step since its last checkpoint. Raising `KeyboardInterrupt` instead sends
the signal down the path Ctrl-C already takes: the trainer saves a checkpoint at the step it reached,
the safety and utility runs keep their caches, and a rerun resumes.

Only the CLI installs this. A program that imports regap as a library keeps its own signal handling.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for a process ended by SIGINT (Ctrl-C)
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, the shell's code for a process ended by SIGTERM


@dataclass
class Termination:
    """Whether SIGTERM arrived while the handler was installed."""

    received: bool = False


@contextmanager
def sigterm_as_interrupt() -> Iterator[Termination]:
    """Within the block, the first SIGTERM raises `KeyboardInterrupt`; later ones are ignored, so that a
    scheduler repeating the signal does not cut short the checkpoint the first one asked for."""
    termination = Termination()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield termination
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if termination.received:
            return
        termination.received = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield termination
    finally:
        signal.signal(signal.SIGTERM, previous)
