"""`load_model`: presets, saved folders, training outputs and HF checkpoints -> an `LVLM`.

The top of the model layer: it imports the loaders (`saved`, `trained`, `blip2_hf`, `llava_hf`,
`build`), none of which imports it, so imports inside `regap.models` run one way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from regap.errors import RegapError
from regap.models.attention import RUN_SETTING, check_attention, set_llm_attention
from regap.models.blip2_hf import load_blip2_hf
from regap.models.llava_hf import load_llava_hf
from regap.models.loading.build import build_lvlm, replace_projector
from regap.models.loading.folders import CONFIG_FILE, PROJECTOR_FILE, is_training_checkpoint, is_training_output
from regap.models.loading.presets import PRESETS, TINY_RANDOM, Preset, get_preset
from regap.models.loading.saved import load_adapter, load_saved
from regap.models.loading.trained import (
    attach_assets,
    attach_training_moca,
    attach_training_output,
    base_options,
    load_checkpoint_parts,
    read_training_record,
    verify_assets,
)
from regap.models.lvlm import LVLM


def build_base_model(name: str, dtype: str | torch.dtype = "auto", device: str = "cpu", *,
                     projector_type: str | None = None, projector_options: dict[str, Any] | None = None,
                     seed: int = 0) -> LVLM:
    """The model a training run starts from: `name` (anything `load_model` takes, or `TINY_RANDOM`,
    built from `seed`), with a fresh projector of `projector_type` when set (sized by
    `projector_options`). Training (`regap.train.setup.build_model`) and the trained presets
    (`regap.models.loading.trained`) rebuild their base with it, so both build the same model."""
    options = dict(projector_options or {})
    if name == TINY_RANDOM:  # a test model: float32, its weights a function of the seed
        from regap.models.random_tiny import tiny_random_lvlm

        return tiny_random_lvlm(seed=seed, projector=projector_type or "mlp2x_gelu",
                                projector_options=options or None).to(device)
    lvlm = load_model(name, dtype=dtype, device=device)
    if projector_type is not None:
        from regap.models.blip2_hf import is_blip2_hf

        if is_blip2_hf(lvlm.config):
            raise RegapError(f"config key 'projector_type' ({projector_type!r}) would replace the trained connector "
                             f"of the BLIP-2/InstructBLIP checkpoint {name}; leave it null for such models")
        replace_projector(lvlm, projector_type, **options)
    return lvlm


def load_model(name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "cpu",
               attn_implementation: str | None = None) -> LVLM:
    """A preset name (a trained preset: `load_trained_preset`), a training output folder
    (`load_trained`: projector, LoRA adapter or full LLM, and MoCa), a folder saved
    by `save_model`, or an HF LLaVA checkpoint (folder or hub id).

    `attn_implementation` switches the LLM's attention kernel after loading (None keeps the
    library's choice, `sdpa` for most LLMs); a bad name fails before any weight loads."""
    check_attention(attn_implementation, RUN_SETTING)
    return set_llm_attention(_load_model(name_or_path, dtype, device), attn_implementation)


def _load_model(name_or_path: str, dtype: str | torch.dtype, device: str) -> LVLM:
    path = Path(name_or_path)
    if is_training_output(path) or is_training_checkpoint(path):
        return load_trained(path, dtype=dtype, device=device)
    if path.is_dir() and (path / CONFIG_FILE).exists():
        return load_saved(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "config.json").exists():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type in ("blip-2", "instructblip"):
            return load_blip2_hf(str(path), dtype=dtype, device=device)
        if model_type != "llava":
            raise RegapError(f"{path}: config.json has model_type {model_type!r}; expected a regap folder or an HF LLaVA checkpoint")
        return load_llava_hf(str(path), dtype=dtype, device=device)
    if name_or_path in PRESETS:
        preset = get_preset(name_or_path)
        if preset.trained:
            return load_trained_preset(preset, dtype=dtype, device=device)
        if preset.llava_hf_id:
            return load_llava_hf(preset.llava_hf_id, dtype=dtype, device=device)
        assert preset.config is not None
        return build_lvlm(preset.config, dtype=dtype, device=device)
    if path.exists():
        raise RegapError(f"{path}: not a regap model folder (no {CONFIG_FILE}) nor an HF LLaVA checkpoint")
    if "/" in name_or_path:  # looks like a hub id
        return load_llava_hf(name_or_path, dtype=dtype, device=device)
    raise RegapError(f"unknown model {name_or_path!r}; presets: {', '.join(PRESETS)}, or a folder path")


def load_trained(out_dir: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu") -> LVLM:
    """Rebuild a trained model from a training output folder: base model + projector
    (+ LoRA adapter or full LLM) + MoCa, which the returned LVLM applies by itself
    (`load_model` and every ``--model OUT`` come here). ``OUT/checkpoints/step-N`` gives the model at
    step N, so a learning curve (or a run still training) is evaluated with the same commands as a
    finished one. `dtype` None: the dtype the run trained in."""
    out_dir = Path(out_dir)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    checkpoint = out_dir if is_training_checkpoint(out_dir) else None
    record = read_training_record(out_dir.parent.parent if checkpoint is not None else out_dir)
    dtype = dtype or record.dtype
    if checkpoint is not None:
        if record.tune == "full" and record.stage == 2:
            raise RegapError(f"{checkpoint}: a checkpoint of a full-LLM stage 2 holds the LLM only as raw "
                             "training state; load the finished output folder instead")
        lvlm = build_base_model(record.model, dtype=dtype, device=device, **record.base_options())
        if (checkpoint / "adapter").is_dir():  # wraps the LLM with peft; its weights are set below
            load_adapter(lvlm, checkpoint / "adapter")
        load_checkpoint_parts(lvlm, checkpoint)
        return lvlm.eval()
    if not (out_dir / PROJECTOR_FILE).is_file():
        raise RegapError(f"{out_dir}: no {PROJECTOR_FILE} (the training has not finished); a checkpoint "
                         f"loads as a model too: {out_dir / 'checkpoints' / 'step-N'}")
    if (out_dir / "model").is_dir():  # a full stage 2: the whole model saved
        lvlm = load_model(str(out_dir / "model"), dtype=dtype, device=device)
    else:
        lvlm = attach_training_output(build_base_model(record.model, dtype=dtype, device=device,
                                                       **record.base_options()), out_dir)
    return attach_training_moca(lvlm, out_dir)


def load_trained_preset(preset: Preset, dtype: str | torch.dtype = "auto", device: str = "cpu") -> LVLM:
    """A trained preset: its pinned assets verified first (before any weight loads), then its base
    rebuilt as its training run built it, then the trained projector, LoRA adapter (and MoCa)."""
    report = verify_assets(preset)
    assert preset.base is not None
    model = build_base_model(preset.base, dtype=dtype, device=device, **base_options(report))
    return attach_assets(model, preset, report)
