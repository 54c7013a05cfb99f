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


def test_a_lock_that_is_a_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".regap.lock").mkdir(parents=True)
    with pytest.raises(RegapError, match=r"\.regap\.lock is a folder, not regap's lock file"):
        with exclusive_out(out):
            pass
    assert main(["utility", "--n", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder, not regap's lock file" in err and "\n" not in err


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RegapError, match=r"--out .*file/run: cannot create the folder"):
        with exclusive_out(blocker / "run"):
            pass


def test_an_unwritable_out_is_one_line(tmp_path, monkeypatch):
    """A read-only --out (tested by making the lock file's creation fail: the tests may run as root)."""
    import errno

    import filelock

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / ".regap.lock"))

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    with pytest.raises(RegapError, match=r"cannot create the lock file .*Permission denied.*choose a writable folder"):
        with exclusive_out(tmp_path / "run"):
            pass


def test_a_file_is_locked_like_a_folder(tmp_path):
    from regap.run_lock import exclusive_file

    target = tmp_path / "calibration.safetensors"
    with exclusive_file(target):
        with pytest.raises(RegapError, match="is in use by another regap run"):
            with exclusive_file(target):
                pass
    with exclusive_file(target):  # free again
        pass
    with pytest.raises(RegapError, match="is a folder, not a file"):
        with exclusive_file(tmp_path):
            pass


@pytest.mark.parametrize("name", ["ENOSPC", "EFBIG", "EROFS", "EACCES", "ENOTDIR"])
def test_storage_errors_are_one_line(monkeypatch, capsys, tmp_path, name):
    """A full disk, a file-size limit, a read-only or blocked folder anywhere in a command: one line."""
    import errno

    def fail(run_dir):
        raise OSError(getattr(errno, name), os.strerror(getattr(errno, name)), str(tmp_path / "x.json"))

    monkeypatch.setattr("regap.commands.report.report_folder", fail)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'x.json'}: ") and f"({name})" in err and "\n" not in err


def test_a_safetensors_write_error_is_one_line(monkeypatch, capsys, tmp_path):
    from safetensors import SafetensorError

    def fail(run_dir):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr("regap.commands.report.report_folder", fail)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device (ENOSPC)" in err and "\n" not in err


def test_defense_calibrate_holds_its_out_file(no_work, tmp_path, capsys):
    from regap.run_lock import exclusive_file

    target = tmp_path / "cmrm.safetensors"
    with exclusive_file(target):
        assert main(["defense", "calibrate", "cmrm", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {target} is in use by another regap run" in err and "\n" not in err


def test_a_study_out_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(["study", "--fast", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0] and "(ENOTDIR)" in errors[0] and "Traceback" not in err
    assert blocker.read_text() == "mine"
