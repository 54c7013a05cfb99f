"""Modality Integration Rate (MIR), following the reference protocol step by step.

For each LLM layer k = 1..L (layer 0, the input embeddings, is skipped):

1. alpha_k = 1 / mean L2 norm of the text tokens at layer k;
2. scale BOTH modalities by alpha_k;
3. in each modality separately, replace every token whose norm is more than
   3 standard deviations from the MEDIAN norm by the coordinate-wise median token;
4. FD_k = Fréchet distance between the Gaussian fits of the two clouds.

MIR = log10(sum_k FD_k). Statistics follow the reference code exactly: the median
is ``torch.median`` (the LOWER middle value for an even count, not numpy's average),
the std is torch's default unbiased std (divide by N-1), and the coordinate-wise
median is taken over all tokens, outliers included. One deliberate difference: the
reference works in float32, here every step runs in ``dtype`` (float64 by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from regap.errors import RegapError
from regap.gap.distances import (
    DEFAULT_DTYPE,
    check_tokens,
    frechet_distance_from_stats,
    gaussian_stats,
    reference_fast_frechet_from_stats,
)

MODES = ("exact", "reference-fast")

Layers = Tensor | Sequence[Tensor]


def norm_outlier_mask(tokens: Tensor, n_sigma: float = 3.0) -> Tensor:
    """Boolean ``[..., N]``: |norm - median norm| > n_sigma * std(norms) (unbiased std)."""
    return _outliers_of_norms(tokens.norm(dim=-1), n_sigma)


def _outliers_of_norms(norms: Tensor, n_sigma: float) -> Tensor:
    if norms.shape[-1] < 2:  # a std of one value is undefined; nothing is an outlier
        return torch.zeros_like(norms, dtype=torch.bool)
    median = norms.median(dim=-1, keepdim=True).values
    std = norms.std(dim=-1, keepdim=True)
    return (norms - median).abs() > n_sigma * std


def replace_norm_outliers(tokens: Tensor, n_sigma: float = 3.0) -> Tensor:
    """Copy of ``tokens [..., N, d]`` with norm outliers replaced by the coordinate-wise median.

    Replacing (rather than dropping) keeps the token count, as in the reference. The
    input is not modified.
    """
    return _replace_rows(tokens, norm_outlier_mask(tokens, n_sigma))


def _replace_rows(tokens: Tensor, mask: Tensor) -> Tensor:
    median_token = tokens.median(dim=-2, keepdim=True).values  # lower median, like torch.median
    return torch.where(mask.unsqueeze(-1), median_token, tokens)


@dataclass(frozen=True)
class LayerGap:
    """Per-layer MIR ingredients, all measured after scaling and outlier replacement.

    ``centroid_gap`` is the ||mu_img - mu_txt||^2 term of ``fd`` (so
    fd - centroid_gap is the covariance part).
    """

    layer: int
    fd: float
    centroid_gap: float
    alpha: float
    n_image_outliers: int
    n_text_outliers: int
    n_image_tokens: int
    n_text_tokens: int


@dataclass(frozen=True)
class MIRResult:
    """MIR over layers ``first_layer..``; ``mode`` says which FD formula produced it."""

    mir: float
    per_layer_fd: list[float]
    per_layer_centroid_gap: list[float]
    mode: str
    ridge: float
    n_sigma: float
    layers: list[LayerGap] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def as_layers(x: Layers, name: str) -> list[Tensor]:
    """Per-layer list of ``[N, d]`` tensors from ``[L, N, d]`` or a sequence."""
    if isinstance(x, Tensor):
        if x.ndim != 3:
            raise RegapError(
                f"{name} must be [L, N, d] or a list of [N, d] tensors, got shape {tuple(x.shape)}"
            )
        layers = list(x.unbind(0))
    else:
        layers = list(x)
    if not layers:
        raise RegapError(f"no layers in {name}")
    for i, t in enumerate(layers):
        if isinstance(t, Tensor) and t.ndim != 2:
            raise RegapError(f"{name}: layer entry {i} must be [N, d], got {tuple(t.shape)}")
    return layers


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise RegapError(f"unknown MIR mode {mode!r}; choose one of {', '.join(MODES)}")


@dataclass
class FittedLayer:
    """One layer after steps 1-3, kept so the pair bootstrap can reuse it.

    ``image``/``text`` are the cleaned tokens in the compute dtype, NOT scaled (scaling
    by alpha multiplies covariances by alpha^2, so it is applied to the statistics
    instead of copying the clouds); ``text_norms`` are the raw text-token norms that
    define alpha; the covariances are those of the unscaled cleaned clouds.
    """

    gap: LayerGap
    image: Tensor
    text: Tensor
    text_norms: Tensor
    cov_image: Tensor
    cov_text: Tensor


def _cleaned_copy(tokens: Tensor, n_sigma: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
    """(copy in ``dtype`` with norm outliers replaced in place, raw norms, outlier count)."""
    copy = tokens.to(dtype, copy=True)
    norms = copy.norm(dim=-1)
    mask = _outliers_of_norms(norms, n_sigma)
    count = int(mask.sum())
    if count:
        copy[mask] = copy.median(dim=-2).values.to(dtype)
    return copy, norms, count


@torch.no_grad()
def fit_layer(
    image_tokens: Tensor,
    text_tokens: Tensor,
    *,
    layer: int,
    mode: str = "exact",
    ridge: float = 0.0,
    n_sigma: float = 3.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> FittedLayer:
    """Steps 1-4 of the protocol for one layer's clouds ``[Nv, d]`` and ``[Nt, d]``.

    Outliers are found on the unscaled tokens: the rule compares norms with their
    median and std, which all scale with alpha, so the mask is the same.
    """
    _check_mode(mode)
    check_tokens(image_tokens, "image tokens", layer=layer, min_tokens=2)
    check_tokens(text_tokens, "text tokens", layer=layer, min_tokens=2)
    if image_tokens.ndim != 2 or text_tokens.ndim != 2:
        raise RegapError(f"layer {layer}: expected [N, d] clouds, got {tuple(image_tokens.shape)} and"
                         f" {tuple(text_tokens.shape)}")
    if image_tokens.shape[-1] != text_tokens.shape[-1]:
        raise RegapError(
            f"layer {layer}: image tokens have width {image_tokens.shape[-1]},"
            f" text tokens {text_tokens.shape[-1]}"
        )
    img, _, img_outliers = _cleaned_copy(image_tokens, n_sigma, dtype)
    txt, text_norms, txt_outliers = _cleaned_copy(text_tokens, n_sigma, dtype)
    mean_norm = text_norms.mean()
    if not mean_norm > 0:
        raise RegapError(f"layer {layer}: text tokens all have zero norm: the text-centric scale is undefined")
    alpha = 1.0 / mean_norm
    mu_t, cov_t = gaussian_stats(txt, dtype=dtype)
    mu_i, cov_i = gaussian_stats(img, dtype=dtype)
    # Text is the first argument: it is the side whose square root ReGap caches.
    fd_fn = frechet_distance_from_stats if mode == "exact" else reference_fast_frechet_from_stats
    try:
        fd = fd_fn(alpha * mu_t, alpha**2 * cov_t, alpha * mu_i, alpha**2 * cov_i, ridge=ridge, dtype=dtype)
    except RegapError as err:
        raise RegapError(f"layer {layer}: {err}") from err
    gap = LayerGap(
        layer=layer,
        fd=float(fd),
        centroid_gap=float(alpha**2 * (mu_i - mu_t).square().sum()),
        alpha=float(alpha),
        n_image_outliers=img_outliers,
        n_text_outliers=txt_outliers,
        n_image_tokens=int(img.shape[-2]),
        n_text_tokens=int(txt.shape[-2]),
    )
    return FittedLayer(gap, img, txt, text_norms, cov_i, cov_t)


def layer_gap(image_tokens: Tensor, text_tokens: Tensor, *, layer: int, **options) -> LayerGap:
    """The per-layer values (see :func:`fit_layer`, which also keeps the fitted clouds)."""
    return fit_layer(image_tokens, text_tokens, layer=layer, **options).gap


def mir_per_layer(
    image_layers: Layers,
    text_layers: Layers,
    *,
    mode: str = "exact",
    ridge: float = 0.0,
    n_sigma: float = 3.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
    first_layer: int = 1,
) -> list[LayerGap]:
    """Per-layer FD and centroid gap for layers ``first_layer, first_layer+1, ...``.

    Inputs are ``[L, N, d]`` tensors or lists of ``[N, d]`` tensors (token counts may
    differ between modalities and layers). Layers are processed one at a time so
    only one pair of d x d covariances is alive at once.
    """
    _check_mode(mode)
    images, texts = as_layers(image_layers, "image tokens"), as_layers(text_layers, "text tokens")
    if len(images) != len(texts):
        raise RegapError(f"{len(images)} image layers but {len(texts)} text layers")
    return [
        layer_gap(i, t, layer=first_layer + k, mode=mode, ridge=ridge, n_sigma=n_sigma, dtype=dtype)
        for k, (i, t) in enumerate(zip(images, texts))
    ]


def mir(
    image_layers: Layers,
    text_layers: Layers,
    *,
    mode: str = "exact",
    ridge: float = 0.0,
    n_sigma: float = 3.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
    first_layer: int = 1,
) -> MIRResult:
    """MIR = log10(sum of per-layer FD) over the given layers (pass layers 1..L, not 0).

    ``mode="reference-fast"`` reproduces the reference code's default numbers (see
    ``reference_fast_frechet_from_stats``); its sum can be <= 0, which raises.
    """
    layers = mir_per_layer(
        image_layers, text_layers, mode=mode, ridge=ridge, n_sigma=n_sigma, dtype=dtype,
        first_layer=first_layer,
    )
    total = math.fsum(g.fd for g in layers)
    if not total > 0:
        hint = (
            " (reference-fast values are not distances and can be negative)"
            if mode == "reference-fast"
            else " (the two modalities are identical to numerical precision)"
        )
        raise RegapError(f"sum of per-layer FD is {total:.6g}; log10 is undefined{hint}")
    return MIRResult(
        mir=math.log10(total),
        per_layer_fd=[g.fd for g in layers],
        per_layer_centroid_gap=[g.centroid_gap for g in layers],
        mode=mode,
        ridge=ridge,
        n_sigma=n_sigma,
        layers=layers,
    )


def layer_zero_report(
    image_tokens: Tensor,
    text_tokens: Tensor,
    *,
    mode: str = "exact",
    ridge: float = 0.0,
    n_sigma: float = 3.0,
    dtype: torch.dtype = DEFAULT_DTYPE,
) -> LayerGap:
    """Layer-0 (LLM input embedding) values, reported apart because MIR excludes them.

    Layer 0 shows the gap the projector hands to the LLM before any mixing; the
    reference protocol leaves it out of the sum, so it must not be added to MIR.
    """
    return layer_gap(
        image_tokens, text_tokens, layer=0, mode=mode, ridge=ridge, n_sigma=n_sigma, dtype=dtype
    )
