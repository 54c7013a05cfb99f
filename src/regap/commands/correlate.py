"""`regap correlate`: modality gap vs unsafe rate across runs (the paper's Figure 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from regap.commands.options import SEED, RegapCommand, out_option

#: Below this many runs the console adds a caution line to the coefficients.
FEW_RUNS = 10


def correlate_command(
    runs: list[Path] = typer.Argument(..., help="Run folders, each with gap.json and a safety summary.json."),
    out: Path = out_option("a folder for correlation.json and correlation.png"),
    x: str = typer.Option("mir", "--x", help="mir or layer0_gap."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Judge whose unsafe rate is used (default: the first)."),
    conditions: Optional[str] = typer.Option(None, "--conditions", help="Comma-separated conditions pooled (default: all with images)."),
    n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap replicates over runs for the intervals."),
    seed: int = SEED,
) -> None:
    """Pearson and Spearman correlation (bootstrap intervals) between the gap and the unsafe rate."""
    from regap.analysis.correlate import correlate, gather, plot_correlation
    from regap.errors import RegapError
    from regap.provenance import provenance

    if x not in ("mir", "layer0_gap"):
        raise RegapError(f"--x must be mir or layer0_gap, not {x!r}")
    chosen = [c.strip() for c in conditions.split(",")] if conditions else None
    result = correlate(gather(runs, judge, chosen), x=x, n_boot=n_boot, seed=seed)
    result["provenance"] = provenance(runs=[str(r) for r in runs], judge=judge, conditions=chosen, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "correlation.json").write_text(json.dumps(result, indent=2, default=float))
    plot_correlation(result, out / "correlation.png")
    typer.echo(f"Pearson r = {result['pearson']['r']:.3f} {_interval(result['pearson']['ci'])}, "
               f"Spearman rho = {result['spearman']['rho']:.3f} {_interval(result['spearman']['ci'])} "
               f"over {result['n_points']} runs")
    if result["n_points"] < FEW_RUNS:
        typer.echo(f"caution: {result['n_points']} runs are few for a correlation; a bootstrap over them has few "
                   "distinct resamples, so read the coefficients and intervals as descriptive, not as evidence")
    typer.echo(f"wrote {out / 'correlation.json'} and {out / 'correlation.png'}")


def _interval(ci: list[float] | tuple[float, float]) -> str:
    """`[low, high]` to three decimals (`[nan, nan]` when every resample was constant)."""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def register(app: typer.Typer) -> None:
    app.command("correlate", cls=RegapCommand)(correlate_command)
