"""Hidden-state interventions as context managers over ordinary PyTorch forward hooks.

Entering registers the hooks, leaving removes them (also on an exception), so the model is
exactly as before afterwards; no transformers class or method is replaced. The hooks are
registered with ``prepend=True``: transformers records ``output_hidden_states`` with its own
forward hooks on the decoder blocks, and those must see the shifted output, as the next block
does. A model's MoCa (`regap.models.moca`, part of the model) is re-attached after that, so
its hooks stay first: the shift acts on the model's own (calibrated) block output.

torch.compile does not notice hooks added or removed after it traced a module
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so a compiled decoding step would run
whichever hook set it was compiled with. `uncompiled` gives decoding settings that switch
transformers' automatic compilation off for the calls made under a hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from regap.errors import InternalError, RegapError
from regap.models.generation import DecodingSettings
from regap.models.layers import decoder_layers, layer_output, replace_layer_output

if TYPE_CHECKING:
    from regap.models.moca import MoCa


class DecoderShift:
    """Subtract a vector from the output of chosen decoder blocks while active.

    `layers` are 1-based decoder blocks; `moca` is the model's MoCa, if any (kept first);
    `vectors` is ``[len(layers), d]`` (every row the same
    shift) or ``[rows, len(layers), d]`` (one shift per batch row; a batch with k times as many
    rows, as beam search makes, repeats each row's shift k times). `set_vectors` swaps them
    between batches while the hooks stay registered.
    """

    def __init__(self, llm: nn.Module, layers: Sequence[int], vectors: torch.Tensor | None = None,
                 moca: MoCa | None = None) -> None:
        blocks = decoder_layers(llm)
        for layer in layers:
            if not 1 <= layer <= len(blocks):
                raise RegapError(f"layer {layer} is beyond the model's {len(blocks)} decoder layers "
                                 f"(valid: 1..{len(blocks)})")
        self.blocks = [blocks[layer - 1] for layer in layers]
        self.layers = list(layers)
        self.llm, self.moca = llm, moca
        parameter = next(llm.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.vectors: torch.Tensor | None = None
        self._handles: list[Any] = []
        if vectors is not None:
            self.set_vectors(vectors)

    def set_vectors(self, vectors: torch.Tensor) -> None:
        if vectors.ndim not in (2, 3) or vectors.shape[-2] != len(self.layers):
            raise RegapError(f"shift vectors {tuple(vectors.shape)} do not match {len(self.layers)} layer(s)")
        self.vectors = vectors.to(device=self.device, dtype=self.dtype)

    def _hook(self, position: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self.vectors is None:
                raise InternalError("a shifted forward pass ran before its shift vectors were set")
            hidden = layer_output(output)
            if self.vectors.ndim == 2:
                shift = self.vectors[position]
            else:
                shift = self.vectors[:, position]
                rows = hidden.shape[0]
                if rows != shift.shape[0]:
                    if rows % shift.shape[0]:
                        raise InternalError(f"a batch of {rows} rows for {shift.shape[0]} per-row shift vectors")
                    shift = shift.repeat_interleave(rows // shift.shape[0], dim=0)
                shift = shift.unsqueeze(1)
            return replace_layer_output(output, hidden - shift)

        return hook

    def __enter__(self) -> "DecoderShift":
        if self._handles:
            raise InternalError("this DecoderShift is already active")
        try:
            for position, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_hook(self._hook(position), prepend=True))
            if self.moca is not None:
                self.moca.attach(self.llm)  # detaches and prepends again: MoCa, then the shift, then recorders
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ImageTokenAffine:
    """Map the projector's output (the image tokens at the LLM input) through a fixed affine
    map while active: ``x + strength * ((scale * x + bias) - x)``, computed in float32."""

    def __init__(self, projector: nn.Module, scale: float, bias: torch.Tensor, strength: float = 1.0) -> None:
        self.projector, self.scale, self.strength = projector, float(scale), float(strength)
        self.bias = bias.detach().float()
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        tokens = layer_output(output)
        x = tokens.float()
        mapped = x + self.strength * ((self.scale * x + self.bias.to(x.device)) - x)
        return replace_layer_output(output, mapped.to(tokens.dtype))

    def __enter__(self) -> "ImageTokenAffine":
        if self._handle is not None:
            raise InternalError("this ImageTokenAffine is already active")
        self._handle = self.projector.register_forward_hook(self._hook, prepend=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass
class UncompiledDecoding(DecodingSettings):
    """Decoding settings whose generation config switches automatic compilation off, so decoding
    steps run the forward hooks that are registered now (see the module docstring)."""

    def generation_config(self, tokenizer: Any, prompt_length: int | None = None) -> Any:
        config = super().generation_config(tokenizer, prompt_length=prompt_length)
        config.disable_compile = True
        return config


def uncompiled(settings: Any) -> Any:
    """`settings` with compiled decoding switched off (only the static engine compiles)."""
    if isinstance(settings, DecodingSettings) and not isinstance(settings, UncompiledDecoding) \
            and settings.engine == "static":
        return UncompiledDecoding(**settings.to_dict())
    return settings
