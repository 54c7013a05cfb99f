"""Hugging Face LLaVA checkpoints (`LlavaForConditionalGeneration`) in and out of the LVLM interface."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from regap.errors import InternalError, RegapError
from regap.files import apply_umask
from regap.models.loading.build import parse_dtype
from regap.models.loading.folders import EXPORT_RECORD
from regap.models.loading.sources import hub_call
from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.projector import build_projector
from regap.models.templates import IMAGE_MARKER, TEMPLATES, hf_chat_template
from regap.models.vision import VisionConfig, VisionTower


def load_llava_hf(name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> LVLM:
    """Load an HF LLaVA checkpoint; its modules are shared, not copied (no second 7B in memory)."""
    from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    torch_dtype = parse_dtype(dtype, device)
    llava = hub_call(name_or_path, LlavaForConditionalGeneration.from_pretrained, name_or_path, dtype=torch_dtype)
    processor = hub_call(name_or_path, AutoProcessor.from_pretrained, name_or_path)
    cfg = llava.config
    if isinstance(cfg.vision_feature_layer, (list, tuple)):
        raise RegapError(f"{name_or_path}: multi-layer vision features are not supported")
    if cfg.projector_hidden_act != "gelu":
        raise RegapError(f"{name_or_path}: projector activation {cfg.projector_hidden_act!r} is not supported (gelu only)")
    vision_config = VisionConfig(
        source=name_or_path, feature_layer=int(cfg.vision_feature_layer),
        drop_cls=cfg.vision_feature_select_strategy == "default",
    )
    vision = VisionTower(llava.model.vision_tower.eval(), processor.image_processor, vision_config)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(cfg.text_config)
    llm.model = llava.model.language_model
    llm.lm_head = llava.lm_head
    llm.generation_config = llava.generation_config
    source = llava.model.multi_modal_projector
    projector = build_projector("mlp2x_gelu", vision.hidden_size, cfg.text_config.hidden_size)
    projector[0].load_state_dict(source.linear_1.state_dict())
    projector[2].load_state_dict(source.linear_2.state_dict())
    config = LVLMConfig(
        vision=vision_config, llm_source=name_or_path, projector_type="mlp2x_gelu",
        template=_recorded_template(name_or_path, processor), name=str(name_or_path),
        extra={"llava_hf": str(name_or_path)},
    )
    return LVLM(config, vision, llm.eval(), processor.tokenizer, projector=projector).to(device)


def _recorded_template(name_or_path: str, processor: Any) -> str:
    """The regap template a checkpoint was exported with: `regap export`'s record, else the regap
    template whose HF rendering is the checkpoint's chat template, else LLaVA-1.5's `vicuna_v1`."""
    record = Path(name_or_path) / EXPORT_RECORD
    if record.is_file():
        try:
            name = json.loads(record.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, OSError, AttributeError):
            name = None
        if name in TEMPLATES:
            return str(name)
    saved = getattr(processor, "chat_template", None)
    if saved:
        for name in TEMPLATES:
            try:
                if hf_chat_template(name, processor.tokenizer) == saved:
                    return name
            except Exception:  # a tokenizer a template cannot be rendered for: not that template
                continue
    return "vicuna_v1"


LLAVA_EXPRESSIBLE = ("HF LLaVA expresses a CLIP or SigLIP encoder without pooling and an mlp2x_gelu projector; "
                "save_model keeps the regap format")


def llava_export_problems(config: LVLMConfig, vision_model_type: str | None = None) -> list[str]:
    """What about a model HF's `LlavaForConditionalGeneration` cannot express (empty: exportable).
    `vision_model_type` (the encoder's config `model_type`) is checked when known; the rest needs
    only the config, so `regap export` can refuse pooled or Q-Former models before loading them."""
    problems = []
    if vision_model_type is not None and vision_model_type not in ("clip_vision_model", "siglip_vision_model"):
        problems.append(f"vision encoder {vision_model_type!r} (CLIP or SigLIP needed)")
    if config.vision.pool_grid:
        problems.append("patch pooling")
    if config.projector_type != "mlp2x_gelu":
        problems.append(f"projector {config.projector_type!r} (mlp2x_gelu needed)")
    if "moca" in config.extra:
        problems.append("MoCa (a learned scale and shift of image tokens inside the LLM)")
    return problems


def export_llava_hf(model: LVLM, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a standard `LlavaForConditionalGeneration` folder (weights + processor) that other
    tools (lmms-eval's `llava_hf`, vLLM, `pipeline("image-text-to-text")`) can read. Needs a
    CLIP/SigLIP encoder, no pooling, an integer feature layer, an `mlp2x_gelu` projector and no
    MoCa: what the HF LLaVA class can express. A LoRA adapter is merged into the model's LLM first
    (`regap.models.loading.saved.merge_adapter`, in place). The weights are written in `dtype` (default: as
    they are). The chat template (processor and tokenizer) renders like the model's regap template
    and turns image content parts into the `<image>` marker."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from regap.models.loading.saved import merge_adapter

    problems = llava_export_problems(model.config, model.vision.encoder.config.model_type)
    if problems:
        raise RegapError(f"cannot export {model.config.name} as HF LLaVA: {', '.join(problems)} ({LLAVA_EXPRESSIBLE})")
    merge_adapter(model)
    layer = model.config.vision.feature_layer
    if layer == "final":
        layer = -1
    out_dir = Path(out_dir)
    tokenizer = copy.deepcopy(model.tokenizer)
    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    chat_template = hf_chat_template(model.config.template, model.tokenizer)
    tokenizer.chat_template = chat_template
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    text_config = copy.deepcopy(model.llm.config)
    old_vocab = model.llm.get_input_embeddings().weight.shape[0]
    text_config.vocab_size = max(old_vocab, len(tokenizer))
    strategy = "default" if model.config.vision.drop_cls and model.vision.has_cls else "full"
    config = LlavaConfig(
        vision_config=copy.deepcopy(model.vision.encoder.config), text_config=text_config,
        image_token_index=image_token_id, projector_hidden_act="gelu", vision_feature_layer=int(layer),
        vision_feature_select_strategy=strategy, image_seq_length=model.tokens_per_image,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
    )
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.encoder.state_dict().items():
        state["model.vision_tower." + key] = value
    state["model.multi_modal_projector.linear_1.weight"] = model.projector[0].weight
    state["model.multi_modal_projector.linear_1.bias"] = model.projector[0].bias
    state["model.multi_modal_projector.linear_2.weight"] = model.projector[2].weight
    state["model.multi_modal_projector.linear_2.bias"] = model.projector[2].bias
    for key, value in model.llm.state_dict().items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
        elif key == "lm_head.weight":
            state[key] = value
    grow = text_config.vocab_size - old_vocab
    if grow > 0:
        # The new <image> row is never looked up (its slots are replaced by image features);
        # in lm_head it is the mean row, so its logit is an average one and never wins argmax.
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in state:
                mean_row = state[key].mean(dim=0, keepdim=True).expand(grow, -1)
                state[key] = torch.cat([state[key], mean_row])
    if dtype is not None:
        config.dtype = dtype
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    state = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype)
             for k, v in state.items()}
    missing, unexpected = llava.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InternalError(f"HF LLaVA export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        llava.tie_weights()
    # Stop and pad as regap's generation does (`DecodingSettings.generation_config`).
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    llava.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    llava.save_pretrained(out_dir, safe_serialization=True)
    patch = model.vision.encoder.config.patch_size
    processor = LlavaProcessor(
        image_processor=model.vision.image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1 if model.vision.has_cls else 0,
        image_token=IMAGE_MARKER, chat_template=chat_template,
    )
    processor.save_pretrained(out_dir)
    apply_umask(out_dir)  # safetensors writes 0600: the folder gets the umask's modes
    return out_dir
