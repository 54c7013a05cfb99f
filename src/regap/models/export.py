"""`regap export`: any model regap loads, written as a standard HF LLaVA folder.

The command's work, so it is the same from Python: the output folder is locked for the run
(`OUT/.regap.lock`, as every command that writes a folder), the dtype is checked before any
weight loads, a model HF LLaVA cannot express is refused before it loads when its config is
known without loading, a LoRA adapter is merged into the LLM, and the weights are written in
the asked dtype. `regap_export.json` records what was written (it is read back on load, so the
export's chat template wins over LLaVA's default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from regap.errors import RegapError
from regap.files import write_json_atomic
from regap.models.loading.load import load_model
from regap.models.loading.folders import CONFIG_FILE, EXPORT_RECORD
from regap.models.loading.saved import load_projector
from regap.models.llava_hf import LLAVA_EXPRESSIBLE, export_llava_hf, llava_export_problems
from regap.models.lvlm import LVLMConfig
from regap.models.loading.presets import PRESETS

#: The dtypes an export can write (`auto` is a run setting, not a file format).
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_dtype(name: str) -> str:
    """`name` (an alias such as `bf16` too) as one of EXPORT_DTYPES; anything else is one line."""
    from regap.precision import normalise_dtype_name

    try:
        canonical = normalise_dtype_name(name)
    except RegapError:
        canonical = None
    if canonical not in EXPORT_DTYPES:
        raise RegapError(f"--dtype {name!r} cannot be exported; valid: {', '.join(EXPORT_DTYPES)}")
    return str(canonical)


def config_without_loading(model: str) -> LVLMConfig | None:
    """The model's `LVLMConfig` when a preset or a regap folder gives it without loading weights."""
    if model in PRESETS:
        preset = PRESETS[model]
        if preset.trained and preset.base in PRESETS:  # a trained preset has its base's architecture
            return PRESETS[preset.base].config
        return preset.config
    record_path = Path(model) / CONFIG_FILE
    if record_path.is_file():
        try:
            return LVLMConfig.from_dict(json.loads(record_path.read_text())["config"])
        except (ValueError, KeyError, TypeError):
            return None  # load_model names the problem
    return None


def _check_out(out: Path) -> None:
    from regap.run_lock import LOCK_NAME

    if out.exists() and not out.is_dir():
        raise RegapError(f"--out {out} is a file, not a folder; give a folder path")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise RegapError(f"--out {out} is not empty; give a new folder")


def export_model(model: str, out: str | Path, *, projector: str | Path | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """Export `model` (a preset, a regap folder, a training output or an HF LLaVA checkpoint) with
    `projector` loaded into `out`, its weights in `dtype`; returns the record written beside them."""
    from regap.models.fingerprint import model_fingerprint
    from regap.provenance import provenance
    from regap.run_lock import exclusive_out

    out = Path(out)
    dtype = export_dtype(dtype)
    _check_out(out)
    if projector is not None and not Path(projector).is_file():
        raise RegapError(f"--projector: projector checkpoint not found: {projector}")
    config = config_without_loading(model)
    problems = llava_export_problems(config) if config is not None else []
    if problems:
        raise RegapError(f"cannot export {model} as HF LLaVA: {', '.join(problems)} ({LLAVA_EXPRESSIBLE})")
    with exclusive_out(out):
        _check_out(out)  # another export may have finished while this one started
        lvlm = load_model(model, dtype=dtype)
        if projector is not None:
            load_projector(lvlm, projector)
        fingerprint = model_fingerprint(lvlm)
        lora = hasattr(lvlm.llm, "peft_config")
        export_llava_hf(lvlm, out, dtype=getattr(torch, dtype))
        record = provenance(model=model, projector=str(projector) if projector else None, dtype=dtype,
                            model_config=lvlm.config.to_dict(), model_fingerprint=fingerprint,
                            format="LlavaForConditionalGeneration", chat_template=lvlm.config.template,
                            lora_merged=lora)
        write_json_atomic(out / EXPORT_RECORD, record)
    return record
