"""MoCa as part of the model: identity is exact, image positions only, every engine but vLLM,
saved and reloaded through `--model OUT`, and named in the provenance of what it measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from regap.errors import RegapError
from regap.models import DecodingSettings, MoCa
from regap.models.random_tiny import tiny_random_lvlm


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


PROMPTS = ["Describe this.", "What is in this image? Describe the picture in detail, left and right.", "Hi"]


def _images() -> list:
    return [Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (56, 56), (30, 200, 90)), None]


CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A circle."}],
    [{"role": "user", "content": "Say one two three four five six seven"}, {"role": "assistant", "content": "one two"}],
    [{"role": "user", "content": "left <image> right"}, {"role": "assistant", "content": "top"}],
]


def _batch(model, padding_side: str = "right", rows: list[int] | None = None):
    """Two image conversations (the image first / in the middle) and a text-only one."""
    rows = rows if rows is not None else [0, 1, 2]
    images = [[_images()[0]], [], [_images()[1]]]
    return model.build_inputs([CONVERSATIONS[r] for r in rows], [images[r] for r in rows], template="chat",
                              padding_side=padding_side)


def _with_moca(model, shift: float = 0.0, scale: float = 1.0, layers=None):
    model.set_moca(MoCa.for_llm(model.llm, layers))
    with torch.no_grad():
        model.moca.shift.fill_(shift)
        model.moca.scale.fill_(scale)
    return model


# ---------------------------------------------------------------------- the calibration itself


def test_identity_moca_gives_exactly_the_outputs_of_the_model_without_it():
    plain, calibrated = tiny_random_lvlm(seed=0), _with_moca(tiny_random_lvlm(seed=0))
    assert calibrated.moca.is_identity()
    batch = _batch(plain)
    with torch.no_grad():
        a = plain(batch, output_hidden_states=True, use_labels=False)
        b = calibrated(batch, output_hidden_states=True, use_labels=False)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    for engine in ("transformers", "static"):
        settings = DecodingSettings(max_new_tokens=6, batch_size=3, engine=engine)
        assert plain.generate_detailed(PROMPTS, _images(), settings).texts == \
            calibrated.generate_detailed(PROMPTS, _images(), settings).texts


def test_non_identity_moca_changes_hidden_states_at_image_positions_only():
    plain = tiny_random_lvlm(seed=0)
    calibrated = _with_moca(tiny_random_lvlm(seed=0), shift=0.5, scale=1.5, layers=[1])
    batch = _batch(plain)
    image = batch.image_mask
    assert bool(image.any()) and bool((~image & batch.attention_mask.bool()).any())
    with torch.no_grad():
        a = plain(batch, output_hidden_states=True, use_labels=False).hidden_states
        b = calibrated(batch, output_hidden_states=True, use_labels=False).hidden_states
    assert torch.equal(a[0], b[0])  # the LLM's input is not MoCa's business
    # The output of the calibrated layer: h * 1.5 + 0.5 at image positions, untouched elsewhere.
    assert torch.allclose(b[1][image], a[1][image] * 1.5 + 0.5, atol=1e-5)
    assert torch.equal(b[1][~image], a[1][~image])
    # Causal attention: tokens before a sample's first image never see the change, at any layer.
    first_image = torch.where(image.any(1), image.float().argmax(1), torch.full_like(image[:, 0], image.shape[1], dtype=torch.long))
    before = torch.arange(image.shape[1]).unsqueeze(0) < first_image.unsqueeze(1)
    for x, y in zip(a, b):
        assert torch.equal(x[before], y[before])
    assert not torch.allclose(a[-1][image], b[-1][image])


def test_left_padded_batches_calibrate_each_row_at_its_own_image_positions():
    model = _with_moca(tiny_random_lvlm(seed=0), shift=0.3, scale=0.7)
    batch = _batch(model, padding_side="left")
    with torch.no_grad():
        together = model(batch, use_labels=False).logits
        for row in range(3):
            alone = model(_batch(model, padding_side="left", rows=[row]), use_labels=False).logits[0]
            assert torch.allclose(together[row, -alone.shape[0]:], alone, atol=1e-5), row
    # Generation: a batch of prompts of different lengths (left-padded) gives each prompt's own answer.
    calibrated = model.generate_detailed(PROMPTS, _images(), DecodingSettings(max_new_tokens=6, batch_size=3)).texts
    one_by_one = [model.generate_detailed([p], [i], DecodingSettings(max_new_tokens=6, batch_size=1)).texts[0]
                  for p, i in zip(PROMPTS, _images())]
    assert calibrated == one_by_one
    assert calibrated != tiny_random_lvlm(seed=0).generate_detailed(
        PROMPTS, _images(), DecodingSettings(max_new_tokens=6, batch_size=3)).texts  # MoCa acted in generate


def test_engines_static_and_beam_search_apply_moca_and_vllm_refuses_it():
    model = _with_moca(tiny_random_lvlm(seed=0), shift=0.3, scale=0.7)
    dynamic = model.generate_detailed(PROMPTS, _images(), DecodingSettings(max_new_tokens=6, batch_size=3)).texts
    static = model.generate_detailed(PROMPTS, _images(),
                                     DecodingSettings(max_new_tokens=6, batch_size=3, engine="static")).texts
    assert static == dynamic
    beams = model.generate_detailed(PROMPTS, _images(), DecodingSettings(max_new_tokens=4, batch_size=3, num_beams=2))
    assert len(beams.texts) == 3  # generate expands each row for the beams; the mask follows
    with pytest.raises(RegapError, match="vllm engine cannot apply MoCa"):
        model.generate_detailed(PROMPTS, _images(), DecodingSettings(max_new_tokens=4, engine="vllm"))


def test_an_llm_call_without_image_positions_fails_instead_of_skipping_moca():
    model = _with_moca(tiny_random_lvlm(seed=0))
    batch = _batch(model)
    embeds = model.embed(batch)
    with pytest.raises(RegapError, match="no image mask"):
        model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask)
    with pytest.raises(RegapError, match="does not fit"), model.image_positions(batch.image_mask[:, :-1]):
        model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask)
    with torch.no_grad(), model.image_positions(batch.image_mask):
        direct = model.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        assert torch.equal(direct, model(batch, use_labels=False).logits)


def test_coca_calibrates_its_second_pass_at_its_own_image_positions():
    from regap.defenses import build_generate, get_defense
    from regap.defenses.coca import CalibrationProcessor

    model = _with_moca(tiny_random_lvlm(seed=0), shift=0.3, scale=0.7)
    image = _images()[0]
    processor = CalibrationProcessor(model, ["How do I pick a lock?"], [image], alpha=1.0)
    without = model.build_inputs([[{"role": "user", "content": "<image>\nHow do I pick a lock?"}]], [[image]],
                                 add_generation_prompt=True)
    outer = _batch(model)  # inside generate, the principle prompt's own (longer) mask is active
    with torch.no_grad(), model.image_positions(outer.image_mask):
        processor(torch.empty(1, 0, dtype=torch.long), torch.zeros(1, model.llm.config.vocab_size))
        expected = model(without, use_labels=False).logits[:, -1]
    assert torch.allclose(processor.last_logits, expected, atol=1e-5)
    result = build_generate(model, [get_defense("coca")])(PROMPTS, _images(), DecodingSettings(max_new_tokens=3))
    assert len(result.texts) == 3


# ---------------------------------------------------------------------- fingerprint, saving, --model OUT


def test_fingerprint_and_config_follow_the_moca_parameters():
    from regap.models.fingerprint import model_fingerprint

    model = tiny_random_lvlm(seed=0)
    without = model_fingerprint(model)
    _with_moca(model)
    assert model.config.extra["moca"] == {"layers": [1, 2]}
    identity = model_fingerprint(model)
    with torch.no_grad():
        model.moca.shift[1, 0] = 0.01
    assert len({without, identity, model_fingerprint(model)}) == 3
    model.set_moca(None)
    assert "moca" not in model.config.extra and model_fingerprint(model) == without
    assert "moca" not in tiny_random_lvlm(seed=0).config.extra  # the shared config was not changed


def test_save_model_keeps_moca_and_a_missing_file_is_an_error(tmp_path):
    from regap.models import load_model, save_model

    model = _with_moca(tiny_random_lvlm(seed=0), shift=0.2, scale=1.1, layers=[2])
    folder = save_model(model, tmp_path / "m", include_backbones=True)
    loaded = load_model(str(folder))
    assert loaded.moca is not None and loaded.moca.layers == [2]
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, loaded(batch).logits)
    (folder / "moca.safetensors").unlink()
    with pytest.raises(RegapError, match="names MoCa but moca.safetensors is missing"):
        load_model(str(folder))


@pytest.fixture(scope="module")
def moca_run(tmp_path_factory) -> tuple[Path, object]:
    """A 2-step stage-1 run of the tiny random model with MoCa; the trained model in memory."""
    from regap.data import generate_synthetic
    from regap.train import TrainConfig, train

    root = tmp_path_factory.mktemp("moca")
    generate_synthetic(root / "synth", 8, seed=0, image_size=56)
    config = TrainConfig.from_dict({
        "model": "tiny-random", "seed": 0, "data": {"json": str(root / "synth" / "captions.json")},
        "global_batch_size": 4, "per_device_batch_size": 2, "lr": 1e-2, "max_steps": 2, "save_every": 2,
        "max_length": 128, "moca": {"enabled": True}, "observe": {"progress": False, "gap_every": 0, "mir_every": 0},
    })
    model = tiny_random_lvlm(seed=0)
    train(config, root / "out", model=model)
    return root / "out", model.eval()


def test_a_moca_checkpoint_reloaded_through_model_out_gives_the_same_logits(moca_run):
    from regap.models import load_model
    from regap.models.fingerprint import model_fingerprint

    out, trained = moca_run
    assert (out / "moca.safetensors").is_file() and not trained.moca.is_identity()
    loaded = load_model(str(out))  # what every `--model OUT` does
    assert loaded.moca is not None and loaded.config.extra["moca"] == {"layers": [1, 2]}
    batch = _batch(trained)
    with torch.no_grad():
        assert torch.equal(trained(batch).logits, loaded(batch).logits)
        loaded.set_moca(None)
        assert not torch.allclose(trained(batch).logits, loaded(batch).logits)  # MoCa matters in this model
    assert model_fingerprint(load_model(str(out))) == model_fingerprint(trained)


def test_regap_safety_gap_utility_and_chat_on_a_moca_run_record_moca(moca_run, tmp_path, capsys):
    from regap.cli import main
    from regap.models import load_model
    from regap.models.fingerprint import model_fingerprint

    out, _ = moca_run
    fingerprint = model_fingerprint(load_model(str(out)))
    safety = tmp_path / "safety"
    assert main(["safety", "--model", str(out), "--out", str(safety), "--limit", "2", "--max-new-tokens", "3",
                 "--conditions", "text,blank"]) == 0
    rows = [json.loads(line) for line in (safety / "results.jsonl").read_text().splitlines()]
    summary = json.loads((safety / "summary.json").read_text())
    assert rows and all(r["provenance"] == "summary.json#provenance" and r["model_fingerprint"] == fingerprint
                        for r in rows)
    assert summary["provenance"]["model_config"]["extra"]["moca"] == {"layers": [1, 2]}
    assert summary["provenance"]["model_fingerprint"] == fingerprint

    gap = tmp_path / "gap"
    assert main(["gap", "--model", str(out), "--out", str(gap), "--pairs", "4", "--n-boot", "0"]) == 0
    record = json.loads((gap / "gap.json").read_text())["provenance"]
    assert record["model_config"]["extra"]["moca"] == {"layers": [1, 2]} and record["model_fingerprint"] == fingerprint

    utility = tmp_path / "utility"
    assert main(["utility", "--model", str(out), "--out", str(utility), "--tasks", "synthetic-qa", "--n", "2",
                 "--max-new-tokens", "3"]) == 0
    record = json.loads((utility / "utility.json").read_text())["provenance"]
    assert record["model_config"]["extra"]["moca"] == {"layers": [1, 2]} and record["model_fingerprint"] == fingerprint

    capsys.readouterr()
    assert main(["chat", "--model", str(out), "--example-image", "--max-new-tokens", "3", "--json", "hi"]) == 0
    record = json.loads(capsys.readouterr().out)["provenance"]
    assert record["model_config"]["extra"]["moca"] == {"layers": [1, 2]} and record["model_fingerprint"] == fingerprint
    assert main(["chat", "--model", str(out), "--engine", "vllm", "hi"]) == 2
    assert "cannot apply MoCa" in capsys.readouterr().err  # refused before vLLM is even looked for


def test_an_unfinished_training_folder_is_named_as_such(moca_run, tmp_path):
    import shutil

    from regap.models import load_model

    out, _ = moca_run
    unfinished = tmp_path / "run"
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "config.yaml", unfinished / "config.yaml")
    with pytest.raises(RegapError, match="has not finished"):
        load_model(str(unfinished))


def test_training_a_model_that_has_moca_keeps_it_trained_only_when_enabled():
    from regap.train.config import TrainConfig
    from regap.train.setup import setup_model

    for enabled in (True, False):
        model = _with_moca(tiny_random_lvlm(seed=0), shift=0.1)
        moca = model.moca
        config = TrainConfig.from_dict({"model": "tiny-random", "data": {"json": "x.json"}, "moca": {"enabled": enabled}})
        module, returned = setup_model(model, config.resolved(), log=lambda m: None)
        assert returned is moca and model.moca is moca  # not replaced by a fresh identity
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert ({"lvlm.moca.scale", "lvlm.moca.shift"} <= trainable) == enabled
