"""Where converted weights and other derived artefacts live (never in git), and how
several processes build an entry there without colliding."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """`$REGAP_CACHE`, else `$XDG_CACHE_HOME/regap`, else `~/.cache/regap`."""
    explicit = os.environ.get("REGAP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "regap"


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_writable(folder: Path) -> Path:
    """`folder`, created, once a file could be made in it; OSError when not (read-only, a file in
    its place, a full disk). Caches that only save time check this first and do without."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
        pass
    return folder


# ---- building cache entries safely with several processes -------------------------------------
#
# Two processes on an empty cache (e.g. `torchrun --nproc_per_node 2` on a fresh machine) must
# not build the same entry into the same temporary name. The builder of an entry holds a lock
# file beside it (other processes wait, then reuse the finished entry), writes into a staging
# name of its own, and renames it into place once complete. Staging left behind by a killed
# builder is removed by the next one.

STAGING_MARK = ".partial"
#: Staging of another host (where the process cannot be checked) counts as stale after this long.
STALE_AFTER_S = 24 * 3600


def announce(message: str) -> None:
    """A one-line progress note on stderr (stdout stays for command output)."""
    print(f"regap: {message}", file=sys.stderr, flush=True)


@contextmanager
def build_lock(target: Path, what: str) -> Iterator[None]:
    """Hold `TARGET.lock` (an OS file lock, freed when the process dies) while building
    `target`; a second process waits, saying so, and should then re-check `target`."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.with_name(target.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        announce(f"waiting for another process that is preparing {what}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def staging_path(target: Path) -> Path:
    """A temporary name beside `target` that belongs to this process (host, pid, random)."""
    host = socket.gethostname().replace("-", "_") or "host"
    return target.with_name(f"{target.name}{STAGING_MARK}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_stale(path: Path, now: float) -> bool:
    suffix = path.name.rsplit(STAGING_MARK, 1)[1]
    parts = suffix[1:].rsplit("-", 2) if suffix.startswith("-") else []
    if len(parts) == 3 and parts[0] == socket.gethostname().replace("-", "_") and parts[1].isdigit():
        if int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            return True
    try:
        return now - path.lstat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def clean_stale_staging(target: Path) -> list[Path]:
    """Remove staging files/folders of `target` left by builders that died (same host) or that
    are older than `STALE_AFTER_S`, and the fixed `.partial` name of earlier versions; call it
    while holding `build_lock(target)`. Returns what was removed."""
    if not target.parent.is_dir():
        return []
    now = time.time()
    removed = []
    for path in target.parent.glob(glob.escape(target.name + STAGING_MARK) + "*"):
        if path.name != target.name + STAGING_MARK and not _is_stale(path, now):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        announce(f"removed {len(removed)} unfinished leftover(s) of {target.name}: "
                 + ", ".join(p.name for p in removed))
    return removed
