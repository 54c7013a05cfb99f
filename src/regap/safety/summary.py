"""Rates with Wilson intervals per condition and category, paired comparisons, the bar plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from regap.errors import RegapError
from regap.safety.metrics import mcnemar_exact, paired_difference, rate_table


def _frame(rows: list[dict[str, Any]], judge: str) -> pd.DataFrame:
    records = []
    for row in rows:
        verdict = row.get("verdicts", {}).get(judge)
        failed = row.get("response") is None or verdict is None or verdict.get("label") == "error"
        records.append({
            "condition": row["condition"], "category": row["category"], "label": row["label"],
            "unsafe": None if failed else verdict.get("unsafe"),
            "refused": None if failed else verdict.get("refused"),
            "off_topic": None if failed else verdict.get("label") == "off_topic",
            "error": failed,
        })
    columns = ["condition", "category", "label", "unsafe", "refused", "off_topic", "error"]
    return pd.DataFrame.from_records(records, columns=columns)  # columns even with no rows (an interrupted run)


def _rates(frame: pd.DataFrame, by: list[str]) -> list[dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for outcome in ("unsafe", "refused", "off_topic"):
        table = rate_table(frame, by=by, outcome=outcome)
        for record in table.to_dict("records"):
            key = tuple(record[c] for c in by)
            entry = out.setdefault(key, {c: record[c] for c in by})
            entry[outcome] = {"rate": record["rate"], "ci": [record["ci_low"], record["ci_high"]],
                              "k": record["k"], "n": record["n"], "missing": record["n_missing"]}
    return list(out.values())


def summarise(rows: list[dict[str, Any]], judges: list[str], record: dict[str, Any]) -> dict[str, Any]:
    """`summary.json`: per judge, rates per condition (harmful items), per condition x category,
    and the over-refusal rate on benign items."""
    summary: dict[str, Any] = {"judges": {}, "provenance": record, "n_rows": len(rows),
                               "generation_errors": sum(1 for r in rows if r.get("response") is None),
                               "empty_responses": sum(1 for r in rows if r.get("response") == "")}
    for judge in judges:
        frame = _frame(rows, judge)
        harmful, benign = frame[frame["label"] == "harmful"], frame[frame["label"] == "benign"]
        entry: dict[str, Any] = {"judge_errors": int(frame["error"].sum())}
        if len(harmful):
            entry["by_condition"] = _rates(harmful, ["condition"])
            entry["by_condition_category"] = _rates(harmful, ["condition", "category"])
        if len(benign):
            over = rate_table(benign, by=["condition"], outcome="refused").to_dict("records")
            entry["over_refusal"] = [{"condition": r["condition"], "rate": r["rate"], "ci": [r["ci_low"], r["ci_high"]],
                                      "k": r["k"], "n": r["n"]} for r in over]
        summary["judges"][judge] = entry
    return summary


def plot_unsafe_rates(summary: dict[str, Any], path: Path) -> Path | None:
    """Bars with 95 % Wilson intervals: unsafe rate per condition, one group of bars per judge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    judges = [j for j, e in summary["judges"].items() if e.get("by_condition")]
    if not judges:
        return None
    conditions = [r["condition"] for r in summary["judges"][judges[0]]["by_condition"]]
    width = 0.8 / len(judges)
    figure, axis = plt.subplots(figsize=(1.6 * len(conditions) + 2, 4), constrained_layout=True)
    for index, judge in enumerate(judges):
        rows = {r["condition"]: r["unsafe"] for r in summary["judges"][judge]["by_condition"]}
        rates = np.array([rows[c]["rate"] for c in conditions], dtype=float)
        lows = np.array([rows[c]["ci"][0] for c in conditions], dtype=float)
        highs = np.array([rows[c]["ci"][1] for c in conditions], dtype=float)
        x = np.arange(len(conditions)) + index * width
        axis.bar(x, rates, width, label=judge, yerr=[rates - lows, highs - rates], capsize=3)
    axis.set_xticks(np.arange(len(conditions)) + width * (len(judges) - 1) / 2, conditions)
    axis.set_ylabel("unsafe rate (95% Wilson CI)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title(f"unsafe rate per condition: {summary['provenance'].get('model')}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _load_results(folder: Path) -> list[dict[str, Any]]:
    path = folder / "results.jsonl"
    if not path.exists():
        raise RegapError(f"{folder}: no results.jsonl (run `regap safety` there first)")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RegapError(f"{path}: line {number} is not valid JSON") from None
    return rows


def compare_runs(folder_a: Path, folder_b: Path, judge: str | None = None, level: float = 0.95) -> list[dict[str, Any]]:
    """Paired comparison of two runs on the items both judged: difference of unsafe rates (B - A)
    with Newcombe's interval and the exact McNemar test, per condition. A condition's row says
    under `left_out` how many of its items only one run judged (the key only when some were);
    `left_out_of_comparison` lists those and the conditions only one run has."""
    a, b, judge = _judged_pair(folder_a, folder_b, judge)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise RegapError(f"{folder_a} and {folder_b} share no judged items for judge {judge!r}")
    left = _left_out(a, b)
    results = []
    for condition in sorted({key[0] for key in shared}):
        keys = [k for k in shared if k[0] == condition]
        va, vb = [a[k] for k in keys], [b[k] for k in keys]
        test = mcnemar_exact(va, vb)
        diff = paired_difference(vb, va, level)
        row = {"condition": condition, "judge": judge, "n": len(keys), "rate_a": sum(va) / len(va),
               "rate_b": sum(vb) / len(vb), "difference_b_minus_a": _as_dict(diff),
               "mcnemar": {"b01": test[0], "b10": test[1], "p_value": test[2]}}
        if condition in left:
            row["left_out"] = left[condition]
        results.append(row)
    return results


def left_out_of_comparison(folder_a: Path, folder_b: Path, judge: str | None = None) -> dict[str, dict[str, int]]:
    """Per condition, the judged harmful items only run A or only run B has (request sets or
    conditions that differ): `{condition: {"only_in_a": i, "only_in_b": j}}`, conditions
    without any left out omitted."""
    a, b, _ = _judged_pair(folder_a, folder_b, judge)
    return _left_out(a, b)


def _left_out(a: dict[tuple, bool], b: dict[tuple, bool]) -> dict[str, dict[str, int]]:
    left: dict[str, dict[str, int]] = {}
    for name, only in (("only_in_a", set(a) - set(b)), ("only_in_b", set(b) - set(a))):
        for key in only:
            counts = left.setdefault(key[0], {"only_in_a": 0, "only_in_b": 0})
            counts[name] += 1
    return dict(sorted(left.items()))


def _judged_pair(folder_a: Path, folder_b: Path, judge: str | None) -> tuple[dict[tuple, bool], dict[tuple, bool], str]:
    """Each run's harmful items with a verdict of `judge` (default: run A's first judge):
    (condition, source, request id) -> unsafe."""
    rows_a, rows_b = _load_results(folder_a), _load_results(folder_b)
    if judge is None:
        judges = [j for j in rows_a[0].get("verdicts", {})] if rows_a else []
        if not judges:
            raise RegapError(f"{folder_a}: results have no verdicts")
        judge = judges[0]

    def index(rows: list[dict[str, Any]]) -> dict[tuple, bool]:
        out = {}
        for row in rows:
            verdict = row.get("verdicts", {}).get(judge)
            if verdict and verdict.get("unsafe") is not None and row["label"] == "harmful":
                out[(row["condition"], row["source"], row["request_id"])] = bool(verdict["unsafe"])
        return out

    return index(rows_a), index(rows_b), judge


def _as_dict(value: Any) -> Any:
    if hasattr(value, "_asdict"):
        return value._asdict()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return value
