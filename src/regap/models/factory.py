"""Model factory: presets, saved folders and HF LLaVA checkpoints -> an `LVLM`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from regap.errors import RegapError
from regap.models.hub import hub_call
from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.offline_assets import is_offline_source, resolve
from regap.models.presets import PRESETS, get_preset
from regap.models.vision import load_vision_tower
from regap.precision import resolve_torch_dtype

CONFIG_FILE = "regap_config.json"
PROJECTOR_FILE = "projector.safetensors"
TRAIN_CONFIG_FILE = "config.yaml"  # written by `regap.train` into every training output folder


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name (`auto`, `float32`, `bfloat16`, `float16`, or an alias) -> torch dtype on `device`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_torch_dtype(dtype, device)


def resolve_source(source: str) -> str:
    """`regap:` names become cache folders (converted on first use); others pass through."""
    return resolve(source) if is_offline_source(source) else source


def load_llm(source: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_source(source)
    tokenizer = hub_call(location, AutoTokenizer.from_pretrained, location)
    llm = hub_call(location, AutoModelForCausalLM.from_pretrained, location, dtype=dtype)
    return llm.eval(), tokenizer


def build_lvlm(config: LVLMConfig, dtype: str | torch.dtype = "auto", device: str = "cpu",
               vision_folder: str | None = None, llm_folder: str | None = None) -> LVLM:
    """Assemble vision tower, LLM and a (fresh) projector from a config."""
    torch_dtype = parse_dtype(dtype, device)
    vision = load_vision_tower(vision_folder or resolve_source(config.vision.source), config.vision, torch_dtype)
    llm, tokenizer = load_llm(llm_folder or config.llm_source, torch_dtype)
    model = LVLM(config, vision, llm, tokenizer).to(device)
    model.llm_origin = llm_folder
    return model


def replace_projector(model: LVLM, kind: str, seed: int = 0, **options: Any) -> LVLM:
    """Give `model` a fresh projector of `kind` (seeded; `options` size a `qformer`), in place.

    The config records the new type and options, so `save_model` / `load_model` rebuild the same
    shape; used by training configs that pick a connector (`projector_type`) for a preset."""
    from regap.models.projector import build_projector

    projector = build_projector(kind, model.vision.hidden_size, model.hidden_size, seed=seed, **options)
    model.projector = projector.to(device=model.device, dtype=model.dtype)
    extra = {k: v for k, v in model.config.extra.items() if k != "projector_options"}
    if options:
        extra["projector_options"] = dict(options)
    # A new config object: a preset's config is shared by every model built from it.
    model.config = dataclasses.replace(model.config, projector_type=kind, extra=extra)
    return model


def is_training_output(path: Path) -> bool:
    """A folder written by `regap pretrain` / `regap finetune` (its config and projector, or checkpoints)."""
    return path.is_dir() and (path / TRAIN_CONFIG_FILE).is_file() and \
        ((path / PROJECTOR_FILE).is_file() or (path / "checkpoints").is_dir())


def load_model(name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> LVLM:
    """A preset name, a training output folder (`regap.train.load_trained`: projector, LoRA adapter
    or full LLM, and MoCa), a folder saved by `save_model`, or an HF LLaVA checkpoint (folder or hub id)."""
    path = Path(name_or_path)
    if is_training_output(path):
        from regap.train.loop import load_trained

        return load_trained(path, dtype=dtype, device=device)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        from regap.models.io import load_saved

        return load_saved(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "config.json").exists():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type in ("blip-2", "instructblip"):
            from regap.models.blip2_hf import load_blip2_hf

            return load_blip2_hf(str(path), dtype=dtype, device=device)
        if model_type != "llava":
            raise RegapError(f"{path}: config.json has model_type {model_type!r}; expected a regap folder or an HF LLaVA checkpoint")
        from regap.models.llava_hf import load_llava_hf

        return load_llava_hf(str(path), dtype=dtype, device=device)
    if name_or_path in PRESETS:
        preset = get_preset(name_or_path)
        if preset.llava_hf_id:
            from regap.models.llava_hf import load_llava_hf

            return load_llava_hf(preset.llava_hf_id, dtype=dtype, device=device)
        assert preset.config is not None
        return build_lvlm(preset.config, dtype=dtype, device=device)
    if path.exists():
        raise RegapError(f"{path}: not a regap model folder (no {CONFIG_FILE}) nor an HF LLaVA checkpoint")
    if "/" in name_or_path:  # looks like a hub id
        from regap.models.llava_hf import load_llava_hf

        return load_llava_hf(name_or_path, dtype=dtype, device=device)
    raise RegapError(f"unknown model {name_or_path!r}; presets: {', '.join(PRESETS)}, or a folder path")
