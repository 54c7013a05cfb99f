"""The `regap` command. Each feature area registers its subcommands from `regap.commands`."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from regap import __version__
from regap.commands.options import RegapGroup
from regap.errors import RegapError, RunInterrupted, storage_problem
from regap.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Termination, sigterm_as_interrupt

app = typer.Typer(
    name="regap",
    help="Measure and close the modality gap that makes vision-language models unsafe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=RegapGroup,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"regap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """regap: build, measure, train, evaluate and defend LLaVA-style models."""
    from regap.precision import use_usable_cpus

    use_usable_cpus()


def _register_commands() -> None:
    from regap.commands import (correlate, data, defense, demo, gap, judge_validate, models, playground, report,
                                safety, study, train, utility)

    for module in (demo, study, models, train, gap, safety, utility, correlate, report, data, judge_validate, defense,
                   playground):
        module.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and return its exit status; user errors become one line on
    stderr (exit 2), Ctrl-C exits 130 with where the run stopped and how to resume it. SIGTERM
    (a scheduler's stop) takes Ctrl-C's path, so the run saves what it has, and exits 143."""
    with sigterm_as_interrupt() as termination:
        code = _run(argv, termination)
    if termination.received and code == EXIT_INTERRUPTED:
        return EXIT_TERMINATED
    return code


def _run(argv: list[str] | None, termination: Termination) -> int:
    try:
        code = app(args=argv, standalone_mode=False)
    except RegapError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except RunInterrupted as exc:
        typer.echo(f"{_stopped_by(termination)}: {exc}", err=True)
        return EXIT_INTERRUPTED
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        typer.echo(_stopped_by(termination), err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        problem = storage_problem(exc)  # a full disk, a read-only folder, a file in the way
        if problem is not None:
            typer.echo(f"error: {problem}", err=True)
            return 2
        # usage errors: click's ClickException, or the copy of click that typer >= 0.2x vendors
        # (click itself need not be installed then); both show one line and carry the exit code
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    # Without standalone mode typer returns the status instead of exiting: `typer.Exit(code)`
    # from a command, and 130 for a Ctrl-C that no command turned into `RunInterrupted`.
    if code == EXIT_INTERRUPTED:
        typer.echo(_stopped_by(termination), err=True)
    return code if isinstance(code, int) else 0


def _stopped_by(termination: Termination) -> str:
    return "terminated (SIGTERM)" if termination.received else "interrupted"


if __name__ == "__main__":
    sys.exit(main())
