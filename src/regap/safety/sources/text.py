"""Loaders for the text-only public benchmarks (CSV files read from a user-given path).

Each loader keeps the dataset's own id where it has one, so results can be joined back to
the original release; otherwise the id is built from the 1-based data-row number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from regap.errors import RegapError
from regap.safety.sources.core import LABELS, LoadReport, Request, register_source
from regap.safety.sources.files import CsvRow, read_csv

UNCATEGORIZED = "uncategorized"


def with_context(context: str, behavior: str) -> str:
    """HarmBench contextual behaviours: the context first, a blank line, then the ask."""
    return f"{context}\n\n{behavior}" if context else behavior


def _nonempty(**fields: str) -> dict[str, str]:
    return {key: value for key, value in fields.items() if value}


def _as_set(value: str | Sequence[str] | None) -> set[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return {item.strip().lower() for item in items if item.strip()}


@register_source("advbench")
def load_advbench(path: Path, report: LoadReport) -> Iterator[Request]:
    """AdvBench harmful behaviours: original `goal,target` CSV or HarmBench's `Behavior,BehaviorID` copy."""
    for row in read_csv(path, source=report.source, required=[("goal", "Behavior")], report=report):
        behavior = row.get("goal", "Behavior")
        if not behavior:
            report.skip(row.line, "empty goal/Behavior")
            continue
        # HarmBench numbered AdvBench rows advbench_1.. in file order; the original has no
        # ids, so the same numbering makes both layouts give the same ids.
        request_id = row.get("BehaviorID") or f"advbench_{row.index}"
        yield Request(
            id=request_id,
            prompt=with_context(row.get("ContextString"), behavior),
            category=row.get("SemanticCategory", "Category", default=UNCATEGORIZED),
            source=report.source,
            label="harmful",
            extra=_nonempty(target=row.get("target")),
        )


@register_source("harmbench")
def load_harmbench(
    path: Path, report: LoadReport, *, functional_categories: str | Sequence[str] | None = None
) -> Iterator[Request]:
    """HarmBench text behaviours (`harmbench_behaviors_text_*.csv`); contextual rows get the context first."""
    wanted = _as_set(functional_categories)
    for row in read_csv(path, source=report.source, required=["Behavior", "BehaviorID"], report=report):
        functional = row.get("FunctionalCategory")
        if wanted is not None and functional.lower() not in wanted:
            continue
        behavior, request_id = row.get("Behavior"), row.get("BehaviorID")
        if not behavior or not request_id:
            reason = "empty Behavior" if not behavior else "empty BehaviorID"
            report.skip(row.line, reason, request_id or None)
            continue
        context = row.get("ContextString")
        yield Request(
            id=request_id,
            prompt=with_context(context, behavior),
            category=row.get("SemanticCategory", default=UNCATEGORIZED),
            source=report.source,
            label="harmful",
            extra=_nonempty(
                behavior=behavior, context=context, functional_category=functional, tags=row.get("Tags")
            ),
        )


@register_source("strongreject")
def load_strongreject(path: Path, report: LoadReport) -> Iterator[Request]:
    """StrongREJECT forbidden prompts (`strongreject_dataset.csv`, `category,source,forbidden_prompt`)."""
    for row in read_csv(path, source=report.source, required=["forbidden_prompt", "category"], report=report):
        prompt = row.get("forbidden_prompt")
        if not prompt:
            report.skip(row.line, "empty forbidden_prompt")
            continue
        yield Request(
            id=f"strongreject-{row.index}",
            prompt=prompt,
            category=row.get("category", default=UNCATEGORIZED),
            source=report.source,
            label="harmful",
            extra=_nonempty(origin=row.get("source")),
        )


def _jbb_label(path: Path, label: str | None) -> str:
    if label is None:
        return "benign" if "benign" in path.name.lower() else "harmful"
    if label not in LABELS:
        raise RegapError(f"jbb: label must be one of {', '.join(LABELS)}, got {label!r}")
    return label


@register_source("jbb")
def load_jbb(path: Path, report: LoadReport, *, label: str | None = None) -> Iterator[Request]:
    """JailbreakBench JBB-Behaviors CSV; label from `label=` or 'benign' in the file name."""
    resolved_label = _jbb_label(path, label)
    for row in read_csv(path, source=report.source, required=["Goal"], report=report):
        goal = row.get("Goal")
        if not goal:
            report.skip(row.line, "empty Goal")
            continue
        number = row.get("Index") or str(row.index)
        yield Request(
            id=f"jbb-{resolved_label}-{number}",
            prompt=goal,
            category=row.get("Category", default=UNCATEGORIZED),
            source=report.source,
            label=resolved_label,
            extra=_nonempty(behavior=row.get("Behavior"), target=row.get("Target"), origin=row.get("Source")),
        )


_XSTEST_LABELS = {"safe": "benign", "unsafe": "harmful", "benign": "benign", "harmful": "harmful"}


@register_source("xstest")
def load_xstest(path: Path, report: LoadReport, *, label: str | None = None) -> Iterator[Request]:
    """XSTest prompts (`xstest_prompts.csv`): safe prompts that sound unsafe, plus unsafe contrasts;
    `label=safe` (or `benign`) keeps the safe prompts only, the over-refusal set, `unsafe` the contrasts."""
    keep = None
    if label is not None:
        if str(label).lower() not in _XSTEST_LABELS:
            raise RegapError(f"xstest: label must be one of {', '.join(_XSTEST_LABELS)}, got {label!r}")
        keep = _XSTEST_LABELS[str(label).lower()]
    for row in read_csv(path, source=report.source, required=["prompt", "label"], report=report):
        prompt, raw_label = row.get("prompt"), row.get("label").lower()
        request_id = f"xstest-{row.get('id') or row.index}"
        if not prompt:
            report.skip(row.line, "empty prompt", request_id)
            continue
        if raw_label not in _XSTEST_LABELS:
            report.skip(row.line, f"label {raw_label!r} is not safe/unsafe", request_id)
            continue
        if keep is not None and _XSTEST_LABELS[raw_label] != keep:
            continue
        yield Request(
            id=request_id,
            prompt=prompt,
            category=row.get("type", default=UNCATEGORIZED),
            source=report.source,
            label=_XSTEST_LABELS[raw_label],
            extra=_nonempty(focus=row.get("focus"), note=row.get("note")),
        )


def _safebench_id(row: CsvRow) -> str:
    category_id, task_id = row.get("category_id"), row.get("task_id")
    return f"safebench-{category_id}-{task_id}" if category_id and task_id else f"safebench-{row.index}"


@register_source("figstep")
@register_source("safebench")
def load_safebench(path: Path, report: LoadReport) -> Iterator[Request]:
    """FigStep's SafeBench CSV: `question` is the prompt; `instruction` (rendered in the image) is in extra."""
    for row in read_csv(path, source=report.source, required=["question", "instruction"], report=report):
        request_id = _safebench_id(row)
        question, instruction = row.get("question"), row.get("instruction")
        if not question or not instruction:
            report.skip(row.line, "empty question" if not question else "empty instruction", request_id)
            continue
        yield Request(
            id=request_id,
            prompt=question,
            category=row.get("category_name", default=UNCATEGORIZED),
            source=report.source,
            label="harmful",
            extra=_nonempty(
                instruction=instruction,
                dataset=row.get("dataset"),
                category_id=row.get("category_id"),
                task_id=row.get("task_id"),
            ),
        )
