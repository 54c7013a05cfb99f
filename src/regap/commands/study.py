"""`regap study [CONFIG] [key=value ...]`: the paper's pipeline over seeds and arms, unit by unit,
resumable, then the statistics and the report (docs/study.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from regap.commands.options import RegapCommand, out_option


def study_command(
    config: Optional[str] = typer.Argument(None, help="Study config: a YAML path or a shipped name (default "
                                           "tiny-study); `--list` shows them.", metavar="CONFIG"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, dotted for sections "
                                                   "(e.g. seeds=[0,1] stage2.steps=128)."),
    out: Optional[Path] = out_option("the results folder (default results/<name>; weights and caches go to "
                                     "OUT/work unless --work)", default=None),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder for weights, generations and caches."),
    unit: Optional[List[str]] = typer.Option(None, "--unit", help="Run only this unit (repeatable), e.g. plain-s0."),
    max_units: Optional[int] = typer.Option(None, "--max-units", help="Stop after running this many units."),
    no_run: bool = typer.Option(False, "--no-run", help="Run nothing: aggregate the units present and rebuild the report."),
    fast: bool = typer.Option(False, "--fast", help="Test-sized study on the tiny random model (minutes; checks "
                              "the pipeline, measures nothing)."),
    plan: bool = typer.Option(False, "--plan", help="Print the units, which are done and the time estimate, then exit."),
    list_configs: bool = typer.Option(False, "--list", help="List the shipped study configs and exit."),
    import_answers: Optional[List[str]] = typer.Option(None, "--import-answers", metavar="UNIT=FOLDER",
                                                       help="Keep the answers of a `regap safety` run folder as a "
                                                       "finished unit's (for units run before answers were kept)."),
    audit_sample: Optional[int] = typer.Option(None, "--audit-sample", metavar="N",
                                               help="Draw about N harmful-request answers, stratified over arm x "
                                               "condition, into OUT/judge-audit/sample.jsonl for labelling."),
    audit: bool = typer.Option(False, "--audit", help="Score the judges against OUT/judge-audit/labels.jsonl "
                               "(docs/judges.md, 'Audit on the study's answers')."),
    rejudge: Optional[str] = typer.Option(None, "--rejudge", metavar="JUDGE[,JUDGE]",
                                          help="Judge the finished units again from their kept answers (no model), "
                                          "then rebuild the statistics and the report; runs nothing else."),
) -> None:
    """Stage 1 (ReGap at each λ, and MoCa) → stage 2 → gap, safety, utility and defenses per seed;
    statistics over seeds and requests; report. Finished units are skipped on a rerun."""
    from regap.study.config import load_study_config, shipped_study_configs

    if list_configs:
        for name, path in shipped_study_configs().items():
            typer.echo(f"{name:24s} {path}")
        return
    if config is not None and "=" in config:  # `regap study seeds=[0,1]`: the default config, overridden
        overrides, config = [config, *(overrides or [])], None
    if fast:
        from regap.study.fast import FAST_OVERRIDES

        overrides = FAST_OVERRIDES + list(overrides or [])
    cfg = load_study_config(config or "tiny-study", list(overrides or []))
    out = out or Path("results") / cfg.name
    from regap.errors import RunInterrupted
    from regap.study.run import Study

    study = Study(cfg, out, work)
    if plan:
        from regap.run_lock import held_by_another_run
        from regap.study.units import plan_units

        todo = study.todo(unit)  # the asked-for units without a summary: nothing is read twice below
        names = {u.name for u in todo}
        progress: dict[str, str | None] = {}  # read once, shown per unit and counted by the estimate
        planned = plan_units(cfg)
        width = max([24] + [len(spec.name) + 1 for spec in planned])  # an ablation's name can be long
        for spec in planned:
            if unit and spec.name not in unit:
                state = "not asked for"
            elif spec.name not in names:
                state = "done"
            else:
                started = progress[spec.name] = study.runner(spec).training_progress()
                if held_by_another_run(study.work / "units" / spec.name):
                    state = "running (another process holds it" + (f"; {started})" if started else ")")
                else:
                    state = f"to run ({started})" if started else "to run"
            typer.echo(f"{spec.name:{width}s} {state}")
        if study.has_backbone():  # run once per study, on any trained unit's model
            typer.echo(f"{'backbone':{width}s} {'to run' if study.backbone_due() else 'done'}")
        for line in study.estimate(todo, progress):
            typer.echo(line)
        return
    if import_answers or audit_sample is not None or audit:
        _answers_and_audit(out, cfg, import_answers or [], audit_sample, audit)
        return
    if rejudge is not None:
        from regap.study.rejudge import rejudge_study

        names = [n.strip() for n in rejudge.split(",") if n.strip()]
        done = rejudge_study(out, names, cfg.safety.judge_options, log=typer.echo)
        if done["without_answers"]:
            typer.echo(f"note: no answers kept for {', '.join(done['without_answers'])}: their verdicts are as they were")
        no_run = True
    resume = "rerun the same command to continue (finished steps are reused)"
    try:  # each unit locks its own work folder, so several processes can share OUT
        if not no_run:
            study.run(unit, max_units)
        summary = study.aggregate()
    except RunInterrupted as exc:  # a training or safety step: its own where, the study's resume
        exc.where, exc.resume = f"study stopped: {exc.where}", resume
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(f"study stopped; finished steps are kept under {study.work}", resume) from None
    _print(summary)
    typer.echo(f"report: {out / 'report.html'}")


def _answers_and_audit(out: Path, cfg, imports: list[str], sample: int | None, audit: bool) -> None:
    from regap.errors import RegapError

    for spec in imports:
        unit, sep, folder = spec.partition("=")
        if not sep or not unit or not folder:
            raise RegapError(f"--import-answers: expected UNIT=FOLDER, got {spec!r}")
        from regap.study.answers import import_safety_run

        record = import_safety_run(out / "units", unit, Path(folder))
        typer.echo(f"{unit}: {record['rows']} answers kept; fingerprint matches the unit: "
                   f"{record['fingerprint_matches_unit']}; unsafe verdicts equal to the stored ones: "
                   + ", ".join(f"{j} {min(v.values()):.3f}-{max(v.values()):.3f}"
                               for j, v in record["unsafe_verdict_agreement_with_stored"].items()))
    if sample is not None:
        from regap.study.audit import draw_sample

        drawn = draw_sample(out, sample)
        typer.echo(f"{len(drawn)} answers drawn into {out / 'judge-audit' / 'sample.jsonl'}")
    if audit:
        from regap.study.audit import run_audit

        result = run_audit(out, list(cfg.safety.judges))
        typer.echo((out / "judge-audit" / "audit.md").read_text())
        typer.echo(f"main judge: {result['main_judge']['judge']}")


def _print(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    results = summary["results"]
    table = Table(title=f"regap study {summary['study']}: unsafe rate (judge {summary['primary_judge']}), "
                        f"{len(summary['units'])}/{len(summary['units_planned'])} units")
    table.add_column("arm")
    conditions = [c for c in summary["config"]["safety"]["conditions"] if c != "backbone"] + ["image (pooled)"]
    for c in conditions:
        table.add_column(c)
    table.add_column("QA")
    for arm, entry in results["arms"].items():
        cells = []
        for c in conditions:
            e = entry["unsafe"].get(c)
            cells.append(f"{e['mean']:.2f}" if e else "-")
        qa = entry.get("qa")
        table.add_row(arm, *cells, f"{qa['mean']:.2f}" if qa else "-")
    Console().print(table)
    for note in summary["notes"]:
        typer.echo(f"note: {note}")


def lambda_range_command(
    runs: List[Path] = typer.Argument(..., help="Stage-1 run folders (`regap pretrain` outputs), one per λ."),
    out: Path = out_option("a folder for stage1_sweep.json, stage1_sweep.md and the figure"),
    tail: int = typer.Option(16, "--tail", min=1, help="Caption loss: mean over this many last logged steps."),
) -> None:
    """ReGap's working range: equal stage-1 runs at several λ side by side (layer-0 gap, norm ratio, MIR,
    caption loss at the last probe), as a table and a figure against λ on a log axis."""
    from regap.study.lambda_range import table, write

    summary = write(runs, out, tail)
    for line in table(summary):
        typer.echo(line)
    for note in summary["notes"]:
        typer.echo(f"note: {note}")


def lambda_choose_command(
    sweep: Path = typer.Option(..., "--sweep", help="The stage-1 sweep's stage1_sweep.json (`regap lambda-range`)."),
    check: Path = typer.Option(..., "--check", help="The λ check study's results folder (or its summary.json)."),
    out: Optional[Path] = out_option("lambda_choice.json (optional)", default=None),
) -> None:
    """λ* by results/lambda-range/RULE.md: the knee and its three candidates from the sweep (caption loss),
    then the largest candidate whose held-out QA is within 0.05 of plain's (never a safety result). Read from
    the largest candidate down: the candidates the decision does not need may be left untrained."""
    from regap.study.lambda_range import choose

    result = choose(sweep, check, out)
    step1, step2 = result["step1"], result["step2"]
    typer.echo(f"step 1: knee λ_k = {step1['knee']:g} (caption loss bound {step1['bound']:.4g}); candidates "
               + ", ".join(f"{c:g}" for c in step1["candidates"]))
    typer.echo(f"step 2: plain QA {step2['plain_qa']:.3f}")
    for arm, row in step2["candidates"].items():
        if row["qa"] is None:
            typer.echo(f"  {arm}: not measured (the rule does not need it)")
            continue
        typer.echo(f"  {arm}: QA {row['qa']:.3f} ({row['qa_minus_plain']:+.3f}) "
                   + ("keeps utility" if row["keeps_utility"] else "below the margin"))
    typer.echo(f"λ* = {result['lambda_star']:g} ({step2['reason']})")


def register(app: typer.Typer) -> None:
    app.command("study", cls=RegapCommand)(study_command)
    app.command("lambda-range", cls=RegapCommand)(lambda_range_command)
    app.command("lambda-choose", cls=RegapCommand)(lambda_choose_command)
