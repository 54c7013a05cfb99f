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


#: errno names of storage problems the user fixes (space, limits, permissions, a file where a
#: folder is needed): the CLI shows these as one line instead of a traceback.
STORAGE_ERRNOS = {
    "ENOSPC": "the disk is full: free space and rerun (finished steps are kept)",
    "EDQUOT": "the disk quota is used up: free space and rerun (finished steps are kept)",
    "EFBIG": "a file reached the file-size limit (`ulimit -f`): raise it and rerun (finished steps are kept)",
    "EROFS": "the file system is read-only: choose a writable folder",
    "EACCES": "permission denied: choose a writable folder or fix its permissions",
    "EPERM": "operation not permitted: choose a writable folder or fix its permissions",
    "ENOTDIR": "a file is in the way where a folder is needed",
    "EISDIR": "a folder is in the way where a file is needed",
    "EEXIST": "a file is in the way where a folder is needed",
}


def storage_problem(exc: BaseException) -> str | None:
    """One line for an OSError that is a storage problem (STORAGE_ERRNOS), naming the path; None for
    anything else. safetensors reports its write errors as `SafetensorError("... IoError(Os { code:
    N ...")`: those are read as errno N."""
    import errno
    import os
    import re

    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"Os \{ code: (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    name = errno.errorcode.get(code) if code is not None else None
    if name not in STORAGE_ERRNOS:
        return None
    path = getattr(exc, "filename", None)
    return f"{path or 'a file'}: {os.strerror(code)} ({name}); {STORAGE_ERRNOS[name]}"
