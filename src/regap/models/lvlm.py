"""The LVLM: vision tower -> projector -> causal LM, with the image-token mask made explicit."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from regap.errors import InternalError, RegapError
from regap.models.engines import generate_vllm
from regap.models.generation import DecodingSettings, active_streamer, count_until_eos, eos_token_ids
from regap.models.inputs import BuiltBatch, InputBuilder, ModelInputs, build_batch, with_image_marker
from regap.models.layers import accepts_logits_to_keep
from regap.models.lm_head import keep_lm_head_input_contiguous
from regap.models.projector import build_projector
from regap.models.templates import get_template
from regap.models.vision import VisionConfig, VisionTower

if TYPE_CHECKING:
    from regap.models.moca import MoCa


@dataclass
class LVLMConfig:
    """Everything needed to rebuild the model (sources are hub ids, folders or `regap:` names)."""

    vision: VisionConfig
    llm_source: str
    projector_type: str = "mlp2x_gelu"
    template: str = "chat"
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["vision"] = self.vision.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LVLMConfig":
        known = {"vision", "llm_source", "projector_type", "template", "name", "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RegapError(f"unknown key(s) in model config: {', '.join(unknown)}")
        vision_keys = set(VisionConfig.__dataclass_fields__)
        bad = sorted(set(data.get("vision", {})) - vision_keys)
        if bad:
            raise RegapError(f"unknown key(s) in model config 'vision': {', '.join(bad)}")
        return cls(**{**data, "vision": VisionConfig(**data["vision"])})


Conversation = list[dict[str, str]]


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: list[int]  # generated tokens per item, up to and including the first end token
    settings: DecodingSettings


def fill_short_batches(engine: str, device_type: str, has_processors: bool) -> bool:
    """Whether a short last batch is filled to the batch size: only where decoding is compiled
    (static cache off the CPU), since every new batch shape costs a recompilation there, and
    not with logits processors, which are built for the real rows."""
    return engine == "static" and device_type != "cpu" and not has_processors


class LVLM(nn.Module):
    """A LLaVA-style model built from parts.

    `build_inputs` returns token ids with image slots and the image-token mask;
    `embed` scatters projected image features into those slots; `forward` and
    `generate` run the LLM on the resulting `inputs_embeds`. An optional MoCa
    (`set_moca`) is part of the model: every LLM call is made inside
    `image_positions(batch.image_mask)`, so MoCa applies wherever the model runs.
    """

    def __init__(self, config: LVLMConfig, vision: VisionTower, llm: nn.Module, tokenizer: Any,
                 projector: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.projector = projector or build_projector(config.projector_type, vision.hidden_size, self.hidden_size,
                                                      **config.extra.get("projector_options", {}))
        self.projector.to(dtype=next(llm.parameters()).dtype)
        keep_lm_head_input_contiguous(llm)  # generate's last-position logits: a CPU bf16 slow path otherwise
        self.moca: MoCa | None = None
        #: Where the LLM's weights were read from when that is not `config.llm_source` (a saved
        #: folder's `llm/`, or training in memory): they may be tuned, so the LLM as it was before
        #: stage 2 (the `backbone` safety condition) must be loaded from `llm_source`. None: the
        #: LLM is `llm_source` as published (or a peft wrapper around it).
        self.llm_origin: str | None = None

    # ---- MoCa ---------------------------------------------------------------------------------
    def set_moca(self, moca: "MoCa | None") -> None:
        """Make ``moca`` part of this model (hooked into the LLM's decoder layers, on the model's
        device, named in the config so provenance and the fingerprint record it); None removes it."""
        if self.moca is not None:
            self.moca.detach()
        extra = {k: v for k, v in self.config.extra.items() if k != "moca"}
        if moca is not None:
            moca.attach(self.llm)
            moca.to(device=self.device)
            extra["moca"] = moca.describe()
        self.moca = moca
        # A new config object: a preset's config is shared by every model built from it.
        self.config = dataclasses.replace(self.config, extra=extra)

    def image_positions(self, image_mask: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """Where the image tokens are, for the LLM calls made inside (MoCa's hooks read it);
        a no-op for a model without MoCa. Direct LLM calls (a defense's extra pass) use it too."""
        return self.moca.image_positions(image_mask) if self.moca is not None else contextlib.nullcontext()

    # ---- properties -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.llm.get_input_embeddings().embedding_dim)

    @property
    def tokens_per_image(self) -> int:
        return getattr(self.projector, "num_tokens", None) or self.vision.num_tokens

    @property
    def context_length(self) -> int | None:
        """The LLM's positions (its config's `max_position_embeddings` or equivalent); None when
        the config names none."""
        config = self.llm.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def context_overflow(self, prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a prompt of `prompt_tokens` tokens (image slots and template included) cannot be
        answered within the context, or None when it can. Such a prompt is never sent: its
        prefill alone would run for minutes on a long input, past the positions the LLM was
        trained on (or past its position table)."""
        context = self.context_length
        if context is None or prompt_tokens + max_new_tokens <= context:
            return None
        return (f"prompt longer than the model's context ({prompt_tokens:,} tokens + {max_new_tokens} new > "
                f"{context:,} positions)")

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    # ---- inputs ------------------------------------------------------------------------------
    def build_inputs(
        self,
        conversations: Sequence[Conversation],
        images: Sequence[Sequence[Image.Image]] | None = None,
        *,
        template: str | None = None,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        max_length: int | None = None,
    ) -> ModelInputs:
        """Conversations (chat messages with `<image>` markers) + images -> a padded batch
        (`InputBuilder`, the builder the training collator uses too); a conversation cut to
        ``max_length`` is named in a warning."""
        images = images if images is not None else [[] for _ in conversations]
        built = self.input_builder()(
            [list(c) for c in conversations], [list(i) for i in images], template=template,
            add_generation_prompt=add_generation_prompt, padding_side=padding_side, max_length=max_length,
        )
        for index, length in built.truncated.items():
            warnings.warn(f"conversation {index} truncated from {length} to {max_length} tokens", stacklevel=2)
        return built.inputs

    def input_builder(self) -> InputBuilder:
        """This model's input builder (tokenizer, image processor, tokens per image, template)."""
        return InputBuilder(self.tokenizer, self.vision.image_processor, self.tokens_per_image, self.config.template)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> projected image tokens [n_images, tokens_per_image, hidden]."""
        features = self.vision(pixel_values.to(self.device))
        return self.projector(features.to(self.dtype))

    def embed(self, inputs: ModelInputs) -> torch.Tensor:
        """Text embeddings with projected image tokens written into the image slots."""
        inputs = inputs.to(self.device)
        embeds = self.llm.get_input_embeddings()(inputs.input_ids)
        n_slots = int(inputs.image_mask.sum())
        if inputs.image_features is not None:
            image_tokens = self.projector(inputs.image_features.to(self.dtype))
        elif inputs.pixel_values is None:
            if n_slots:
                raise InternalError("the batch has image slots but no pixel values")
            return embeds
        else:
            image_tokens = self.encode_images(inputs.pixel_values)
        if image_tokens.shape[0] * image_tokens.shape[1] != n_slots:
            raise InternalError(f"{n_slots} image slots but {image_tokens.shape[0]} image(s) x {image_tokens.shape[1]} tokens")
        mask = inputs.image_mask.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, image_tokens.to(embeds.dtype).reshape(-1))

    def forward(self, inputs: ModelInputs, output_hidden_states: bool = False, use_labels: bool = True,
                logits_to_keep: int | None = None) -> Any:
        """`logits_to_keep=1` for passes that only read hidden states (the gap, calibrations): the
        vocabulary projection of every position is a large share of a small model's forward pass and a
        [batch, length, vocabulary] tensor. Ignored by LLMs that cannot limit it, and with labels."""
        embeds = self.embed(inputs)
        extra = {}
        if logits_to_keep is not None and not use_labels and accepts_logits_to_keep(self.llm):
            extra["logits_to_keep"] = logits_to_keep
        with self.image_positions(inputs.image_mask):
            return self.llm(
                inputs_embeds=embeds, attention_mask=inputs.attention_mask.to(self.device),
                labels=inputs.labels.to(self.device) if use_labels else None,
                output_hidden_states=output_hidden_states, use_cache=False, **extra,
            )

    # ---- generation --------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        """Batched generation; see `generate_detailed` (this returns the texts only)."""
        return self.generate_detailed(*args, **kwargs).texts

    @staticmethod
    def prepare_conversations(
        prompts: Sequence[str | Conversation], images: Sequence[Sequence[Image.Image] | Image.Image | None],
    ) -> tuple[list[Conversation], list[list[Image.Image]]]:
        """Strings become one user turn; images without a marker go before the user's text."""
        conversations, image_lists = [], []
        for prompt, image in zip(prompts, images):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            listed = [] if image is None else ([image] if isinstance(image, Image.Image) else list(image))
            conversations.append(with_image_marker(messages, len(listed)))
            image_lists.append(listed)
        return conversations, image_lists

    def prompt_lengths(self, conversations: Sequence[Conversation], image_lists: Sequence[Sequence[Image.Image]],
                       template: str | None = None) -> list[int]:
        """Token length of each prompt with its generation prompt and image slots (no images are
        encoded): what batching by length needs, unlike the string length of the conversation."""
        built = self.build_token_batch(conversations, [len(i) for i in image_lists], template=template,
                                       add_generation_prompt=True, padding_side="left")
        return [len(sample.ids) for sample in built.samples]

    def build_token_batch(self, conversations: Sequence[Conversation], image_counts: Sequence[int], *,
                          template: str | None = None, add_generation_prompt: bool = False,
                          padding_side: str = "right") -> BuiltBatch:
        """The `BuiltBatch` `build_inputs` would make, without pixel values: token ids and the
        image and text masks only, to size work before any image is made or encoded."""
        return build_batch(
            [list(c) for c in conversations], list(image_counts), tokenizer=self.tokenizer,
            template=get_template(template or self.config.template, self.tokenizer),
            tokens_per_image=self.tokens_per_image, add_generation_prompt=add_generation_prompt,
            padding_side=padding_side,
        )

    @torch.no_grad()
    def generate_detailed(
        self,
        prompts: Sequence[str | Conversation],
        images: Sequence[Sequence[Image.Image] | Image.Image | None] | None = None,
        settings: DecodingSettings | None = None,
        *,
        template: str | None = None,
        progress: bool = False,
        logits_processor_factory: Callable[[list[int]], Any] | None = None,
    ) -> "GenerationResult":
        """Batched generation with left padding; greedy unless `settings` say otherwise.

        A prompt may be a plain string (one user turn) or a list of chat messages. An image
        given without an `<image>` marker is placed before the user's text (LLaVA convention).
        Prompts are batched by token length (image slots included), longest first, so padding
        is small and a static cache is sized once. `settings.engine` picks the generation engine
        (`transformers`, `static`, `vllm`; see `regap.models.generation.ENGINES`).
        `logits_processor_factory(indices)` may return extra logits processors for the batch
        holding those prompt indices (decoding-time defenses use it; not with vllm).
        """
        settings = settings or DecodingSettings()
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise RegapError(f"{len(prompts)} prompts but {len(images)} image entries")
        if not prompts:
            return GenerationResult([], [], settings)
        conversations, image_lists = self.prepare_conversations(prompts, images)
        lengths = self.prompt_lengths(conversations, image_lists, template)
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # stable: ties keep their order
        if settings.engine == "vllm":
            if logits_processor_factory is not None:
                raise RegapError("the vllm engine cannot run decoding-time defenses (logits processors); "
                                 "use --engine transformers or static")
            if self.moca is not None:
                raise RegapError("the vllm engine cannot apply MoCa (vLLM runs its own decoder layers, without "
                                 "MoCa's hooks); use --engine transformers or static")
            texts, counts = generate_vllm(self, conversations, image_lists, order, settings, template=template,
                                          progress=progress)
            return GenerationResult(texts, counts, settings)
        outputs: list[str] = [""] * len(prompts)
        new_tokens: list[int] = [0] * len(prompts)
        eos_ids = eos_token_ids(self.tokenizer, settings.generation_config(self.tokenizer))
        # Compiled decoding (static cache off the CPU) recompiles for every new batch size: fill a
        # short last batch with copies of its last prompt (their outputs are dropped).
        fill = fill_short_batches(settings.engine, self.device.type, logits_processor_factory is not None)
        fill_to = settings.batch_size if fill else None
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        starts = range(0, len(order), settings.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="generate", unit="batch")
        for start in starts:
            chunk = order[start : start + settings.batch_size]
            rows = chunk + [chunk[-1]] * (fill_to - len(chunk)) if fill_to else chunk
            batch = self.build_inputs(
                [conversations[i] for i in rows], [image_lists[i] for i in rows],
                template=template, add_generation_prompt=True, padding_side="left",
            )
            embeds = self.embed(batch)
            extra = {}
            if logits_processor_factory is not None:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList(logits_processor_factory(chunk))
            if len(rows) == 1 and active_streamer() is not None:  # `regap.models.generation.streaming`
                extra["streamer"] = active_streamer()
            with self.image_positions(batch.image_mask):
                generated = self.llm.generate(
                    inputs_embeds=embeds, attention_mask=batch.attention_mask.to(self.device),
                    generation_config=settings.generation_config(self.tokenizer, prompt_length=embeds.shape[1]),
                    **extra,
                )
            texts = self.tokenizer.batch_decode(generated[: len(chunk)], skip_special_tokens=True)
            for row, (index, text) in enumerate(zip(chunk, texts)):
                outputs[index] = text.strip()
                new_tokens[index] = count_until_eos(generated[row].tolist(), eos_ids)
        return GenerationResult(outputs, new_tokens, settings)

    # ---- parameter groups --------------------------------------------------------------------
    def freeze_backbones(self) -> None:
        """Stage 1: only the projector trains."""
        for module in (self.vision, self.llm):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        for parameter in self.projector.parameters():
            parameter.requires_grad_(True)
