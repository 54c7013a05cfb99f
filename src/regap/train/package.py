"""Packaging a stage-2 LoRA training output as a trained preset's assets (`regap models package`).

The folder it writes is what `regap.models.loading.trained` loads: the projector, the peft LoRA
adapter (and MoCa, when the run trained one), all safetensors, and `manifest.json` (the base
model as training built it, the training's key settings read from its `config.yaml`, the
caller's info and the sha256 of every file). It returns the pins, which go into
`regap.models.loading.presets` by hand: the hashes live in code, so a changed asset is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regap.errors import RegapError
from regap.files import atomic_path, file_sha256, write_json_atomic
from regap.models.loading.folders import PROJECTOR_FILE, TRAIN_CONFIG_FILE, is_training_output
from regap.models.loading.saved import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from regap.models.moca import MOCA_FILE
from regap.models.loading.presets import PRESETS, TINY_RANDOM
from regap.models.loading.trained import ADAPTER_DIR, MANIFEST_FILE, MANIFEST_FORMAT, is_base_model
from regap.train.config import TrainConfig, read_yaml

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
RESAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PackagedPreset:
    dest: Path
    pins: dict[str, str]  # relative path -> sha256, manifest.json included
    manifest: dict[str, Any]
    total_bytes: int


def package_preset(train_out: str | Path, name: str, dest: str | Path, *, info: dict[str, Any] | None = None,
                   dtype: str | None = None, overwrite: bool = False) -> PackagedPreset:
    """Copy a stage-2 LoRA output's trained parts into `dest` with a manifest; `dtype` re-saves
    the floating-point weights in that type (smaller assets), None keeps them as saved."""
    train_out, dest = Path(train_out), Path(dest)
    config = _stage2_lora_config(train_out)
    if not _NAME.match(name):
        raise RegapError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-' (e.g. tiny-llava)")
    if name in PRESETS and not PRESETS[name].trained:
        raise RegapError(f"--name {name!r} is a preset built from parts; give the trained preset's own name")
    if dtype is not None and dtype not in RESAVE_DTYPES:
        raise RegapError(f"--dtype {dtype!r}: valid: {', '.join(RESAVE_DTYPES)} (or leave it out to keep the saved type)")
    if info is not None and not isinstance(info, dict):
        raise RegapError("--info must be a JSON object ({\"key\": value, ...})")
    if dest.exists() and not dest.is_dir():
        raise RegapError(f"--dest {dest} is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise RegapError(f"--dest {dest} is not empty; give a new folder (or --overwrite to replace it)")

    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ADAPTER_DIR).mkdir(parents=True)
    files = [PROJECTOR_FILE, f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS_FILE}"]
    if (train_out / MOCA_FILE).is_file():
        files.append(MOCA_FILE)
    for relative in files:
        source, target = train_out / relative, staging / relative
        if dtype is not None and relative.endswith(".safetensors"):
            _resave(source, target, dtype)
        elif relative.endswith(ADAPTER_CONFIG_FILE):
            _portable_adapter_config(source, target, config.model)
        else:
            shutil.copyfile(source, target)
    hashes = {relative: file_sha256(staging / relative) for relative in files}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "base": {"model": config.model, "projector_type": config.projector_type,
                 "projector_options": config.qformer.options(), "seed": config.seed},
        "training": training_record(train_out, config),
        "info": dict(info or {}),
        "weights_dtype": dtype or "as saved by training",
        "files": hashes,
    }
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    pins = {MANIFEST_FILE: file_sha256(staging / MANIFEST_FILE), **hashes}
    total = sum((staging / relative).stat().st_size for relative in pins)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return PackagedPreset(dest, dict(sorted(pins.items())), manifest, total)


def _portable_adapter_config(source: Path, target: Path, base: str) -> None:
    """peft's adapter config with `base_model_name_or_path` naming the base preset's LLM instead of the
    packager's cache folder (peft only records it: the model is built from the preset, not from it)."""
    adapter_config = _read_json(source)
    preset = PRESETS.get(base)
    llm = preset.config.llm_source if preset is not None and preset.config is not None else base
    adapter_config["base_model_name_or_path"] = llm
    target.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _stage2_lora_config(train_out: Path) -> TrainConfig:
    if not is_training_output(train_out):
        raise RegapError(f"{train_out}: not a training output folder (no {TRAIN_CONFIG_FILE} with {PROJECTOR_FILE}); "
                         f"give the --out folder of a finished `regap finetune` run with tune: lora")
    config = TrainConfig.from_dict(read_yaml(train_out / TRAIN_CONFIG_FILE))
    if config.stage != 2 or config.tune != "lora":
        raise RegapError(f"{train_out}: a stage-{config.stage} output (tune: {config.tune}); a trained preset packages "
                         f"a stage-2 LoRA output (projector + LoRA adapter)")
    for relative in (PROJECTOR_FILE, f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS_FILE}"):
        if not (train_out / relative).is_file():
            raise RegapError(f"{train_out}: no {relative} (the training has not finished)")
    if not is_base_model(config.model):
        valid = [n for n in PRESETS if is_base_model(n)] + [TINY_RANDOM]
        raise RegapError(f"{train_out}: its base model {config.model!r} is not a preset built from parts "
                         f"({', '.join(valid)}); a trained preset is rebuilt from its base preset")
    return config


def training_record(train_out: Path, config: TrainConfig) -> dict[str, Any]:
    """The training's key settings (from `config.yaml`), its data (from `provenance.json`) and its
    stage-1 run's settings when the initial projector is a training output that still exists."""
    record = _key_settings(train_out, config)
    initial = Path(config.projector) if config.projector else None
    record["initial_projector"] = initial.name if initial is not None else None
    stage1_folder = initial if initial is not None and initial.is_dir() else (initial.parent if initial else None)
    if stage1_folder is not None and is_training_output(stage1_folder):
        try:
            stage1 = TrainConfig.from_dict(read_yaml(stage1_folder / TRAIN_CONFIG_FILE))
        except RegapError:
            stage1 = None
        if stage1 is not None:
            record["stage1"] = _key_settings(stage1_folder, stage1)
    return record


def _key_settings(folder: Path, config: TrainConfig) -> dict[str, Any]:
    provenance = _read_json(folder / "provenance.json")
    data = provenance.get("data") if isinstance(provenance.get("data"), dict) else {}
    return {
        "stage": config.stage, "tune": config.tune, "model": config.model, "template": config.template,
        "seed": config.seed, "dtype": config.dtype, "mixed_precision": config.mixed_precision,
        "lr": config.lr, "projector_lr": config.projector_lr, "global_batch_size": config.global_batch_size,
        "epochs": config.epochs, "max_steps": config.max_steps, "steps": _trained_steps(folder),
        "max_length": config.max_length, "warmup_ratio": config.warmup_ratio, "weight_decay": config.weight_decay,
        "lora": {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout,
                 "target_modules": config.lora.target_modules} if config.tune == "lora" else None,
        "regap": {"lam": config.regap.lam, "layer": config.regap.layer, "distance": config.regap.distance,
                  "pooling": config.regap.pooling},
        "moca": {"enabled": config.moca.enabled, "layers": config.moca.layers},
        "data": {"json": Path(config.data.json).name if config.data.json else None,
                 "sha256": data.get("sha256"), "loaded": data.get("loaded"), "max_items": config.data.max_items,
                 "synth": dict(vars(config.data.synth)) if config.data.synth is not None else None},
    }


def _trained_steps(folder: Path) -> int | None:
    """The optimizer steps the saved projector was trained for (its safetensors metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / PROJECTOR_FILE), framework="pt") as handle:
            step = (handle.metadata() or {}).get("step")
        return int(step) if step is not None else None
    except Exception:  # a missing or unreadable file: the step count is unknown, not an error here
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _resave(source: Path, target: Path, dtype: str) -> None:
    """Copy a safetensors file with its floating-point tensors cast to `dtype` (metadata kept)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def format_pins(pins: dict[str, str]) -> str:
    """The pins as a Python dict literal, to paste as `pins=` of the preset in `regap.models.loading.presets`."""
    lines = ["{"] + [f"    {json.dumps(k)}: {json.dumps(v)}," for k, v in sorted(pins.items())] + ["}"]
    return "\n".join(lines)
