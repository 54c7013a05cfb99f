"""`--resume` on a folder without checkpoints is said only when the user passed --resume: the study
and the demo always resume, and a fresh training must not print a note about a flag nobody gave."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regap.cli import main


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from regap.data import generate_synthetic

    folder = tmp_path_factory.mktemp("resume-note")
    generate_synthetic(folder / "synth", 4, seed=0, image_size=56)
    path = folder / "one-step.yaml"
    path.write_text(yaml.safe_dump({
        "stage": 1, "model": "tiny-random", "seed": 0, "data": {"json": str(folder / "synth" / "captions.json")},
        "global_batch_size": 2, "per_device_batch_size": 2, "max_steps": 1, "save_every": 1, "max_length": 128,
        "observe": {"progress": True, "gap_every": 0, "mir_every": 0}}))
    return path


def test_a_resume_asked_for_by_the_library_starts_quietly(config, tmp_path, capsys):
    """As `regap study` and `regap demo` call it for every unit, finished or fresh."""
    from regap.train import load_config, train

    assert train(load_config(str(config)), tmp_path / "run", resume=True).status == "completed"
    assert "--resume" not in capsys.readouterr().out
    assert "--resume" not in (tmp_path / "run" / "train.log").read_text()


def test_the_cli_says_when_resume_finds_no_checkpoint(config, tmp_path, capsys):
    assert main(["pretrain", str(config), "--out", str(tmp_path / "fresh")]) == 0
    assert "--resume" not in capsys.readouterr().out
    assert main(["pretrain", str(config), "--out", str(tmp_path / "asked"), "--resume"]) == 0
    assert f"--resume: no checkpoint in {tmp_path / 'asked'}; starting from scratch" in capsys.readouterr().out
