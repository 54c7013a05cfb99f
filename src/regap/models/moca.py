"""MoCa (modality calibration, Huang et al. 2024, the MIR paper): a learnable per-dimension
scale and shift of the hidden states at image-token positions after each decoder layer,
``h <- h * scale_k + shift_k``, initialised to the identity (scale 1, shift 0). See docs/moca.md.

A MoCa belongs to its LVLM (`LVLM.set_moca`), which attaches it to the LLM's decoder layers
with forward hooks (no transformers class is patched) and says where the image tokens are
for each LLM call it makes: ``with moca.image_positions(mask): llm(...)`` holds the batch's
image mask for that call only, and every hook reads it there. The rules of a hook:

* a single-token pass (a decoding step with a KV cache) is left alone: a generated token is
  text (the reference skips these passes the same way);
* a batch that `generate` expanded (beam search repeats each row) gets the mask rows
  repeated the same way;
* a pass with no mask, or with a mask that does not fit the hidden states, raises a
  RegapError: a model with MoCa must never run silently without it (a direct ``llm(...)``
  call outside `image_positions`, or a wrapper that re-runs module hooks after the call,
  such as FSDP activation checkpointing, fails loudly instead).

The calibration is computed in float32 and cast back, as in the reference; the identity is
exact in every dtype. The parameters are saved as ``moca.safetensors`` (layer list in the
metadata) next to the projector.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from regap.errors import RegapError
from regap.files import atomic_path
from regap.models.layers import decoder_layers, layer_output, replace_layer_output

MOCA_FILE = "moca.safetensors"
_NO_MASK = ("this LLM call has no image mask, but the model has MoCa: run it through LVLM.forward / "
            "LVLM.generate, or inside `lvlm.image_positions(mask)`")


class MoCa(nn.Module):
    """Per-layer ``scale [n_layers, d]`` and ``shift [n_layers, d]`` for image tokens."""

    def __init__(self, hidden_size: int, layers: list[int]) -> None:
        super().__init__()
        if not layers:
            raise RegapError("MoCa needs at least one decoder layer")
        self.layers = sorted(set(int(k) for k in layers))
        self.scale = nn.Parameter(torch.ones(len(self.layers), hidden_size))
        self.shift = nn.Parameter(torch.zeros(len(self.layers), hidden_size))
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    @classmethod
    def for_llm(cls, llm: nn.Module, layers: list[int] | None = None) -> "MoCa":
        """An identity MoCa sized for ``llm``: every decoder layer, or the listed 1-based ones."""
        blocks = decoder_layers(llm)
        chosen = list(range(1, len(blocks) + 1)) if layers is None else list(layers)
        bad = [k for k in chosen if not 1 <= k <= len(blocks)]
        if bad:
            raise RegapError(f"moca.layers {bad} out of range: the LLM has decoder layers 1..{len(blocks)}")
        return cls(int(llm.get_input_embeddings().embedding_dim), chosen)

    # ------------------------------------------------------------------ hooks
    def attach(self, llm: nn.Module) -> None:
        """Hook the decoder layers of ``llm`` (an LVLM does this in `set_moca`)."""
        self.detach()
        blocks = decoder_layers(llm)
        hidden = int(llm.get_input_embeddings().embedding_dim)
        if self.scale.shape[-1] != hidden:
            raise RegapError(f"MoCa width {self.scale.shape[-1]} does not fit the LLM's hidden size {hidden}")
        for row, k in enumerate(self.layers):
            if k > len(blocks):
                raise RegapError(f"MoCa layer {k} but the LLM has {len(blocks)} decoder layers")
            # prepend: run before other forward hooks (e.g. transformers' hidden-state recorders),
            # so every observer sees the calibrated output.
            self._handles.append(blocks[k - 1].register_forward_hook(self._make_hook(row), prepend=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def image_positions(self, mask: torch.Tensor) -> Iterator[None]:
        """The image-token mask ``[batch, tokens]`` of the LLM calls made inside (nestable)."""
        previous = self._mask
        self._mask = mask.bool()
        try:
            yield
        finally:
            self._mask = previous

    def _make_hook(self, row: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = layer_output(output)
            # A decoding step comes first and touches nothing else, so compiled decoding
            # (static cache) traces no mask and never recompiles for a new one.
            if hidden.ndim != 3 or hidden.shape[1] == 1:
                return None
            select = self._fit(hidden).unsqueeze(-1)
            scale = self.scale[row].to(hidden.device, torch.float32)  # layers may sit on other devices
            calibrated = hidden.float() * scale + self.shift[row].to(hidden.device, torch.float32)
            return replace_layer_output(output, torch.where(select, calibrated.to(hidden.dtype), hidden))

        return hook

    def _fit(self, hidden: torch.Tensor) -> torch.Tensor:
        """The current mask on ``hidden``'s device, rows repeated for a batch `generate` expanded."""
        mask = self._mask
        if mask is None:
            raise RegapError(_NO_MASK)
        batch, tokens = hidden.shape[:2]
        if mask.shape[0] != batch and mask.shape[0] and batch % mask.shape[0] == 0:
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        if tuple(mask.shape) != (batch, tokens):
            raise RegapError(f"MoCa: the image mask {tuple(mask.shape)} does not fit the hidden states "
                             f"[{batch}, {tokens}] of this LLM call")
        return mask.to(hidden.device)

    # ------------------------------------------------------------------ facts
    def is_identity(self) -> bool:
        return bool(torch.all(self.scale == 1)) and bool(torch.all(self.shift == 0))

    def describe(self) -> dict[str, Any]:
        """What provenance records (the parameters themselves go into the model fingerprint)."""
        return {"layers": list(self.layers)}

    def extra_repr(self) -> str:
        return f"layers={self.layers}, hidden={self.scale.shape[-1]}"


def save_moca(moca: MoCa, path: str | Path) -> Path:
    """Atomic safetensors write of the MoCa parameters (layer list in the metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"scale": moca.scale.detach().float().cpu().contiguous(), "shift": moca.shift.detach().float().cpu().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "regap-moca/1", "layers": ",".join(map(str, moca.layers))})
    return path


def load_moca(path: str | Path, llm: nn.Module | None = None) -> MoCa:
    """A MoCa from ``moca.safetensors``, checked against ``llm``'s layers and width when given
    (give it to an LVLM with `LVLM.set_moca`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RegapError(f"MoCa checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise RegapError(f"cannot read MoCa checkpoint {path}: {exc}") from None
    try:
        layers = [int(k) for k in meta.get("layers", "").split(",") if k]
    except ValueError:
        layers = []
    if set(tensors) != {"scale", "shift"} or not layers or len(layers) != tensors["scale"].shape[0] \
            or tensors["scale"].shape != tensors["shift"].shape:
        raise RegapError(f"{path} is not a MoCa checkpoint (keys {sorted(tensors)}, layers {layers})")
    moca = MoCa(tensors["scale"].shape[1], layers)
    if llm is not None:
        hidden = int(llm.get_input_embeddings().embedding_dim)
        n_blocks = len(decoder_layers(llm))
        if moca.scale.shape[1] != hidden:
            raise RegapError(f"{path}: MoCa width {moca.scale.shape[1]} does not fit the LLM's hidden size {hidden}")
        if max(moca.layers) > n_blocks or min(moca.layers) < 1:
            raise RegapError(f"{path}: MoCa layers {moca.layers} but the LLM has decoder layers 1..{n_blocks}")
    with torch.no_grad():
        moca.scale.copy_(tensors["scale"])
        moca.shift.copy_(tensors["shift"])
    return moca
