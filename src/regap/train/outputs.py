"""What a training run leaves in its folder besides checkpoints: the trained parts
(`save_outputs`), ``provenance.json`` and ``data_report.json``. The way back from such a folder to
a model is the model layer's (`regap.models.load_model`, `regap.models.loading.load.load_trained`): a
training output folder is one of its folder formats."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from regap.files import apply_umask
from regap.models.moca import MOCA_FILE, save_moca
from regap.models.loading.presets import TINY_RANDOM
from regap.train import checkpoint as ckpt
from regap.train.config import TrainConfig
from regap.train.distributed import is_sharded
from regap.train.regap_loss import ReGapLoss

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM


def save_outputs(accelerator: Any, out_dir: Path, module: nn.Module, config: TrainConfig, regap: ReGapLoss | None,
                 step: int) -> None:
    """Projector (+ MoCa, ReGap state) for every stage; LoRA adapter or full LLM for stage 2."""
    unwrapped = accelerator.unwrap_model(module)
    lvlm = unwrapped.lvlm
    full_state = accelerator.get_state_dict(module) if (is_sharded(accelerator) and config.tune == "full") else None
    trainable = ckpt.trainable_state(accelerator, module) if config.tune == "lora" else {}
    if not accelerator.is_main_process:
        return
    from regap.models import save_model, save_projector

    meta = {"stage": str(config.stage), "step": str(step)}
    if config.stage == 2 and config.tune == "full":
        staging = out_dir / "model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        if full_state is None:
            save_model(lvlm, staging, include_backbones=True)
        else:
            save_model(lvlm, staging, include_backbones=False)
            llm_state = {k[len("lvlm.llm."):]: v for k, v in full_state.items() if k.startswith("lvlm.llm.")}
            lvlm.llm.save_pretrained(staging / "llm", state_dict=llm_state, safe_serialization=True)
            lvlm.tokenizer.save_pretrained(staging / "llm")
            apply_umask(staging / "llm")
        shutil.rmtree(out_dir / "model", ignore_errors=True)
        os.replace(staging, out_dir / "model")
    if config.stage == 2 and config.tune == "lora":
        staging = out_dir / "adapter.partial"
        shutil.rmtree(staging, ignore_errors=True)
        ckpt.save_adapter(lvlm.llm, staging, trainable)
        shutil.rmtree(out_dir / "adapter", ignore_errors=True)
        os.replace(staging, out_dir / "adapter")
    save_projector(lvlm, out_dir / "projector.safetensors", metadata=meta)
    if config.model != TINY_RANDOM and not (config.stage == 2 and config.tune == "lora"):
        record = {"format": "regap-lvlm/1", "config": lvlm.config.to_dict(), "includes_backbones": False,
                  "dtype": config.dtype, "trained_by": "regap.train", **meta}
        ckpt.write_json_atomic(out_dir / "regap_config.json", record)
    if unwrapped.moca is not None:
        save_moca(unwrapped.moca, out_dir / MOCA_FILE)
    if regap is not None:
        ckpt.save_tensors_atomic(dict(regap.state_dict()), out_dir / ckpt.REGAP_STATE_FILE)


def write_data_report(out_dir: Path, dataset: Any, skipped: list[dict[str, Any]], truncated: int) -> None:
    """``data_report.json``: the data set's own report plus the corrupt images and truncations met in training."""
    report = dataset.report.to_dict()
    unique = {(s.get("index"), s.get("image")): s for s in skipped}
    report.update({"n_corrupt_images": len(unique), "corrupt_images": list(unique.values()),
                   "n_truncated": truncated})
    ckpt.write_json_atomic(out_dir / "data_report.json", report)


def write_provenance(out_dir: Path, cfg: TrainConfig, lvlm: LVLM, json_path: Path, data_sha: str, dataset: Any,
                     world: int, per_device: int, accumulation: int, accelerator: Any, command: str | None,
                     **extra: Any) -> None:
    """``provenance.json``: what was trained on what, how, and with which text-token rules."""
    from regap.provenance import json_hash, provenance

    record = provenance(
        command=command, stage=cfg.stage, tune=cfg.tune, model=cfg.model, model_config=lvlm.config.to_dict(),
        data={"json": str(json_path), "sha256": data_sha, "image_root": str(dataset.image_root),
              "loaded": len(dataset), "missing_images": len(dataset.report.missing_images),
              "malformed": len(dataset.report.malformed)},
        seed=cfg.seed, config_sha=json_hash(cfg.to_dict()), world_size=world, per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation, global_batch_size=cfg.global_batch_size,
        mixed_precision=cfg.mixed_precision, distributed_type=str(accelerator.distributed_type),
        device=str(accelerator.device),
        text_tokens={"regap": cfg.regap.text_tokens if cfg.regap.lam > 0 else None, "probe": cfg.observe.text_tokens},
        **extra,
    )
    ckpt.write_json_atomic(out_dir / "provenance.json", record)


def __getattr__(name: str) -> Any:
    """`load_trained` and `load_checkpoint_parts` moved to the model layer (deprecated here)."""
    moved = {"load_trained": "regap.models.loading.load", "load_checkpoint_parts": "regap.models.loading.trained"}
    if name in moved:
        import importlib
        import warnings

        warnings.warn(f"regap.train.outputs.{name} moved to {moved[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
