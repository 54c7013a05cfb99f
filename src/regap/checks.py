"""Argument checks shared by the commands, run before any model is loaded so a typo costs
a one-line `RegapError` instead of minutes of loading and a library traceback."""

from __future__ import annotations

from pathlib import Path

from regap.errors import RegapError

#: numpy's legacy seeding (used by accelerate's `set_seed`) takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


def check_seed(seed: int, name: str = "--seed") -> int:
    """The seed, or an error: every library we seed accepts 0..2**32-1 (numpy rejects negatives)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RegapError(f"{name} must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return seed


def prepare_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder (and its parents); a file in its place is named, not a traceback."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RegapError(f"{flag} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RegapError(f"{flag} {path}: a part of that path is a file, not a folder") from None
    except PermissionError:
        raise RegapError(f"{flag} {path}: permission denied creating the folder") from None
    return path


def check_names(names: list[str], flag: str) -> list[str]:
    """A comma-separated list that must name at least one item (`--conditions ""` is a mistake)."""
    if not names:
        raise RegapError(f"{flag} is empty; give at least one name")
    return names
