"""Pair-bootstrap intervals for MIR without an eigendecomposition per replicate.

An exact bootstrap of MIR needs two d x d eigendecompositions per layer per replicate
(24 layers x 1000 replicates on the tiny model is hours on a CPU). Here each layer is
linearised once around the full sample: only the Tr (S_t S_v)^{1/2} term of the Fréchet
distance is non-linear in the covariances, and its gradients are closed-form,

    dT/dS_t = 1/2 S_t^{-1/2} M^{1/2} S_t^{-1/2},   dT/dS_v = 1/2 S_t^{1/2} M^{-1/2} S_t^{1/2},
    M = S_t^{1/2} S_v S_t^{1/2}   (pseudo-inverses for singular spectra).

Every other term (means, traces, the text-centric scale alpha) is recomputed exactly in
each replicate from per-pair sufficient statistics (counts, sums, squared norms, norms,
and the quadratic forms x^T G x), so one replicate costs O(pairs x d + d^2) per layer.
Outlier replacement is decided once on the full sample. `tests/test_gap_bootstrap.py`
checks the linearisation against exact recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from regap.gap.mir import FittedLayer

_PINV_RTOL = 1e-12
_ROWS_PER_CHUNK = 8192


def _eig_psd(matrix: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh((matrix + matrix.mT) / 2)
    return values.clamp_min(0), vectors


def _fn_of(values: Tensor, vectors: Tensor, fn) -> Tensor:
    return (vectors * fn(values).unsqueeze(-2)) @ vectors.mT


def _inv_sqrt(values: Tensor) -> Tensor:
    floor = _PINV_RTOL * float(values.max()) if values.numel() else 0.0
    out = torch.zeros_like(values)
    keep = values > floor
    out[keep] = values[keep].rsqrt()
    return out


def trace_sqrt_and_gradients(cov_text: Tensor, cov_image: Tensor) -> tuple[float, Tensor, Tensor]:
    """T = Tr (S_t S_v)^{1/2} and its symmetric gradients with respect to S_t and S_v."""
    lam, u = _eig_psd(cov_text)
    root_t = _fn_of(lam, u, torch.sqrt)
    inv_root_t = _fn_of(lam, u, _inv_sqrt)
    gamma, v = _eig_psd(root_t @ cov_image @ root_t)
    trace = float(gamma.sqrt().sum())
    grad_text = 0.5 * inv_root_t @ _fn_of(gamma, v, torch.sqrt) @ inv_root_t
    grad_image = 0.5 * root_t @ _fn_of(gamma, v, _inv_sqrt) @ root_t
    return trace, (grad_text + grad_text.mT) / 2, (grad_image + grad_image.mT) / 2


@dataclass
class PairMoments:
    """Per-pair sufficient statistics of one modality's cleaned (unscaled) tokens at one layer."""

    counts: Tensor  # [P]
    sums: Tensor  # [P, d]
    sq_norms: Tensor  # [P]  sum ||x||^2
    norms: Tensor  # [P]  sum ||x||
    quad: Tensor  # [P]  sum x^T G x
    grad: Tensor  # [d, d]

    @classmethod
    def of(cls, tokens: Tensor, norms: Tensor, pair_index: Tensor, n_pairs: int, grad: Tensor) -> "PairMoments":
        """`norms` are the norms that define alpha (raw tokens, before outlier replacement)."""
        d = tokens.shape[1]
        index = pair_index.long()
        zeros = tokens.new_zeros(n_pairs)
        sq_norms, quad = zeros.clone(), zeros.clone()
        for start in range(0, tokens.shape[0], _ROWS_PER_CHUNK):  # no [N, d] temporaries
            rows, where = tokens[start : start + _ROWS_PER_CHUNK], index[start : start + _ROWS_PER_CHUNK]
            sq_norms.index_add_(0, where, rows.square().sum(1))
            quad.index_add_(0, where, ((rows @ grad) * rows).sum(1))
        return cls(
            counts=zeros.index_add(0, index, torch.ones_like(tokens[:, 0])),
            sums=tokens.new_zeros(n_pairs, d).index_add(0, index, tokens),
            sq_norms=sq_norms,
            norms=zeros.index_add(0, index, norms.to(tokens.dtype)),
            quad=quad,
            grad=grad,
        )

    def replicate(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """For weights [B, P]: count, mean [B, d], Tr Cov, <G, Cov>, sum of norms."""
        n = weights @ self.counts
        mean = (weights @ self.sums) / n.unsqueeze(1)
        trace = (weights @ self.sq_norms - n * mean.square().sum(1)) / (n - 1)
        linear = (weights @ self.quad - n * ((mean @ self.grad) * mean).sum(1)) / (n - 1)
        return n, mean, trace, linear, weights @ self.norms


@dataclass
class LayerLinearisation:
    """Everything a replicate needs for one layer."""

    text: PairMoments
    image: PairMoments
    trace_sqrt: float
    base_text_linear: float
    base_image_linear: float

    def frechet(self, weights: Tensor) -> Tensor:
        """Text-centric scaled FD for each replicate's pair weights [B, P] -> [B]."""
        n_t, mu_t, tr_t, lin_t, norm_t = self.text.replicate(weights)
        _, mu_v, tr_v, lin_v, _ = self.image.replicate(weights)
        trace_sqrt = self.trace_sqrt + (lin_t - self.base_text_linear) + (lin_v - self.base_image_linear)
        fd = (mu_v - mu_t).square().sum(1) + tr_t + tr_v - 2 * trace_sqrt
        alpha = n_t / norm_t
        return alpha.square() * fd

    def centroid_gap(self, weights: Tensor) -> Tensor:
        n_t, mu_t, _, _, norm_t = self.text.replicate(weights)
        _, mu_v, _, _, _ = self.image.replicate(weights)
        return (n_t / norm_t).square() * (mu_v - mu_t).square().sum(1)


def linearise_layer(fitted: FittedLayer, image_pairs: Tensor, text_pairs: Tensor, n_pairs: int) -> LayerLinearisation:
    """Linearise the trace term around a layer fitted on the full sample (outliers cleaned once)."""
    cov_t, cov_v = fitted.cov_text, fitted.cov_image
    trace_sqrt, grad_t, grad_v = trace_sqrt_and_gradients(cov_t, cov_v)
    return LayerLinearisation(
        text=PairMoments.of(fitted.text, fitted.text_norms, text_pairs, n_pairs, grad_t),
        image=PairMoments.of(fitted.image, fitted.image.norm(dim=1), image_pairs, n_pairs, grad_v),
        trace_sqrt=trace_sqrt,
        base_text_linear=float((grad_t * cov_t).sum()),
        base_image_linear=float((grad_v * cov_v).sum()),
    )


def pair_weights(n_pairs: int, n_boot: int, seed: int) -> Tensor:
    """[n_boot, n_pairs] float64 counts of each pair in each resample (with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_pairs, (n_boot, n_pairs), generator=generator)
    weights = torch.zeros(n_boot, n_pairs, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def percentile_interval(samples: Tensor, level: float) -> tuple[float, float]:
    finite = samples[torch.isfinite(samples)]
    if finite.numel() == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = torch.quantile(finite, torch.tensor([tail, 1 - tail], dtype=finite.dtype))
    return float(low), float(high)
