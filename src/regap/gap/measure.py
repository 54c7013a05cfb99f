"""From collected hidden states to the numbers `regap gap` reports.

Per layer: the exact protocol values (text-centric scaling, outlier replacement, Fréchet
distance, centroid gap) from `regap.gap.mir`; over layers 1..L: MIR. Intervals come from a
bootstrap over pairs, accumulated layer by layer so only one layer's tokens are in memory
at a time. Two ways to compute a replicate:

* ``linear`` (default): the trace term linearised around the full sample
  (`regap.gap.linear_bootstrap`), O(pairs x d + d^2) per replicate and layer;
* ``exact``: the whole protocol (scaling, outliers, Fréchet distance) recomputed on each
  resample, two covariances and an eigvalsh per replicate and layer. The small-sample
  reference that the linearisation is checked against; affordable for small models or
  a few hundred replicates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from regap.errors import RegapError
from regap.gap.collect import HiddenStates
from regap.gap.linear_bootstrap import linearise_layer, pair_weights, percentile_interval
from regap.gap.mir import fit_layer, layer_gap

DEFAULT_STABILITY_SIZES = (5, 10, 20, 50, 100, 200, 500, 1000)
CI_METHODS = ("linear", "exact")


def _exact_replicates(
    image: torch.Tensor, text: torch.Tensor, image_pairs: torch.Tensor, text_pairs: torch.Tensor,
    weights: torch.Tensor, layer: int, **gap_options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fréchet distance and centroid gap of each resample, recomputed from its tokens."""
    fds, centroids = [], []
    for row in weights.long():
        gap = layer_gap(image.repeat_interleave(row[image_pairs], 0), text.repeat_interleave(row[text_pairs], 0),
                        layer=layer, **gap_options)
        fds.append(gap.fd)
        centroids.append(gap.centroid_gap)
    return torch.tensor(fds, dtype=torch.float64), torch.tensor(centroids, dtype=torch.float64)


def analyse(
    store: HiddenStates, *, n_pairs: int | None = None, mode: str = "exact", n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, ridge: float = 0.0, n_sigma: float = 3.0, ci: str = "linear",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """MIR (layers 1..L), layer-0 values and per-layer curves over the first `n_pairs` pairs.

    ``device`` (default: the CPU) is where each layer's clouds are fitted: on a GPU the
    float64 covariances and eigen-solves of a 7B model's 4096-wide layers take a fraction
    of a second instead of seconds. Replicates come back to the CPU for the intervals.
    """
    if ci not in CI_METHODS:
        raise RegapError(f"unknown interval method {ci!r}; choose one of {', '.join(CI_METHODS)}")
    compute = torch.device(device) if device is not None else torch.device("cpu")
    limit = store.n_pairs if n_pairs is None else min(n_pairs, store.n_pairs)
    image_keep = torch.from_numpy(store.image_pairs < limit)
    text_keep = torch.from_numpy(store.text_pairs < limit)
    image_pairs = torch.from_numpy(store.image_pairs.astype(np.int64))[image_keep].to(compute)
    text_pairs = torch.from_numpy(store.text_pairs.astype(np.int64))[text_keep].to(compute)
    n_image, n_text = int(image_keep.sum()), int(text_keep.sum())
    # The linearised bootstrap needs full-rank covariances: with fewer tokens than dimensions
    # Tr (S_t S_v)^1/2 is not differentiable along the resampling directions.
    enough_tokens = min(n_image, n_text) > store.width or ci == "exact"
    bootstrap = mode == "exact" and n_boot > 0 and limit >= 2 and enough_tokens
    weights = pair_weights(limit, n_boot, seed).to(compute) if bootstrap else None
    fd_sum = torch.zeros(n_boot, dtype=torch.float64) if bootstrap else None
    per_layer: list[dict[str, Any]] = []
    layer0: dict[str, Any] = {}
    for k in range(store.n_layers):
        image, text = store.layer(k)
        if limit < store.n_pairs:  # boolean indexing copies; skip it when every pair is used
            image, text = image[image_keep], text[text_keep]
        image, text = image.to(compute), text.to(compute)
        fitted = fit_layer(image, text, layer=k, mode=mode, ridge=ridge, n_sigma=n_sigma)
        gap = fitted.gap
        row = {"layer": k, "frechet": gap.fd, "centroid_gap": gap.centroid_gap, "alpha": gap.alpha,
               "image_outliers": gap.n_image_outliers, "text_outliers": gap.n_text_outliers}
        per_layer.append(row)
        if bootstrap:
            if ci == "exact":
                fds, centroids = _exact_replicates(image, text, image_pairs, text_pairs, weights, k,
                                                   mode=mode, ridge=ridge, n_sigma=n_sigma)
            else:
                linear = linearise_layer(fitted, image_pairs, text_pairs, limit)
                fds, centroids = linear.frechet(weights), linear.centroid_gap(weights)
            fds, centroids = fds.cpu(), centroids.cpu()
            if k == 0:
                layer0["centroid_ci"] = percentile_interval(centroids, level)
                layer0["frechet_ci"] = percentile_interval(fds, level)
            else:
                fd_sum += fds
        del image, text, fitted  # one layer's clouds in memory at a time
    total = math.fsum(row["frechet"] for row in per_layer[1:])
    result: dict[str, Any] = {
        "mir": math.log10(total) if total > 0 else None,
        "mir_ci": None,
        "ci_level": level,
        "mode": mode,
        "n_pairs": limit,
        "n_image_tokens": int(image_keep.sum()),
        "n_text_tokens": int(text_keep.sum()),
        "layer0_gap": per_layer[0]["centroid_gap"],
        "layer0_frechet": per_layer[0]["frechet"],
        "layer0_gap_ci": layer0.get("centroid_ci"),
        "layer0_frechet_ci": layer0.get("frechet_ci"),
        "per_layer": per_layer,
        "ridge": ridge,
        "n_sigma": n_sigma,
    }
    if bootstrap:
        valid = fd_sum[fd_sum > 0]
        result["mir_ci"] = percentile_interval(valid.log10(), level)
        # Squared distances are biased upward under resampling (E||mu*_v - mu*_t||^2 adds the
        # variance of the means); the shift is reported so a skewed interval can be read.
        result["mir_bootstrap_bias"] = float(valid.log10().mean()) - result["mir"] if result["mir"] else None
        how = ("trace term linearised around the full sample, all other terms exact per replicate" if ci == "linear"
               else "every replicate recomputed exactly (scaling, outliers, Fréchet distance)")
        result["ci_method"] = (f"bootstrap over pairs (n_boot={n_boot}, seed={seed}, percentile, {ci}); {how}; "
                               "mir_bootstrap_bias is the replicate mean minus the estimate")
    elif not enough_tokens:
        result["ci_method"] = (f"none: {min(n_image, n_text)} tokens of one modality <= width {store.width}, so the "
                               "covariance is singular and the linearised bootstrap is invalid; use more pairs or longer texts")
    else:
        result["ci_method"] = "none (intervals need mode=exact and n_boot > 0)"
    return result


def stability(store: HiddenStates, sizes: tuple[int, ...] = DEFAULT_STABILITY_SIZES, **options: Any) -> list[dict[str, Any]]:
    """MIR with its interval for growing numbers of pairs (the first N pairs)."""
    rows = []
    usable = [n for n in sizes if n <= store.n_pairs] or [store.n_pairs]
    if store.n_pairs not in usable:
        usable.append(store.n_pairs)
    for n in usable:
        result = analyse(store, n_pairs=n, **options)
        rows.append({"pairs": n, "mir": result["mir"], "mir_ci": result["mir_ci"], "layer0_gap": result["layer0_gap"]})
    return rows
