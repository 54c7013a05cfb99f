"""Saving and loading: whole models or projector-only checkpoints, as safetensors + JSON config
(BLIP-2 / InstructBLIP-loaded models too: their Q-Former architecture is saved beside the backbones;
a model's MoCa as `moca.safetensors`)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from regap.errors import RegapError
from regap.files import apply_umask, atomic_path, write_json_atomic
from regap.models.blip2_hf import (
    QFORMER_FOLDER,
    is_blip2_hf,
    load_saved_blip2,
    save_qformer_config,
)
from regap.models.loading.build import build_lvlm, parse_dtype
from regap.models.loading.folders import CONFIG_FILE, PROJECTOR_FILE
from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.moca import MOCA_FILE, load_moca, save_moca


def save_projector(model: LVLM, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """The stage-1 artefact: projector weights only (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.projector.state_dict().items()}
    meta = {"projector_type": model.config.projector_type, **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_projector(model: LVLM, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise RegapError(f"projector checkpoint not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise RegapError(f"cannot read projector checkpoint {path}: {exc}") from None
    expected = model.projector.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise RegapError(
            f"{path}: projector weights do not fit this model "
            f"({model.config.projector_type}, {model.vision.hidden_size}->{model.hidden_size})"
        )
    model.projector.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


#: peft's file names inside a LoRA adapter folder (`PeftModel.save_pretrained`).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """While peft wraps a model: peft reads transformers' deprecated `is_gradient_checkpointing`
    each time, and transformers warns each time (a FutureWarning on every LoRA load); only that
    warning, from that module, is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        yield


def load_adapter(model: LVLM, folder: str | Path) -> None:
    """Wrap the model's LLM with the LoRA adapter in `folder` (peft's format), in place.

    Safetensors only: peft would fall back to a pickled `adapter_model.bin` when the
    safetensors file is missing, so that case is refused here instead."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise RegapError(f"{folder}: not a LoRA adapter folder (no {name})")
    from peft import PeftModel

    with peft_wrapping():
        model.llm = PeftModel.from_pretrained(model.llm, str(folder))


def merge_adapter(model: LVLM) -> bool:
    """Merge a LoRA-wrapped LLM's adapter into its weights (peft's `merge_and_unload`), in place: the
    model computes the same function with a plain LLM, as formats without LoRA (HF LLaVA) need.
    Returns whether there was an adapter."""
    if not hasattr(model.llm, "peft_config"):
        return False
    model.llm = model.llm.merge_and_unload()
    return True


def save_model(model: LVLM, out_dir: str | Path, include_backbones: bool = False) -> Path:
    """Write `regap_config.json` + `projector.safetensors` (+ `moca.safetensors`); with
    `include_backbones`, also the vision encoder and the LLM as safetensors folders so the
    model rebuilds without its sources."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_projector(model, out_dir / PROJECTOR_FILE)
    if model.moca is not None:
        save_moca(model.moca, out_dir / MOCA_FILE)
    if include_backbones:
        for name, save in (("vision", _save_vision), ("llm", _save_llm)):
            staging = out_dir / f"{name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            save(model, staging)
            apply_umask(staging)
            shutil.rmtree(out_dir / name, ignore_errors=True)
            os.replace(staging, out_dir / name)
        if is_blip2_hf(model.config):
            shutil.rmtree(out_dir / QFORMER_FOLDER, ignore_errors=True)
            save_qformer_config(model, out_dir / QFORMER_FOLDER)
    write_json_atomic(out_dir / CONFIG_FILE, {
        "format": "regap-lvlm/1", "config": model.config.to_dict(), "includes_backbones": include_backbones,
        "dtype": str(model.dtype).replace("torch.", ""),
    })
    return out_dir


def _save_vision(model: LVLM, folder: Path) -> None:
    model.vision.encoder.save_pretrained(folder, safe_serialization=True)
    model.vision.image_processor.save_pretrained(folder)


def _save_llm(model: LVLM, folder: Path) -> None:
    model.llm.save_pretrained(folder, safe_serialization=True)
    model.tokenizer.save_pretrained(folder)


def _saved_dtype(record: dict, folder: Path) -> torch.dtype:
    name = str(record.get("dtype", "float32"))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise RegapError(f"{folder / CONFIG_FILE}: field 'dtype' is {name!r}, not a torch dtype")
    return value


def load_saved(folder: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu") -> LVLM:
    folder = Path(folder)
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise RegapError(f"{folder / CONFIG_FILE}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if "config" not in record:
        raise RegapError(f"{folder / CONFIG_FILE}: missing field 'config'")
    config = LVLMConfig.from_dict(record["config"])
    with_backbones = bool(record.get("includes_backbones"))
    # No dtype asked for: the dtype the folder was saved in (a fact about the file, not a request).
    torch_dtype = parse_dtype(dtype, device) if dtype is not None else _saved_dtype(record, folder)
    if is_blip2_hf(config):  # a BLIP-2 / InstructBLIP checkpoint's own connector, not one built from options
        model = load_saved_blip2(folder, config, with_backbones, torch_dtype, device)
    else:
        model = build_lvlm(
            config, dtype=torch_dtype, device=device,
            vision_folder=str(folder / "vision") if with_backbones else None,
            llm_folder=str(folder / "llm") if with_backbones else None,
        )
    load_projector(model, folder / PROJECTOR_FILE)
    attach_saved_moca(model, folder)
    return model


def attach_saved_moca(model: LVLM, folder: str | Path) -> None:
    """Give ``model`` the MoCa saved in ``folder`` (`moca.safetensors`), if there is one; a
    config that names MoCa without the file is an error (the model would run without it)."""
    path = Path(folder) / MOCA_FILE
    if path.is_file():
        model.set_moca(load_moca(path, model.llm))
    elif "moca" in model.config.extra:
        raise RegapError(f"{folder}: the model config names MoCa but {MOCA_FILE} is missing")
