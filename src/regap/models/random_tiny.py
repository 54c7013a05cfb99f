"""Tiny randomly initialised LVLMs for fast tests and examples (seconds, no downloads).

The tokenizer is a small byte-level BPE trained on a built-in corpus, with a ChatML chat
template, so every code path (offsets, chat template, labels) is exercised for real.
"""

from __future__ import annotations

from typing import Any

import torch

from regap.models.lvlm import LVLM, LVLMConfig
from regap.models.vision import VisionConfig, VisionTower

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "A red circle and a blue square on a white background.",
    "What is in this image? Describe the picture in detail.",
    "I'm sorry, but I can't assist with that.",
    "The capital of France is Paris. Here is a recipe for pancakes.",
    "USER: ASSISTANT: SYSTEM: system user assistant",
    "one two three four five six seven eight nine ten left right top bottom",
]


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A trained byte-level BPE tokenizer with ChatML specials (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_vision(kind: str = "clip", image_size: int = 56, patch_size: int = 14, hidden: int = 32) -> tuple[Any, Any]:
    """A random vision encoder and a matching image processor (PIL backend, no downloads)."""
    common = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    if kind == "clip":
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

        encoder = CLIPVisionModel(CLIPVisionConfig(projection_dim=hidden, **common))
        processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    elif kind == "siglip":
        from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

        encoder = SiglipVisionModel(SiglipVisionConfig(**common))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    elif kind == "dinov2":
        from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

        encoder = Dinov2Model(Dinov2Config(**common))
        processor = BitImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False)
    else:
        raise ValueError(kind)
    return encoder.eval(), processor


def tiny_llm(tokenizer: Any, kind: str = "llama", hidden: int = 48, layers: int = 2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                  tie_word_embeddings=False)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(kind)


def tiny_random_lvlm(
    vision: str = "clip", llm: str = "llama", projector: str = "mlp2x_gelu", pool_grid: int | None = None,
    feature_layer: int | str = -2, drop_cls: bool = True, template: str = "chat", seed: int = 0,
    projector_options: dict[str, Any] | None = None,
) -> LVLM:
    """A complete random LVLM: 56 px images -> 16 patches (or pooled), 48-d LM, 2 layers each.
    `projector_options` size a `qformer` projector (kept in the config's `extra`)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    encoder, processor = tiny_vision(vision)
    config = LVLMConfig(
        vision=VisionConfig(source=f"random:{vision}", feature_layer=feature_layer, drop_cls=drop_cls, pool_grid=pool_grid),
        llm_source=f"random:{llm}", projector_type=projector, template=template, name="tiny-random",
        extra={"projector_options": dict(projector_options)} if projector_options else {},
    )
    tower = VisionTower(encoder, processor, config.vision)
    return LVLM(config, tower, tiny_llm(tokenizer, llm), tokenizer)
