"""Files and reproducible randomness shared by every package: atomic writes, file hashes and
seeded random streams (one copy of each, so every output and every stream follows one rule).

File modes: every file regap writes gets the mode the process umask gives a new file, whatever
library wrote it (`apply_umask`).

Atomic writes: a reader, or a run resumed after a crash, sees either the old file or the whole
new one, never a half-written file: the data go to a temporary name beside the target (unique to
the process, so two writers never share it), which `os.replace` then renames in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

TMP_SUFFIX = ".tmp"


_umask_lock = threading.Lock()


def process_umask() -> int:
    """The process's umask (read from /proc where the OS has it, so no other thread ever sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> Path:
    """Give the file `path`, or every file under the folder `path`, the mode a new file gets from the
    process umask (0644 under the usual 022). Writers that create private files (safetensors writes
    0600) would otherwise break a cache or run folder shared by a group."""
    path = Path(path)
    mode = 0o666 & ~process_umask()
    for item in [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        os.chmod(item, mode)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file path beside `path` to write to (with any writer: safetensors, torch,
    text); renamed onto `path` when the block ends without error (with the mode the umask gives
    a new file, whatever the writer chose), removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        if tmp.is_file():
            apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `data` as indented JSON to `path` atomically; values JSON cannot hold (paths,
    dates) are written as their `str`."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str))


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line to `path` atomically (values as in `write_json_atomic`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    return path


def file_sha256(path: str | Path) -> str:
    """Full sha256 of a file, read in 1 MiB blocks (weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_seed(*parts: object, sep: str = "\x1f") -> int:
    """A 64-bit seed from the parts' text (the first 8 bytes of its sha256), identical across
    processes, machines and Python versions, unlike `hash()`; nearby seeds or indices give
    unrelated streams. `sep` joins the parts (streams made before this module existed joined
    theirs with "|": they pass it, so they stay the same)."""
    joined = sep.join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(joined.encode("utf-8")).digest()[:8], "big")


def stable_random(*parts: object, sep: str = "\x1f") -> random.Random:
    """A `random.Random` seeded with `stable_seed(*parts, sep=sep)`: a random stream that is a
    function of the parts only (draw through `random()` where the stream must stay the same
    across Python versions: its sequence is the one Python keeps stable)."""
    return random.Random(stable_seed(*parts, sep=sep))
