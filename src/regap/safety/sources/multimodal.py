"""Loaders for the image benchmarks: MM-SafetyBench and JailbreakV-28K.

Every image path is checked to stay inside the data root and to exist; items that fail
are listed in the report and skipped, so one bad row never stops a run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from regap.errors import RegapError
from regap.safety.sources.core import ImageIssue, LoadReport, Request, register_source
from regap.safety.sources.files import check_image, read_csv, read_json, require_dir, require_file

UNCATEGORIZED = "uncategorized"


@dataclass(frozen=True)
class Pairing:
    """Which text goes with which image folder in MM-SafetyBench."""

    image_dir: str | None  # folder under imgs/{scenario}/, None for the text-only baseline
    question_field: str


#: MM-SafetyBench's canonical pairing, encoded once. The SD image shows the key phrase as a
#: picture, so its question says "the image shows ..."; the typography variants pair with
#: the question that points at the phrase written in the image; the baseline is the raw ask.
MMSB_PAIRING: dict[str, Pairing] = {
    "SD": Pairing("SD", "Rephrased Question(SD)"),
    "SD_TYPO": Pairing("SD_TYPO", "Rephrased Question"),
    "TYPO": Pairing("TYPO", "Rephrased Question"),
    "text": Pairing(None, "Question"),
}

#: Folder names the images are found under, in order: the repository layout, then the
#: name the authors' image archive unpacks to.
_MMSB_IMAGE_DIRS = ("imgs", "MM-SafetyBench(imgs)")


def _pairing(image_type: str) -> tuple[str, Pairing]:
    for name, pairing in MMSB_PAIRING.items():
        if name.lower() == image_type.strip().lower():
            return name, pairing
    raise RegapError(f"mmsafetybench: unknown image_type {image_type!r}; valid: {', '.join(MMSB_PAIRING)}")


def _key_order(key: str) -> tuple[int, int, str]:
    return (0, int(key), key) if key.isdigit() else (1, 0, key)


def _plain_name(key: str) -> bool:
    """Item keys become file names; one with a separator or `..` could point anywhere."""
    return bool(key) and "/" not in key and "\\" not in key and key not in (".", "..") and "\x00" not in key


def _selected(names: str | Sequence[str] | None) -> set[str] | None:
    if names is None:
        return None
    items = names.split(",") if isinstance(names, str) else list(names)
    return {item.strip() for item in items if item.strip()}


@register_source("mmsafetybench")
def load_mmsafetybench(
    path: Path,
    report: LoadReport,
    *,
    image_type: str = "SD_TYPO",
    scenarios: str | Sequence[str] | None = None,
) -> Iterator[Request]:
    """MM-SafetyBench root (`processed_questions/*.json`, `imgs/`); `image_type` SD, SD_TYPO, TYPO or text."""
    root = require_dir(path, report.source)
    kind, pairing = _pairing(image_type)
    questions_dir = require_dir(root / "processed_questions", report.source)
    files = sorted(questions_dir.glob("*.json"))
    wanted = _selected(scenarios)
    if wanted is not None:
        unknown = wanted - {f.stem for f in files}
        if unknown:
            found = ", ".join(f.stem for f in files) or "none"
            raise RegapError(
                f"mmsafetybench: no scenario(s) {', '.join(sorted(unknown))} in {questions_dir}; found: {found}"
            )
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise RegapError(f"mmsafetybench: no scenario .json files in {questions_dir}")
    image_dir = None
    if pairing.image_dir is not None:
        image_dir = next((d for d in _MMSB_IMAGE_DIRS if (root / d).is_dir()), None)
        if image_dir is None:
            raise RegapError(
                f"mmsafetybench: no image folder ({' or '.join(_MMSB_IMAGE_DIRS)}) under {root}; "
                "use image_type='text' for the text-only baseline"
            )

    for file in files:
        scenario = file.stem  # keep the release's own spelling, typos included
        data = read_json(file, source=report.source)
        if not isinstance(data, dict):
            raise RegapError(f"mmsafetybench: {file} must hold a JSON object keyed '0', '1', ...")
        for key in sorted(data, key=_key_order):
            item_id = f"{scenario}-{key}"
            entry = data[key]
            question = entry.get(pairing.question_field) if isinstance(entry, dict) else None
            if not isinstance(question, str) or not question.strip():
                report.skip(None, f"no {pairing.question_field!r} text in {file.name}", item_id)
                continue
            image = None
            if image_dir is not None and not _plain_name(key):
                report.unsafe_paths.append(ImageIssue(item_id, key))
                continue
            if image_dir is not None:
                stem = f"{image_dir}/{scenario}/{pairing.image_dir}/{key}"
                others = (f"{stem}.png", f"{stem}.jpeg")
                image = check_image(report, root, f"{stem}.jpg", item_id, alternatives=others)
                if image is None:
                    continue
            yield Request(
                id=item_id,
                prompt=question.strip(),
                category=scenario,
                source=report.source,
                label="harmful",
                image=image,
                image_root=str(root.absolute()) if image else None,
                extra={
                    "scenario": scenario,
                    "image_type": kind,
                    "question": str(entry.get("Question", "")),
                    "key_phrase": str(entry.get("Key Phrase", "")),
                    "phrase_type": str(entry.get("Phrase Type", "")),
                    # both rephrasings, so a project-rendered typography condition can
                    # pair its own image with the right text whatever image_type was loaded
                    "rephrased": str(entry.get("Rephrased Question", "")),
                    "rephrased_sd": str(entry.get("Rephrased Question(SD)", "")),
                },
            )


_JBV_CSV_NAMES = ("JailbreakV_28K.csv", "JailbreakV_28K/JailbreakV_28K.csv")
_JBV_QUERY_FIELDS = {"jailbreak": "jailbreak_query", "redteam": "redteam_query"}


def _jbv_csv(path: Path) -> Path:
    """Accept the CSV itself or the folder it sits in (the dataset's own layout)."""
    if path.is_dir():
        for name in _JBV_CSV_NAMES:
            if (path / name).is_file():
                return path / name
        raise RegapError(f"jailbreakv: no {' or '.join(_JBV_CSV_NAMES)} in {path}; pass the CSV file itself")
    return require_file(path, "jailbreakv")


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


@register_source("jailbreakv")
def load_jailbreakv(
    path: Path, report: LoadReport, *, query: str = "jailbreak", mini: bool = False
) -> Iterator[Request]:
    """JailbreakV-28K CSV (or its folder); images resolve against the CSV's folder.

    `query` picks the text: "jailbreak" (the attack, default) or "redteam" (the plain
    harmful ask); `mini=True` keeps the rows marked `selected_mini`.
    """
    if query not in _JBV_QUERY_FIELDS:
        raise RegapError(f"jailbreakv: query must be one of {', '.join(_JBV_QUERY_FIELDS)}, got {query!r}")
    csv_path = _jbv_csv(path)
    root = csv_path.parent
    field = _JBV_QUERY_FIELDS[query]
    required = [field, "image_path"] + (["selected_mini"] if mini else [])
    for row in read_csv(csv_path, source=report.source, required=required, report=report):
        if mini and not _truthy(row.get("selected_mini")):
            continue
        item_id = f"jbv-{row.get('id') or row.index}"
        prompt, raw_image = row.get(field), row.get("image_path")
        if not prompt or not raw_image:
            report.skip(row.line, f"empty {field}" if not prompt else "empty image_path", item_id)
            continue
        image = check_image(report, root, raw_image, item_id)
        if image is None:
            continue
        yield Request(
            id=item_id,
            prompt=prompt,
            category=row.get("policy", default=UNCATEGORIZED),
            source=report.source,
            label="harmful",
            image=image,
            image_root=str(root.absolute()),
            extra={
                "redteam_query": row.get("redteam_query"),
                "format": row.get("format"),
                "origin": row.get("from"),
                "transfer_from_llm": _truthy(row.get("transfer_from_llm")),
                "selected_mini": _truthy(row.get("selected_mini")),
            },
        )
