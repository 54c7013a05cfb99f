"""What a unit's model said, kept beside its summary: `OUT/units/UNIT.answers.jsonl.gz`.

A verdict is only as good as its judge, so a study keeps the answers themselves, not only the 0/1
verdicts: any judge can then be re-run on them (`regap study --rejudge`) and audited against labels
made by reading them (`regap.study.audit`), with no model. One JSON row per generated answer:

* safety: `kind` "safety", `request` (`source/id`, as in the unit summary), `label` (harmful / benign),
  `category`, `condition`, `prompt` (the request), `prompt_sent` (what reached the model, e.g. the
  typographic condition's instruction), `answer`, `new_tokens`, `error`, `defenses` and `decoding`;
* utility: `kind` "qa" or "caption", `item`, `prompt`, `answer`, `gold`, `correct` (QA) and `f1` (captions).

The file is gzip with a zero timestamp, rows sorted, so the same answers give the same bytes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterable

from regap.errors import RegapError
from regap.files import atomic_path

SUFFIX = ".answers.jsonl.gz"


def answers_path(units_folder: Path, unit: str) -> Path:
    return units_folder / f"{unit}{SUFFIX}"


def safety_answers(folder: Path) -> list[dict[str, Any]]:
    """The answer rows of one safety run folder (its `results.jsonl` and the decoding in `summary.json`)."""
    results = folder / "results.jsonl"
    if not results.is_file():
        raise RegapError(f"{folder}: no results.jsonl (the safety run has not finished)")
    provenance = json.loads((folder / "summary.json").read_text()).get("provenance", {})
    decoding = provenance.get("decoding")
    defenses = [d.get("name", d) if isinstance(d, dict) else d for d in provenance.get("defenses") or []]
    rows = []
    for line in results.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        rows.append({"kind": "safety", "request": f"{r['source']}/{r['request_id']}", "label": r.get("label"),
                     "category": r.get("category"), "condition": r["condition"], "prompt": r.get("prompt"),
                     "prompt_sent": r.get("prompt_sent"), "answer": r.get("response"),
                     "new_tokens": r.get("new_tokens"), "error": r.get("error"), "defenses": defenses,
                     "decoding": decoding})
    return rows


def utility_answers(folder: Path) -> list[dict[str, Any]]:
    """The answer rows of one utility run folder (`utility_responses.jsonl`)."""
    path = folder / "utility_responses.jsonl"
    if not path.is_file():
        return []
    kinds = {"synthetic-qa": "qa", "synthetic-caption": "caption"}
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("task") not in kinds:
            continue
        rows.append({"kind": kinds[r["task"]], "item": r.get("item_id"), "prompt": r.get("prompt"),
                     "answer": r.get("response"), "gold": r.get("gold"), "correct": r.get("correct"),
                     "f1": r.get("f1")})
    return rows


def _sort_key(row: dict[str, Any]) -> tuple:
    return (row["kind"], str(row.get("condition") or ""), str(row.get("request") or row.get("item") or ""))


def write_answers(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write answer rows (sorted, gzip with mtime 0, atomically); returns how many."""
    ordered = sorted(rows, key=_sort_key)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in ordered)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return len(ordered)


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The rows of an answers file; a damaged file is a one-line error naming it."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except FileNotFoundError:
        raise RegapError(f"{path}: no such answers file") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegapError(f"{path}: unreadable answers file ({type(exc).__name__}: {exc})") from None


def import_safety_run(units_folder: Path, unit: str, folder: Path) -> dict[str, Any]:
    """Keep the answers of a safety run made outside the study as unit `unit`'s (for units that ran
    before answers were kept, regenerated from their model): writes `UNIT.answers.jsonl.gz` and records
    in the summary where they came from, whether the model fingerprint is the unit's, and how often the
    regenerated verdicts equal the stored ones (per judge and condition), so a reader can tell whether
    they are the same answers."""
    import time

    from regap.files import write_json_atomic
    from regap.study.records import safety_record

    path = units_folder / f"{unit}.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        (arm, record), = summary["safety"].items()
    except (OSError, ValueError, KeyError, TypeError):
        raise RegapError(f"{path}: no unit summary with one safety record to attach answers to") from None
    judges = sorted({j for by_judge in record["verdicts"].values() for j in by_judge})
    regenerated = safety_record(folder, judges)
    if regenerated["requests"] != record["requests"]:
        raise RegapError(f"{folder}: its requests differ from unit {unit}'s; not the same evaluation")
    agreement: dict[str, dict[str, float]] = {}
    for condition, by_judge in record["verdicts"].items():
        for judge, bits in by_judge.items():
            new = regenerated["verdicts"].get(condition, {}).get(judge, {}).get("unsafe")
            if new is not None:
                same = sum(a == b for a, b in zip(bits["unsafe"], new))
                agreement.setdefault(judge, {})[condition] = round(same / len(new), 4)
    fingerprint = regenerated["provenance"].get("model_fingerprint")
    count = write_answers(answers_path(units_folder, unit), safety_answers(folder))
    summary["answers"] = answers_path(units_folder, unit).name
    run = json.loads((folder / "summary.json").read_text()).get("provenance", {})
    summary["answers_regenerated"] = {
        "from": run.get("model"), "model_fingerprint": fingerprint, "rows": count,
        "fingerprint_matches_unit": fingerprint == record.get("provenance", {}).get("model_fingerprint"),
        "unsafe_verdict_agreement_with_stored": agreement, "date": time.strftime("%Y-%m-%d"),
        "note": "answers regenerated after the unit ran (the unit kept verdicts only); the stored verdicts "
                "are the unit's own, these answers are what its model gives when run again"}
    write_json_atomic(path, summary)
    return summary["answers_regenerated"]
