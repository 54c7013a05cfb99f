"""Crossed (seeds x requests) bootstrap: point values by hand, the bootstrap against exact enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from regap.analysis.crossed import bootstrap_means, crossed_mean, paired_difference
from regap.errors import RegapError

TABLE = [[1, 0, 1],
         [0, 0, 1]]  # 2 seeds x 3 requests of 0/1 unsafe verdicts


def _exact_resample_means(table: np.ndarray) -> np.ndarray:
    """Every equally likely crossed resample (ordered draws of seeds and of requests), enumerated."""
    n_seeds, n_requests = table.shape
    means = []
    for rows in itertools.product(range(n_seeds), repeat=n_seeds):
        for cols in itertools.product(range(n_requests), repeat=n_requests):
            means.append(np.nanmean(table[np.ix_(rows, cols)]))
    return np.asarray(means)


def test_point_values_by_hand():
    estimate = crossed_mean(TABLE)
    assert estimate.mean == pytest.approx(3 / 6)
    assert estimate.seed_means == pytest.approx((2 / 3, 1 / 3))
    assert (estimate.n_seeds, estimate.n_requests) == (2, 3)
    assert estimate.ci[0] <= estimate.mean <= estimate.ci[1]


def test_bootstrap_matches_exact_enumeration():
    table = np.asarray(TABLE, dtype=float)
    exact = _exact_resample_means(table)  # 4 x 27 = 108 resamples
    sampled = bootstrap_means(table, n_boot=40000, seed=1)
    assert sampled.mean() == pytest.approx(exact.mean(), abs=0.005)
    assert sampled.std() == pytest.approx(exact.std(), rel=0.03)
    for t in (0.25, 0.5, 0.75):  # the distribution is discrete: compare its CDF, not interpolated quantiles
        assert np.mean(sampled <= t) == pytest.approx(np.mean(exact <= t), abs=0.01)


def test_seed_noise_widens_the_interval():
    """Same requests, same pooled rate: seeds that disagree give a wider interval than seeds that agree."""
    rng = np.random.default_rng(0)
    base = (rng.random(40) < 0.5).astype(float)
    agree = np.stack([base, base, base])
    disagree = np.stack([np.ones(40), base, np.zeros(40)])
    narrow, wide = crossed_mean(agree, seed=3), crossed_mean(disagree, seed=3)
    assert wide.ci[1] - wide.ci[0] > 1.5 * (narrow.ci[1] - narrow.ci[0])


def test_missing_cells_are_left_out():
    table = [[1, np.nan, 1], [0, 0, np.nan], [np.nan, np.nan, np.nan]]  # a whole seed missing: dropped
    estimate = crossed_mean(table)
    assert estimate.mean == pytest.approx(2 / 4) and estimate.n_seeds == 2 and estimate.n_requests == 3
    with pytest.raises(RegapError, match="every cell is missing"):
        crossed_mean([[np.nan, np.nan]])
    with pytest.raises(RegapError, match="seeds x requests table"):
        crossed_mean([1, 0, 1])


def test_paired_difference_by_hand_and_its_p_value():
    treated = [[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    control = [[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]]
    result = paired_difference(treated, control, n_boot=4000, seed=0)
    assert result.mean == pytest.approx((2 - 9) / 12)
    assert result.seed_means == pytest.approx((-0.5, -0.75, -0.5))
    assert result.ci[1] < 0 and result.p_value < 0.05
    same = paired_difference(control, control, n_boot=500)
    assert same.mean == 0 and same.p_value == 1.0
    with pytest.raises(RegapError, match="differ in shape"):
        paired_difference(treated, [[0, 1]])


def test_reproducible_with_a_seed():
    a = crossed_mean(TABLE, seed=7, n_boot=300)
    b = crossed_mean(TABLE, seed=7, n_boot=300)
    c = crossed_mean(TABLE, seed=8, n_boot=300)
    assert a == b
    assert (a.ci, a.se) != (c.ci, c.se)
