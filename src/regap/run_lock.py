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
    from filelock import FileLock, Timeout

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RegapError(f"{flag} {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RegapError(f"{flag} {out} is in use by another regap run (it holds {out / LOCK_NAME}); "
                         "wait for that run to finish or choose another folder") from None
    try:
        yield out
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
