"""Bad arguments are one-line errors before any model loads; `regap gap --images DIR` reports
unreadable files and refuses to reuse images silently."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from regap.cli import main


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import regap.models
    import regap.models.loading.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the argument check")

    monkeypatch.setattr(regap.models, "load_model", refuse)
    monkeypatch.setattr(regap.models.loading.load, "load_model", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [
    ["safety", "--model", "tiny"],
    ["gap", "--model", "tiny", "--pairs", "4"],
    ["pretrain", "tiny-stage1"],
])
def test_out_pointing_to_a_file(no_model_loads, tmp_path, capsys, command):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main([*command, "--out", str(target)]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert target.read_text() == "x"


@pytest.mark.parametrize("flag", ["--conditions", "--judge", "--prompts"])
def test_empty_name_lists(no_model_loads, tmp_path, capsys, flag):
    assert main(["safety", "--model", "tiny", "--out", str(tmp_path / "run"), flag, ""]) == 2
    assert f"{flag} is empty" in _error(capsys)


@pytest.mark.parametrize("command", [
    ["safety", "--model", "tiny", "--seed", "-1"],
    ["gap", "--model", "tiny", "--pairs", "4", "--seed", "-1"],
    ["pretrain", "tiny-stage1", "seed=-1"],
    ["pretrain", "tiny-stage1", "seed=4294967296"],
])
def test_bad_seeds(no_model_loads, tmp_path, capsys, command):
    assert main([*command, "--out", str(tmp_path / "run")]) == 2
    assert "seed" in _error(capsys)


def _folder(tmp_path, good: int, bad: int):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(good):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(folder / f"good{i}.png")
    for i in range(bad):
        (folder / f"bad{i}.png").write_bytes(b"not an image")
    return folder


def test_gap_folder_with_too_few_readable_images_is_refused(no_model_loads, tmp_path, capsys):
    folder = _folder(tmp_path, good=1, bad=2)
    assert main(["gap", "--model", "tiny", "--out", str(tmp_path / "out"), "--images", str(folder),
                 "--pairs", "3", "--n-boot", "0"]) == 2
    err = _error(capsys)
    assert "1 readable image(s) for 3 pairs" in err and "2 unreadable" in err and "bad0.png" in err
    assert "--reuse-images" in err


def test_gap_reuse_images_is_explicit_and_problems_are_reported(tmp_path, capsys):
    from regap.models import save_model
    from regap.models.random_tiny import tiny_random_lvlm

    model = str(save_model(tiny_random_lvlm(), tmp_path / "model", include_backbones=True))
    folder = _folder(tmp_path, good=2, bad=1)
    out = tmp_path / "out"
    assert main(["gap", "--model", model, "--out", str(out), "--images", str(folder), "--pairs", "3",
                 "--n-boot", "0", "--reuse-images"]) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    provenance = json.loads((out / "gap.json").read_text())["provenance"]
    assert provenance["reuse_images"] is True and len(provenance["image_problems"]) == 1
    assert "bad0.png" in provenance["image_problems"][0]
    assert [p.split("|")[0] for p in provenance["pair_ids"]] == ["good0.png", "good1.png", "good0.png"]


def test_make_pairs_reports_problems_to_the_caller(tmp_path):
    from regap.errors import RegapError
    from regap.safety.pairs import make_pairs

    folder = _folder(tmp_path, good=3, bad=1)
    problems: list[str] = []
    pairs = make_pairs(3, images=str(folder), problems=problems)
    assert len({p.id.split("|")[0] for p in pairs}) == 3 and len(problems) == 1
    with pytest.raises(RegapError, match="3 readable image"):
        make_pairs(4, images=str(folder))
