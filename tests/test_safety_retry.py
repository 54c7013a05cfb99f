"""Safety caches: failed items are retried, changed benchmark images regenerated, damaged cache
lines skipped and recorded; error counts reach the console."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from regap.cli import main
from regap.files import file_sha256


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from regap.models import save_model
    from regap.models.random_tiny import tiny_random_lvlm

    return str(save_model(tiny_random_lvlm(), tmp_path_factory.mktemp("m") / "model", include_backbones=True))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mmsb(root: Path, n: int) -> Path:
    """A minimal MM-SafetyBench folder with `n` questions and their SD_TYPO images."""
    (root / "processed_questions").mkdir(parents=True)
    questions = {str(i): {"Question": f"How to do bad thing {i}?", "Changed Question": "q", "Key Phrase": "bad thing",
                          "Phrase Type": "activity", "Rephrased Question": f"The image shows an activity {i}. How?",
                          "Rephrased Question(SD)": "q"} for i in range(n)}
    (root / "processed_questions" / "01-Illegal_Activitiy.json").write_text(json.dumps(questions))
    images = root / "imgs" / "01-Illegal_Activitiy" / "SD_TYPO"
    images.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), "white").save(images / f"{i}.jpg")
    return images


def test_error_rows_are_retried_and_changed_images_regenerated(saved_model, tmp_path, capsys):
    root = tmp_path / "mmsb"
    images = _mmsb(root, 2)
    (images / "1.jpg").write_bytes(b"corrupt")
    out = tmp_path / "run"
    args = ["safety", "--model", saved_model, "--out", str(out), "--prompts", f"mmsafetybench:{root}",
            "--conditions", "benchmark", "--max-new-tokens", "3"]
    assert main(args) == 0
    console = capsys.readouterr().out
    assert "2 item(s), 1 generation error(s)" in console and "retried on the next run" in console
    assert json.loads((out / "summary.json").read_text())["generation_errors"] == 1

    Image.new("RGB", (40, 40), "white").save(images / "1.jpg")  # the image is fixed
    assert main(args) == 0
    assert "0 generation error(s)" in capsys.readouterr().out
    rows = _lines(out / "results.jsonl")
    assert len(rows) == 2 and not any(r["error"] for r in rows) and all(r["response"] is not None for r in rows)
    assert json.loads((out / "summary.json").read_text())["generation_errors"] == 0

    before = len(_lines(out / "generations.jsonl"))
    assert main(args) == 0  # nothing changed: nothing is generated again
    assert len(_lines(out / "generations.jsonl")) == before
    Image.new("RGB", (40, 40), "black").save(images / "0.jpg")  # same name, other picture
    assert main(args) == 0
    generated = _lines(out / "generations.jsonl")
    assert len(generated) == before + 1 and generated[-1]["input_sha256"] == file_sha256(images / "0.jpg")


def test_a_condition_where_every_item_failed_shows_no_nan(saved_model, tmp_path, capsys):
    root = tmp_path / "mmsb"
    images = _mmsb(root, 1)
    (images / "0.jpg").write_bytes(b"corrupt")
    assert main(["safety", "--model", saved_model, "--out", str(tmp_path / "run"), "--prompts", f"mmsafetybench:{root}",
                 "--conditions", "benchmark", "--max-new-tokens", "3"]) == 0
    console = capsys.readouterr().out
    assert "nan" not in console and "1 generation error(s)" in console


def test_undecodable_cache_line_is_skipped_and_recorded(tmp_path):
    from regap.safety.store import JsonlStore

    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"key": "a", "v": 1}\n{"key": "b", "v": "\xff\xfe"}\n{"key": "c", "v": 3}\n')
    store = JsonlStore(path)
    assert sorted(r["key"] for r in store.rows()) == ["a", "c"]
    assert store.skipped == [{"line": 2, "reason": store.skipped[0]["reason"]}]
    assert "UTF-8" in store.skipped[0]["reason"]


def test_undecodable_line_in_a_run_cache_is_redone_and_reported(saved_model, tmp_path):
    out = tmp_path / "run"
    args = ["safety", "--model", saved_model, "--out", str(out), "--limit", "2", "--max-new-tokens", "2",
            "--conditions", "text"]
    assert main(args) == 0
    cache = out / "generations.jsonl"
    first, second = cache.read_bytes().splitlines(keepends=True)
    cache.write_bytes(first + second.replace(b'"response"', b'"resp\xffonse"'))
    with pytest.warns(UserWarning, match=r"generations\.jsonl: skipped 1 unreadable line"):
        assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_skipped_lines"]["generations.jsonl"][0]["line"] == 2
    assert len(_lines(out / "results.jsonl")) == 2
