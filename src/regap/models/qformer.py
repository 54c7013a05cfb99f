"""Q-Former connectors (BLIP-2 / InstructBLIP / MiniGPT-4): learned queries read the image.

A `QFormerProjector` is a transformers Q-Former (`Blip2QFormerModel`, or InstructBLIP's
`InstructBlipQFormerModel` when loaded from a checkpoint) plus `num_query_tokens` learned
query embeddings and a `Linear(qformer_hidden -> llm_hidden)` (`language_projection`). The
queries cross-attend to all vision tokens, so every image becomes `num_query_tokens` LLM
tokens whatever the encoder's patch count; the LVLM's `tokens_per_image` follows
`projector.num_tokens`.

State-dict keys are `query_tokens`, `qformer.*` and `language_projection.*` (Hugging Face's
names), so a projector-only checkpoint holds the whole connector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regap.errors import RegapError

TRAINABLE_MODES = ("all", "linear")

# The from-scratch default is CPU-friendly; BLIP-2's own Q-Former is hidden 768, 12 layers,
# 12 heads, cross-attention every 2nd layer (pass those as options to get it).
DEFAULTS: dict[str, Any] = {
    "num_query_tokens": 32, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": None,  # 4 x hidden_size
    "cross_attention_frequency": 1, "dropout": 0.0, "trainable": "all",
}


class QFormerProjector(nn.Module):
    """vision features [B, N, Dv] -> [B, num_query_tokens, D_llm].

    `trainable`: `all` (queries + Q-Former + linear, BLIP-2 stage 1/2) or `linear` (only the
    `language_projection`, MiniGPT-4 style). `set_trainable` sets `requires_grad` accordingly;
    call it again after anything that unfreezes every projector parameter.
    """

    def __init__(self, qformer: nn.Module, query_tokens: nn.Parameter, language_projection: nn.Linear,
                 trainable: str = "all") -> None:
        super().__init__()
        if query_tokens.ndim != 3 or query_tokens.shape[0] != 1:
            raise RegapError(f"query tokens must be [1, num_queries, hidden], got {tuple(query_tokens.shape)}")
        self.qformer = qformer
        self.query_tokens = query_tokens  # a Parameter: shared, not copied, when it comes from a checkpoint
        self.language_projection = language_projection
        # InstructBLIP's Q-Former embeds instruction text; BLIP-2's reads the queries only.
        self.takes_text = hasattr(qformer, "embeddings")
        self.trainable = "all"
        self.set_trainable(trainable)

    @property
    def num_tokens(self) -> int:
        return int(self.query_tokens.shape[1])

    @property
    def vision_dim(self) -> int:
        return int(self.qformer.config.encoder_hidden_size)

    def set_trainable(self, mode: str) -> None:
        if mode not in TRAINABLE_MODES:
            raise RegapError(f"unknown Q-Former trainable mode {mode!r}; valid: {', '.join(TRAINABLE_MODES)}")
        self.trainable = mode
        self.query_tokens.requires_grad_(mode == "all")
        for parameter in self.qformer.parameters():
            parameter.requires_grad_(mode == "all")
        for parameter in self.language_projection.parameters():
            parameter.requires_grad_(True)

    def forward(self, vision_features: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`qformer_input_ids` (InstructBLIP only): the instruction in the Q-Former's own vocabulary.
        The LVLM never passes it, so inside `LVLM` InstructBLIP runs with no instruction tokens."""
        if vision_features.ndim != 3:
            raise RegapError(f"Q-Former input must be [images, tokens, dim], got {tuple(vision_features.shape)}")
        qformer_dtype = next(self.qformer.parameters()).dtype
        queries = self.query_tokens.expand(vision_features.shape[0], -1, -1)
        features = vision_features.to(qformer_dtype)
        if qformer_input_ids is not None:
            if not self.takes_text:
                raise RegapError("this Q-Former (BLIP-2) takes no instruction text")
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
            outputs = self.qformer(
                input_ids=qformer_input_ids, attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                query_embeds=queries, encoder_hidden_states=features, return_dict=True,
            )
        elif self.takes_text:
            outputs = self.qformer(input_ids=None, query_embeds=queries, encoder_hidden_states=features, return_dict=True)
        else:
            outputs = self.qformer(query_embeds=queries, encoder_hidden_states=features, return_dict=True)
        hidden = outputs.last_hidden_state[:, : self.num_tokens]
        # HF keeps BLIP-2's Q-Former in float32 and casts its output to the projection's dtype.
        return self.language_projection(hidden.to(self.language_projection.weight.dtype))


def build_qformer_projector(vision_dim: int, llm_dim: int, seed: int = 0, **options: Any) -> QFormerProjector:
    """A freshly initialised (seeded) Q-Former connector. Options (see `DEFAULTS`):
    num_query_tokens, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    cross_attention_frequency, dropout, trainable."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise RegapError(f"unknown Q-Former option(s): {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
    spec = {**DEFAULTS, **options}
    hidden = int(spec["hidden_size"])
    if hidden % int(spec["num_attention_heads"]):
        raise RegapError(f"Q-Former hidden_size {hidden} is not divisible by num_attention_heads {spec['num_attention_heads']}")
    config = Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=int(spec["num_hidden_layers"]),
        num_attention_heads=int(spec["num_attention_heads"]),
        intermediate_size=int(spec["intermediate_size"] or 4 * hidden),
        cross_attention_frequency=int(spec["cross_attention_frequency"]), encoder_hidden_size=int(vision_dim),
        hidden_dropout_prob=float(spec["dropout"]), attention_probs_dropout_prob=float(spec["dropout"]),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        qformer = Blip2QFormerModel(config)
        # LAVIS initialises the queries from N(0, initializer_range); HF zeros them (the checkpoint overwrites).
        query_tokens = nn.Parameter(torch.randn(1, int(spec["num_query_tokens"]), hidden) * config.initializer_range)
        projection = nn.Linear(hidden, llm_dim)
    return QFormerProjector(qformer, query_tokens, projection, trainable=spec["trainable"])
