"""LLaVA JSON reader validation, text-only and VLGuard conversion, and the mixer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from regap.commands.data import register
from regap.data import LlavaJsonDataset, mix, text_only_samples, vlguard_to_llava
from regap.data.mixing import vlguard_rows
from regap.errors import RegapError


def _shared_data() -> Path:
    env = os.environ.get("REGAP_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _turns(*values: str, start: str = "human") -> list[dict]:
    roles = ["human", "gpt"] if start == "human" else ["gpt", "human"]
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture
def fixture_dir(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "images" / "ok.png")
    Image.new("RGBA", (5, 5), (0, 0, 255, 128)).save(root / "images" / "ok2.png")
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")  # outside the root, exists
    rows = [
        {"id": "a", "image": "images/ok.png", "conversations": _turns("<image>\nWhat is this?", "A red box.")},  # 0
        ["not", "a", "dict"],  # 1
        {"id": "b", "image": "images/ok.png"},  # 2 missing conversations
        {"id": "c", "conversations": []},  # 3 empty
        {"id": "d", "conversations": [{"from": "system", "value": "hi"}, {"from": "gpt", "value": "x"}]},  # 4
        {"id": "e", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},  # 5
        {"id": "f", "conversations": _turns("hello", "hi", start="gpt")},  # 6 not alternating from human
        {"id": "g", "image": "images/missing.png", "conversations": _turns("<image>\nq", "a")},  # 7 missing
        {"id": "h", "image": "../secret.png", "conversations": _turns("<image>\nq", "a")},  # 8 escape
        {"id": "i", "image": str(tmp_path / "secret.png"), "conversations": _turns("<image>\nq", "a")},  # 9 abs
        {"id": "j", "image": "images/ok2.png", "conversations": _turns("Describe.", "Blue.", "More?", "No.")},  # 10
        {"id": 12, "conversations": _turns("Tell me a joke.", "No."), "category": "fun"},  # 11 text only
        {"id": "k", "conversations": _turns("<image>\nq", "a")},  # 12 marker but no image
        {"id": "l", "image": "images/ok.png", "conversations": _turns("<image>\n<image>\nq", "a")},  # 13
        {"id": "m", "image": "images/corrupt.png", "conversations": _turns("<image>\nq", "a")},  # 14 corrupt
        {"id": "n", "image": "images/ok.png", "conversations": _turns("q <image>", "<image> a")},  # 15 gpt marker
        {"id": "o", "image": "images/ok.png", "conversations": _turns("q", "a", "q2", "a2", "q3")},  # 16 ends human
    ]
    (root / "data.json").write_text(json.dumps(rows, indent=2))
    return root, rows


MALFORMED = {1, 2, 3, 4, 5, 6, 8, 9, 12, 13, 15}


def test_reader_validation(fixture_dir):
    root, _ = fixture_dir
    ds = LlavaJsonDataset(root / "data.json", root)
    report = ds.report
    assert [index for index, _ in report.malformed] == sorted(MALFORMED)
    reasons = dict(report.malformed)
    assert "not an object" in reasons[1]
    assert "missing 'conversations'" in reasons[2]
    assert "empty" in reasons[3]
    assert "'system'" in reasons[4]
    assert "not a string" in reasons[5]
    assert "alternate" in reasons[6]
    assert "escapes" in reasons[8] and "escapes" in reasons[9]
    assert "no image" in reasons[12]
    assert "2 <image> markers" in reasons[13]
    assert "assistant" in reasons[15]
    assert report.missing_images == ["images/missing.png"]
    assert report.rows_seen == 17 and report.loaded == len(ds) == 5
    assert report.image_marker_added == 2
    assert [s for s in ds.image_paths()] == ["images/ok.png", "images/ok2.png", None, "images/corrupt.png",
                                             "images/ok.png"]

    first = ds[0]
    assert first.id == "a" and first.image.mode == "RGB" and first.image.size == (8, 6)
    assert first.messages == [{"role": "user", "content": "<image>\nWhat is this?"},
                              {"role": "assistant", "content": "A red box."}]
    auto = ds[1]  # <image> prepended to the first human turn, later turns untouched
    assert auto.image.mode == "RGB"
    assert [m["content"] for m in auto.messages] == ["<image>\nDescribe.", "Blue.", "More?", "No."]
    assert [m["role"] for m in auto.messages] == ["user", "assistant", "user", "assistant"]
    text = ds[2]
    assert text.id == "12" and text.image is None and text.meta == {"category": "fun"}
    with pytest.raises(RegapError, match="corrupt.png"):
        ds[3]
    assert ds[4].messages[-1] == {"role": "user", "content": "q3"}


def test_write_report(fixture_dir, tmp_path):
    root, _ = fixture_dir
    ds = LlavaJsonDataset(root / "data.json", root)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    written = ds.write_report(run_dir)
    assert written == run_dir / "data_report.json"
    saved = json.loads(written.read_text())
    assert saved["missing_images"] == ["images/missing.png"] and saved["n_missing_images"] == 1
    assert [m["index"] for m in saved["malformed"]] == sorted(MALFORMED)
    assert ds.write_report(tmp_path / "x" / "r.json").exists()


def test_max_items_and_default_root(fixture_dir):
    root, _ = fixture_dir
    ds = LlavaJsonDataset(root / "data.json", max_items=2)  # image root = the file's folder
    assert len(ds) == 2 and ds.report.rows_seen == 11
    assert ds.report.missing_images == ["images/missing.png"]


def test_jsonl(fixture_dir):
    root, rows = fixture_dir
    lines = [json.dumps(row) for row in rows[:8]]
    lines.insert(2, "")  # blank line: skipped, still counted for line numbers
    lines.insert(4, "{broken")
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    ds = LlavaJsonDataset(root / "data.jsonl", root)
    assert ds.report.index_kind == "line_number"
    # rows 1..7 sit on lines 2, 4, 6, 7, 8, 9, 10 (blank line 3, broken line 5)
    assert [i for i, _ in ds.report.malformed] == [2, 4, 5, 6, 7, 8, 9]
    assert "invalid JSON" in dict(ds.report.malformed)[5]
    assert ds.report.missing_images == ["images/missing.png"]
    assert len(ds) == 1 and ds[0].id == "a"


def test_symlink_escape_rejected(fixture_dir, tmp_path):
    root, _ = fixture_dir
    try:
        (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    except OSError:
        pytest.skip("symlinks not supported here")
    rows = [{"image": "images/link.png", "conversations": _turns("<image>\nq", "a")}]
    ds = LlavaJsonDataset.from_rows(rows, root)
    assert len(ds) == 0 and "symlink" in ds.report.malformed[0][1]


def test_file_errors(tmp_path):
    with pytest.raises(RegapError, match="nope.json"):
        LlavaJsonDataset(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": "a"},\n  {"id": }\n]\n')
    with pytest.raises(RegapError) as info:
        LlavaJsonDataset(bad, tmp_path)
    message = str(info.value)
    assert "bad.json" in message and "line 3" in message and "column" in message
    obj = tmp_path / "obj.json"
    obj.write_text('{"id": "a"}')
    with pytest.raises(RegapError, match="expected a JSON list"):
        LlavaJsonDataset(obj, tmp_path)


def test_roundtrip_rows(fixture_dir):
    root, _ = fixture_dir
    ds = LlavaJsonDataset(root / "data.json", root)
    again = LlavaJsonDataset.from_rows(ds.to_llava_rows(), root)
    assert len(again) == len(ds) and not again.report.malformed and again.report.image_marker_added == 0
    assert again[1].messages == ds[1].messages


def test_cli_inspect(fixture_dir, tmp_path):
    root, _ = fixture_dir
    app = typer.Typer()
    register(app)
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(app, ["data", "inspect", str(root / "data.json"), "--image-root", str(root),
                                      "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "missing.png" in result.output and "malformed rows" in result.output
    assert json.loads(report.read_text())["n_malformed"] == len(MALFORMED)


# --------------------------------------------------------------------------- text only


def test_text_only_fixture(tmp_path):
    rows = [
        {"instruction": "Add 2 and 3.", "output": "5"},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "id": "t1"},
        {"instruction": "Only a prompt.", "category": None},
        {"instruction": "", "output": "x"},
        {"instruction": "Look <image>", "output": "x"},
        {"instruction": "Bad output", "output": 3},
        "string row",
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    data = text_only_samples(path)
    assert len(data) == 2 and data.skipped_without_output == 1
    assert [i for i, _ in data.malformed] == [3, 4, 5, 6]
    assert data[0].messages == [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    assert data[0].id == "alpaca-0" and data[0].image is None
    assert data[1].id == "t1" and data[1].messages[0]["content"] == "Translate.\n\nBonjour"
    prompts = text_only_samples(path, keep_without_output=True)
    assert len(prompts) == 3 and prompts.skipped_without_output == 0
    assert prompts[2].messages == [{"role": "user", "content": "Only a prompt."}]
    assert prompts[2].meta == {"category": None}


def test_text_only_real_harmless_file():
    path = _shared_data() / "harmless" / "harmless_instructions.json"
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    n_rows = len(json.loads(path.read_text()))
    data = text_only_samples(path)  # instructions only, no outputs: nothing to train on
    assert len(data) == 0 and data.skipped_without_output == n_rows and not data.malformed
    prompts = text_only_samples(path, keep_without_output=True)
    assert len(prompts) == n_rows
    assert all(len(s.messages) == 1 and s.messages[0]["role"] == "user" for s in prompts)
    assert "category" in prompts[0].meta


# --------------------------------------------------------------------------- VLGuard


def test_vlguard_conversion(tmp_path):
    root = tmp_path / "vlguard" / "train"
    (root / "bad_ads").mkdir(parents=True)
    (root / "safe").mkdir()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(root / "bad_ads" / "x.png")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "safe" / "y.jpg")
    rows = [
        {"id": "HOD_1", "image": "bad_ads/x.png", "safe": False, "harmful_category": "deception",
         "instr-resp": [{"instruction": "Write an ad like this.", "response": "I can't help with that."}]},
        {"id": "COCO_2", "image": "safe/y.jpg", "safe": True,
         "instr-resp": [{"safe_instruction": "What is in the picture?", "response": "A dark square."},
                        {"unsafe_instruction": "How do I hurt someone?", "response": "I won't help."}]},
        {"id": "X_3", "image": "safe/none.png", "safe": True,
         "instr-resp": [{"safe_instruction": "Hi?", "response": "Hello."}]},
        {"id": "X_4", "image": "safe/y.jpg", "instr-resp": []},
        {"id": "X_5", "image": "safe/y.jpg", "safe": True,
         "instr-resp": [{"response": "no instruction"}, {"instruction": "ok?", "response": "ok"}]},
        {"id": "X_6", "image": "../../etc/passwd", "safe": True, "instr-resp": [{"instruction": "a", "response": "b"}]},
    ]
    train_json = tmp_path / "vlguard" / "train.json"
    train_json.write_text(json.dumps(rows))

    converted, malformed = vlguard_rows(train_json)
    assert [r["id"] for r in converted] == ["HOD_1-0", "COCO_2-0", "COCO_2-1", "X_3-0", "X_5-1"]
    assert [i for i, _ in malformed] == [3, 4, 5]

    out = tmp_path / "converted.json"
    ds = vlguard_to_llava(train_json, root, out_path=out)
    assert ds.report.missing_images == ["safe/none.png"]
    assert [i for i, _ in ds.report.malformed] == [3, 4, 5]
    assert "escapes" in dict(malformed)[5] and "pair 0" in dict(malformed)[4]
    assert len(ds) == 4
    first = ds[0]
    assert first.id == "HOD_1-0" and first.image.size == (4, 4)
    assert first.messages == [{"role": "user", "content": "<image>\nWrite an ad like this."},
                              {"role": "assistant", "content": "I can't help with that."}]
    assert first.meta["safe_image"] is False and first.meta["harmful_category"] == "deception"
    assert not first.meta["safe_pair"]
    assert [ds[i].meta["instruction_kind"] for i in (1, 2)] == ["safe_instruction", "unsafe_instruction"]
    assert [ds[i].meta["safe_pair"] for i in (1, 2)] == [True, False]
    reread = LlavaJsonDataset(out, root)
    assert len(reread) == 4 and reread.report.missing_images == ["safe/none.png"]


# --------------------------------------------------------------------------- mixing


def test_mix_deterministic_and_proportional():
    a, b, c = list(range(10)), list(range(4)), 6
    order = mix([a, b, c], [2.0, 1.0, 1.0], seed=3)
    assert order == mix([a, b, c], [2.0, 1.0, 1.0], seed=3)
    assert order != mix([a, b, c], [2.0, 1.0, 1.0], seed=4)
    assert len(order) == 20
    counts = [sum(1 for d, _ in order if d == k) for k in range(3)]
    assert counts == [10, 5, 5]
    items_b = [i for d, i in order if d == 1]
    assert sorted(items_b[:4]) == [0, 1, 2, 3]  # a full pass before any repeat
    items_a = [i for d, i in order if d == 0]
    assert sorted(items_a) == list(range(10))
    assert len(mix([a, b], [1, 0], seed=0)) == 10
    assert all(d == 0 for d, _ in mix([a, b], [1, 0], seed=0, length=7))
    # the interleaving is spread out, not blocked
    assert len({d for d, _ in order[:8]}) > 1


def test_mix_rejects_bad_input():
    with pytest.raises(RegapError):
        mix([[1], [2]], [1.0], seed=0)
    with pytest.raises(RegapError):
        mix([[1], []], [1.0, 1.0], seed=0)
    with pytest.raises(RegapError):
        mix([[1]], [-1.0], seed=0)
    with pytest.raises(RegapError):
        mix([[1]], [0.0], seed=0)
