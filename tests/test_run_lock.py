"""One run per output folder: a second run on a folder in use fails at once with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from regap.cli import main
from regap.errors import RegapError
from regap.run_lock import exclusive_out


def _must_not_run(*args, **kwargs):
    raise AssertionError("the command started its work although --out was locked by another run")


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work fails loudly, so a missing lock check cannot start a real run."""
    import regap.study.demo
    import regap.models
    import regap.train.loop

    monkeypatch.setattr(regap.models, "load_model", _must_not_run)
    monkeypatch.setattr(regap.train.loop, "train", _must_not_run)
    monkeypatch.setattr(regap.study.demo, "run_families", _must_not_run)


@pytest.mark.parametrize("argv", [
    ["safety", "--limit", "1"],
    ["gap", "--pairs", "2"],
    ["utility", "--n", "1"],
    ["pretrain", "tiny-stage1"],
    ["finetune", "tiny-stage2"],
    ["demo", "--fast"],
], ids=lambda argv: argv[0])
def test_a_second_run_on_the_same_out_is_refused(argv, no_work, tmp_path, capsys):
    out = tmp_path / "run"
    with exclusive_out(out):
        assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out} is in use by another regap run") and "\n" not in err


def test_the_lock_is_per_process_and_dies_with_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom regap.run_lock import exclusive_out\n"
         "with exclusive_out(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RegapError, match="in use by another regap run"):
            with exclusive_out(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_out(out):  # the OS dropped the dead run's lock: no stale lock blocks the folder
        pass
    with exclusive_out(out):  # and it is free again after a run ends
        pass


def test_out_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RegapError, match="is a file, not a folder"):
        with exclusive_out(path):
            pass
