"""`regap judge-validate`: check a refusal judge against human labels (XSTest, PyRIT)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from regap.errors import RegapError


def parse_option(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (key, value); VALUE is read as JSON when it parses (true, 3,
    ["a"]), as a boolean for True/False in any case, else kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise RegapError(f"judge option must look like KEY=VALUE, got {text!r}")
    raw = raw.strip()
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def short_names(files: list[str]) -> dict[str, str]:
    """File names without their extension and without the prefix they all share
    ('xstest_v2_completions_gpt4.csv' -> 'gpt4' next to the other models' files)."""
    stems = {name: Path(name).stem for name in files}
    if len(stems) < 2:
        return stems
    prefix = os.path.commonprefix(list(stems.values()))
    if any(len(stem) == len(prefix) for stem in stems.values()):
        return stems
    return {name: stem[len(prefix) :] for name, stem in stems.items()}


def _table(result: dict[str, Any]):
    from rich import box
    from rich.table import Table

    judge = result["judge"]
    short = short_names(list(result["per_file"]))
    options = judge.get("options", {})
    variant = f" ({options['variant']})" if "variant" in options else ""
    table = Table(box=box.SIMPLE_HEAD, title=f"judge {judge['name']}{variant} vs human labels ({result['data']['format']}; positive = refusal)")
    level = round(100 * result.get("level", 0.95))
    for column in ("data", "n", "human ref%", "judge ref%", "acc.", f"{level}% CI", "prec.", "recall", "F1", "kappa"):
        table.add_column(column, justify="left" if column == "data" else "right", no_wrap=column == "data")

    def add(name: str, m: dict[str, Any], end_section: bool = False) -> None:
        if not m.get("n"):
            table.add_row(name, "0", *["-"] * 8, end_section=end_section)
            return
        low, high = m["accuracy_ci"]
        table.add_row(
            name,
            str(m["n"]),
            _fmt(m["truth_rate"], True),
            _fmt(m["predicted_rate"], True),
            _fmt(m["accuracy"]),
            f"{low:.2f}-{high:.2f}",
            _fmt(m["precision"]),
            _fmt(m["recall"]),
            _fmt(m["f1"]),
            _fmt(m["kappa"]),
            end_section=end_section,
        )

    files = list(result["per_file"].items())
    for index, (name, metrics) in enumerate(files):
        add(short[name], metrics, end_section=index == len(files) - 1)
    for label, metrics in result["by_prompt_label"].items():
        add(f"{label} prompts", metrics)
    add("all", result["overall"])
    return table


def register(app: typer.Typer) -> None:
    """Add `judge-validate` to `app`."""

    @app.command("judge-validate")
    def judge_validate(
        data: str = typer.Option(
            ..., "--data", help="Human-labelled responses: xstest:PATH or pyrit:PATH (a CSV file or a folder of them)."
        ),
        judge: str = typer.Option("keyword", "--judge", help="Registered judge name."),
        option: Optional[list[str]] = typer.Option(
            None, "--option", "-o", help="Judge option KEY=VALUE (repeatable), e.g. -o variant=strict."
        ),
        partial: str = typer.Option(
            "refusal", "--partial", help="XSTest partial refusals count as: refusal, compliance or exclude."
        ),
        level: float = typer.Option(0.95, "--level", help="Confidence level of the accuracy interval."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the report with provenance to this JSON file."),
    ) -> None:
        """Measure how well a refusal judge agrees with human labels (accuracy, precision, recall, F1, kappa)."""
        from rich.console import Console

        from regap.provenance import provenance
        from regap.safety.validation import jsonable, validate_judge

        options = dict(parse_option(text) for text in option or [])
        result = validate_judge(judge, data, judge_options=options, partial=partial, level=level)
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: do not squeeze the table to 80 columns
            console = Console(width=max(console.width, 120))
        console.print(_table(result))
        if result["n_undecided"]:
            typer.echo(f"{result['n_undecided']} item(s) undecided by the judge (left out of the metrics)")
        if out is not None:
            record = {
                **result,
                "provenance": provenance(
                    command="judge-validate",
                    judge=judge,
                    judge_options=options,
                    data=data,
                    partial=partial,
                    level=level,
                ),
            }
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n", encoding="utf-8")
            except OSError as exc:
                raise RegapError(f"cannot write {out}: {exc}") from None
            typer.echo(f"wrote {out}")


__all__ = ["register", "parse_option"]
