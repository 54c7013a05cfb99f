"""Building an `LVLM` from parts: a config's vision tower and LLM, and a fresh projector."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from regap.models.loading.sources import hub_call, resolve_source
from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.projector import build_projector
from regap.models.vision import load_vision_tower
from regap.precision import resolve_torch_dtype


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name (`auto`, `float32`, `bfloat16`, `float16`, or an alias) -> torch dtype on `device`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_torch_dtype(dtype, device)


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
    projector = build_projector(kind, model.vision.hidden_size, model.hidden_size, seed=seed, **options)
    model.projector = projector.to(device=model.device, dtype=model.dtype)
    extra = {k: v for k, v in model.config.extra.items() if k != "projector_options"}
    if options:
        extra["projector_options"] = dict(options)
    # A new config object: a preset's config is shared by every model built from it.
    model.config = dataclasses.replace(model.config, projector_type=kind, extra=extra)
    return model
