"""Decoding settings: greedy by default, every option recorded with the outputs."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from regap.errors import RegapError

# Generation engines (see docs/safety.md, "Engines"):
#   transformers: `generate` with the dynamic KV cache (the default; the reference path);
#   static: `generate` with transformers' static KV cache, whose decoding steps transformers
#           compiles automatically on cuda/xpu/neuron/tpu (eager on CPU);
#   vllm: the LVLM computes the prompt embeddings, vLLM decodes them (needs `pip install vllm`).
ENGINES: dict[str, str] = {
    "transformers": "transformers generate, dynamic KV cache (default)",
    "static": "transformers generate, static KV cache; decoding compiled on GPU (recommended there)",
    "vllm": "vLLM decoding from the LVLM's prompt embeddings (pip install vllm)",
}
DEFAULT_ENGINE = "transformers"
# Static caches are sized up to a multiple of this, so batches of similar length share one
# compiled graph instead of recompiling for every prompt length.
STATIC_CACHE_BUCKET = 256
# Fields added after caches were first written: left out of `cache_key()` at these values,
# so results cached before the field existed keep their keys.
_KEY_DEFAULTS: dict[str, Any] = {"engine": DEFAULT_ENGINE}


def check_engine(name: str) -> str:
    """The engine name, or a RegapError listing the valid ones."""
    if name not in ENGINES:
        raise RegapError(f"unknown generation engine {name!r}; valid: {', '.join(ENGINES)}")
    return name


def eos_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """The tokens that end a generation: the generation config's and the tokenizer's eos (every
    engine stops on the same set, so token counts agree between them)."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


#: The streamer that single-prompt `generate` calls send their tokens to (see `streaming`).
_STREAMER: ContextVar[Any] = ContextVar("regap_generation_streamer", default=None)


@contextmanager
def streaming(streamer: Any) -> Iterator[None]:
    """Within this block, every transformers-engine generation of ONE prompt (this thread's) also
    sends its tokens to `streamer` (a transformers streamer, e.g. `TextIteratorStreamer`), so an
    interactive caller can show an answer while it is being made, through any defense stack.
    A context variable rather than an argument: defenses call generation through their own
    signature. Batches of several prompts are not streamed (transformers' streamers take one)."""
    token = _STREAMER.set(streamer)
    try:
        yield
    finally:
        _STREAMER.reset(token)


def active_streamer() -> Any:
    """The streamer set by the innermost `streaming` block of this thread, or None."""
    return _STREAMER.get()


def count_until_eos(token_ids: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first end token (all of them if none ends it)."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return position + 1
    return len(token_ids)


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
    engine: str = DEFAULT_ENGINE

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RegapError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise RegapError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and self.temperature <= 0:
            raise RegapError("temperature must be > 0 when sampling")
        check_engine(self.engine)
        from regap.checks import check_seed

        check_seed(self.seed, "seed")
        if self.engine == "vllm" and self.num_beams != 1:
            raise RegapError("the vllm engine does not run beam search (num_beams must be 1); use --engine transformers")

    def to_dict(self) -> dict[str, Any]:
        """Every field, the engine included (provenance)."""
        return asdict(self)

    def cache_key(self) -> dict[str, Any]:
        """What result caches are keyed by: every field, except later-added ones left at their
        default. Any non-default engine is part of the key: bf16 outputs of the static and vLLM
        engines can differ from the dynamic-cache ones (other kernels and reduction orders)."""
        return {k: v for k, v in self.to_dict().items() if not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}

    def generation_config(self, tokenizer: Any, prompt_length: int | None = None) -> Any:
        """A transformers `GenerationConfig`; with the static engine, `prompt_length` (the padded
        batch length) sizes the static cache (rounded up to `STATIC_CACHE_BUCKET`)."""
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
        if self.engine == "static":
            # transformers compiles the decoding step by itself when the cache is static and the
            # device is cuda/xpu/neuron/tpu (GenerationMixin._valid_auto_compile_criteria); no
            # compile_config is passed so that CPU runs stay eager without a warning.
            options["cache_implementation"] = "static"
            if prompt_length is not None:
                needed = prompt_length + self.max_new_tokens
                options["max_cache_len"] = -(-needed // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        return GenerationConfig(**options)
