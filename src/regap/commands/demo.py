"""`regap demo`: the whole study on the offline tiny model (the project's main job)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from regap.commands.options import RegapCommand, dtype_option, out_option

if TYPE_CHECKING:
    from rich.console import Console


def demo_command(
    out: Path = out_option("a folder for every step and the report (reruns reuse finished steps)",
                           default=Path("runs/demo")),
    fast: bool = typer.Option(False, "--fast", help="Test-sized run (a few minutes)."),
    advbench: Optional[Path] = typer.Option(None, "--advbench", help="AdvBench CSV to add to the harmful requests."),
    xstest: Optional[Path] = typer.Option(None, "--xstest", help="XSTest folder or file: judge validation and over-refusal."),
    family: str = typer.Option("mlp", "--family", help="Connector family: mlp (tiny, results in OUT), qformer "
                               "(tiny-qformer, 32 query tokens, results in OUT/qformer) or both (report side by side)."),
    dtype: str = dtype_option("auto"),
) -> None:
    """Data, stage-1 pretraining with and without ReGap (a lambda sweep), gap, safety, defenses,
    utility, correlation and a report, on the embedded tiny model, offline."""
    from rich.console import Console

    from regap.study.demo import DemoSettings, family_plan, run_families

    settings = DemoSettings.fast() if fast else DemoSettings()
    settings.advbench = str(advbench) if advbench else None
    settings.xstest = str(xstest) if xstest else None
    from regap.precision import normalise_dtype_name

    settings.dtype = normalise_dtype_name(dtype)  # an unknown name fails before any work
    family_plan(out, settings, family)  # a bad --family fails before any work
    from regap.errors import RunInterrupted
    from regap.run_lock import exclusive_out

    resume = "rerun the same command to continue (finished steps are reused)"
    with exclusive_out(out):
        try:
            summaries = run_families(out, settings, family)
        except RunInterrupted as exc:  # a training or safety step: its own where, the demo's resume
            exc.where, exc.resume = f"demo stopped: {exc.where}", resume
            raise
        except KeyboardInterrupt:
            raise RunInterrupted(f"demo stopped; finished steps are recorded in {out / '.steps'}", resume) from None
    console = Console()
    for name, summary in summaries.items():
        _print_summary(console, summary, settings.conditions, f"{name} family, {summary['setup']['model']}")
    console.print(f"report: {out / 'report.html'}")


def _print_summary(console: Console, summary: dict, conditions: list[str], title: str) -> None:
    """One family's table: gap and unsafe rate per checkpoint, then the correlation."""
    from rich.table import Table

    table = Table(title=f"regap demo ({title}): gap and safety per checkpoint")
    table.add_column("model@step", no_wrap=True)
    for column in ("MIR [95% CI]", "layer-0 gap", *conditions):
        table.add_column(column)
    for name, gap in summary["gap"].items():
        unsafe = summary["safety"][name]["unsafe"]
        ci = gap["gap"]["mir_ci"]
        table.add_row(name, f"{gap['gap']['mir']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{gap['gap']['mir']:.3f}",
                      f"{gap['gap']['layer0_gap']:.3g}", *[f"{unsafe[c]['rate']:.2f}" if c in unsafe else "-"
                                                            for c in conditions])
    console.print(table)
    corr = summary["correlation"]
    if "undefined" in corr:
        console.print(f"MIR vs unsafe rate over {corr['n_points']} checkpoints: {corr['undefined']}")
    else:
        console.print(f"MIR vs unsafe rate over {corr['n_points']} checkpoints: Pearson r = {corr['pearson']['r']:.2f} "
                      f"{[round(v, 2) for v in corr['pearson']['ci']]}, Spearman rho = {corr['spearman']['rho']:.2f}")
    console.print(f"judge for the table: {next(iter(summary['safety'].values()))['judge']} (unsafe rate on harmful requests)")


def register(app: typer.Typer) -> None:
    app.command("demo", cls=RegapCommand)(demo_command)
