"""The linearised pair bootstrap agrees with exact recomputation; gradients are right."""

from __future__ import annotations

import pytest
import torch

from regap.gap.linear_bootstrap import linearise_layer, pair_weights, trace_sqrt_and_gradients
from regap.gap.mir import fit_layer, layer_gap


def _random_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def test_trace_sqrt_gradients_match_finite_differences():
    from regap.gap import trace_sqrt_product

    a, b = _random_cov(5, 0), _random_cov(5, 1)
    value, grad_a, grad_b = trace_sqrt_and_gradients(a, b)
    assert abs(value - float(trace_sqrt_product(a, b))) < 1e-10
    direction = _random_cov(5, 2)
    eps = 1e-6
    for grad, plus, minus in (
        (grad_a, lambda: trace_sqrt_product(a + eps * direction, b), lambda: trace_sqrt_product(a - eps * direction, b)),
        (grad_b, lambda: trace_sqrt_product(a, b + eps * direction), lambda: trace_sqrt_product(a, b - eps * direction)),
    ):
        numeric = (float(plus()) - float(minus())) / (2 * eps)
        assert abs(numeric - float((grad * direction).sum())) < 1e-6


def _clouds(pairs: int = 30, per_pair: int = 12, d: int = 6):
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    image = torch.randn(pairs * per_pair, d, generator=g, dtype=torch.float64) @ mix + 2.0
    text = torch.randn(pairs * per_pair, d, generator=g, dtype=torch.float64) * 0.5
    index = torch.arange(pairs).repeat_interleave(per_pair)
    return image, text, index, pairs


@pytest.mark.parametrize("n_sigma", [100.0, 1.0])  # 1.0: outliers replaced in both clouds
def test_full_sample_weights_reproduce_the_exact_layer_gap(n_sigma):
    image, text, index, pairs = _clouds()
    fitted = fit_layer(image, text, layer=1, n_sigma=n_sigma)
    if n_sigma == 1.0:
        assert fitted.gap.n_image_outliers > 0 and fitted.gap.n_text_outliers > 0
    linear = linearise_layer(fitted, index, index, pairs)
    exact = layer_gap(image, text, layer=1, n_sigma=n_sigma)
    ones = torch.ones(1, pairs, dtype=torch.float64)
    assert abs(float(linear.frechet(ones)[0]) - exact.fd) < 1e-9 * exact.fd
    assert abs(float(linear.centroid_gap(ones)[0]) - exact.centroid_gap) < 1e-9 * exact.centroid_gap


def test_replicates_match_exact_recomputation_closely():
    image, text, index, pairs = _clouds()
    linear = linearise_layer(fit_layer(image, text, layer=1, n_sigma=100.0), index, index, pairs)
    weights = pair_weights(pairs, 20, seed=1)
    approx = linear.frechet(weights)
    for b in range(weights.shape[0]):
        repeats = weights[b].long()[index]
        exact = layer_gap(image.repeat_interleave(repeats, 0), text.repeat_interleave(repeats, 0), layer=1, n_sigma=100.0)
        assert abs(float(approx[b]) - exact.fd) < 0.01 * exact.fd  # second-order error only
        centroid = float(linear.centroid_gap(weights[b : b + 1])[0])
        assert abs(centroid - exact.centroid_gap) < 1e-9 * max(exact.centroid_gap, 1e-12)


def test_pair_weights_are_resamples():
    weights = pair_weights(7, 50, seed=0)
    assert weights.shape == (50, 7)
    assert torch.all(weights.sum(1) == 7)
    assert torch.equal(weights, pair_weights(7, 50, seed=0))
