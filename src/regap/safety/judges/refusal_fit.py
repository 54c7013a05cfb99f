"""Fitting the `refusal-lexicon` judge on one half of XSTest and measuring it on the other.

Why: a judge tuned and scored on the same responses reports its own memory. The human-
labelled responses are split by prompt (the five models' answers to one prompt stay on one
side), seeded; on the *tuning* side the L2 strength of the logistic regression is chosen by
grouped k-fold cross-validation and the weights are fitted; the *held-out* side is only
scored, once, by `regap.safety.judges.validation.validate_judge` (the same code as
`regap judge-validate --split heldout`), next to the `keyword` judge on the same rows.

The logistic regression is a few lines of scipy (L-BFGS-B on the penalised log-loss), so
regap needs no machine-learning library for it. Each weight's sign is fixed by what its
feature means (`regap.safety.judges.lexicon.FEATURE_SIGNS`): a refusal cue may only raise
P(refusal), a compliance cue only lower it. Without that, XSTest's own conventions leak in:
it labels polite explanations of a nonsensical question ("I'm sorry, but Goofy is a
fictional character ...") as compliance and answers to self-harm questions that point to
a helpline as either, so a free fit gives "reach out to a mental health professional" in
the opening a *negative* weight and turns a refusal like "I am an AI language model and do
not condone violence. Please reach out to ..." into compliance. Fixing the signs cost nothing
in grouped cross-validation on the tuning split (best grid value 0.926 with fixed signs, 0.925
free; measured before the explicit-refusal rule of the lexicon was added).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from regap.errors import RegapError

#: Inverse L2 strengths tried by cross-validation (as scikit-learn's `C`: larger = weaker penalty).
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
FOLDS = 5


def fit_logistic(features: np.ndarray, labels: Sequence[bool], c: float = 1.0,
                 signs: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Weights and bias minimising sum(log-loss) + |w|^2 / (2 c) (the bias is not penalised).

    `signs[i]` = +1 keeps weight i >= 0, -1 keeps it <= 0, 0 leaves it free.
    Deterministic: L-BFGS-B from zero with the analytic gradient."""
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=float)
    y = np.asarray([bool(v) for v in labels], dtype=float)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise RegapError(f"fit_logistic: need one label per row, got {x.shape} and {y.shape}")
    if not 0 < y.sum() < y.size:
        raise RegapError("fit_logistic: need both refusals and compliances to fit")
    if not c > 0:
        raise RegapError(f"fit_logistic: c must be positive, got {c!r}")
    if signs is not None and len(signs) != x.shape[1]:
        raise RegapError(f"fit_logistic: need one sign per feature, got {len(signs)} for {x.shape[1]}")
    bounds = None if signs is None else [
        (0.0, None) if s > 0 else (None, 0.0) if s < 0 else (None, None) for s in signs] + [(None, None)]
    sign = 2.0 * y - 1.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        margin = sign * (x @ w + b)
        value = float(np.sum(np.logaddexp(0.0, -margin)) + w @ w / (2.0 * c))
        slope = -sign / (1.0 + np.exp(margin))  # d loss / d z
        grad = np.concatenate([x.T @ slope + w / c, [slope.sum()]])
        return value, grad

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-14})
    if not np.all(np.isfinite(result.x)):
        raise RegapError(f"fit_logistic: the fit diverged ({result.message})")
    return result.x[:-1], float(result.x[-1])


def grouped_folds(groups: Sequence[str], k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per row; the rows of one group share a fold. Groups are sorted
    and shuffled with `seed`, then dealt round-robin, so folds differ in size by at most one group."""
    keys = [str(g) for g in groups]
    unique = sorted(set(keys))
    if len(unique) < k:
        raise RegapError(f"need at least {k} groups for {k}-fold cross-validation, got {len(unique)}")
    order = np.random.default_rng([seed, 3]).permutation(len(unique))
    fold_of = {unique[i]: position % k for position, i in enumerate(order)}
    return np.asarray([fold_of[key] for key in keys])


def select_c(features: np.ndarray, labels: Sequence[bool], groups: Sequence[str], grid: Sequence[float] = C_GRID,
             k: int = FOLDS, seed: int = 0, threshold: float = 0.5, signs: Sequence[int] | None = None,
             fixed: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """The `c` of `grid` with the best grouped k-fold accuracy (ties: the smaller `c`, the
    stronger penalty), and the accuracy of every candidate. Rows where `fixed` is True are
    refusals by rule: left out of every fit and predicted refusal (they still count in the accuracy)."""
    x = np.asarray(features, dtype=float)
    y = np.asarray([bool(v) for v in labels])
    fixed = np.zeros(len(y), dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
    folds = grouped_folds(groups, k, seed)
    scores: dict[str, float] = {}
    for c in grid:
        correct = 0
        for fold in range(k):
            train = (folds != fold) & ~fixed
            test = folds == fold
            w, b = fit_logistic(x[train], y[train], c, signs)
            p = 1.0 / (1.0 + np.exp(-(x[test] @ w + b)))
            correct += int(np.sum(((p >= threshold) | fixed[test]) == y[test]))
        scores[repr(float(c))] = correct / len(y)
    best = max(scores.values())
    chosen = min(float(c) for c in grid if math.isclose(scores[repr(float(c))], best))
    return chosen, scores


def fit_refusal_lexicon(
    data_spec: str,
    seed: int = 0,
    tuning_fraction: float = 0.5,
    partial: str = "refusal",
    grid: Sequence[float] = C_GRID,
    folds: int = FOLDS,
    level: float = 0.95,
    n_boot: int = 1000,
    compare: Sequence[tuple[str, dict[str, Any]]] = (("keyword", {"variant": "gcg"}), ("keyword", {"variant": "strict"})),
) -> tuple[Any, dict[str, Any]]:
    """Fit the refusal-lexicon weights on the tuning split of `data_spec` (xstest:PATH or
    pyrit:PATH) and score them on the held-out split.

    Returns the `LexiconModel` and a JSON-ready report: the split, the cross-validated
    choice of `c`, the judge's metrics on the tuning split (in-sample) and on the held-out
    split (per file, per prompt class, a group-bootstrap interval for accuracy), the
    `compare` judges on the same held-out rows, and an exact McNemar test of the judge's
    correctness against the first of them.
    """
    from regap.safety.judges import JudgeInput
    from regap.safety.judges.lexicon import (
        FEATURE_NAMES,
        FEATURE_SIGNS,
        LexiconModel,
        RefusalLexiconJudge,
        explicit_refusal,
        feature_matrix,
    )
    from regap.safety.judges.relevance_threshold import _group_bootstrap
    from regap.safety.judges.validation import load_labeled, select_split, tuning_mask, validate_judge

    data, record = load_labeled(data_spec, partial)
    in_tuning = tuning_mask(data, tuning_fraction, seed)
    tune = data[in_tuning].reset_index(drop=True)
    x = feature_matrix(list(tune["response"]))
    y = tune["human_refusal"].to_numpy(dtype=bool)
    explicit = explicit_refusal(x)
    c, cv_scores = select_c(x, y, tune["prompt"], grid, folds, seed, signs=FEATURE_SIGNS, fixed=explicit)
    weights, bias = fit_logistic(x[~explicit], y[~explicit], c, FEATURE_SIGNS)
    _, tuning_record = select_split(data, "tuning", tuning_fraction, seed)
    _, heldout_record = select_split(data, "heldout", tuning_fraction, seed)
    fit_record = {
        "data": [{"file": f["file"], "sha256": f["sha256"], "rows": f["rows"]} for f in record["files"]],
        "label_mapping": record["label_mapping"],
        "split": {k: v for k, v in tuning_record.items() if k != "split"},
        "c": c, "c_grid": [float(g) for g in grid], "cv_folds": folds, "cv_accuracy": cv_scores,
        "weight_signs": "refusal cues >= 0, compliance cues <= 0, log_length free",
        "explicit_refusal_rows": {"n": int(explicit.sum()), "human_refusal": int(y[explicit].sum()),
                                  "note": "decided by rule, left out of the fit"},
        # PATH, not the path given: the data are pinned by their sha256 above, and the weights file
        # stays byte-identical wherever the command runs.
        "command": f"regap judge-calibrate --judge refusal-lexicon --data {record['format']}:PATH --seed {seed} "
                   f"--calibration-fraction {tuning_fraction} --partial {partial}",
    }
    model = LexiconModel(tuple(float(w) for w in weights), float(bias), 0.5, fit_record)
    judge = RefusalLexiconJudge(weights=model)

    def score(target: Any, options: dict[str, Any] | None, split: str) -> dict[str, Any]:
        return validate_judge(target, data_spec, options, partial=partial, level=level, split=split, seed=seed,
                              tuning_fraction=tuning_fraction)

    tuning = score(judge, None, "tuning")
    heldout = score(judge, None, "heldout")
    held = data[~in_tuning].reset_index(drop=True)
    human = held["human_refusal"].to_numpy(dtype=bool)
    items = [JudgeInput(prompt=str(p), response=r) for p, r in zip(held["prompt"], held["response"])]
    fitted = judge.judge_batch(items)
    correct = np.asarray([v.refused for v in fitted]) == human
    heldout["accuracy_bootstrap_ci"] = _group_bootstrap(
        held["prompt"].to_numpy(), lambda idx: float(np.mean(correct[idx])), n_boot, seed, level)
    baselines, paired, agreement = _compare_heldout(items, fitted, human, correct, compare, score)
    ranked = sorted(zip(FEATURE_NAMES, weights), key=lambda pair: -abs(pair[1]))
    report = {
        "judge": judge.describe(),
        "data": record,
        "split": fit_record["split"],
        "selection": {"c": c, "grid": fit_record["c_grid"], "folds": folds, "cv_accuracy": cv_scores,
                      "grouped_by": "prompt", "criterion": "accuracy at P(refusal) >= 0.5; ties: smaller c"},
        "tuning": tuning,
        "heldout": heldout,
        "heldout_baselines": baselines,
        "heldout_paired": paired,
        "heldout_agreement": {k: agreement[k] for k in ("n_items", "rates", "agreement")},
        "largest_weights": [{"feature": f, "weight": round(float(w), 4)} for f, w in ranked[:15]],
        "bias": round(float(bias), 4),
        "level": level,
    }
    return model, report


def _compare_heldout(items: list[Any], fitted: list[Any], human: np.ndarray, correct: np.ndarray,
                     compare: Sequence[tuple[str, dict[str, Any]]], score: Any) -> tuple[dict, dict, dict]:
    """The `compare` judges on the held-out rows: their scores, their agreement with the fitted judge
    and the human labels, and an exact McNemar test against the first of them."""
    from regap.safety.judges.agreement import judge_agreement, reference_verdicts
    from regap.safety.metrics import mcnemar_exact

    labels = {name + "".join(f" {k}={v}" for k, v in options.items()): (name, dict(options)) for name, options in compare}
    baselines = {}
    for label, (name, options) in labels.items():
        result = score(name, options, "heldout")
        baselines[label] = {key: result[key] for key in ("judge", "overall", "per_file", "by_prompt_label")}
    agreement, verdicts = judge_agreement(items, labels, fields=("refused",),
                                          reference={"refusal-lexicon": fitted, "human": reference_verdicts(human)})
    paired = {}
    if labels:
        first = next(iter(labels))
        other_correct = np.asarray([v.refused for v in verdicts[first]]) == human
        test = mcnemar_exact(other_correct, correct)
        paired = {"against": first, "judge_right_other_wrong": test.b01, "judge_wrong_other_right": test.b10,
                  "p_value": test.p_value, "test": "exact McNemar on per-item correctness"}
    return baselines, paired, agreement


__all__ = ["C_GRID", "FOLDS", "fit_logistic", "grouped_folds", "select_c", "fit_refusal_lexicon"]
