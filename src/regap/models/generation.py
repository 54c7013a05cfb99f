"""Decoding settings: greedy by default, every option recorded with the outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from regap.errors import RegapError


@dataclass
class DecodingSettings:
    """What decides the generated text; stored in every result's provenance."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RegapError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise RegapError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and self.temperature <= 0:
            raise RegapError("temperature must be > 0 when sampling")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def generation_config(self, tokenizer: Any) -> Any:
        from transformers import GenerationConfig

        options: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if self.do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p)
        else:
            # Greedy: neutral sampling fields so transformers does not warn or apply them.
            options.update(temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**options)
