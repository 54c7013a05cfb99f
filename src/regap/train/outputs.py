"""What a training run leaves in its folder besides checkpoints: the trained parts
(`save_outputs`), ``provenance.json`` and ``data_report.json``; and the way back from such a
folder to a model (`load_trained`, which ``--model OUT`` and `regap.models.load_model` use)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from regap.errors import RegapError
from regap.files import apply_umask
from regap.models.moca import MOCA_FILE, load_moca, save_moca
from regap.models.presets import TINY_RANDOM
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


def load_trained(out_dir: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu") -> LVLM:
    """Rebuild a trained model from a training output folder: base model + projector
    (+ LoRA adapter or full LLM) + MoCa, which the returned LVLM applies by itself
    (`regap.models.load_model` and every ``--model OUT`` come here). ``OUT/checkpoints/step-N``
    gives the model at step N, so a learning curve (or a run still training) can be evaluated
    with the same commands as a finished one."""
    out_dir = Path(out_dir)
    from regap.models.folders import is_training_checkpoint
    from regap.train.config import read_yaml
    from regap.train.setup import build_model

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    checkpoint = out_dir if is_training_checkpoint(out_dir) else None
    run_dir = out_dir.parent.parent if checkpoint is not None else out_dir
    config = TrainConfig.from_dict(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    if checkpoint is not None:
        if config.tune == "full" and config.stage == 2:
            raise RegapError(f"{checkpoint}: a checkpoint of a full-LLM stage 2 holds the LLM only as raw "
                             "training state; load the finished output folder instead")
        lvlm = build_model(config if dtype is None else dataclasses.replace(config, dtype=dtype)).to(device)
        if (checkpoint / "adapter").is_dir():  # wraps the LLM with peft; its weights are set below
            from regap.models.io import load_adapter

            load_adapter(lvlm, checkpoint / "adapter")
        load_checkpoint_parts(lvlm, checkpoint)
        return lvlm.eval()
    if not (out_dir / "projector.safetensors").is_file():
        raise RegapError(f"{out_dir}: no projector.safetensors (the training has not finished); a checkpoint "
                         f"loads as a model too: {out_dir / 'checkpoints' / 'step-N'}")
    if (out_dir / "model").is_dir():
        from regap.models import load_model

        lvlm = load_model(str(out_dir / "model"), dtype=dtype or config.dtype, device=device)
    else:
        lvlm = build_model(config if dtype is None else dataclasses.replace(config, dtype=dtype)).to(device)
        from regap.models.io import load_adapter, load_projector

        load_projector(lvlm, out_dir / "projector.safetensors")
        if (out_dir / "adapter").is_dir():
            load_adapter(lvlm, out_dir / "adapter")
    if lvlm.moca is None and (out_dir / MOCA_FILE).is_file():  # `model/` (full stage 2) may hold it already
        lvlm.set_moca(load_moca(out_dir / MOCA_FILE, lvlm.llm))
    return lvlm.eval()


def load_checkpoint_parts(lvlm: LVLM, checkpoint: Path) -> None:
    """A checkpoint's projector, LoRA adapter (stage 2) and MoCa into `lvlm`, in place (a learning curve
    swaps them into one model instead of rebuilding it per checkpoint)."""
    from safetensors.torch import load_file

    from regap.models.io import load_projector

    if not (checkpoint / "projector.safetensors").is_file():
        raise RegapError(f"{checkpoint}: no projector.safetensors (not a regap training checkpoint)")
    load_projector(lvlm, checkpoint / "projector.safetensors")
    adapter = checkpoint / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        if not hasattr(lvlm.llm, "peft_config"):
            raise RegapError(f"{checkpoint}: holds a LoRA adapter, but the model it is loaded into has none")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(lvlm.llm, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RegapError(f"{adapter}: adapter keys not in the model: {unexpected[:3]}")
    if (checkpoint / MOCA_FILE).is_file():
        if lvlm.moca is None:
            lvlm.set_moca(load_moca(checkpoint / MOCA_FILE, lvlm.llm))
        else:
            lvlm.moca.load_state_dict(load_moca(checkpoint / MOCA_FILE, lvlm.llm).state_dict())


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
