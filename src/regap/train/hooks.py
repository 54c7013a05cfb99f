"""Forward hooks on the LLM: find its decoder blocks, capture the features ReGap regularises.

Everything here registers ordinary PyTorch hooks on the modules and removes them again;
no transformers class is patched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regap.errors import RegapError


def unwrap_llm(llm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(llm, "get_base_model", None)
    return get_base() if callable(get_base) else llm


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (`model.layers` for Llama/Qwen/Mistral, else searched)."""
    base = unwrap_llm(llm)
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return layers
    expected = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) and (expected is None or len(module) == expected):
            return module
    raise RegapError(f"cannot find the decoder layers of {type(base).__name__}")


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states in a decoder block's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_layer_output(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


class HiddenCapture:
    """Keep the LLM-side features at one layer during a forward pass.

    ``layer=0``: the ``inputs_embeds`` handed to the LLM (projector outputs at image
    positions, token embeddings elsewhere), captured by a forward pre-hook on the LLM.
    ``layer=k``: the output of decoder block k (1-based), captured by a forward hook.
    The captured tensor keeps its autograd graph, so a loss on it trains the projector.
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
