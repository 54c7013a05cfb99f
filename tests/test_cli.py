"""The `regap` command: help on every subcommand, version, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from regap import __version__
from regap.cli import app, main

runner = CliRunner()


def _subcommands() -> list[list[str]]:
    import typer.main

    group = typer.main.get_command(app)
    paths = []
    for name, command in group.commands.items():
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("path", _subcommands())
def test_every_subcommand_has_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_models_lists_presets_as_json():
    import json

    result = runner.invoke(app, ["models", "--json"])
    names = [row["name"] for row in json.loads(result.output)]
    assert names[:2] == ["tiny", "small"] and "llava-1.5-7b" in names


def test_user_errors_are_one_line(capsys, tmp_path):
    assert main(["chat", "--model", "no-such-model", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no-such-model'") and "\n" not in err
    assert main(["chat", "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["chat", "--engine", "turbo", "hi"]) == 2
    err = capsys.readouterr().err
    assert "turbo" in err and "transformers, static, vllm" in err


def test_hub_id_without_network_is_one_line(monkeypatch, capsys):
    import huggingface_hub.constants

    # offline mode (read at call time) instead of waiting for connection retries to time out
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["chat", "--model", "someone/not-a-real-llava", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "someone/not-a-real-llava" in err and "\n" not in err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "regap.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "regap" in result.stdout


@pytest.fixture
def extra_commands():
    """Register throwaway commands on the real app; removed again afterwards."""
    added = []

    def add(name, function):
        app.command(name)(function)
        added.append(app.registered_commands[-1])

    yield add
    for info in added:
        app.registered_commands.remove(info)


def test_main_returns_the_exit_status_of_the_command(extra_commands, capsys):
    import typer

    from regap.errors import RunInterrupted

    def exits() -> None:
        raise typer.Exit(3)

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    def stopped() -> None:
        raise RunInterrupted("stopped at step 2/5", "continue with --resume")

    for name, function in (("t-exit", exits), ("t-ctrl-c", ctrl_c), ("t-stopped", stopped)):
        extra_commands(name, function)
    assert main(["t-exit"]) == 3
    assert main(["t-ctrl-c"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert main(["t-stopped"]) == 130
    assert capsys.readouterr().err == "interrupted: stopped at step 2/5; continue with --resume\n"
    assert main(["--no-such-option"]) == 2


def test_sigterm_takes_ctrl_c_path_exits_143_and_a_repeat_does_not_cut_the_save_short(extra_commands, capsys):
    import os
    import signal
    import time

    saved: list[str] = []

    def terminated() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            saved.append("not interrupted")
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating the signal while the run saves
            time.sleep(0.05)
            saved.append("checkpoint")
            raise

    extra_commands("t-sigterm", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["t-sigterm"]) == 143
    assert saved == ["checkpoint"]
    assert capsys.readouterr().err.strip() == "terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only while the command runs


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv, patch, expected", [
    (["safety", "--limit", "1"], "regap.models.load_model", "interrupted: safety run stopped while loading tiny"),
    (["gap", "--pairs", "2"], "regap.models.load_model", "interrupted: gap measurement stopped before"),
    (["utility", "--n", "1"], "regap.models.load_model", "interrupted: utility run stopped; the responses"),
    (["demo", "--fast"], "regap.study.demo.run_families", "interrupted: demo stopped; finished steps are recorded"),
], ids=["safety", "gap", "utility", "demo"])
def test_ctrl_c_in_a_command_exits_130_saying_where(argv, patch, expected, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(patch, _ctrl_c)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and "\n" not in err


def test_demo_names_its_own_resume_for_an_interrupted_step(monkeypatch, tmp_path, capsys):
    from regap.errors import RunInterrupted

    def stopped(*args, **kwargs):
        raise RunInterrupted("training stopped at step 3/8", "continue with --resume --out somewhere")

    monkeypatch.setattr("regap.study.demo.run_families", stopped)
    assert main(["demo", "--fast", "--out", str(tmp_path / "demo")]) == 130
    assert capsys.readouterr().err == ("interrupted: demo stopped: training stopped at step 3/8; "
                                       "rerun the same command to continue (finished steps are reused)\n")


def test_an_internal_error_is_not_printed_as_a_user_error(extra_commands, capsys):
    """A bug (InternalError) keeps its traceback: `main` does not turn it into one line and exit 2."""
    from regap.errors import InternalError, RegapError

    def broken() -> None:
        raise InternalError("3 image slots but 1 image(s) x 2 tokens")

    extra_commands("t-broken", broken)
    assert not issubclass(InternalError, RegapError)
    with pytest.raises(InternalError, match="3 image slots"):
        main(["t-broken"])
    assert "error:" not in capsys.readouterr().err
