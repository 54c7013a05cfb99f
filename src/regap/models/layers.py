"""The decoder blocks of a causal LM and their outputs, for forward hooks (MoCa, feature capture).

Shared by the model layer (MoCa is part of a loaded model) and training (ReGap's feature
capture); nothing here patches a transformers class.
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


def accepts_logits_to_keep(llm: nn.Module) -> bool:
    """Whether the causal LM can project only some positions onto the vocabulary (transformers'
    `logits_to_keep`; older or remote-code models cannot, and then compute every position)."""
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap_llm(llm).forward).parameters


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
