"""MoCa baseline: a learnable per-dimension scale and shift of the vision tokens after each
decoder layer (Huang et al.), initialised to the identity (scale 1, shift 0).

It is implemented with forward hooks on the decoder layers. A hook reads the current
batch's image mask from a small context object (:class:`ImageMaskContext`) and rewrites
the layer output at image positions only: ``h <- h * scale_k + shift_k``. The training
loop (or :meth:`MoCa.images`) sets the mask before the forward pass; a hook whose mask
is unset, or does not match the hidden states' [batch, tokens] shape (e.g. one new token
during cached generation), leaves the output unchanged.

The mask is kept until it is replaced or cleared, not dropped when the forward pass ends:
wrappers that checkpoint a whole module call (torch's ``checkpoint_wrapper``, FSDP
activation checkpointing) re-run the layer's hooks during the backward pass, and the
recomputation must see the same mask. (transformers' own gradient checkpointing wraps
``forward`` only, so there the hooks run once.)

The parameters train with the projector and are saved next to it (``moca.safetensors``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from regap.errors import RegapError
from regap.train.hooks import decoder_layers, layer_output, replace_layer_output

MOCA_FILE = "moca.safetensors"


class ImageMaskContext:
    """Holds the image-token mask ([batch, tokens], bool) of the batch being processed."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None else mask.bool()

    def clear(self) -> None:
        self.mask = None


class MoCa(nn.Module):
    """Per-layer ``scale [n_layers, d]`` and ``shift [n_layers, d]`` for vision tokens."""

    def __init__(self, hidden_size: int, layers: list[int]) -> None:
        super().__init__()
        if not layers:
            raise RegapError("MoCa needs at least one decoder layer")
        self.layers = sorted(set(int(k) for k in layers))
        self.scale = nn.Parameter(torch.ones(len(self.layers), hidden_size))
        self.shift = nn.Parameter(torch.zeros(len(self.layers), hidden_size))
        self.context = ImageMaskContext()
        self._handles: list[Any] = []

    @classmethod
    def for_llm(cls, llm: nn.Module, layers: list[int] | None = None) -> "MoCa":
        """A MoCa for every decoder layer of ``llm`` (or the listed 1-based layers), attached."""
        blocks = decoder_layers(llm)
        chosen = list(range(1, len(blocks) + 1)) if layers is None else list(layers)
        bad = [k for k in chosen if not 1 <= k <= len(blocks)]
        if bad:
            raise RegapError(f"moca.layers {bad} out of range: the LLM has decoder layers 1..{len(blocks)}")
        hidden = int(llm.get_input_embeddings().embedding_dim)
        moca = cls(hidden, chosen)
        weight = next(llm.parameters())
        moca.to(device=weight.device)
        moca.attach(llm)
        return moca

    # ------------------------------------------------------------------ hooks
    def attach(self, llm: nn.Module) -> None:
        self.detach()
        blocks = decoder_layers(llm)
        for row, k in enumerate(self.layers):
            if k > len(blocks):
                raise RegapError(f"MoCa layer {k} but the LLM has {len(blocks)} decoder layers")
            # prepend: run before other forward hooks (e.g. transformers' hidden-state recorders),
            # so every observer sees the modified output.
            self._handles.append(blocks[k - 1].register_forward_hook(self._make_hook(row), prepend=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, row: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            mask = self.context.mask
            hidden = layer_output(output)
            if mask is None or hidden.ndim != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
                return None
            select = mask.to(hidden.device).unsqueeze(-1)
            scale = self.scale[row].to(hidden.dtype)
            shift = self.shift[row].to(hidden.dtype)
            updated = torch.where(select, hidden * scale + shift, hidden)
            return replace_layer_output(output, updated)

        return hook

    @contextlib.contextmanager
    def images(self, mask: torch.Tensor) -> Iterator[None]:
        """Apply MoCa for a direct LLM call (e.g. generation prefill) with this image mask."""
        previous = self.context.mask
        self.context.set(mask)
        try:
            yield
        finally:
            self.context.mask = previous

    def is_identity(self) -> bool:
        return bool(torch.all(self.scale == 1)) and bool(torch.all(self.shift == 0))

    def extra_repr(self) -> str:
        return f"layers={self.layers}, hidden={self.scale.shape[-1]}"


def save_moca(moca: MoCa, path: str | Path) -> Path:
    """Atomic safetensors write of the MoCa parameters (layer list in the metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"scale": moca.scale.detach().float().cpu().contiguous(), "shift": moca.shift.detach().float().cpu().contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "regap-moca/1", "layers": ",".join(map(str, moca.layers))})
    os.replace(tmp, path)
    return path


def load_moca(llm: nn.Module, path: str | Path, *, attach: bool = True) -> MoCa:
    """Rebuild a MoCa from ``moca.safetensors`` and (by default) attach it to ``llm``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise RegapError(f"MoCa checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise RegapError(f"cannot read MoCa checkpoint {path}: {exc}") from None
    layers = [int(k) for k in meta.get("layers", "").split(",") if k]
    if set(tensors) != {"scale", "shift"} or len(layers) != tensors["scale"].shape[0]:
        raise RegapError(f"{path} is not a MoCa checkpoint (keys {sorted(tensors)}, layers {layers})")
    moca = MoCa(tensors["scale"].shape[1], layers)
    hidden = int(llm.get_input_embeddings().embedding_dim)
    if moca.scale.shape[1] != hidden:
        raise RegapError(f"{path}: MoCa width {moca.scale.shape[1]} does not fit the LLM's hidden size {hidden}")
    with torch.no_grad():
        moca.scale.copy_(tensors["scale"])
        moca.shift.copy_(tensors["shift"])
    moca.to(device=next(llm.parameters()).device)
    if attach:
        moca.attach(llm)
    return moca
