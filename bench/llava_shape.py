"""LLaVA-1.5-7B-shaped regap models with random weights, and inputs at their real lengths.

Shared by `gpu.py` (the 7B path on a GPU) and `rehearse.py` (the same path on a CPU), so
both run exactly the same model: CLIP ViT-L/14-336 (576 image tokens from layer -2, CLS
dropped), `mlp2x_gelu`, a Llama-2/Vicuna-7B-shaped LM, the `vicuna_v1` template. The weights
come from transformers' config classes, initialised directly in the target dtype and on the
target device (one copy of the weights, never a float32 copy first). No model hub: the
tokenizer is `vicuna_like_tokenizer`, a small byte-level BPE trained on text that holds
vicuna_v1's system prompt, so prompts have Vicuna's lengths (system prompt about 35 tokens,
a 617-token prompt = 576 image tokens + 41 text tokens, as in the reference figures).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Shape:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    sample_tokens: int  # tokens per training sample and per generation prompt (image included)
    max_positions: int = 4096

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SEVEN_B = Shape(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, image_size=336,
                patch=14, hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000, sample_tokens=617)
TINY = Shape(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, image_size=56, patch=14,
             hidden=64, layers=2, heads=4, intermediate=128, vocab=640, sample_tokens=60, max_positions=512)


def vicuna_like_tokenizer() -> Any:
    """A trained byte-level BPE (deterministic, about 600 entries) with Llama's specials: `<s>`
    prepended, `</s>` ends, `<unk>` pads (LLaVA's choice for Vicuna). Its corpus holds
    vicuna_v1's system prompt and template words, so they cost as few tokens as in Vicuna's
    own tokenizer; ids past its length are never produced, which does not matter for shapes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from regap.models.random_tiny import _CORPUS
    from regap.models.templates import VICUNA_SYSTEM

    corpus = [*_CORPUS, VICUNA_SYSTEM, "USER: <image>\nWhat is shown in the image? ASSISTANT: A photo of a cat."]
    specials = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus * 8, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def build_model(shape: Shape, device: Any, dtype: Any, *, vision_layers: int | None = None) -> Any:
    """A LLaVA-1.5-7B-shaped regap `LVLM` (`shape`) with random weights, built on `device` in `dtype`.

    The preset `clip-vicuna-7b` gives the feature selection (CLIP layer -2, CLS dropped), the
    projector type and the template; the weights come from transformers' config classes,
    created under `dtype` as the default dtype and `device` as the default device, so the
    7B model never exists in float32 or twice. `vision_layers` builds a shallower vision
    tower of the same width (tests on small machines).
    """
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from regap.models import LVLM, VisionTower, get_preset

    preset = get_preset("clip-vicuna-7b").config
    config = dataclasses.replace(preset, vision=dataclasses.replace(preset.vision, source="random:clip-vit-l-14-336"),
                                 llm_source="random:llama-2-7b-shape", name="llava-1.5-7b-shape-random")
    tokenizer = vicuna_like_tokenizer()
    if len(tokenizer) > shape.vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries, more than the shape's vocabulary {shape.vocab}")
    size = shape.image_size
    vision_config = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                                     num_hidden_layers=vision_layers or shape.vision_layers,
                                     num_attention_heads=shape.vision_heads, image_size=size, patch_size=shape.patch)
    llm_config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                             num_key_value_heads=shape.heads, max_position_embeddings=shape.max_positions,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            encoder = CLIPVisionModel(vision_config).eval()
            llm = LlamaForCausalLM(llm_config).eval()
    finally:
        torch.set_default_dtype(default)
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    model = LVLM(config, VisionTower(encoder, processor, config.vision), llm, tokenizer)
    return model.to(device=device, dtype=dtype)


class NoEnd:
    """A logits processor that suppresses the end token, so every row generates exactly max_new_tokens."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[:, self.eos] = float("-inf")
        return scores


def checkpointing_off(llm: Any) -> None:
    """Gradient checkpointing off (transformers >= 5.2x names it activation checkpointing)."""
    on = getattr(llm, "is_activation_checkpointing", None)
    if on is None:
        on = getattr(llm, "is_gradient_checkpointing", False)
    if on:
        (getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable)()


def for_inference(model: Any) -> Any:
    """Back from a training run: eval mode, no checkpointing, projector in the model's dtype."""
    checkpointing_off(model.llm)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.projector.to(dtype=model.dtype)
    model.eval()
    return model


def _longest_text(length_of: Callable[[str], int], target: int) -> tuple[str, int]:
    """The longest text of cycled words whose rendered length is at most `target` tokens."""
    words = ["describe", "the", "picture", "in", "detail", "left", "right", "top", "bottom", "one", "two", "circle"]
    text, length = "", length_of("")
    for i in range(8 * target):
        candidate = (text + " " + words[i % len(words)]).strip()
        n = length_of(candidate)
        if n > target:
            break
        text, length = candidate, n
    return text, length


def _sample_length(model: Any, template_name: str, user: str, answer: str) -> int:
    from regap.models.inputs import build_batch
    from regap.models.templates import get_template

    conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": answer or "a"}]
    built = build_batch([conversation], [1], tokenizer=model.tokenizer, template=get_template(template_name, model.tokenizer),
                        tokens_per_image=model.tokens_per_image, add_generation_prompt=False, padding_side="right")
    return len(built.samples[0].ids)


def caption_of_length(model: Any, target: int) -> tuple[str, int]:
    """A caption that makes a stage-1 (`plain` template) sample `target` tokens long, image included."""
    return _longest_text(lambda caption: _sample_length(model, "plain", "<image>", caption), target)


def answer_of_length(model: Any, question: str, target: int) -> tuple[str, int]:
    """An answer that makes a stage-2 sample (the model's template, `<image>` + `question`) `target` tokens long."""
    user = "<image>\n" + question
    return _longest_text(lambda answer: _sample_length(model, model.config.template, user, answer), target)


def prompt_of_length(model: Any, target: int) -> tuple[str, int]:
    """A request that, with one image and the model's template, is `target` prompt tokens long."""
    from PIL import Image

    image = [Image.new("RGB", (8, 8))]

    def length_of(text: str) -> int:
        conversations, images = model.prepare_conversations([text or "describe"], [image])
        return model.prompt_lengths(conversations, images)[0]

    return _longest_text(length_of, target)


def _write_images(folder: Path, shape: Shape) -> None:
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (shape.image_size, shape.image_size), (30 * k, 120, 255 - 30 * k)).save(
            folder / "images" / f"{k}.png")


def write_captions(folder: Path, model: Any, shape: Shape, n: int) -> tuple[Path, int]:
    """`n` LLaVA-format caption rows over 8 colour images, every sample `sample_tokens` long."""
    caption, tokens = caption_of_length(model, shape.sample_tokens)
    _write_images(folder, shape)
    rows = [{"id": str(i), "image": f"images/{i % 8}.png",
             "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]}
            for i in range(n)]
    path = folder / "captions.json"
    path.write_text(json.dumps(rows))
    return path, tokens


def write_conversations(folder: Path, model: Any, shape: Shape, n: int) -> tuple[Path, int]:
    """`n` LLaVA-format instruction rows (one question and answer in the model's template), every
    sample `sample_tokens` long, image included."""
    question = "What is in the image?"
    answer, tokens = answer_of_length(model, question, shape.sample_tokens)
    _write_images(folder, shape)
    rows = [{"id": str(i), "image": f"images/{i % 8}.png",
             "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}
            for i in range(n)]
    path = folder / "instructions.json"
    path.write_text(json.dumps(rows))
    return path, tokens
