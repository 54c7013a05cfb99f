"""A unit's small summary, read back from its run folders: the training curve and data, the gap, the
safety verdicts as one character per request, and QA correctness per question, so the statistics can
be recomputed from the summaries alone (`regap.study.stats`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Verdict strings: one character per request (in the unit's `requests` order).
YES, NO, MISSING = "1", "0", "-"


def _bits(values: list[Any]) -> str:
    return "".join(MISSING if v is None else (YES if v else NO) for v in values)


def training_record(folder: Path) -> dict[str, Any]:
    """Loss (and the probe's gap) per logged step, and the data the stage trained on."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = ("step", "loss", "caption_loss", "gap", "gap_loss", "probe_gap0", "probe_mir", "alpha", "elapsed_s")
    record: dict[str, Any] = {"steps": [{k: r[k] for k in keep if k in r} for r in rows
                                        if isinstance(r.get("step"), int) and "event" not in r],
                              "events": [r for r in rows if "event" in r]}
    data = _trained_data(folder)
    if data:
        record["data"] = {k: data[k] for k in ("json", "sha256", "loaded") if k in data}
    return record


def _trained_data(folder: Path) -> dict[str, Any]:
    path = folder / "provenance.json"
    return (json.loads(path.read_text()).get("data") or {}) if path.is_file() else {}


def training_data_note(stage: int, folder: Path, expected: Path) -> str | None:
    """A note when a stage was trained on other data than the study's file (a run adopted from
    elsewhere, or study data regenerated after the stage ran): its results stand for that data,
    and the report must say so."""
    from regap.files import file_sha256

    data = _trained_data(folder)
    trained = data.get("sha256")
    if trained is None or not expected.is_file():
        return None
    study = file_sha256(expected)
    if trained == study:
        return None
    return (f"stage {stage} was trained on {data.get('json')} (sha256 {trained[:12]}), not on the "
            f"study's {expected.name} (sha256 {study[:12]})")


def gap_record(folder: Path) -> dict[str, Any]:
    gap = json.loads((folder / "gap.json").read_text())
    return {k: gap.get(k) for k in ("mir", "mir_ci", "layer0_gap", "layer0_gap_ci", "n_pairs", "defenses")}


def safety_record(folder: Path, judges: list[str]) -> dict[str, Any]:
    """Per condition and judge, two strings over the requests: unsafe and refused (1/0/- for missing)."""
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    requests = sorted({(r["source"], r["request_id"], r["label"]) for r in rows})
    order = {(source, rid): i for i, (source, rid, _) in enumerate(requests)}
    verdicts: dict[str, dict[str, dict[str, list[Any]]]] = {}
    for row in rows:
        i = order[(row["source"], row["request_id"])]
        for judge in judges:
            entry = verdicts.setdefault(row["condition"], {}).setdefault(
                judge, {"unsafe": [None] * len(requests), "refused": [None] * len(requests)})
            verdict = (row.get("verdicts") or {}).get(judge) or {}
            if row.get("response") is not None and verdict.get("label") != "error":
                entry["unsafe"][i] = verdict.get("unsafe")
                entry["refused"][i] = verdict.get("refused")
    summary = json.loads((folder / "summary.json").read_text())
    return {"requests": [f"{source}/{rid}" for source, rid, _ in requests],
            "labels": "".join("H" if label == "harmful" else "B" for _, _, label in requests),
            "verdicts": {cond: {j: {k: _bits(v) for k, v in entry.items()} for j, entry in by_judge.items()}
                         for cond, by_judge in verdicts.items()},
            "provenance": {k: summary["provenance"].get(k) for k in ("model_fingerprint", "judges", "decoding",
                                                                     "dtype", "defenses", "conditions", "versions")
                           if k in summary["provenance"]}}


def utility_record(folder: Path) -> dict[str, Any]:
    data = json.loads((folder / "utility.json").read_text())
    rows = [json.loads(line) for line in (folder / "utility_responses.jsonl").read_text().splitlines() if line.strip()]
    qa = [r for r in rows if r["task"] == "synthetic-qa"]
    tasks = data["tasks"]
    return {
        "qa": {"accuracy": tasks["synthetic-qa"]["score"], "ci": tasks["synthetic-qa"]["ci"],
               "per_type": {t: v["score"] for t, v in tasks["synthetic-qa"].get("per_type", {}).items()},
               "items": [r["item_id"] for r in qa], "correct": _bits([r["correct"] for r in qa])},
        "caption_f1": {"mean": tasks["synthetic-caption"]["score"], "ci": tasks["synthetic-caption"]["ci"]},
        **({"over_refusal": {"rate": tasks["over-refusal"]["score"], "ci": tasks["over-refusal"]["ci"],
                             "n": tasks["over-refusal"].get("n")}} if "over-refusal" in tasks else {}),
        "examples": [{"prompt": r["prompt"], "response": r["response"], "gold": r["gold"]} for r in qa[:5]],
    }

