"""Statistics for safety metrics, checked against statsmodels and worked examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from regap.errors import RegapError
from regap.safety.metrics import (
    accuracy,
    binary_metrics,
    cohen_kappa,
    confusion_counts,
    f1_score,
    mcnemar_exact,
    paired_difference,
    precision,
    rate_table,
    recall,
    wilson_interval,
)

proportion = pytest.importorskip("statsmodels.stats.proportion")
contingency = pytest.importorskip("statsmodels.stats.contingency_tables")


def paired(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    return a, b


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_statsmodels(level):
    for n in (1, 2, 7, 30, 450):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ours = wilson_interval(k, n, level)
            theirs = proportion.proportion_confint(k, n, alpha=1 - level, method="wilson")
            assert ours == pytest.approx(theirs, abs=1e-12)
            assert 0.0 <= ours[0] <= k / n <= ours[1] <= 1.0


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    for bad in ((-1, 3), (4, 3), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, level=1.0)


# --------------------------------------------------------------------------- McNemar, paired difference


def test_mcnemar_matches_statsmodels_exact():
    rng = np.random.default_rng(7)
    for n, p_a, p_b in ((20, 0.5, 0.5), (60, 0.3, 0.6), (200, 0.8, 0.75), (15, 0.1, 0.9)):
        a = rng.random(n) < p_a
        b = np.where(rng.random(n) < 0.6, a, rng.random(n) < p_b)
        b01, b10, p_value = mcnemar_exact(a, b)
        assert b01 == int(np.sum(~a & b)) and b10 == int(np.sum(a & ~b))
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        expected = contingency.mcnemar(np.array(table), exact=True).pvalue
        assert p_value == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mcnemar_edge_cases():
    same = np.array([True, False, True])
    assert mcnemar_exact(same, same) == (0, 0, 1.0)
    assert mcnemar_exact([0, 0, 0, 0, 0], [1, 1, 1, 1, 1]).p_value == pytest.approx(0.0625)
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError):
        mcnemar_exact([0.5, 1.0], [0, 1])


def test_paired_difference_matches_newcombe_worked_example():
    # Cavo et al. (2012), as used by Fagerland, Lydersen & Laake for the paired 2x2 table:
    # Newcombe's square-and-add interval is -0.0621 (95% CI -0.1186 to -0.0046).
    result = paired_difference(*paired(59, 6, 16, 80))
    assert result.difference == pytest.approx(-0.0621, abs=5e-5)
    assert result.ci_low == pytest.approx(-0.1186, abs=5e-5)
    assert result.ci_high == pytest.approx(-0.0046, abs=5e-5)
    assert (result.n, result.b01, result.b10) == (161, 16, 6)
    assert result.rate_a == pytest.approx(65 / 161) and result.rate_b == pytest.approx(75 / 161)


def test_paired_difference_properties():
    no_discordant = paired_difference(*paired(10, 0, 0, 10))
    assert no_discordant.difference == 0.0
    assert no_discordant.ci_low < 0.0 < no_discordant.ci_high  # unlike Wald, not zero width
    extreme = paired_difference(*paired(0, 30, 0, 0))
    assert extreme.difference == 1.0 and -1.0 <= extreme.ci_low < 1.0 and extreme.ci_high == 1.0
    flipped = paired_difference(*paired(5, 3, 12, 20)[::-1])
    forward = paired_difference(*paired(5, 3, 12, 20))
    assert flipped.difference == pytest.approx(-forward.difference)
    assert (flipped.ci_low, flipped.ci_high) == pytest.approx((-forward.ci_high, -forward.ci_low))
    empty = paired_difference([], [])
    assert (empty.difference, empty.ci_low, empty.ci_high, empty.n) == (0.0, -1.0, 1.0, 0)


def test_paired_difference_close_to_wald_for_large_samples():
    a, b = paired(400, 120, 80, 400)
    result = paired_difference(a, b)
    n, diff = a.size, (120 - 80) / a.size
    se = math.sqrt((120 + 80) - (120 - 80) ** 2 / n) / n
    assert result.ci_low == pytest.approx(diff - 1.959964 * se, abs=3e-3)
    assert result.ci_high == pytest.approx(diff + 1.959964 * se, abs=3e-3)


# --------------------------------------------------------------------------- agreement


def test_cohen_kappa_textbook_example():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_formula_and_edge_cases():
    a = ["r", "c", "c", "p", "r", "r", "c", "p", "p", "c"]
    b = ["r", "c", "p", "p", "r", "c", "c", "p", "r", "c"]
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    assert cohen_kappa(a, b) == pytest.approx((observed - expected) / (1 - expected))
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_cohen_kappa_matches_statsmodels():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(3)
    a = rng.random(120) < 0.4
    b = np.where(rng.random(120) < 0.7, a, rng.random(120) < 0.5)
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
    assert cohen_kappa(a.tolist(), b.tolist()) == pytest.approx(inter_rater.cohens_kappa(table).kappa)


def test_binary_metrics_by_hand():
    truth = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    assert confusion_counts(truth, pred) == {"tp": 3, "fp": 1, "fn": 1, "tn": 5}
    assert accuracy(truth, pred) == pytest.approx(0.8)
    assert precision(truth, pred) == pytest.approx(0.75)
    assert recall(truth, pred) == pytest.approx(0.75)
    assert f1_score(truth, pred) == pytest.approx(0.75)
    report = binary_metrics(truth, pred)
    assert report["n"] == 10 and report["accuracy_ci"] == pytest.approx(list(wilson_interval(8, 10)))
    # p_o = 0.8, p_e = 0.4*0.4 + 0.6*0.6 = 0.52 -> kappa = 0.28 / 0.48
    assert report["kappa"] == pytest.approx(0.28 / 0.48)
    assert report["truth_rate"] == 0.4 and report["predicted_rate"] == 0.4
    assert math.isnan(precision([1, 0], [0, 0]))


# --------------------------------------------------------------------------- rate table


def test_rate_table_groups_with_wilson_intervals():
    rows = (
        [{"condition": "text", "category": "x", "unsafe": v} for v in (True, False, False, False)]
        + [{"condition": "typo", "category": "x", "unsafe": v} for v in (True, True, True, False, None)]
        + [{"condition": "typo", "category": "y", "unsafe": float("nan")}]
    )
    table = rate_table(rows, by=["condition"])
    assert list(table.columns) == ["condition", "n", "k", "rate", "ci_low", "ci_high", "n_missing"]
    text = table.set_index("condition").loc["text"]
    typo = table.set_index("condition").loc["typo"]
    assert (text.n, text.k, text.rate, text.n_missing) == (4, 1, 0.25, 0)
    assert (typo.n, typo.k, typo.rate, typo.n_missing) == (4, 3, 0.75, 2)
    assert (typo.ci_low, typo.ci_high) == pytest.approx(wilson_interval(3, 4))

    by_two = rate_table(pd.DataFrame(rows), by=["condition", "category"])
    empty_group = by_two[(by_two.condition == "typo") & (by_two.category == "y")].iloc[0]
    assert empty_group.n == 0 and math.isnan(empty_group.rate) and (empty_group.ci_low, empty_group.ci_high) == (0, 1)

    overall = rate_table(rows)
    assert overall.iloc[0].n == 8 and overall.iloc[0].k == 4 and overall.iloc[0].n_missing == 2


def test_rate_table_errors():
    with pytest.raises(RegapError, match="no column"):
        rate_table([{"unsafe": True}], by=["condition"])
    with pytest.raises(RegapError, match="expected True/False"):
        rate_table([{"unsafe": "maybe"}])
