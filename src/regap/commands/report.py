"""`regap report RUN_DIR`: the run's report as Markdown and self-contained HTML."""

from __future__ import annotations

from pathlib import Path

import typer

from regap.commands.options import RegapCommand


def report_command(run_dir: Path = typer.Argument(..., help="A `regap demo` run or a `regap study` results folder.")) -> None:
    """Build report.md and report.html from the run's files; missing files are named, the rest renders.
    A folder holding no regap run, or a report.md / report.html regap did not write, is refused."""
    from regap.study.report import report_folder

    result = report_folder(run_dir)
    for item in result["missing"]:
        typer.echo(f"missing: {run_dir / item}", err=True)
    typer.echo(f"wrote {run_dir / 'report.html'} and {run_dir / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("report", cls=RegapCommand)(report_command)
