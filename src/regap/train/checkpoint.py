"""Training checkpoints: atomic folders that let `--resume` continue exactly.

A checkpoint ``OUT/checkpoints/step-0000123/`` holds

* ``state.json`` - step, epoch, position in the epoch's sample order, batch layout, the
  training data's sha256 (a resume on changed data is refused);
* ``trainable.safetensors`` - every trainable parameter (projector, MoCa, LoRA or LLM);
* ``projector.safetensors`` (the `save_projector` format), ``moca.safetensors`` and, for
  LoRA, ``adapter/`` (peft's format);
* ``regap_state.safetensors`` - the ReGap alpha warm-up buffers (alpha stays frozen);
* ``optimizer.pt``, ``scheduler.pt``, ``rng_state_<rank>.pt`` (python, numpy, torch, cuda);
* with DeepSpeed or FSDP, ``accelerate/`` from `Accelerator.save_state` (sharded states).

The folder is written as ``step-0000123.tmp`` and renamed with ``os.replace`` once
complete, and ``latest.json`` is replaced atomically after that, so an interrupted
save never damages the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from regap.errors import RegapError

FORMAT = "regap-train-checkpoint/1"
LATEST = "latest.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")
             and not p.name.endswith(".tmp") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint named by latest.json, else the newest complete one."""
    pointer = folder / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            candidate = folder / name
            if (candidate / "state.json").is_file():
                return candidate
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    found = list_checkpoints(folder)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegapError(f"cannot read checkpoint state {checkpoint / 'state.json'}: {exc}") from None
    if state.get("format") != FORMAT:
        raise RegapError(f"{checkpoint}: not a regap training checkpoint (format {state.get('format')!r})")
    return state


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RegapError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise RegapError(f"cannot read {path}: {exc}") from None


def rotate(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all) and stale .tmp folders."""
    for stale in folder.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
