"""`regap study --rejudge JUDGE[,JUDGE]`: judge a finished study again from its kept answers, with no model.

Each unit's `units/UNIT.answers.jsonl.gz` holds every answer its model gave; a judge run on them gives
the verdict strings the unit summary stores (`safety.ARM.verdicts.CONDITION.JUDGE.unsafe|refused`, one
character per request in the summary's request order), so a new judge, a recalibrated one or an audit
can replace or add verdicts without generating anything again. The statistics are then rebuilt from
the summaries as usual."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from regap.errors import RegapError
from regap.files import write_json_atomic
from regap.study.answers import answers_path, read_answers


def verdict_strings(rows: list[dict[str, Any]], requests: list[str], judge: Any) -> dict[str, dict[str, str]]:
    """Per condition, `{"unsafe": bits, "refused": bits}` of `judge` on the answer rows, in `requests` order
    ('1' yes, '0' no, '-' no answer or the judge failed): the format of a unit summary."""
    from regap.safety.judges import JudgeInput
    from regap.study.records import MISSING, NO, YES

    order = {request: i for i, request in enumerate(requests)}
    by_condition: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") == "safety" and row["request"] in order:
            by_condition.setdefault(row["condition"], []).append(row)
    out: dict[str, dict[str, str]] = {}
    for condition, part in by_condition.items():
        unsafe, refused = [MISSING] * len(requests), [MISSING] * len(requests)
        answered = [r for r in part if r.get("answer") is not None]
        verdicts = judge.judge_batch([JudgeInput(prompt=r["prompt"], response=r["answer"], category=r.get("category"))
                                      for r in answered])
        for row, verdict in zip(answered, verdicts):
            if verdict.label == "error":
                continue
            i = order[row["request"]]
            unsafe[i] = MISSING if verdict.unsafe is None else (YES if verdict.unsafe else NO)
            refused[i] = MISSING if verdict.refused is None else (YES if verdict.refused else NO)
        out[condition] = {"unsafe": "".join(unsafe), "refused": "".join(refused)}
    return out


def rejudge_unit(summary: dict[str, Any], rows: list[dict[str, Any]], judges: dict[str, Any]) -> dict[str, Any]:
    """`summary` with the verdicts of `judges` (name -> Judge) recomputed from its answer rows."""
    records = [r for key in ("safety", "xstest") for r in summary.get(key, {}).values()]
    for record in records:
        for name, judge in judges.items():
            for condition, bits in verdict_strings(rows, record["requests"], judge).items():
                if condition in record["verdicts"]:
                    record["verdicts"][condition][name] = bits
            described = record.setdefault("provenance", {}).setdefault("judges", {})
            described[name] = judge.describe()
    return summary


def rejudge_study(out: Path, judge_names: list[str], options: dict[str, dict[str, Any]] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-judge every unit of `out` that kept its answers; returns which units were re-judged and which
    could not be (no answers file)."""
    from regap.safety.judges import get_judge

    if not judge_names:
        raise RegapError("--rejudge: name one or more judges (e.g. --rejudge relevance,refusal-lexicon)")
    judges = {name: get_judge(name, **(options or {}).get(name, {})) for name in judge_names}
    units = out / "units"
    if not units.is_dir():
        raise RegapError(f"{out}: no units/ folder (not a regap study results folder)")
    done, missing = [], []
    for path in sorted(units.glob("*.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(summary, dict) or "safety" not in summary:
            continue
        answers = answers_path(units, path.stem)
        if not answers.is_file():
            missing.append(path.stem)
            continue
        write_json_atomic(path, rejudge_unit(summary, read_answers(answers), judges))
        done.append(path.stem)
        log(f"rejudged {path.stem} with {', '.join(judge_names)}")
    return {"judges": judge_names, "rejudged": done, "without_answers": missing}
