"""Judge validation: how well does a refusal judge agree with human labels?

Two human-labelled formats are read from a user-given path:

* `xstest:PATH` - XSTest v2 completion files (Röttger et al., NAACL 2024), one CSV per
  model with columns `id, type, prompt, completion, ..., final_label`, where
  `final_label` is `1_full_compliance`, `2_full_refusal` or `3_partial_refusal`.
  Full and partial refusals both count as refusal by default (a partial refusal
  declines part of the request, which a refusal judge should notice); `partial=
  "compliance"` or `partial="exclude"` gives the other readings. Prompts whose `type`
  starts with `contrast_` are XSTest's unsafe prompts, the others its safe prompts;
  the report splits by that too.
* `pyrit:PATH` - PyRIT's refusal-scorer evaluation CSVs: leading lines starting with
  `#` are comments (e.g. `# version=1.0`), then columns `objective,
  assistant_response, human_score, data_type` where `human_score` 1 means refusal.
  Several raters (`human_score_1`, `human_score_2`, ...) are combined by majority;
  ties are excluded. Rows whose `data_type` is not `text` are excluded.

PATH is a CSV file or a folder, in which case every CSV file there (not recursive)
with the format's columns is used and the others are listed as skipped.

The positive class is *refusal*: precision is the share of judge-flagged refusals
that humans also call refusals, recall the share of human refusals the judge finds.
Items the judge could not decide (error verdicts, `refused=None`) are left out of the
metrics and counted in `n_undecided`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from regap.errors import InternalError, RegapError
from regap.files import file_sha256
from regap.safety.judges import Judge, JudgeInput, get_judge
from regap.safety.metrics import binary_metrics
from regap.safety.splits import split_groups

FORMATS = ("xstest", "pyrit")
PARTIAL_POLICIES = ("refusal", "compliance", "exclude")
#: `split=` values: every row, or one side of the seeded prompt-grouped split that
#: `regap judge-calibrate --judge refusal-lexicon` tunes on (`tuning`) and reports (`heldout`).
SPLITS = ("all", "tuning", "heldout")

XSTEST_COLUMNS = ("prompt", "completion", "final_label")
XSTEST_LABELS = {"1_full_compliance": "compliance", "2_full_refusal": "refusal", "3_partial_refusal": "partial"}
PYRIT_RESPONSE_COLUMNS = ("assistant_response", "response")
PYRIT_PROMPT_COLUMNS = ("objective", "prompt")


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RegapError(f"file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise RegapError(f"not UTF-8 text: {path}: {exc}") from None
    except OSError as exc:
        raise RegapError(f"cannot read {path}: {exc}") from None


def read_commented_csv(path: Path) -> pd.DataFrame:
    """Read a CSV whose leading lines may be `#` comments.

    Only the comment lines *before the header* are dropped, and every field is read as
    text (no NA guessing): pandas' `comment="#"` would also cut responses at a '#'
    inside an unquoted field, and NA guessing would turn a response "None" into a
    missing value.
    """
    text = _read_text(path)
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and (lines[start].lstrip().startswith("#") or not lines[start].strip()):
        start += 1
    body = "".join(lines[start:])
    if not body.strip():
        return pd.DataFrame()
    try:
        return pd.read_csv(io.StringIO(body), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise RegapError(f"not a readable CSV file: {path}: {exc}") from None


def _first_present(columns: Iterable[str], candidates: Iterable[str]) -> str | None:
    columns = list(columns)
    return next((c for c in candidates if c in columns), None)


def _xstest_usable(frame: pd.DataFrame) -> list[str]:
    return [c for c in XSTEST_COLUMNS if c not in frame.columns]


def _pyrit_score_columns(frame: pd.DataFrame) -> list[str]:
    if "human_score" in frame.columns:
        return ["human_score"]
    return sorted(c for c in frame.columns if str(c).startswith("human_score_"))


def _pyrit_usable(frame: pd.DataFrame) -> list[str]:
    missing = []
    if _first_present(frame.columns, PYRIT_RESPONSE_COLUMNS) is None:
        missing.append("assistant_response")
    if not _pyrit_score_columns(frame):
        missing.append("human_score")
    return missing


def load_xstest_file(path: Path, partial: str = "refusal") -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of one XSTest completions file as `source, id, prompt, response,
    human_label, human_refusal, prompt_label, category`, plus exclusion counts."""
    frame = read_commented_csv(path)
    missing = _xstest_usable(frame)
    if missing:
        raise RegapError(f"{path}: not an XSTest completions file (missing columns: {', '.join(missing)})")
    raw = frame["final_label"].str.strip()
    unknown = sorted(set(raw) - set(XSTEST_LABELS) - {""})
    if unknown:
        raise RegapError(f"{path}: unknown final_label value(s): {', '.join(map(repr, unknown[:5]))}")
    kind = raw.map(XSTEST_LABELS)
    counts = {"unlabeled": int((raw == "").sum()), "partial_excluded": 0}
    refusal = kind.map({"refusal": True, "compliance": False, "partial": partial == "refusal"})
    keep = raw != ""
    if partial == "exclude":
        counts["partial_excluded"] = int((kind == "partial").sum())
        keep &= kind != "partial"
    types = frame["type"] if "type" in frame.columns else pd.Series([""] * len(frame))
    rows = pd.DataFrame(
        {
            "source": path.name,
            "id": frame["id"] if "id" in frame.columns else pd.Series(range(len(frame))).astype(str),
            "prompt": frame["prompt"],
            "response": frame["completion"],
            "human_label": raw,
            "human_refusal": refusal,
            "prompt_label": np.where(types.str.startswith("contrast"), "unsafe", "safe") if "type" in frame else "",
            "category": types,
        }
    )
    return rows[keep.to_numpy()].reset_index(drop=True), counts


def _parse_score(value: str) -> float:
    text = str(value).strip().lower()
    if text in ("true", "yes"):
        return 1.0
    if text in ("false", "no"):
        return 0.0
    if text == "":
        return math.nan
    try:
        score = float(text)
    except ValueError:
        raise ValueError(value) from None
    if score not in (0.0, 1.0):
        raise ValueError(value)
    return score


def load_pyrit_file(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of one PyRIT refusal-scorer CSV (same columns as `load_xstest_file`)."""
    frame = read_commented_csv(path)
    missing = _pyrit_usable(frame)
    if missing:
        raise RegapError(f"{path}: not a PyRIT refusal-scorer CSV (missing columns: {', '.join(missing)})")
    response_col = _first_present(frame.columns, PYRIT_RESPONSE_COLUMNS)
    prompt_col = _first_present(frame.columns, PYRIT_PROMPT_COLUMNS)
    score_cols = _pyrit_score_columns(frame)
    try:
        scores = frame[score_cols].apply(lambda col: col.map(_parse_score)).astype(float)
    except ValueError as exc:
        raise RegapError(f"{path}: human scores must be 0 or 1, found {exc.args[0]!r}") from None
    mean = scores.mean(axis=1, skipna=True)
    counts = {"unlabeled": int(mean.isna().sum()), "ties_excluded": int((mean == 0.5).sum()), "non_text_excluded": 0}
    keep = mean.notna() & (mean != 0.5)
    if "data_type" in frame.columns:
        non_text = frame["data_type"].str.strip().str.lower().ne("text") & frame["data_type"].str.strip().ne("")
        counts["non_text_excluded"] = int((non_text & keep).sum())
        keep &= ~non_text
    rows = pd.DataFrame(
        {
            "source": path.name,
            "id": [str(i) for i in range(len(frame))],
            "prompt": frame[prompt_col] if prompt_col else "",
            "response": frame[response_col],
            "human_label": mean.map(lambda m: "" if math.isnan(m) else ("refusal" if m > 0.5 else "compliance")),
            "human_refusal": mean > 0.5,
            "prompt_label": "",
            "category": frame["harm_category"] if "harm_category" in frame.columns else "",
        }
    )
    return rows[keep.to_numpy()].reset_index(drop=True), counts


def parse_data_spec(spec: str) -> tuple[str, Path]:
    """'xstest:PATH' / 'pyrit:PATH' -> (format, path)."""
    from regap.specs import parse_path_spec

    return parse_path_spec(spec, "data", FORMATS)  # type: ignore[return-value]


def load_labeled(spec: str, partial: str = "refusal") -> tuple[pd.DataFrame, dict[str, Any]]:
    """All human-labelled rows of a data spec, plus a record of the files read and
    the rows excluded."""
    if partial not in PARTIAL_POLICIES:
        raise RegapError(f"partial must be one of {', '.join(PARTIAL_POLICIES)}, got {partial!r}")
    fmt, path = parse_data_spec(spec)
    if not path.exists():
        raise RegapError(f"{fmt} data not found: {path}")
    usable = _xstest_usable if fmt == "xstest" else _pyrit_usable
    skipped: list[str] = []
    if path.is_dir():
        files = []
        for candidate in sorted(path.glob("*.csv")):
            header = read_commented_csv_header(candidate)
            if usable(header):
                skipped.append(candidate.name)
            else:
                files.append(candidate)
        if not files:
            raise RegapError(f"no {fmt} CSV files in {path}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    else:
        files = [path]
    frames, per_file, excluded = [], [], {}
    for file in files:
        rows, counts = load_xstest_file(file, partial) if fmt == "xstest" else load_pyrit_file(file)
        frames.append(rows)
        per_file.append({"file": file.name, "path": str(file), "sha256": file_sha256(file), "rows": len(rows), **counts})
        for key, value in counts.items():
            excluded[key] = excluded.get(key, 0) + value
    data = pd.concat(frames, ignore_index=True)
    record = {
        "spec": spec,
        "format": fmt,
        "path": str(path),
        "files": per_file,
        "skipped_files": skipped,
        "excluded": excluded,
        "label_mapping": label_mapping(fmt, partial),
    }
    return data, record


def read_commented_csv_header(path: Path) -> pd.DataFrame:
    """Just the header of a CSV with leading '#' comments (an empty frame with its columns)."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line in handle:
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    return pd.read_csv(io.StringIO(line), nrows=0)
                except (pd.errors.ParserError, ValueError, pd.errors.EmptyDataError):
                    return pd.DataFrame()
    return pd.DataFrame()


def label_mapping(fmt: str, partial: str = "refusal") -> dict[str, str]:
    """How human labels become refusal / compliance (recorded in every report)."""
    if fmt == "xstest":
        return {
            "1_full_compliance": "compliance",
            "2_full_refusal": "refusal",
            "3_partial_refusal": {"refusal": "refusal", "compliance": "compliance", "exclude": "excluded"}[partial],
        }
    return {
        "human_score=1": "refusal",
        "human_score=0": "compliance",
        "several human_score_* columns": "majority; ties excluded",
        "data_type other than text": "excluded",
    }


# --------------------------------------------------------------------------- splitting


def tuning_mask(data: pd.DataFrame, tuning_fraction: float = 0.5, seed: int = 0,
                universe: Iterable[str] | None = None) -> np.ndarray:
    """True for rows on the tuning side of the prompt-grouped split, False for held-out rows.

    Grouped by prompt text, so the five XSTest models' answers to one prompt stay on one
    side; the prompts are sorted and then shuffled with `seed`, so the split depends only on
    the set of prompts and the seed (`regap.safety.splits.split_groups`). `universe`
    (default: the rows' own prompts) is the prompt set the split is drawn over: dropping rows
    (`partial="exclude"`) must not move the prompts that remain to the other side."""
    prompts = sorted({str(p) for p in (data["prompt"] if universe is None else universe)})
    tuning = {p for p, chosen in zip(prompts, split_groups(prompts, tuning_fraction, seed)) if chosen}
    missing = set(data["prompt"].astype(str)) - set(prompts)
    if missing:
        raise RegapError(f"split: {len(missing)} prompt(s) are not in the prompt set the split is drawn over")
    return data["prompt"].astype(str).isin(tuning).to_numpy()


def select_split(data: pd.DataFrame, split: str = "all", tuning_fraction: float = 0.5,
                 seed: int = 0, universe: Iterable[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows of one side of the split (all rows for `split="all"`) and a record of it."""
    if split not in SPLITS:
        raise RegapError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return data, {"split": "all"}
    mask = tuning_mask(data, tuning_fraction, seed, universe)
    keep = mask if split == "tuning" else ~mask
    chosen = data[keep].reset_index(drop=True)
    record = {
        "split": split, "by": "prompt", "seed": seed, "tuning_fraction": tuning_fraction,
        "rows": int(len(chosen)), "prompts": int(chosen["prompt"].nunique()),
        "rows_total": int(len(data)), "prompts_total": int(data["prompt"].nunique()),
    }
    return chosen, record


# --------------------------------------------------------------------------- validating


def jsonable(value: Any) -> Any:
    """Recursively turn NaN/inf into None and numpy scalars into Python ones."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metrics(truth: np.ndarray, predicted: np.ndarray, level: float) -> dict[str, Any]:
    if truth.size == 0:
        return {"n": 0}
    return binary_metrics(truth, predicted, level)


def _examples(data: pd.DataFrame, mask: np.ndarray, limit: int) -> list[dict[str, Any]]:
    chosen = data[mask].head(limit)
    return [
        {
            "source": row.source,
            "id": row.id,
            "human_label": row.human_label,
            "matched": row.matched,
            "response_start": str(row.response)[:200],
        }
        for row in chosen.itertuples(index=False)
    ]


def validate_judge(
    judge_name: str | Judge,
    data_spec: str,
    judge_options: dict[str, Any] | None = None,
    partial: str = "refusal",
    level: float = 0.95,
    max_examples: int = 5,
    split: str = "all",
    seed: int = 0,
    tuning_fraction: float = 0.5,
) -> dict[str, Any]:
    """Run a judge on human-labelled responses and report agreement.

    `split="tuning"` or `"heldout"` keeps one side of the seeded prompt-grouped split
    (`select_split`), the one `regap judge-calibrate --judge refusal-lexicon` fits on and
    reports; the default scores every row.

    Returns a JSON-ready dict: the judge's description, the data record (files with
    hashes, exclusions, label mapping), `overall` metrics (n, confusion counts,
    accuracy with Wilson interval, precision, recall, F1, Cohen's kappa, human and
    judge refusal rates), `per_file` metrics, `by_prompt_label` (XSTest's safe/unsafe
    prompts), `n_undecided`, and a few disagreements of each kind.
    """
    judge = judge_name if isinstance(judge_name, Judge) else get_judge(judge_name, **(judge_options or {}))
    data, record = load_labeled(data_spec, partial)
    universe = None
    if split != "all" and partial == "exclude":  # draw the split over every labelled prompt, as when fitting
        universe = load_labeled(data_spec, "refusal")[0]["prompt"]
    data, split_record = select_split(data, split, tuning_fraction, seed, universe)
    items = [
        JudgeInput(prompt=str(p), response=r, category=(c or None))
        for p, r, c in zip(data["prompt"], data["response"], data["category"])
    ]
    verdicts = judge.judge_batch(items)
    if len(verdicts) != len(items):
        raise InternalError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(items)} items")
    data = data.assign(
        judge_refusal=[v.refused for v in verdicts],
        judge_label=[v.label for v in verdicts],
        matched=[v.detail.get("matched") for v in verdicts],
        judge_error=[v.detail.get("error") if v.is_error else None for v in verdicts],
    )
    decided = data["judge_refusal"].map(lambda x: isinstance(x, (bool, np.bool_)))
    scored = data[decided.to_numpy()].reset_index(drop=True)
    truth = scored["human_refusal"].to_numpy(dtype=bool)
    predicted = scored["judge_refusal"].to_numpy(dtype=bool)

    per_file = {}
    for source in record["files"]:
        mask = (scored["source"] == source["file"]).to_numpy()
        per_file[source["file"]] = _metrics(truth[mask], predicted[mask], level)
    by_prompt_label = {}
    for label in sorted(set(scored["prompt_label"]) - {""}):
        mask = (scored["prompt_label"] == label).to_numpy()
        by_prompt_label[label] = _metrics(truth[mask], predicted[mask], level)

    errors = data["judge_error"].dropna()
    result = {
        "judge": judge.describe(),
        "data": record,
        "split": split_record,
        "n_items": int(len(data)),
        "n_undecided": int((~decided).sum()),
        "undecided_examples": [str(e) for e in errors.head(max_examples)],
        "overall": _metrics(truth, predicted, level),
        "per_file": per_file,
        "by_prompt_label": by_prompt_label,
        "false_refusals": _examples(scored, ~truth & predicted, max_examples),
        "missed_refusals": _examples(scored, truth & ~predicted, max_examples),
        "level": level,
        "positive_class": "refusal",
    }
    return jsonable(result)


__all__ = [
    "FORMATS",
    "PARTIAL_POLICIES",
    "parse_data_spec",
    "read_commented_csv",
    "load_xstest_file",
    "load_pyrit_file",
    "load_labeled",
    "label_mapping",
    "SPLITS",
    "tuning_mask",
    "select_split",
    "jsonable",
    "validate_judge",
]
