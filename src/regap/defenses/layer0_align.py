"""layer0-align: the training-free counterpart of ReGap, a fixed affine map of the image tokens.

ReGap trains the projector until the alpha-scaled centroid of the image tokens at the LLM
input (layer 0) meets that of the text tokens (`regap.train.regap_loss`: image tokens are
the projector outputs, text tokens every other attended position, alpha = 1 / mean text-token
norm). layer0-align gets there without training: on calibration pairs it measures the image
centroid mu_i, the text centroid mu_t and the mean norms, and maps every image token

    x -> s * (x - mu_i) + mu_t          (= s * x + b, b = mu_t - s * mu_i)

with s = 1 (``match_norm=false``: the centroids meet, alpha * mu cancels alpha) or the s >= 0
for which the mean image-token norm equals the mean text-token norm (``match_norm=true``; the
centroids still meet). It is a forward hook on the projector, so it also works with the
static and vLLM engines (the LVLM computes the input embeddings itself). ``strength`` in [0, 1]
is the fraction of that shift applied, a linear interpolation between the original and the
fully aligned token: x + strength * (s * x + b - x); so the image centroid moves exactly that
fraction of the way to the text centroid. 0 is no defense (no hook, no calibration), 1 the full
map. ``alpha`` is its former name (still accepted; runs record the value as ``alpha``, so
caches made before the rename stay valid).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from regap.defenses.base import (
    DefendedResult,
    GenerateFn,
    bool_option,
    float_option,
    has_image,
    int_option,
    register_defense,
)
from regap.defenses.calibration_files import CalibratedDefense
from regap.defenses.hooks import ImageTokenAffine
from regap.errors import RegapError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

DEFAULT_PAIRS = 100


@torch.no_grad()
def _layer0_batches(model: LVLM, pairs: list[Any], protocol: str, batch_size: int):
    """(image tokens [n_img, d], text tokens [n_txt, d]) per batch, float64, at the LLM input."""
    from regap.models.gap_pair import conversation

    embedding = model.llm.get_input_embeddings()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = model.build_inputs([conversation(p, protocol) for p in chunk], [[p.image] for p in chunk],
                                   add_generation_prompt=protocol == "prompt", padding_side="right").to(model.device)
        image = model.encode_images(batch.pixel_values).reshape(-1, model.hidden_size).double()
        text_mask = batch.attention_mask.bool() & ~batch.image_mask.bool()
        text = embedding(batch.input_ids)[text_mask].double()
        yield image, text


def solve_scale(a: torch.Tensor, b: torch.Tensor, c: float, target: float, iterations: int = 200) -> float:
    """The s >= 0 with mean_i sqrt(a_i s^2 + 2 b_i s + c) = target (the mean norm of s * d_i + mu_t
    with a_i = |d_i|^2, b_i = <d_i, mu_t>, c = |mu_t|^2). The left side is convex in s with zero
    slope at 0 (the d_i average to zero), so it rises from |mu_t| and the root is unique; by
    Jensen the text tokens' mean norm (target) is at least |mu_t|."""

    def mean_norm(s: float) -> float:
        return float(torch.sqrt((a * s * s + 2 * b * s + c).clamp_min(0)).mean())

    if target <= mean_norm(0.0):
        return 0.0
    high = 1.0
    while mean_norm(high) < target:
        high *= 2.0
        if high > 1e12:
            raise RegapError("layer0-align: cannot match the text-token norm (image tokens have no spread)")
    low = 0.0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if mean_norm(middle) < target:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def calibrate_layer0(model: LVLM, pair_list: list[Any], *, images: str, texts: str, seed: int,
                     protocol: str = "reference", match_norm: bool = False,
                     batch_size: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The affine map (``scale`` [1], ``bias`` [d]) and the statistics it was fitted on, from the
    calibration pairs (`regap.safety.pairs.make_pairs` with `images`, `texts` and `seed`, which
    the record names)."""
    from regap.provenance import json_hash

    d = model.hidden_size
    sums = {"image": torch.zeros(d, dtype=torch.float64), "text": torch.zeros(d, dtype=torch.float64)}
    norms = {"image": 0.0, "text": 0.0}
    counts = {"image": 0, "text": 0}
    for image, text in _layer0_batches(model, pair_list, protocol, batch_size):
        for name, tokens in (("image", image), ("text", text)):
            sums[name] += tokens.sum(0).cpu()
            norms[name] += float(tokens.norm(dim=-1).sum())
            counts[name] += tokens.shape[0]
    if counts["text"] == 0 or counts["image"] == 0:
        raise RegapError("layer0-align: the calibration pairs have no text or no image tokens")
    mu_i, mu_t = sums["image"] / counts["image"], sums["text"] / counts["text"]
    norm_i, norm_t = norms["image"] / counts["image"], norms["text"] / counts["text"]
    scale = 1.0
    if match_norm:  # second pass: per-token scalars for the exact mean norm after the map
        a_parts, b_parts = [], []
        for image, _ in _layer0_batches(model, pair_list, protocol, batch_size):
            centred = image.cpu() - mu_i
            a_parts.append(centred.square().sum(-1))
            b_parts.append(centred @ mu_t)
        scale = solve_scale(torch.cat(a_parts), torch.cat(b_parts), float(mu_t.square().sum()), norm_t)
    bias = mu_t - scale * mu_i
    tensors = {"scale": torch.tensor([scale]), "bias": bias.float(), "image_mean": mu_i.float(), "text_mean": mu_t.float()}
    alpha = 1.0 / norm_t if norm_t > 0 else math.nan
    record = {"images": images, "texts": texts, "pairs": len(pair_list), "seed": seed, "protocol": protocol,
              "match_norm": match_norm, "pair_ids_sha256_16": json_hash([p.id for p in pair_list]),
              "text_tokens": "every attended non-image position (as the ReGap loss)",
              "image_tokens": "projector outputs", "n_image_tokens": counts["image"], "n_text_tokens": counts["text"],
              "regap_alpha": alpha, "mean_norm_image": norm_i, "mean_norm_text": norm_t, "scale": scale,
              "centroid_gap_before": float(alpha**2 * (mu_i - mu_t).square().sum())}
    return tensors, record


@register_defense("layer0-align")
class Layer0Align(CalibratedDefense):
    """Move the image tokens' centroid (and optionally mean norm) to the text tokens' at the LLM input."""

    hidden_state = True
    kind = "layer0-align"
    shapes = {"scale": (1,), "bias": ("d",)}
    option_ranges = {"strength": (0.0, 1.0), "alpha": (0.0, 1.0)}  # a fraction of the shift
    strength_option = "strength"

    def __init__(self, strength: float | None = None, file: str | os.PathLike | None = None, match_norm: bool = False,
                 images: str = "scenes", texts: str = "starter-benign", pairs: int = DEFAULT_PAIRS, seed: int = 0,
                 protocol: str = "reference", batch_size: int = 8, alpha: float | None = None) -> None:
        from regap.deprecation import deprecated
        from regap.models.gap_pair import PROTOCOLS

        super().__init__(file)
        if alpha is not None:
            if strength is not None:
                raise RegapError("defense layer0-align: give strength (alpha is its former name), not both")
            deprecated("layer0-align's option alpha", "strength (layer0-align:strength=...)")
            strength = alpha
        self.strength = float_option("layer0-align", "strength", 1.0 if strength is None else strength,
                                     *self.option_ranges["strength"])
        self.match_norm = bool_option("layer0-align", "match_norm", match_norm)
        if protocol not in PROTOCOLS:
            raise RegapError(f"defense layer0-align: protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.images, self.texts, self.protocol = images, texts, protocol
        self.pairs = int_option("layer0-align", "pairs", pairs, low=2)
        self.seed = int_option("layer0-align", "seed", seed)
        self.batch_size = int_option("layer0-align", "batch_size", batch_size, low=1)

    def calibration_settings(self) -> dict[str, Any]:
        return {"images": self.images, "texts": self.texts, "pairs": self.pairs, "seed": self.seed,
                "protocol": self.protocol, "match_norm": self.match_norm}

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.strength, **self.file_settings()}  # recorded under its former name (cache keys)

    def needs_calibration(self) -> bool:
        return self.strength > 0  # at strength 0 nothing is mapped

    def compute_calibration(self, model: LVLM, pairs: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return calibrate_layer0(model, pairs, images=self.images, texts=self.texts, seed=self.seed,
                                protocol=self.protocol, match_norm=self.match_norm, batch_size=self.batch_size)

    def hook(self, model: LVLM, fingerprint: str | None = None) -> ImageTokenAffine:
        """The projector hook (a context manager) for this model."""
        tensors = self.calibration_for(model, fingerprint).tensors
        return ImageTokenAffine(model.projector, float(tensors["scale"][0]), tensors["bias"], self.strength)

    def wrap(self, next_fn: GenerateFn, model: LVLM) -> GenerateFn:
        from regap.models.fingerprint import model_fingerprint

        fingerprint = model_fingerprint(model)  # once per wrapped model; the file is loaded when first needed

        def generate(prompts, images, settings) -> DefendedResult:
            flags = [has_image(image) and self.strength > 0 for image in images]
            if any(flags):
                with self.hook(model, fingerprint):
                    result = next_fn(prompts, images, settings)
            else:  # nothing reaches the projector
                result = next_fn(prompts, images, settings)
            for detail, flag in zip(result.details, flags):
                detail["layer0-align"] = {"mapped": flag, "alpha": self.strength}
                if flag:
                    detail["layer0-align"]["calibration_sha256_16"] = self.calibration.sha256[:16]
            return result

        return generate

    def intervention(self, model: LVLM):
        hook = self.hook(model) if self.strength > 0 else nullcontext()
        return lambda conversations, image_lists, add_generation_prompt: hook
