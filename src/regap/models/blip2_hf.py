"""Hugging Face BLIP-2 / InstructBLIP checkpoints in the LVLM interface (modules shared, not copied).

* vision: the checkpoint's `Blip2VisionModel` / `InstructBlipVisionModel`; its last hidden state,
  CLS included, is what the Q-Former reads (as in HF and LAVIS);
* projector: a `QFormerProjector` holding the checkpoint's own `qformer`, `query_tokens` and
  `language_projection`; each image becomes `num_query_tokens` LLM tokens, and those positions
  are the image-token mask;
* LLM: the checkpoint's decoder-only language model (OPT, Vicuna/LLaMA, ...). The T5 variants
  (encoder-decoder) do not fit a causal-LM LVLM and are refused with a `RegapError`.

InstructBLIP's Q-Former also reads the instruction (in its own BERT vocabulary). The LVLM
computes image tokens from pixels alone, so inside `LVLM` InstructBLIP runs with no
instruction tokens (the queries only); `model.projector(features, qformer_input_ids=...)`
gives the instruction-aware output when you have the ids.

Layout: regap puts the query tokens where the `<image>` marker is (after BOS), whereas HF's
processor puts them before BOS; HF's model accepts any placement of its image tokens, so the
same sequence gives the same logits in both (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from regap.errors import RegapError
from regap.models.loading.build import parse_dtype
from regap.models.loading.folders import PROJECTOR_FILE
from regap.models.loading.sources import hub_call
from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.qformer import QFormerProjector
from regap.models.vision import VisionConfig, VisionTower, image_backend

MODEL_TYPES = ("blip-2", "instructblip")

# BLIP-2's VQA prompt ("Question: ... Answer:"), for tokenizers without a chat template (OPT, Vicuna).
# Image markers go first; a user turn that is only an image renders as the image (captioning).
BLIP2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set text = message['content'].replace('<image>', '').strip() -%}"
    "{{ '<image>' * message['content'].count('<image>') }}"
    "{%- if text -%}Question: {{ text }} Answer:{%- endif -%}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def load_blip2_hf(name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> LVLM:
    """Load a BLIP-2 / InstructBLIP checkpoint (hub id or folder) as an `LVLM`."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        Blip2ForConditionalGeneration,
        InstructBlipForConditionalGeneration,
    )

    torch_dtype = parse_dtype(dtype, device)
    cfg = hub_call(name_or_path, AutoConfig.from_pretrained, name_or_path)
    if cfg.model_type not in MODEL_TYPES:
        raise RegapError(f"{name_or_path}: model_type {cfg.model_type!r} is not BLIP-2 or InstructBLIP")
    if not getattr(cfg, "use_decoder_only_language_model", True) or cfg.text_config.is_encoder_decoder:
        raise RegapError(
            f"{name_or_path}: {cfg.model_type} with an encoder-decoder language model "
            f"({cfg.text_config.model_type!r}, e.g. the Flan-T5 variants) is not supported; "
            "regap needs a decoder-only LLM (the OPT and Vicuna variants work)"
        )
    cls = Blip2ForConditionalGeneration if cfg.model_type == "blip-2" else InstructBlipForConditionalGeneration
    blip = hub_call(name_or_path, cls.from_pretrained, name_or_path, dtype=torch_dtype)
    image_processor = hub_call(name_or_path, AutoImageProcessor.from_pretrained, name_or_path, backend=image_backend())
    tokenizer = hub_call(name_or_path, AutoTokenizer.from_pretrained, name_or_path)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = BLIP2_CHAT_TEMPLATE

    vision_config = VisionConfig(source=str(name_or_path), feature_layer="final", drop_cls=False)
    vision = VisionTower(blip.vision_model.eval(), image_processor, vision_config)
    projector = QFormerProjector(blip.qformer, blip.query_tokens, blip.language_projection).eval()
    llm = blip.language_model.eval()
    config = LVLMConfig(
        vision=vision_config, llm_source=str(name_or_path), projector_type="qformer", template="chat",
        name=str(name_or_path), extra={"blip2_hf": str(name_or_path), "hf_model_type": cfg.model_type},
    )
    # LVLM casts a projector it is given to the LLM's dtype; HF keeps BLIP-2's Q-Former (and the
    # query tokens) in float32, so the real projector is attached after construction, as loaded.
    model = LVLM(config, vision, llm, tokenizer, projector=nn.Identity())
    model.projector = projector
    return model.to(device)


# ---------------------------------------------------------------------- save_model / load_saved

QFORMER_FOLDER = "qformer"


def is_blip2_hf(config: LVLMConfig) -> bool:
    """A model that `load_blip2_hf` built (its connector is the checkpoint's, not one from options)."""
    return bool(config.extra.get("blip2_hf"))


def save_qformer_config(model: LVLM, folder: Path) -> None:
    """The Q-Former's architecture (its weights live in projector.safetensors): with it, a folder saved
    with backbones rebuilds the connector without the original checkpoint."""
    model.projector.qformer.config.save_pretrained(folder)


def load_saved_blip2(folder: Path, config: LVLMConfig, with_backbones: bool, dtype: str | torch.dtype,
                     device: str = "cpu") -> LVLM:
    """The model part of a `save_model` folder of a BLIP-2 / InstructBLIP model; the caller loads the
    projector weights. Without backbones the original checkpoint (`extra["blip2_hf"]`) is reloaded."""
    if not with_backbones:
        return load_blip2_hf(config.extra["blip2_hf"], dtype=dtype, device=device)
    from safetensors import safe_open
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype, device)
    if config.extra.get("hf_model_type") == "instructblip":
        from transformers import InstructBlipQFormerConfig as QConfig
        from transformers import InstructBlipQFormerModel as QModel
        from transformers import InstructBlipVisionModel as VisionModel
    else:
        from transformers import Blip2QFormerConfig as QConfig
        from transformers import Blip2QFormerModel as QModel
        from transformers import Blip2VisionModel as VisionModel
    for part in ("vision", "llm", QFORMER_FOLDER):
        if not (folder / part).is_dir():
            raise RegapError(f"{folder}: saved with backbones but {part}/ is missing")
    encoder = VisionModel.from_pretrained(folder / "vision", dtype=torch_dtype).eval()
    image_processor = AutoImageProcessor.from_pretrained(folder / "vision", backend=image_backend())
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm", dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "llm")
    with safe_open(str(folder / PROJECTOR_FILE), "pt") as handle:
        query_shape = handle.get_slice("query_tokens").get_shape()
        out_dim, in_dim = handle.get_slice("language_projection.weight").get_shape()
    # As HF does: the Q-Former and the queries stay float32, the projection takes the model's dtype.
    qformer = QModel(QConfig.from_pretrained(folder / QFORMER_FOLDER)).eval()
    projector = QFormerProjector(qformer, nn.Parameter(torch.zeros(*query_shape)),
                                 nn.Linear(in_dim, out_dim).to(torch_dtype)).eval()
    vision = VisionTower(encoder, image_processor, config.vision)
    model = LVLM(config, vision, llm, tokenizer, projector=nn.Identity())
    model.projector = projector
    return model.to(device)
