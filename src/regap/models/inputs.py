"""Input building: conversations + images -> token ids with image slots, labels and the image-token mask.

The image-token mask ([batch, tokens], True where a projected image token goes) is returned
explicitly, because the gap metrics and the ReGap loss consume it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from regap.errors import RegapError
from regap.models.templates import IMAGE_MARKER, Template

IGNORE_INDEX = -100


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
) -> tuple[ModelInputs, list[TokenizedSample]]:
    """Render, tokenise and pad a batch. Pixel values are attached by the caller."""
    if len(conversations) != len(images_per_conversation):
        raise RegapError("one image count per conversation is required")
    samples: list[TokenizedSample] = []
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
            warnings.warn(f"conversation {index} truncated from {len(sample.ids)} to {max_length} tokens", stacklevel=2)
            sample = TokenizedSample(sample.ids[:max_length], sample.labels[:max_length], sample.image_positions[:max_length])
        samples.append(sample)
    return pad_samples(samples, pad_token_id(tokenizer), padding_side), samples


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
