"""One run per output folder.

Two runs writing the same `--out` interleave their caches and overwrite each other's
summaries without any error. Each command that writes a run folder therefore holds
`OUT/.regap.lock` while it runs; a second run on the same folder fails at once with one
line. The lock is an OS file lock (`filelock`), so the OS releases it when a run dies,
even from `kill -9`: a stale lock file never blocks the next run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from regap.errors import RegapError

LOCK_NAME = ".regap.lock"


@contextmanager
def exclusive_out(out: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Create `out` and hold its lock for the block, without waiting: a folder already in
    use by another run raises a `RegapError` naming it (`flag` is the option it came from)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RegapError(f"{flag} {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegapError(f"{flag} {out}: cannot create the folder ({exc.strerror or exc})") from None
    with _held(out / LOCK_NAME, f"{flag} {out}", "folder"):
        yield out


@contextmanager
def exclusive_file(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Hold a lock beside the file `path` (`.NAME.regap.lock`) for the block: a second run writing
    the same file fails at once, as `exclusive_out` does for a folder."""
    path = Path(path)
    if path.is_dir():
        raise RegapError(f"{flag} {path} is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegapError(f"{flag} {path}: cannot create its folder {path.parent} ({exc.strerror or exc})") from None
    with _held(path.with_name(f".{path.name}{LOCK_NAME}"), f"{flag} {path}", "file"):
        yield path


@contextmanager
def _held(lock_path: Path, what: str, kind: str) -> Iterator[None]:
    """The OS lock on `lock_path`, taken without waiting; every way it can fail is one line."""
    from filelock import FileLock, Timeout

    if lock_path.is_dir():
        raise RegapError(f"{lock_path} is a folder, not regap's lock file; remove it and rerun")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RegapError(f"{what} is in use by another regap run (it holds {lock_path}); "
                         f"wait for that run to finish or choose another {kind}") from None
    except OSError as exc:
        raise RegapError(f"{what}: cannot create the lock file {lock_path} ({exc.strerror or exc}); "
                         f"choose a writable {kind}") from None
    try:
        yield
    finally:
        lock.release()


def held_by_another_run(folder: str | Path) -> bool:
    """Whether another live process holds `folder`'s lock (for status displays: it takes the lock for
    an instant, so a run starting at that very instant may find the folder busy and skip it)."""
    from filelock import FileLock, Timeout

    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
