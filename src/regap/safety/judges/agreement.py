"""Agreement between judges on the same items: pairwise Cohen's kappa.

Why: safety numbers move with the judge, so a report that uses several judges should
say how far they agree. For each pair of judges, kappa is computed on the items both
judged (an `error` verdict, or one whose field is None, drops the item from the pairs
that judge is in, and is counted), with `regap.safety.metrics.cohen_kappa` (NaN when
undefined: no shared items, or both judges gave one and the same answer throughout).

`judge_agreement(items)` runs every available offline judge on a set of responses and
reports their rates and agreement; `agreement_report(verdicts)` does the same for verdicts
already at hand (`verdicts_from_results` reads them from a safety run's `results.jsonl`
rows), and `reference_verdicts` turns human labels into a rater to compare with.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from regap.errors import MissingDependencyError, RegapError
from regap.safety.judges.base import JudgeInput, Verdict
from regap.safety.metrics import cohen_kappa

FIELDS = ("unsafe", "refused", "label")

#: The judges `judge_agreement` compares by default: report name -> (registered judge, options).
#: All run offline; `relevance` needs the `offline` extra (all-MiniLM-L6-v2) and is listed as
#: unavailable without it.
OFFLINE_JUDGES: dict[str, tuple[str, dict[str, Any]]] = {
    "keyword": ("keyword", {}),
    "keyword-strict": ("keyword", {"variant": "strict"}),
    "refusal-lexicon": ("refusal-lexicon", {}),
    "relevance": ("relevance", {}),
}


def _values(verdicts: Sequence[Verdict], field: str) -> list[Any]:
    out = []
    for v in verdicts:
        value = None if v.is_error else getattr(v, field)
        out.append(value)
    return out


def _check(verdicts_by_judge: Mapping[str, Sequence[Verdict]], field: str) -> dict[str, list[Any]]:
    if field not in FIELDS:
        raise RegapError(f"agreement: field must be one of {', '.join(FIELDS)}, got {field!r}")
    if not verdicts_by_judge:
        raise RegapError("agreement: no judges given")
    lengths = {name: len(v) for name, v in verdicts_by_judge.items()}
    if len(set(lengths.values())) > 1:
        raise RegapError(f"agreement: judges must rate the same items in the same order; counts differ: {lengths}")
    return {name: _values(list(v), field) for name, v in verdicts_by_judge.items()}


def pairwise_agreement(verdicts_by_judge: Mapping[str, Sequence[Verdict]], field: str = "unsafe") -> pd.DataFrame:
    """One row per pair of judges (and each judge with itself): `judge_a, judge_b, n,
    n_skipped, agreement, kappa`. `n` counts the items both judged; `agreement` is the
    raw share of equal answers among them (NaN with n = 0)."""
    values = _check(verdicts_by_judge, field)
    names = list(values)
    rows = []
    for i, a in enumerate(names):
        for b in names[i:]:
            pairs = [(x, y) for x, y in zip(values[a], values[b]) if x is not None and y is not None]
            n = len(pairs)
            rows.append({
                "judge_a": a,
                "judge_b": b,
                "n": n,
                "n_skipped": len(values[a]) - n,
                "agreement": sum(x == y for x, y in pairs) / n if n else math.nan,
                "kappa": cohen_kappa([x for x, _ in pairs], [y for _, y in pairs]) if n else math.nan,
            })
    return pd.DataFrame(rows, columns=["judge_a", "judge_b", "n", "n_skipped", "agreement", "kappa"])


def kappa_matrix(verdicts_by_judge: Mapping[str, Sequence[Verdict]], field: str = "unsafe") -> pd.DataFrame:
    """Symmetric judges x judges matrix of Cohen's kappa on `field` (default `unsafe`)."""
    table = pairwise_agreement(verdicts_by_judge, field)
    names = list(verdicts_by_judge)
    matrix = pd.DataFrame(math.nan, index=names, columns=names, dtype=float)
    for row in table.itertuples(index=False):
        matrix.loc[row.judge_a, row.judge_b] = row.kappa
        matrix.loc[row.judge_b, row.judge_a] = row.kappa
    return matrix


def _rate(values: list[Any]) -> float | None:
    known = [bool(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def agreement_report(verdicts_by_judge: Mapping[str, Sequence[Verdict]],
                     fields: Sequence[str] = FIELDS) -> dict[str, Any]:
    """Rates per judge and agreement per field, JSON-ready.

    `rates[judge]`: `n`, `n_error`, and the refusal, unsafe and off-topic rates over the
    verdicts that are not errors (None where the judge has no such answer, e.g. `unsafe`
    for human refusal labels). `agreement[field]`: the `pairwise_agreement` rows and the
    `kappa_matrix` as {judge: {judge: kappa}} (None where undefined)."""
    for field in fields:
        _check(verdicts_by_judge, field)
    rates = {}
    for name, verdicts in verdicts_by_judge.items():
        ok = [v for v in verdicts if not v.is_error]
        rates[name] = {
            "n": len(verdicts),
            "n_error": len(verdicts) - len(ok),
            "refusal_rate": _rate([v.refused for v in ok]),
            "unsafe_rate": _rate([v.unsafe for v in ok]),
            "off_topic_rate": (sum(v.label == "off_topic" for v in ok) / len(ok)) if ok else None,
        }

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    agreement = {}
    for field in fields:
        table = pairwise_agreement(verdicts_by_judge, field)
        matrix = kappa_matrix(verdicts_by_judge, field)
        agreement[field] = {
            "pairwise": [{k: clean(v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                         for row in table.to_dict(orient="records")],
            "kappa": {a: {b: clean(float(matrix.loc[a, b])) for b in matrix.columns} for a in matrix.index},
        }
    n_items = len(next(iter(verdicts_by_judge.values()))) if verdicts_by_judge else 0
    return {"n_items": n_items, "judges": list(verdicts_by_judge), "rates": rates, "agreement": agreement}


def judge_agreement(
    items: Sequence[JudgeInput],
    judges: Mapping[str, tuple[str, dict[str, Any]]] | Iterable[str] | None = None,
    fields: Sequence[str] = FIELDS,
    reference: Mapping[str, Sequence[Verdict]] | None = None,
) -> tuple[dict[str, Any], dict[str, list[Verdict]]]:
    """Run the available judges on `items` and report how far they agree.

    `judges`: report name -> (registered name, options), or a list of registered names;
    default `OFFLINE_JUDGES`. A judge whose package or weights are missing
    (`MissingDependencyError`) is left out and listed under `unavailable` with the reason;
    any other build error (a bad name or option) is raised. `reference` adds raters whose
    verdicts are already known (e.g. `reference_verdicts(human_labels)`). Returns the
    `agreement_report` (plus `described` and `unavailable`) and the verdicts per judge."""
    if judges is None:
        chosen = dict(OFFLINE_JUDGES)
    elif isinstance(judges, Mapping):
        chosen = {str(k): (v[0], dict(v[1])) for k, v in judges.items()}
    else:
        chosen = {str(name): (str(name), {}) for name in judges}
    from regap.safety.judges.base import get_judge

    items = list(items)
    verdicts: dict[str, list[Verdict]] = {}
    described, unavailable = {}, {}
    for label, (name, options) in chosen.items():
        try:
            judge = get_judge(name, **options)
        except MissingDependencyError as exc:
            unavailable[label] = str(exc)
            continue
        described[label] = judge.describe()
        verdicts[label] = judge.judge_batch(items)
    for label, given in (reference or {}).items():
        if len(given) != len(items):
            raise RegapError(f"agreement: reference {label!r} has {len(given)} verdicts for {len(items)} items")
        verdicts[label] = list(given)
    if not verdicts:
        raise RegapError("agreement: no judge available: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    report = agreement_report(verdicts, fields)
    return {**report, "described": described, "unavailable": unavailable}, verdicts


def reference_verdicts(refused: Sequence[bool | None], name: str = "human") -> list[Verdict]:
    """Verdicts from known refusal labels (True = refusal), so human labels can sit in a
    kappa matrix next to the judges; None gives an error verdict (skipped in the pairs).
    `unsafe` is None: refusal labels say nothing about harm."""
    out = []
    for value in refused:
        if value is None:
            out.append(Verdict.error(name, "reference", ValueError("no label")))
        else:
            out.append(Verdict("refusal" if value else "compliance", None, bool(value), None, name, "reference"))
    return out


def verdicts_from_results(rows: Iterable[Mapping[str, Any]], judges: Sequence[str] | None = None) -> dict[str, list[Verdict]]:
    """Verdicts per judge from a safety run's `results.jsonl` rows (each with `verdicts`:
    {judge: verdict dict}), aligned by row; a row a judge has not judged (or a failed
    generation) gets an error verdict for it, so it is skipped and counted in `n_skipped`."""
    rows = [r for r in rows]
    names = list(judges) if judges is not None else sorted({n for r in rows for n in (r.get("verdicts") or {})})
    out: dict[str, list[Verdict]] = {name: [] for name in names}
    for row in rows:
        given = row.get("verdicts") or {}
        for name in names:
            data = given.get(name)
            if data is None:
                out[name].append(Verdict.error(name, "", RuntimeError("not judged")))
                continue
            try:
                out[name].append(Verdict(**{k: data.get(k) for k in ("label", "unsafe", "refused", "score", "judge",
                                                                     "prompt_hash")}, detail=data.get("detail") or {}))
            except (TypeError, ValueError) as exc:
                raise RegapError(f"agreement: bad verdict of judge {name!r} in row {row.get('key')!r}: {exc}") from None
    return out


__all__ = [
    "FIELDS",
    "OFFLINE_JUDGES",
    "pairwise_agreement",
    "kappa_matrix",
    "agreement_report",
    "judge_agreement",
    "reference_verdicts",
    "verdicts_from_results",
]
