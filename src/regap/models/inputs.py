"""Input building: conversations + images -> token ids with image slots, labels and the image-token mask.

The image-token mask ([batch, tokens], True where a projected image token goes) is returned
explicitly, because the gap metrics and the ReGap loss consume it. Which positions count as
*text* tokens is one rule with an explicit mode (`text_positions`, `ModelInputs.text_mask`),
shared by the ReGap loss, the training probe and `regap gap`'s collector:

* ``after-image`` - attended positions after the sample's last image token (MIR's reference
  protocol: the text that follows the image; a sample without an image keeps every attended
  position);
* ``all-non-image`` - every attended position that is not an image token (template, system
  prompt and BOS tokens included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from regap.errors import RegapError
from regap.models.templates import IMAGE_MARKER, Template, get_template

IGNORE_INDEX = -100
TEXT_TOKEN_MODES = ("after-image", "all-non-image")


def text_positions(attention_mask: torch.Tensor, image_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The text-token mask ``[batch, tokens]`` (bool) under ``mode`` (see the module docstring).

    Branch-free on the device: no value is read back to the host."""
    image_mask = image_mask.bool()
    attended = attention_mask.to(image_mask.device).bool() & ~image_mask
    if mode == "all-non-image":
        return attended
    if mode != "after-image":
        raise RegapError(f"unknown text-token mode {mode!r}; valid: {', '.join(TEXT_TOKEN_MODES)}")
    positions = torch.arange(image_mask.shape[1], device=image_mask.device).expand_as(image_mask)
    last_image = torch.where(image_mask, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    return attended & (positions > last_image)


@dataclass
class ModelInputs:
    """A padded batch. Image positions hold `pad_token_id` in `input_ids` and are masked in `labels`."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX where not a target
    image_mask: torch.Tensor  # [B, L] bool
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W], in sample-then-marker order
    images_per_sample: list[int]
    #: Vision-tower outputs [n_images, tokens, vision hidden], when already computed (the frozen-feature
    #: cache): then `LVLM.embed` projects these and does not run the vision tower on `pixel_values`.
    image_features: torch.Tensor | None = None

    def text_mask(self, mode: str) -> torch.Tensor:
        """The text-token positions under ``mode`` (`TEXT_TOKEN_MODES`), on the masks' device."""
        return text_positions(self.attention_mask, self.image_mask, mode)

    def to(self, device: torch.device | str) -> "ModelInputs":
        return ModelInputs(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
            self.image_mask.to(device),
            None if self.pixel_values is None else self.pixel_values.to(device),
            self.images_per_sample,
            None if self.image_features is None else self.image_features.to(device),
        )


@dataclass
class TokenizedSample:
    ids: list[int]
    labels: list[int]
    image_positions: list[bool]


def _needs_bos(tokenizer: Any, text: str) -> bool:
    bos = tokenizer.bos_token
    if tokenizer.bos_token_id is None or (bos and text.startswith(bos)):
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def tokenize_rendered(
    tokenizer: Any, text: str, target_spans: list[tuple[int, int]], tokens_per_image: int,
) -> TokenizedSample:
    """Tokenise segment by segment around `<image>` markers (as LLaVA does); each marker
    becomes `tokens_per_image` slots. A token is a target when it starts inside a target span."""
    ids: list[int] = []
    labels: list[int] = []
    image_positions: list[bool] = []
    if _needs_bos(tokenizer, text):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
        image_positions.append(False)
    pad_id = pad_token_id(tokenizer)
    offset = 0
    segments = text.split(IMAGE_MARKER)
    for index, segment in enumerate(segments):
        if segment:
            encoded = tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
            for token_id, (start, _end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
                position = offset + start
                is_target = any(lo <= position < hi for lo, hi in target_spans)
                ids.append(token_id)
                labels.append(token_id if is_target else IGNORE_INDEX)
                image_positions.append(False)
        offset += len(segment)
        if index < len(segments) - 1:
            ids.extend([pad_id] * tokens_per_image)
            labels.extend([IGNORE_INDEX] * tokens_per_image)
            image_positions.extend([True] * tokens_per_image)
            offset += len(IMAGE_MARKER)
    return TokenizedSample(ids, labels, image_positions)


def pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def count_markers(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))


def with_image_marker(messages: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """LLaVA's convention: an image given without a marker goes before the first user text."""
    if n_images == 0 or count_markers(messages) > 0:
        return messages
    out = [dict(m) for m in messages]
    for message in out:
        if message["role"] == "user":
            message["content"] = (IMAGE_MARKER + "\n") * n_images + message["content"]
            return out
    raise RegapError("images were given but the conversation has no user turn to attach them to")


@dataclass
class BuiltBatch:
    """A padded batch and how it was made: the tokenised samples (after truncation) and the
    conversations cut to ``max_length`` (index -> length before the cut)."""

    inputs: ModelInputs
    samples: list[TokenizedSample]
    truncated: dict[int, int] = field(default_factory=dict)

    @property
    def n_truncated(self) -> int:
        return len(self.truncated)


def build_batch(
    conversations: list[list[dict[str, str]]],
    images_per_conversation: list[int],
    *,
    tokenizer: Any,
    template: Template,
    tokens_per_image: int,
    add_generation_prompt: bool,
    padding_side: str = "right",
    max_length: int | None = None,
) -> BuiltBatch:
    """Render, tokenise and pad a batch. Pixel values are attached by the caller (`InputBuilder`).

    Conversations longer than ``max_length`` are cut (never inside an image) and listed in
    `BuiltBatch.truncated`; the caller decides whether to warn or to count them."""
    if len(conversations) != len(images_per_conversation):
        raise RegapError("one image count per conversation is required")
    samples: list[TokenizedSample] = []
    truncated: dict[int, int] = {}
    for index, (messages, n_images) in enumerate(zip(conversations, images_per_conversation)):
        markers = count_markers(messages)
        if markers != n_images:
            raise RegapError(
                f"conversation {index} has {markers} {IMAGE_MARKER} marker(s) but {n_images} image(s) were given"
            )
        rendered = template.render(messages, add_generation_prompt=add_generation_prompt)
        if rendered.text.count(IMAGE_MARKER) != n_images:
            raise RegapError(f"conversation {index}: the template dropped or duplicated {IMAGE_MARKER} markers")
        sample = tokenize_rendered(tokenizer, rendered.text, rendered.target_spans, tokens_per_image)
        if max_length is not None and len(sample.ids) > max_length:
            if any(sample.image_positions[max_length:]):
                raise RegapError(
                    f"conversation {index}: image tokens end beyond max_length={max_length}; raise max_length"
                )
            truncated[index] = len(sample.ids)
            sample = TokenizedSample(sample.ids[:max_length], sample.labels[:max_length], sample.image_positions[:max_length])
        samples.append(sample)
    return BuiltBatch(pad_samples(samples, pad_token_id(tokenizer), padding_side), samples, truncated)


@dataclass
class InputBuilder:
    """Conversations + images -> a padded `BuiltBatch` with pixel values: the one way
    `LVLM.build_inputs` and the training collator build their inputs.

    It holds only the tokenizer, the image processor, the token count per image and the
    default template's name (not the model), so DataLoader workers can take it under any
    start method.
    """

    tokenizer: Any
    image_processor: Any
    tokens_per_image: int
    template: str

    def __call__(
        self,
        conversations: list[list[dict[str, str]]],
        images: list[list[Any]],
        *,
        template: str | None = None,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        max_length: int | None = None,
    ) -> BuiltBatch:
        if len(images) != len(conversations):
            raise RegapError(f"{len(conversations)} conversations but {len(images)} image lists")
        built = build_batch(
            conversations, [len(i) for i in images], tokenizer=self.tokenizer,
            template=get_template(template or self.template, self.tokenizer), tokens_per_image=self.tokens_per_image,
            add_generation_prompt=add_generation_prompt, padding_side=padding_side, max_length=max_length,
        )
        flat = [image for sample in images for image in sample]
        built.inputs.pixel_values = (self.image_processor(images=flat, return_tensors="pt")["pixel_values"]
                                     if flat else None)
        built.inputs.images_per_sample = [len(i) for i in images]
        return built


def pad_samples(samples: list[TokenizedSample], pad_id: int, padding_side: str) -> ModelInputs:
    if padding_side not in ("left", "right"):
        raise RegapError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    length = max(len(s.ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    image_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.ids)
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = torch.tensor(sample.ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
        attention[row, cols] = 1
        image_mask[row, cols] = torch.tensor(sample.image_positions, dtype=torch.bool)
    return ModelInputs(input_ids, attention, labels, image_mask, None, [])
