"""Child processes that a test interrupts with SIGINT must start with SIGINT's default action.

A shell that starts a job in the background (`cmd &` without job control, as nohup-style CI launchers
do) makes it ignore SIGINT, and children inherit that. Python then never raises KeyboardInterrupt,
and a Ctrl-C test would see its run finish normally."""

import signal


def default_sigint() -> None:
    """`preexec_fn` for `subprocess.Popen`: SIGINT back to its default disposition in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
