"""Forward hooks on the LLM: capture the features ReGap regularises (the decoder blocks are
found by `regap.models.layers`, re-exported here).

Everything here registers ordinary PyTorch hooks on the modules and removes them again;
no transformers class is patched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regap.errors import RegapError
from regap.models.layers import decoder_layers, layer_output, unwrap_llm

__all__ = ["HiddenCapture", "decoder_layers", "layer_output", "unwrap_llm"]


class HiddenCapture:
    """Keep the LLM-side features at one layer during a forward pass.

    ``layer=0``: the ``inputs_embeds`` handed to the LLM (projector outputs at image
    positions, token embeddings elsewhere), captured by a forward pre-hook on the LLM.
    ``layer=k``: the output of decoder block k (1-based), captured by a forward hook.
    The captured tensor keeps its autograd graph, so a loss on it trains the projector.
    The training loop hooks only k > 0: layer 0 comes back from `TrainModule.forward`.
    """

    def __init__(self, llm: nn.Module, layer: int) -> None:
        self.layer = layer
        self.features: torch.Tensor | None = None
        if layer == 0:
            self._handle = llm.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            blocks = decoder_layers(llm)
            if not 1 <= layer <= len(blocks):
                raise RegapError(f"regap.layer={layer} but the LLM has {len(blocks)} decoder layers (use 0..{len(blocks)})")
            self._handle = blocks[layer - 1].register_forward_hook(self._hook)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            self.features = embeds

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.features = layer_output(output)

    def pop(self) -> torch.Tensor:
        if self.features is None:
            raise RegapError(f"no features were captured at layer {self.layer} (was the LLM called with inputs_embeds?)")
        features, self.features = self.features, None
        return features

    def clear(self) -> None:
        self.features = None

    def remove(self) -> None:
        self._handle.remove()
        self.features = None
