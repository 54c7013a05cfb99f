"""File names inside model folders, and what kind of folder a path is (no model code: every
loader and saver imports these, so they live below all of them)."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "regap_config.json"  # written by `save_model`: the folder's `LVLMConfig`
PROJECTOR_FILE = "projector.safetensors"
TRAIN_CONFIG_FILE = "config.yaml"  # written by `regap.train` into every training output folder
EXPORT_RECORD = "regap_export.json"  # written by `regap export` beside the HF LLaVA files


def is_training_checkpoint(path: Path) -> bool:
    """A checkpoint of a training run, ``OUT/checkpoints/step-N`` (loadable as the model at step N)."""
    return path.is_dir() and (path / "state.json").is_file() and path.parent.name == "checkpoints" and \
        (path.parent.parent / TRAIN_CONFIG_FILE).is_file()


def is_training_output(path: Path) -> bool:
    """A folder written by `regap pretrain` / `regap finetune` (its config and projector, or checkpoints)."""
    return path.is_dir() and (path / TRAIN_CONFIG_FILE).is_file() and \
        ((path / PROJECTOR_FILE).is_file() or (path / "checkpoints").is_dir())
