"""User-facing errors, and the one error that is not.

Every problem caused by the user's input (a file, a field, a name) is raised as a
`RegapError` with a one-line message that names the item. The CLI prints that line
and exits with status 2 instead of showing a traceback from deep inside a library.
A broken invariant inside regap (a bug) is an `InternalError` instead, so it is never
shown as something the user should fix.
"""


class RegapError(Exception):
    """An error the user can fix; its message names the offending item."""


class MissingDependencyError(RegapError):
    """An optional package is not installed; the message gives the exact install command."""


class InternalError(Exception):
    """An invariant of regap's own code does not hold: a bug, not something the user can fix.

    Not a `RegapError`: the CLI shows its traceback (to report) instead of one line, and the
    `except RegapError` blocks that record a bad item and go on do not swallow it."""


class RunInterrupted(Exception):
    """A long run stopped by Ctrl-C after saving what it had.

    Not a `RegapError`: the CLI exits with 130 (the shell's code for SIGINT), not 2, and
    prints `where` the run stopped and `resume`, how to continue it. Commands that know
    the exact command line may replace `resume` before it reaches the CLI.
    """

    def __init__(self, where: str, resume: str = "rerun the same command to resume") -> None:
        super().__init__(where)
        self.where = where
        self.resume = resume

    def __str__(self) -> str:
        return f"{self.where}; {self.resume}"
