"""CMRM, Cross-Modality Representation Manipulation (Liu et al., ACL Findings 2025, arXiv 2410.09047).

Adding an image shifts a VLM's hidden states away from the text-only distribution its LLM
was safety-aligned on. CMRM estimates that shift per decoder layer as the difference between
the hidden state of a request with a meaningless image and of the same request without one,

    v^l = h^l(x, img') - h^l(x),

averaged over a calibration set (``level=dataset``) or computed for each request at
inference (``level=sample``, two extra forward passes per request), and removes a fraction
alpha of it from the hidden states of multimodal inputs: ``h^l <- h^l - alpha * v^l``.

Where the paper does not say, regap chooses (docs/defenses.md lists each choice):

* h^l is the output of decoder block l (before the final norm for the last block) at the
  last prompt token, the generation prompt included;
* img' is a blank image by default (``image=noise`` for Gaussian noise);
* the shift is applied at every position (prompt and generated tokens) of every row that
  has an image; text-only rows are left alone;
* several layers are shifted by increments (v^l minus the vector of the previous shifted
  layer), so that, to first order through the residual stream, the total correction that
  reaches layer l is alpha * v^l, as the formula states, instead of a sum over layers;
* alpha is in [0, 1] (the fraction of the shift that is removed).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from regap.defenses.base import (
    DefendedResult,
    GenerateFn,
    float_option,
    has_image,
    int_option,
    is_plain,
    register_defense,
)
from regap.defenses.calibration_files import CalibratedDefense
from regap.defenses.hooks import DecoderShift, uncompiled
from regap.errors import InternalError, RegapError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

LEVELS = ("dataset", "sample")
MEANINGLESS_IMAGES = ("blank", "noise")
DEFAULT_PAIRS = 100


# ---------------------------------------------------------------------------------- layers


def parse_layers(spec: Any) -> list[int] | None:
    """`all` -> None; `8-15`, `3+5+9`, `2-4+9` or a list of ints -> sorted unique layers (1-based)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if isinstance(spec, (list, tuple)):
        parts: list[int] = [int(x) for x in spec]
    else:
        parts = []
        for piece in str(spec).split("+"):
            low, sep, high = piece.strip().partition("-")
            try:
                if sep:
                    start, stop = int(low), int(high)
                    if stop < start:
                        raise ValueError
                    parts.extend(range(start, stop + 1))
                else:
                    parts.append(int(low))
            except ValueError:
                raise RegapError(f"layers={spec!r}: use all, N, N-M or N+M (e.g. 8-15+20); layers are 1-based") from None
    return sorted(set(parts))


def resolve_layers(layers: list[int] | None, n_layers: int, defense: str) -> list[int]:
    """The chosen layers checked against the model (1..n_layers)."""
    chosen = list(range(1, n_layers + 1)) if layers is None else layers
    for layer in chosen:
        if not 1 <= layer <= n_layers:
            raise RegapError(f"defense {defense}: layer {layer} is beyond the model's {n_layers} decoder layers "
                             f"(valid: 1..{n_layers})")
    return chosen


def layer_spec_text(layers: list[int] | None) -> str:
    return "all" if layers is None else "+".join(str(layer) for layer in layers)


def increments(vectors: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Per-layer vectors [..., n_layers, d] -> the increments to subtract at `layers` [..., k, d]:
    the first chosen layer's vector, then each one minus the previous chosen layer's."""
    chosen = vectors[..., [layer - 1 for layer in layers], :]
    previous = torch.cat([torch.zeros_like(chosen[..., :1, :]), chosen[..., :-1, :]], dim=-2)
    return chosen - previous


# ---------------------------------------------------------------------------------- hidden states


def strip_images(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without its image markers (the text-only input)."""
    from regap.models.templates import IMAGE_MARKER

    out = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            content = content.replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "")
        out.append({**message, "content": content})
    return out


@torch.no_grad()
def last_token_states(model: LVLM, conversations: Sequence[Any], image_lists: Sequence[Sequence[Image.Image]], *,
                      add_generation_prompt: bool = True, batch_size: int = 8) -> torch.Tensor:
    """Output of every decoder block at each conversation's last token: [n, n_layers, d] float32."""
    from regap.models.layers import decoder_layers, layer_output

    blocks = decoder_layers(model.llm)
    out = torch.empty(len(conversations), len(blocks), model.hidden_size)
    for start in range(0, len(conversations), batch_size):
        convs = [list(c) for c in conversations[start : start + batch_size]]
        images = [list(i) for i in image_lists[start : start + batch_size]]
        batch = model.build_inputs(convs, images, add_generation_prompt=add_generation_prompt, padding_side="left")
        if not bool(batch.attention_mask[:, -1].all()):
            raise InternalError("left-padded batch does not end in a real token")
        captured: list[torch.Tensor | None] = [None] * len(blocks)

        def capture(index: int):
            def hook(module: Any, args: tuple, output: Any) -> None:
                captured[index] = layer_output(output)[:, -1].float().cpu()

            return hook

        handles = [block.register_forward_hook(capture(k)) for k, block in enumerate(blocks)]
        try:
            model(batch, use_labels=False, logits_to_keep=1)  # only the blocks' outputs are read
        finally:
            for handle in handles:
                handle.remove()
        out[start : start + len(convs)] = torch.stack(captured, dim=1)  # type: ignore[arg-type]
    return out


def meaningless_images(kind: str, key: str, count: int) -> list[Image.Image]:
    """`count` meaningless images: the `blank` or `noise` condition's image (Gaussian noise
    seeded by `key`), made by the functions those conditions use."""
    from regap.images import blank_image, gaussian_noise_image

    if kind == "blank":
        return [blank_image() for _ in range(count)]
    return [gaussian_noise_image(f"cmrm-{key}-{i}") for i in range(count)]


def _image_count(entry: Any) -> int:
    if not has_image(entry):
        return 0
    return len(entry) if isinstance(entry, (list, tuple)) else 1


def paired_states(model: LVLM, prompts: Sequence[Any], image_entries: Sequence[Any], *, add_generation_prompt: bool = True,
                  batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token states of each prompt with its images and of the same prompt without them."""
    conversations, image_lists = model.prepare_conversations(list(prompts), list(image_entries))
    with_image = last_token_states(model, conversations, image_lists, add_generation_prompt=add_generation_prompt,
                                   batch_size=batch_size)
    text_only = last_token_states(model, [strip_images(c) for c in conversations], [[] for _ in conversations],
                                  add_generation_prompt=add_generation_prompt, batch_size=batch_size)
    return with_image, text_only


def sample_vectors(model: LVLM, prompts: Sequence[Any], images: Sequence[Any], *, image: str = "blank",
                   add_generation_prompt: bool = True, batch_size: int = 8) -> torch.Tensor:
    """Per-prompt shift vectors h(x, img') - h(x) for every layer: [n, n_layers, d]; zero for
    prompts without an image. img' replaces each of the prompt's images by a meaningless one."""
    from regap.provenance import text_hash

    n_layers = model.llm.config.num_hidden_layers
    vectors = torch.zeros(len(prompts), n_layers, model.hidden_size)
    rows = [i for i, entry in enumerate(images) if has_image(entry)]
    if rows:
        entries = [meaningless_images(image, text_hash(str(prompts[i])), _image_count(images[i])) for i in rows]
        with_image, text_only = paired_states(model, [prompts[i] for i in rows], entries,
                                              add_generation_prompt=add_generation_prompt, batch_size=batch_size)
        vectors[rows] = with_image - text_only
    return vectors


def calibrate_cmrm(model: LVLM, pair_list: Sequence[Any], *, images: str, texts: str, seed: int,
                   batch_size: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Dataset-level vectors: mean over the calibration pairs (`regap.safety.pairs.make_pairs`
    with `images`, `texts` and `seed`, which the record names) of h(x, img) - h(x) per layer.

    Returns the tensors (``shifts`` [n_layers, d], row l-1 for decoder block l, and the two
    means) and the calibration record (data, seed, pair ids hash)."""
    from regap.provenance import json_hash

    sum_with = sum_text = None
    for start in range(0, len(pair_list), batch_size):
        chunk = pair_list[start : start + batch_size]
        with_image, text_only = paired_states(model, [p.text for p in chunk], [p.image for p in chunk],
                                              batch_size=batch_size)
        batch_with, batch_text = with_image.double().sum(0), text_only.double().sum(0)
        sum_with = batch_with if sum_with is None else sum_with + batch_with
        sum_text = batch_text if sum_text is None else sum_text + batch_text
    mean_with, mean_text = sum_with / len(pair_list), sum_text / len(pair_list)
    tensors = {"shifts": (mean_with - mean_text).float(), "mean_with_image": mean_with.float(),
               "mean_text_only": mean_text.float()}
    record = {"images": images, "texts": texts, "pairs": len(pair_list), "seed": seed,
              "pair_ids_sha256_16": json_hash([p.id for p in pair_list]),
              "inputs": "request as one user turn, image before the text, generation prompt; last prompt token",
              "hidden_state": "output of each decoder block (rows 0..L-1 = blocks 1..L)"}
    return tensors, record


# ---------------------------------------------------------------------------------- the defense


@register_defense("cmrm")
class CMRM(CalibratedDefense):
    """Shift the hidden states of image inputs toward text-only ones (Liu et al. 2025)."""

    hidden_state = True
    kind = "cmrm"
    shapes = {"shifts": ("L", "d")}
    option_ranges = {"alpha": (0.0, 1.0)}  # the paper defines alpha in [0, 1]
    strength_option = "alpha"

    def __init__(self, alpha: float = 1.0, level: str = "dataset", layers: Any = "all",
                 file: str | os.PathLike | None = None, image: str = "blank", images: str | None = None,
                 texts: str = "starter-benign", pairs: int = DEFAULT_PAIRS, seed: int = 0, batch_size: int = 8) -> None:
        super().__init__(file)
        self.alpha = float_option("cmrm", "alpha", alpha, *self.option_ranges["alpha"])
        if level not in LEVELS:
            raise RegapError(f"defense cmrm: level={level!r} is not one of {', '.join(LEVELS)}")
        self.level = level
        self.layer_choice = parse_layers(layers)
        if self.file is not None and level == "sample":
            raise RegapError("defense cmrm: file= holds dataset-level vectors; level=sample computes them per request")
        if image not in MEANINGLESS_IMAGES:
            raise RegapError(f"defense cmrm: image={image!r} is not one of {', '.join(MEANINGLESS_IMAGES)}")
        self.image = image
        self.images = images or image  # calibration images (dataset level): img' unless a source is named
        self.texts = texts
        self.pairs = int_option("cmrm", "pairs", pairs, low=2)
        self.seed = int_option("cmrm", "seed", seed)
        self.batch_size = int_option("cmrm", "batch_size", batch_size, low=1)
        self.layers: list[int] | None = None

    # ---- description and calibration ---------------------------------------------------------
    def calibration_settings(self) -> dict[str, Any]:
        return {"images": self.images, "texts": self.texts, "pairs": self.pairs, "seed": self.seed}

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "level": self.level, "layers": layer_spec_text(self.layer_choice),
                               "image": self.image}
        return {**out, **self.file_settings()} if self.level == "dataset" else out

    def needs_calibration(self) -> bool:
        return self.level == "dataset"

    def compute_calibration(self, model: LVLM, pairs: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return calibrate_cmrm(model, pairs, images=self.images, texts=self.texts, seed=self.seed,
                              batch_size=self.batch_size)

    def validate(self, model: LVLM) -> None:
        self.layers = resolve_layers(self.layer_choice, int(model.llm.config.num_hidden_layers), "cmrm")

    def check_engine(self, engine: str) -> None:
        if engine == "vllm":
            raise RegapError("defense cmrm shifts hidden states inside the LLM with forward hooks, which vLLM "
                             "does not run; use --engine transformers or static")

    def _steps(self, model: LVLM, fingerprint: str) -> torch.Tensor:
        """Dataset level: alpha times the increments at the chosen layers [k, d]."""
        return self.alpha * increments(self.calibration_for(model, fingerprint).tensors["shifts"], self.layers)

    def _detail(self, shifted: bool) -> dict[str, Any]:
        detail: dict[str, Any] = {"shifted": shifted, "alpha": self.alpha, "level": self.level}
        if shifted and self.level == "dataset" and self.calibration is not None:
            detail["calibration_sha256_16"] = self.calibration.sha256[:16]
        return detail

    @staticmethod
    def _check_settings(settings: Any) -> None:
        if getattr(settings, "engine", None) == "vllm":
            raise RegapError("defense cmrm cannot run with the vllm engine (it shifts hidden states with forward "
                             "hooks); use --engine transformers or static")

    # ---- generation -------------------------------------------------------------------------
    def wrap(self, next_fn: GenerateFn, model: LVLM) -> GenerateFn:
        from regap.models.fingerprint import model_fingerprint

        self.validate(model)
        fingerprint = model_fingerprint(model)  # once per wrapped model; the calibration is loaded when first needed
        if self.level == "sample":
            if not is_plain(next_fn, model):
                raise RegapError("cmrm with level=sample computes a shift for every request inside generation and "
                                 "must be the last defense in --defense (so it cannot be stacked with coca)")
            return self._sample_generate(model)
        return self._dataset_generate(next_fn, model, fingerprint)

    def _dataset_generate(self, next_fn: GenerateFn, model: LVLM, fingerprint: str) -> GenerateFn:
        def generate(prompts, images, settings) -> DefendedResult:
            self._check_settings(settings)
            shifted = [i for i, image in enumerate(images) if has_image(image)]
            plain = [i for i, image in enumerate(images) if not has_image(image)]
            texts: list[str] = [""] * len(prompts)
            tokens: list[int] = [0] * len(prompts)
            details: list[dict[str, Any]] = [{} for _ in prompts]
            calls, factor = 0, 1.0
            for rows, active in ((shifted, True), (plain, False)):
                if not rows:
                    continue
                args = ([prompts[i] for i in rows], [images[i] for i in rows])
                if active:
                    shift = DecoderShift(model.llm, self.layers, self._steps(model, fingerprint),
                                         moca=getattr(model, "moca", None))
                    with shift:
                        result = next_fn(*args, uncompiled(settings))
                else:
                    result = next_fn(*args, settings)
                calls += result.generation_calls
                factor = max(factor, result.forward_passes_factor)
                for i, text, count, detail in zip(rows, result.texts, result.new_tokens, result.details):
                    texts[i], tokens[i] = text, count
                    details[i] = {**detail, "cmrm": self._detail(active)}
            return DefendedResult(texts, tokens, details, calls, factor)

        return generate

    def _sample_generate(self, model: LVLM) -> GenerateFn:
        def generate(prompts, images, settings) -> DefendedResult:
            self._check_settings(settings)
            flags = [has_image(image) for image in images]
            if not any(flags):
                result = model.generate_detailed(prompts, images, settings)
                return DefendedResult(result.texts, result.new_tokens, [{"cmrm": self._detail(False)} for _ in prompts], 1)
            vectors = sample_vectors(model, prompts, images, image=self.image, batch_size=self.batch_size)
            steps = self.alpha * increments(vectors, self.layers)
            shift = DecoderShift(model.llm, self.layers, moca=getattr(model, "moca", None))

            def per_batch(indices: list[int]) -> list[Any]:
                shift.set_vectors(steps[indices])  # the rows of the batch about to be generated
                return []

            with shift:
                result = model.generate_detailed(prompts, images, uncompiled(settings), logits_processor_factory=per_batch)
            details = [{"cmrm": {**self._detail(flag), "extra_forward_passes": 2 if flag else 0}} for flag in flags]
            return DefendedResult(result.texts, result.new_tokens, details, 1)

        return generate

    # ---- gap measurement --------------------------------------------------------------------
    def intervention(self, model: LVLM):
        from regap.models.fingerprint import model_fingerprint

        self.validate(model)
        fingerprint = model_fingerprint(model)
        steps = self._steps(model, fingerprint) if self.level == "dataset" else None
        moca = getattr(model, "moca", None)

        def enter(conversations: list[Any], image_lists: list[list[Image.Image]],
                  add_generation_prompt: bool) -> DecoderShift:
            flags = torch.tensor([has_image(images) for images in image_lists], dtype=torch.float32)
            if steps is not None:
                rows = steps.unsqueeze(0) * flags[:, None, None]
            else:
                vectors = sample_vectors(model, conversations, image_lists, image=self.image,
                                         add_generation_prompt=add_generation_prompt, batch_size=self.batch_size)
                rows = self.alpha * increments(vectors, self.layers)
            return DecoderShift(model.llm, self.layers, rows, moca=moca)

        return enter
