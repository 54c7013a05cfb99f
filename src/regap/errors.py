"""User-facing errors.

Every problem caused by the user's input (a file, a field, a name) is raised as a
`RegapError` with a one-line message that names the item. The CLI prints that line
and exits with status 2 instead of showing a traceback from deep inside a library.
"""


class RegapError(Exception):
    """An error the user can fix; its message names the offending item."""


class MissingDependencyError(RegapError):
    """An optional package is not installed; the message gives the exact install command."""
