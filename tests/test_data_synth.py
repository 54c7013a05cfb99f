"""The synthetic shape data set: determinism, exact captions and answers, real pixels."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from regap.commands.data import register
from regap.data import LlavaJsonDataset, SceneSpec, caption, generate_synthetic, qa_pairs, render_scene, sample_scene
from regap.data.synth import (
    BACKGROUNDS,
    CAPTION_PROMPTS,
    COLORS,
    POSITION_NAMES,
    QUESTION_TYPES,
    SHAPES,
    item_rng,
    object_layout,
    synth_item,
)
from regap.errors import RegapError

N_SCENES = 300
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}


def _scenes(n: int = N_SCENES, seed: int = 123) -> list[SceneSpec]:
    return [sample_scene(item_rng(seed, i)) for i in range(n)]


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(tmp_path):
    generate_synthetic(tmp_path / "a", 12, seed=7)
    generate_synthetic(tmp_path / "b", 12, seed=7)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("images/")]) == 12
    for name in a:
        assert a[name] == b[name], name


def test_item_does_not_depend_on_n(tmp_path):
    generate_synthetic(tmp_path / "small", 3, seed=5)
    generate_synthetic(tmp_path / "big", 10, seed=5)
    for name in ("captions.json", "instructions.json"):
        small = json.loads((tmp_path / "small" / name).read_text())
        big = json.loads((tmp_path / "big" / name).read_text())
        assert big[:3] == small
    small_qa = json.loads((tmp_path / "small" / "qa_eval.json").read_text())
    big_qa = json.loads((tmp_path / "big" / "qa_eval.json").read_text())
    assert big_qa[: len(small_qa)] == small_qa
    for i in range(3):
        name = f"images/train_{i:06d}.png"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()
    small_scenes = (tmp_path / "small" / "scenes.jsonl").read_text().splitlines()
    big_scenes = (tmp_path / "big" / "scenes.jsonl").read_text().splitlines()
    assert big_scenes[:3] == small_scenes


def test_seed_and_split_change_the_items():
    base = [synth_item(0, i).caption for i in range(20)]
    assert base != [synth_item(1, i).caption for i in range(20)]
    assert base != [synth_item(0, i, "eval").caption for i in range(20)]
    assert synth_item(0, 3, "eval").id == "eval_000003"


# --------------------------------------------------------------------------- scenes


def test_scene_constraints():
    for spec in _scenes():
        assert 1 <= spec.n_objects <= 4
        assert 1 <= len(spec.groups) <= 3
        assert spec.background in BACKGROUNDS
        positions = [g.position for g in spec.groups]
        assert len(set(positions)) == len(positions)
        assert positions == sorted(positions, key=POSITION_NAMES.index)
        pairs = [(g.color, g.shape) for g in spec.groups]
        assert len(set(pairs)) == len(pairs)
        for g in spec.groups:
            assert g.shape in SHAPES and g.color in COLORS
            assert g.count == 1 or g.size == "small"
        assert SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_caption_matches_scene():
    seen_counts = set()
    for spec in _scenes():
        text = caption(spec)
        assert text[0].isupper()
        suffix = f", on a {spec.background} background."
        assert text.endswith(suffix), text
        body = text[: -len(suffix)]
        phrases = re.split(r", | and ", body[0].lower() + body[1:])
        assert len(phrases) == len(spec.groups), text
        for phrase, g in zip(phrases, spec.groups):
            words = phrase.split()
            seen_counts.add(g.count)
            assert words[0] == COUNT_WORDS[g.count], text
            assert words[1] == g.size
            assert (g.texture in words) == (g.texture != "solid")
            noun = g.shape if g.count == 1 else g.shape + "s"
            assert f"{g.color} {noun} {POSITION_PHRASES[g.position]}" in phrase, text
            assert phrase.endswith(POSITION_PHRASES[g.position])
        for color in COLORS:  # every colour mentioned exactly as often as it is used
            assert len(re.findall(rf"\b{color}\b", body)) == sum(g.color == color for g in spec.groups)
    assert seen_counts == {1, 2, 3}


def _expected_answer(spec: SceneSpec, qa) -> str:
    groups = spec.groups
    q = qa.question
    large = [g for g in groups if g.size == "large"]
    if qa.question_type == "color":
        if q == "What color is the largest object?":
            assert len(large) == 1 and spec.n_objects > 1
            return large[0].color
        shape = re.fullmatch(r"What color (?:is|are) the (\w+?)s?\?", q).group(1)
        (match,) = [g for g in groups if g.shape == shape]
        return match.color
    if qa.question_type == "shape":
        if q == "What shape is the largest object?":
            assert len(large) == 1 and spec.n_objects > 1
            return large[0].shape
        color = re.fullmatch(r"What shape (?:is|are) the (\w+) objects?\?", q).group(1)
        (match,) = [g for g in groups if g.color == color]
        return match.shape
    if qa.question_type == "count":
        what = re.fullmatch(r"How many (\w+)s are there\?", q).group(1)
        if what == "object":
            return str(sum(g.count for g in groups))
        assert what in SHAPES
        return str(sum(g.count for g in groups if g.shape == what))
    if qa.question_type == "position":
        color, shape = re.fullmatch(r"Where (?:is|are) the (\w+) (\w+?)s?\?", q).groups()
        (match,) = [g for g in groups if g.color == color and g.shape == shape]
        return match.position
    if qa.question_type == "yes_no":
        color, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
        return "yes" if any(g.color == color and g.shape == shape for g in groups) else "no"
    raise AssertionError(qa.question_type)


def test_qa_answers_match_scene():
    counts = {t: 0 for t in QUESTION_TYPES}
    answers = {t: set() for t in QUESTION_TYPES}
    for i, spec in enumerate(_scenes()):
        qas = qa_pairs(spec, item_rng(99, i))
        types = [qa.question_type for qa in qas]
        assert types == [t for t in QUESTION_TYPES if t in types]  # one each, fixed order
        assert {"count", "position", "yes_no"} <= set(types)
        for qa in qas:
            assert qa.answer == _expected_answer(spec, qa), (caption(spec), qa)
            assert qa.choices is not None and qa.answer in qa.choices
            assert len(set(qa.choices)) == len(qa.choices)
            counts[qa.question_type] += 1
            answers[qa.question_type].add(qa.answer)
    assert all(c > N_SCENES // 2 for c in counts.values()), counts
    assert answers["yes_no"] == {"yes", "no"}
    assert "0" in answers["count"] and len(answers["count"]) >= 4


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("size", [224, 96])
def test_image_shows_the_shapes(size):
    for spec in _scenes(60, seed=3):
        image = render_scene(spec, size)
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image)
        placed = object_layout(spec, size)
        assert len(placed) == spec.n_objects
        for obj in placed:
            assert tuple(pixels[obj.cy, obj.cx]) == COLORS[obj.color], (caption(spec), obj)
            assert 0 <= obj.cx - obj.radius and obj.cx + obj.radius < size
            assert 0 <= obj.cy - obj.radius and obj.cy + obj.radius < size
        for a in range(len(placed)):  # objects never overlap
            for b in range(a + 1, len(placed)):
                p, q = placed[a], placed[b]
                assert np.hypot(p.cx - q.cx, p.cy - q.cy) > p.radius + q.radius
        # colour area: each colour covers roughly what its objects should cover
        for color in {g.color for g in spec.groups}:
            area = np.all(pixels == COLORS[color], axis=-1).sum()
            assert area >= sum(o.radius**2 for o in placed if o.color == color) * 0.5


def test_background_pixels():
    spec = SceneSpec(background="gray", groups=())
    assert tuple(np.asarray(render_scene(spec, 64))[0, 0]) == BACKGROUNDS["gray"]
    gradient = np.asarray(render_scene(SceneSpec(background="gradient", groups=()), 64)).astype(int)
    assert gradient[0, 0].sum() > gradient[-1, 0].sum()


# --------------------------------------------------------------------------- files


def test_written_files(tmp_path):
    out = tmp_path / "set"
    manifest = generate_synthetic(out, 8, seed=11, image_size=64)
    captions = json.loads((out / "captions.json").read_text())
    instructions = json.loads((out / "instructions.json").read_text())
    qa_eval = json.loads((out / "qa_eval.json").read_text())
    scenes = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    saved = json.loads((out / "manifest.json").read_text())

    assert saved["n"] == 8 and saved["seed"] == 11 and saved["image_size"] == 64
    assert saved["captions_sha256"] == hashlib.sha256((out / "captions.json").read_bytes()).hexdigest()
    assert saved["captions_sha256"] == manifest.captions_sha256
    for name, digest in saved["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    assert len(captions) == len(instructions) == len(scenes) == 8
    for row, scene in zip(captions, scenes):
        assert row["image"] == f"images/{row['id']}.png" == scene["image"]
        human, gpt = row["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"][len("<image>\n"):] in CAPTION_PROMPTS
        assert gpt == {"from": "gpt", "value": caption(SceneSpec.from_dict(scene))}
    for row in instructions:
        turns = row["conversations"]
        assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    ids = {row["id"] for row in captions}
    for row in qa_eval:
        assert set(row) == {"id", "image", "question", "answer", "question_type", "choices"}
        assert row["question_type"] in QUESTION_TYPES and row["answer"] in row["choices"]
        assert row["id"].rsplit("-", 1)[0] in ids

    for name in ("captions.json", "instructions.json"):
        dataset = LlavaJsonDataset(out / name, out)
        assert len(dataset) == 8 and not dataset.report.malformed and not dataset.report.missing_images
        assert dataset[0].image.size == (64, 64)


def test_all_conversations_hold_every_question_and_change_nothing_else(tmp_path):
    """`conversations="all"`: each scene's conversation asks every one of its QA questions, the sampled
    conversation's questions first; every other file is byte-identical to the default's."""
    sampled = generate_synthetic(tmp_path / "sampled", 12, seed=3, image_size=48)
    dense = generate_synthetic(tmp_path / "all", 12, seed=3, image_size=48, conversations="all")
    assert {k: v for k, v in dense.sha256.items() if k != "instructions.json"} == \
        {k: v for k, v in sampled.sha256.items() if k != "instructions.json"}
    assert dense.sha256["instructions.json"] != sampled.sha256["instructions.json"]
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["conversations"] == "all"
    qa_eval = json.loads((tmp_path / "all" / "qa_eval.json").read_text())
    short = json.loads((tmp_path / "sampled" / "instructions.json").read_text())
    for row, few in zip(json.loads((tmp_path / "all" / "instructions.json").read_text()), short):
        pairs = [(q["value"].removeprefix("<image>\n"), a["value"])
                 for q, a in zip(row["conversations"][::2], row["conversations"][1::2])]
        expected = {(q["question"], q["answer"]) for q in qa_eval if q["image"] == row["image"]}
        assert set(pairs) == expected and len(pairs) == len(expected) >= 4
        assert row["conversations"][:len(few["conversations"])] == few["conversations"]
    assert dense.counts["instruction_turns"] == len(qa_eval) > sampled.counts["instruction_turns"]
    with pytest.raises(RegapError, match="conversations 'every': valid: sampled, all"):
        generate_synthetic(tmp_path / "bad", 2, conversations="every")


def test_refuses_non_empty_folder(tmp_path):
    generate_synthetic(tmp_path, 2, seed=0, image_size=48)
    with pytest.raises(RegapError, match="not empty"):
        generate_synthetic(tmp_path, 2, seed=0, image_size=48)
    generate_synthetic(tmp_path, 2, seed=0, image_size=48, overwrite=True)
    with pytest.raises(RegapError, match="split name"):
        generate_synthetic(tmp_path / "x", 2, split_name="../evil")


def test_cli_synth(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", "--n", "4", "--out", str(tmp_path / "s"), "--seed", "2",
                                 "--image-size", "48", "--split-name", "val"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    assert (tmp_path / "s" / "images" / "val_000003.png").exists()
    first = (tmp_path / "s" / "captions.json").read_bytes()
    generate_synthetic(tmp_path / "t", 4, seed=2, image_size=48, split_name="val")
    assert (tmp_path / "t" / "captions.json").read_bytes() == first
    result = runner.invoke(app, ["data", "synth", "--n", "2", "--out", str(tmp_path / "u"), "--image-size", "48",
                                 "--conversations", "all"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "u" / "manifest.json").read_text())["conversations"] == "all"


def test_an_image_size_beyond_the_limit_is_refused_before_any_file(tmp_path):
    from regap.cli import main

    with pytest.raises(RegapError, match=r"--image-size must be from 32 to 4096 pixels \(got 100000\)"):
        generate_synthetic(tmp_path / "big", 2, image_size=100000)
    assert not (tmp_path / "big").exists()
    assert main(["data", "synth", "--n", "2", "--out", str(tmp_path / "cli"), "--image-size", "100000"]) == 2


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_run_leaves_nothing_that_blocks_the_rerun(tmp_path, monkeypatch, existed):
    from regap.data import synth

    out = tmp_path / "out"
    if existed:
        out.mkdir()  # an empty folder the user made: kept, and emptied again
    real, calls = synth.render_scene, []

    def failing(spec, size):
        calls.append(size)
        if len(calls) == 3:
            raise MemoryError("cannot allocate")
        return real(spec, size)

    monkeypatch.setattr(synth, "render_scene", failing)
    with pytest.raises(MemoryError):
        generate_synthetic(out, 5, image_size=48)
    assert out.exists() == existed and (not existed or not any(out.iterdir()))
    monkeypatch.setattr(synth, "render_scene", real)
    assert generate_synthetic(out, 5, image_size=48).counts["images"] == 5


def test_a_failed_overwrite_keeps_the_earlier_files(tmp_path, monkeypatch):
    from regap.data import synth

    generate_synthetic(tmp_path, 2, image_size=48)
    monkeypatch.setattr(synth, "render_scene", lambda spec, size: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path, 2, image_size=48, overwrite=True)
    assert (tmp_path / "captions.json").exists()  # not this run's folder: nothing removed
