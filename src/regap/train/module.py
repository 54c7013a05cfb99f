"""The model as the training loop sees it: `TrainModule`, the module `accelerator.prepare` wraps
(so DDP and friends synchronise every trainable parameter), and what its forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from regap.models.inputs import ModelInputs
from regap.models.layers import accepts_logits_to_keep
from regap.models.moca import MoCa


@dataclass
class TrainOutput(ModelOutput):
    """``logits`` (all positions, or those asked for), ``hidden_states`` (when asked for) and
    ``inputs_embeds``: the layer-0 features the LLM was called with (projected image tokens in
    the image slots, token embeddings elsewhere), still in the autograd graph, so a ReGap loss
    at layer 0 needs no hook. A `ModelOutput` (a mapping), so Accelerate's output conversions
    and DDP treat it as they treat the LLM's own output."""

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    inputs_embeds: torch.Tensor | None = None


class TrainModule(nn.Module):
    """The LVLM (with its MoCa, when enabled) as one trainable module.

    ``forward`` writes the projected image tokens into the input embeddings (`LVLM.embed`)
    and runs the LLM without labels inside `LVLM.image_positions` (MoCa's hooks read the
    batch's image mask there, for that call only): the loss is computed outside, over the
    global batch. ``logits_positions`` (a 1-D tensor of sequence positions) limits the
    vocabulary projection to the positions that predict a target token (``logits_to_keep``),
    which saves most of the LM-head work in stage 1, where image tokens make up most of the
    sequence.
    """

    def __init__(self, lvlm: nn.Module) -> None:
        super().__init__()
        self.lvlm = lvlm
        self._keep_ok = accepts_logits_to_keep(lvlm.llm)

    @property
    def moca(self) -> MoCa | None:
        return self.lvlm.moca

    def forward(self, inputs: ModelInputs, output_hidden_states: bool = False,
                logits_positions: torch.Tensor | None = None) -> TrainOutput:
        embeds = self.lvlm.embed(inputs)
        extra = {}
        if logits_positions is not None and self._keep_ok:  # host positions: an asynchronous copy, no wait
            extra["logits_to_keep"] = logits_positions.to(embeds.device, non_blocking=True)
        with self.lvlm.image_positions(inputs.image_mask):
            out = self.lvlm.llm(inputs_embeds=embeds, attention_mask=inputs.attention_mask.to(embeds.device),
                                output_hidden_states=output_hidden_states, use_cache=False, **extra)
        return TrainOutput(logits=out.logits, hidden_states=out.hidden_states, inputs_embeds=embeds)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}

