"""`regap demo`: the whole study on the offline tiny model (the project's main job)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder (reruns reuse finished steps)."),
    fast: bool = typer.Option(False, "--fast", help="Test-sized run (a few minutes)."),
    advbench: Optional[Path] = typer.Option(None, "--advbench", help="AdvBench CSV to add to the harmful requests."),
    xstest: Optional[Path] = typer.Option(None, "--xstest", help="XSTest folder or file: judge validation and over-refusal."),
) -> None:
    """Data, stage-1 pretraining with and without ReGap (a lambda sweep), gap, safety, defenses,
    utility, correlation and a report, on the embedded tiny model, offline."""
    from rich.console import Console
    from rich.table import Table

    from regap.demo import DemoSettings, run_demo

    settings = DemoSettings.fast() if fast else DemoSettings()
    settings.advbench = str(advbench) if advbench else None
    settings.xstest = str(xstest) if xstest else None
    summary = run_demo(out, settings)
    table = Table(title="regap demo: gap and safety per checkpoint")
    table.add_column("model@step", no_wrap=True)
    for column in ("MIR [95% CI]", "layer-0 gap", *settings.conditions):
        table.add_column(column)
    for name, gap in summary["gap"].items():
        unsafe = summary["safety"][name]["unsafe"]
        ci = gap["gap"]["mir_ci"]
        table.add_row(name, f"{gap['gap']['mir']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{gap['gap']['mir']:.3f}",
                      f"{gap['gap']['layer0_gap']:.3g}", *[f"{unsafe[c]['rate']:.2f}" if c in unsafe else "-"
                                                            for c in settings.conditions])
    console = Console()
    console.print(table)
    corr = summary["correlation"]
    console.print(f"MIR vs unsafe rate over {corr['n_points']} checkpoints: Pearson r = {corr['pearson']['r']:.2f} "
                  f"{[round(v, 2) for v in corr['pearson']['ci']]}, Spearman rho = {corr['spearman']['rho']:.2f}")
    console.print(f"judge for the table: {next(iter(summary['safety'].values()))['judge']} (unsafe rate on harmful requests)")
    console.print(f"report: {out / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
