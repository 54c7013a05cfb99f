"""Intervals that hold with few seeds: the seed is the unit of replication.

A study trains each arm once per seed and evaluates it on a fixed request set. What a reader wants to
know is whether another training run (a new seed) would show the same difference on these requests,
so the per-seed mean difference is the observation, and its t interval with k − 1 degrees of freedom
is the interval (`seed_t`). It is exact when the per-seed means are normal, and each is a mean over
~100 requests.

The crossed bootstrap over seeds and requests (`regap.analysis.crossed`) is kept in the files for
reference, but with 3 seeds it has only 10 distinct seed resamples and its interval is too narrow
when the seeds disagree. `coverage` measures this on simulated seeds x requests tables with known
variance components; `tests/test_study_intervals.py` runs it, and `CROSSED_LABEL` says what it found.

The estimand of every interval here is the expected difference over training seeds *on the study's
requests* (the requests are fixed, the seeds are drawn)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import stats

T_METHOD = "t interval over the per-seed means (k − 1 degrees of freedom)"
CROSSED_LABEL = ("crossed bootstrap over seeds and requests: for reference only, its coverage falls below 0.93 "
                 "with few seeds when the seeds disagree (tests/test_study_intervals.py)")


def seed_t(per_seed: list[float], level: float = 0.95, null: float = 0.0,
           alternative: str = "two-sided") -> dict[str, Any]:
    """Mean of per-seed values with a t interval (None with one seed) and the t-test p-value against
    `null` (`alternative`: two-sided, greater or less)."""
    values = np.asarray([v for v in per_seed if v is not None and not math.isnan(v)], dtype=float)
    k = len(values)
    out: dict[str, Any] = {"mean": float(values.mean()) if k else None, "ci": None, "p_value": None,
                           "n_seeds": k, "df": k - 1 if k > 1 else None, "per_seed": values.tolist(),
                           "method": T_METHOD}
    if k < 2:
        return out
    se = float(values.std(ddof=1) / math.sqrt(k))
    half = float(stats.t.ppf(0.5 + level / 2, k - 1)) * se
    out["ci"] = [out["mean"] - half, out["mean"] + half]
    out["se"] = se
    if se > 0:
        t = (out["mean"] - null) / se
        if alternative == "two-sided":
            out["p_value"] = float(2 * stats.t.sf(abs(t), k - 1))
        elif alternative == "greater":
            out["p_value"] = float(stats.t.sf(t, k - 1))
        else:
            out["p_value"] = float(stats.t.cdf(t, k - 1))
    else:  # every seed gave the same value: no spread to test against
        out["p_value"] = 0.0 if out["mean"] != null else 1.0
    return out


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values of a family (statsmodels' `multipletests(method="holm")`); a missing
    p-value stays missing and is not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    named = [(k, p) for k, p in p_values.items() if p is not None]
    out: dict[str, float | None] = {k: None for k in p_values}
    if named:
        adjusted = multipletests([p for _, p in named], method="holm")[1]
        out.update({k: float(a) for (k, _), a in zip(named, adjusted)})
    return out


# ---- coverage of an interval method, on tables with known variance components ---------------------


@dataclass(frozen=True)
class Scenario:
    """Seeds x requests tables of 0/1 outcomes for a treated and a control arm, paired by cell.

    Request i has a control rate p_i and an effect d_i, fixed for the scenario (the study's requests);
    each seed s shifts the treated rate by u_s ~ N(0, sigma_u^2), the seed-to-seed disagreement. The
    seed share is sigma_u^2 over the variance of one seed's mean difference (sigma_u^2 plus the
    request-level Bernoulli noise of a mean over the requests)."""

    seeds: int
    seed_share: float
    requests: int = 120
    effect: float = -0.1

    def items(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = rng.uniform(0.35, 0.65, self.requests)
        d = self.effect + rng.uniform(-0.05, 0.05, self.requests)
        return p, d

    def sigma_u(self, p: np.ndarray, d: np.ndarray) -> float:
        q = p + d
        noise = float(np.sum(p * (1 - p) + q * (1 - q))) / self.requests ** 2
        return math.sqrt(self.seed_share / (1 - self.seed_share) * noise) if self.seed_share > 0 else 0.0

    @staticmethod
    def truth(p: np.ndarray, d: np.ndarray, sigma_u: float) -> float:
        """The expected mean difference over seeds, E_u[clip(p + d + u, 0, 1)] − p, averaged over requests."""
        m = p + d
        if sigma_u == 0:
            return float(np.mean(np.clip(m, 0, 1) - p))
        a, b = (0 - m) / sigma_u, (1 - m) / sigma_u
        clipped = (m * (stats.norm.cdf(b) - stats.norm.cdf(a)) + sigma_u * (stats.norm.pdf(a) - stats.norm.pdf(b))
                   + stats.norm.sf(b))
        return float(np.mean(clipped - p))

    def draw(self, rng: np.random.Generator, p: np.ndarray, d: np.ndarray, sigma_u: float, reps: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """`reps` simulated studies: treated and control tables of shape (reps, seeds, requests)."""
        shape = (reps, self.seeds, self.requests)
        u = rng.normal(0, sigma_u, (reps, self.seeds, 1)) if sigma_u else np.zeros((reps, self.seeds, 1))
        treated = rng.random(shape) < np.clip(p + d + u, 0, 1)
        control = rng.random(shape) < p
        return treated.astype(float), control.astype(float)


def t_intervals(treated: np.ndarray, control: np.ndarray, level: float) -> np.ndarray:
    """`seed_t`'s interval for each of a stack of studies (reps, seeds, requests): (reps, 2)."""
    per_seed = np.nanmean(treated - control, axis=2)
    k = per_seed.shape[1]
    half = stats.t.ppf(0.5 + level / 2, k - 1) * per_seed.std(axis=1, ddof=1) / math.sqrt(k)
    mean = per_seed.mean(axis=1)
    return np.stack([mean - half, mean + half], axis=1)


def crossed_intervals(treated: np.ndarray, control: np.ndarray, level: float, n_boot: int = 500) -> np.ndarray:
    """The crossed bootstrap's interval (`regap.analysis.crossed.paired_difference`) for each study."""
    from regap.analysis.crossed import paired_difference

    return np.array([paired_difference(a, b, n_boot=n_boot, seed=0, level=level).ci for a, b in zip(treated, control)])


METHODS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "t over seeds": t_intervals, "crossed bootstrap": crossed_intervals}


def coverage(method: str, scenario: Scenario, reps: int = 500, level: float = 0.95, seed: int = 0) -> float:
    """How often `method`'s interval holds the true difference over `reps` simulated studies (the
    requests fixed, the seeds drawn anew for each)."""
    rng = np.random.default_rng(seed)
    p, d = scenario.items(rng)
    sigma_u = scenario.sigma_u(p, d)
    truth = scenario.truth(p, d, sigma_u)
    cis = METHODS[method](*scenario.draw(rng, p, d, sigma_u, reps), level)
    return float(np.mean((cis[:, 0] <= truth) & (truth <= cis[:, 1])))
