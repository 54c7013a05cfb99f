"""Hidden states of every layer at image and text positions, spilled to disk per layer.

One forward pass per batch with all hidden states, after a tokenizer-only pass that counts
the tokens (so the spill is sized, and checked against the free disk space, before any image
is made). Tokens are written into two layer-major memory maps ([layers, tokens, d] for each modality; float32 when they
are small, float16 once they would exceed `FLOAT32_LIMIT_BYTES`), so host memory
holds one batch of hidden states at a time and the measurement later reads one layer
at a time: the 100-pair protocol of a 7B model (~68k tokens x 4096 x 33 layers, ~18 GB
in fp16) stays on disk instead of in RAM.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from regap.errors import InternalError, RegapError
from regap.models.gap_pair import GapPair, conversation
from regap.models.inputs import TEXT_TOKEN_MODES  # noqa: F401  (`regap gap --text-tokens` choices)

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

FLOAT32_LIMIT_BYTES = 2 * 1024**3
_FP16_MAX = 65504.0


@dataclass
class HiddenStates:
    """Per-layer token clouds on disk; `layer(k)` returns float32 tensors (image, text)."""

    folder: Path
    n_layers: int  # hidden_states entries: embeddings (layer 0) + decoder blocks
    width: int
    image_pairs: np.ndarray
    text_pairs: np.ndarray
    n_pairs: int
    dtype: str = "float32"

    def _map(self, name: str, count: int) -> np.memmap:
        return np.memmap(self.folder / f"{name}.bin", dtype=self.dtype, mode="r", shape=(self.n_layers, count, self.width))

    def layer(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._map("image", len(self.image_pairs))[k]
        text = self._map("text", len(self.text_pairs))[k]
        return torch.from_numpy(np.array(image, dtype=np.float32)), torch.from_numpy(np.array(text, dtype=np.float32))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @classmethod
    def from_tensors(
        cls, folder: str | Path, image: torch.Tensor, text: torch.Tensor,
        image_pairs: torch.Tensor | np.ndarray, text_pairs: torch.Tensor | np.ndarray,
    ) -> "HiddenStates":
        """Spill hidden states computed elsewhere ([layers, tokens, d] per modality, and each
        token's pair index) so `regap.gap.measure` can analyse them like collected ones."""
        if image.ndim != 3 or text.ndim != 3 or image.shape[0] != text.shape[0] or image.shape[2] != text.shape[2]:
            raise RegapError(f"expected image [L, Nv, d] and text [L, Nt, d] with the same L and d,"
                             f" got {tuple(image.shape)} and {tuple(text.shape)}")
        image_pairs, text_pairs = np.asarray(image_pairs, dtype=np.int32), np.asarray(text_pairs, dtype=np.int32)
        if len(image_pairs) != image.shape[1] or len(text_pairs) != text.shape[1]:
            raise RegapError("need one pair index per token: got "
                             f"{len(image_pairs)} for {image.shape[1]} image and {len(text_pairs)} for {text.shape[1]} text tokens")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, tokens in (("image", image), ("text", text)):
            target = np.memmap(folder / f"{name}.bin", dtype="float32", mode="w+", shape=tuple(tokens.shape))
            target[:] = tokens.detach().float().cpu().numpy()
            target.flush()
        n_pairs = int(max(image_pairs.max(initial=-1), text_pairs.max(initial=-1))) + 1
        return cls(folder, image.shape[0], image.shape[2], image_pairs, text_pairs, n_pairs)


def _token_counts(model: LVLM, pairs: list[GapPair], protocol: str, text_tokens: str, batch_size: int) -> tuple[int, int]:
    """Image and text tokens over all pairs, from the tokenizer alone (no image is made): the same
    batches and masks the forward passes use, so the spill is sized before any of them runs."""
    n_image = n_text = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = model.build_token_batch([conversation(p, protocol) for p in chunk], [1] * len(chunk),
                                        add_generation_prompt=protocol == "prompt", padding_side="right").inputs
        text_mask = batch.text_mask(text_tokens)
        if not bool(text_mask.any(dim=1).all()):
            raise RegapError("a pair has no text tokens after its image; use --text-tokens all-non-image or longer texts")
        n_image += int(batch.image_mask.sum())
        n_text += int(text_mask.sum())
    return n_image, n_text


def check_disk_space(folder: Path, needed: int, n_pairs: int) -> None:
    """A one-line `RegapError` when `folder`'s file system cannot hold `needed` bytes of hidden
    states (a memory map written past a full disk kills the process instead of raising)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise RegapError(f"the hidden states of {n_pairs} pairs need {_size(needed)} in {folder}, which has "
                         f"{_size(free)} free: lower --pairs (or --texts-per-pair), or free space")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


@torch.no_grad()
def collect_hidden_states(
    model: LVLM, pairs: list[GapPair], folder: str | Path, *, protocol: str = "reference",
    text_tokens: str = "after-image", batch_size: int = 8, progress: bool = True,
    intervention: Callable[..., Any] | None = None,
) -> HiddenStates:
    """Run the model over the pairs and spill image/text tokens of every layer to `folder`.

    The tokens are counted first from the tokenizer alone, so the spill's size is known (and
    checked against the free disk space) before any image is made; then each batch's images are
    made, encoded and run, one batch in memory at a time, with a progress bar.
    `intervention(conversations, image_lists, add_generation_prompt)` (a defense's, see
    `regap.defenses.base.Intervention`) gives the context each batch's forward pass runs in.
    Text tokens follow `ModelInputs.text_mask(text_tokens)` (`TEXT_TOKEN_MODES`), the rule the
    ReGap loss and the training probe use too; ``after-image`` is MIR's reference protocol."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    n_image, n_text = _token_counts(model, pairs, protocol, text_tokens, batch_size)
    n_layers = model.llm.config.num_hidden_layers + 1
    width = model.hidden_size
    dtype = "float32" if n_layers * (n_image + n_text) * width * 4 <= FLOAT32_LIMIT_BYTES else "float16"
    check_disk_space(folder, n_layers * (n_image + n_text) * width * np.dtype(dtype).itemsize, len(pairs))
    image_map = np.memmap(folder / "image.bin", dtype=dtype, mode="w+", shape=(n_layers, n_image, width))
    text_map = np.memmap(folder / "text.bin", dtype=dtype, mode="w+", shape=(n_layers, n_text, width))
    image_pairs = np.empty(n_image, dtype=np.int32)
    text_pairs = np.empty(n_text, dtype=np.int32)
    starts: Any = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="hidden states", unit="batch")
    image_offset = text_offset = 0
    for start in starts:
        chunk = pairs[start : start + batch_size]
        conversations, image_lists = [conversation(p, protocol) for p in chunk], [[p.image] for p in chunk]
        batch = model.build_inputs(conversations, image_lists, add_generation_prompt=protocol == "prompt",
                                   padding_side="right")
        text_mask = batch.text_mask(text_tokens)
        context = intervention(conversations, image_lists, protocol == "prompt") if intervention else nullcontext()
        with context:
            hidden = model(batch, output_hidden_states=True, use_labels=False, logits_to_keep=1).hidden_states
        if len(hidden) != n_layers:
            raise InternalError(f"the model returned {len(hidden)} hidden states, expected {n_layers}")
        rows = torch.arange(batch.image_mask.shape[0]).unsqueeze(1) + start
        image_rows = rows.expand_as(batch.image_mask)[batch.image_mask.cpu()].numpy()
        text_rows = rows.expand_as(text_mask)[text_mask].numpy()
        ni, nt = len(image_rows), len(text_rows)
        if image_offset + ni > n_image or text_offset + nt > n_text:
            raise InternalError("a batch has more tokens than the tokenizer counted for it")
        for k, states in enumerate(hidden):
            states = states.float().cpu()
            if not bool(torch.isfinite(states).all()):
                raise RegapError(f"non-finite hidden states at layer {k} (batch starting at pair {start})")
            if dtype == "float16" and float(states.abs().max()) > _FP16_MAX:
                raise RegapError(f"layer {k} has activations beyond float16's range; raise FLOAT32_LIMIT_BYTES")
            image_map[k, image_offset : image_offset + ni] = states[batch.image_mask.cpu()].numpy()
            text_map[k, text_offset : text_offset + nt] = states[text_mask].numpy()
        image_pairs[image_offset : image_offset + ni] = image_rows
        text_pairs[text_offset : text_offset + nt] = text_rows
        image_offset, text_offset = image_offset + ni, text_offset + nt
    if (image_offset, text_offset) != (n_image, n_text):
        raise InternalError("the batches had fewer tokens than the tokenizer counted for them")
    image_map.flush()
    text_map.flush()
    del image_map, text_map
    return HiddenStates(folder, n_layers, width, image_pairs, text_pairs, len(pairs), dtype)
