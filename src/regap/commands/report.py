"""`regap report RUN_DIR`: the run's report as Markdown and self-contained HTML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from regap.commands.options import RegapCommand


def report_folder(root: Path) -> dict[str, Any]:
    """A demo run's report (`regap.report.demo`), or a study's rebuilt from its summary.json and unit
    summaries (`regap.study.study_report`); a folder holding neither, or a report regap did not write,
    is refused before anything is written."""
    import json

    from regap.errors import RegapError
    from regap.report.demo import build_report, run_kind
    from regap.report.html import check_reports_overwritable

    if not root.is_dir():
        raise RegapError(f"run folder not found: {root}")
    kind = run_kind(root)
    if kind is None:
        raise RegapError(f"{root} holds no regap run (neither a `regap demo` run: summary.json with a setup or "
                         "eval/; nor a `regap study` results folder: summary.json and units/); nothing written")
    if kind == "demo":
        return build_report(root)
    check_reports_overwritable(root)
    from regap.study.stats import load_units
    from regap.study.study_report import write_report

    units, _ = load_units(root)
    write_report(root, json.loads((root / "summary.json").read_text(encoding="utf-8")), units)
    return {"missing": [], "figures": []}


def report_command(run_dir: Path = typer.Argument(..., help="A `regap demo` run or a `regap study` results folder.")) -> None:
    """Build report.md and report.html from the run's files; missing files are named, the rest renders.
    A folder holding no regap run, or a report.md / report.html regap did not write, is refused."""
    result = report_folder(run_dir)
    for item in result["missing"]:
        typer.echo(f"missing: {run_dir / item}", err=True)
    typer.echo(f"wrote {run_dir / 'report.html'} and {run_dir / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("report", cls=RegapCommand)(report_command)
