"""Exported HF LLaVA folders work through HF's own chat path (processor chat template with image
parts, `pipeline("image-text-to-text")`), and `regap export` refuses what HF LLaVA cannot express."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from regap.cli import main
from regap.models import DecodingSettings, export_llava_hf
from regap.models.random_tiny import tiny_random_lvlm
from regap.models.templates import TEMPLATES, get_template, hf_chat_template

IMAGE = Image.new("RGB", (60, 50), (200, 30, 40))


@pytest.mark.parametrize("name", TEMPLATES)
def test_exported_template_renders_like_regap(name):
    tokenizer = tiny_random_lvlm().tokenizer
    jinja = hf_chat_template(name, tokenizer)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
             {"role": "user", "content": "And the colour?"}]
    plain = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A red square."},
             {"role": "user", "content": "And the colour?"}]
    for messages, generation in ((parts, True), (parts[:2], False), (parts[:1], True)):
        strings = plain[: len(messages)]
        expected = get_template(name, tokenizer).render(strings, add_generation_prompt=generation).text
        assert tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=generation) == expected
        assert tokenizer.apply_chat_template(strings, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=generation) == expected


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_random_lvlm()
    return model, export_llava_hf(model, tmp_path_factory.mktemp("x") / "llava")


def test_processor_chat_template_places_the_image(exported):
    from transformers import AutoProcessor

    model, folder = exported
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == model.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat?"}],
                                                       add_generation_prompt=True, tokenize=False)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ours = model.build_inputs([[{"role": "user", "content": "<image>\nWhat?"}]], [[IMAGE]], add_generation_prompt=True)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_token).sum()) == int(ours.image_mask.sum()) == model.tokens_per_image
    assert torch.allclose(inputs["pixel_values"], ours.pixel_values)


def test_image_text_to_text_pipeline_answers_like_regap(exported):
    from transformers import pipeline

    model, folder = exported
    pipe = pipeline("image-text-to-text", model=str(folder))
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                             {"type": "text", "text": "What is this?"}]}]
    answer = pipe(text=messages, generate_kwargs={"max_new_tokens": 6}, return_full_text=False)[0]["generated_text"]
    assert answer.strip() == model.generate(["What is this?"], [IMAGE], DecodingSettings(max_new_tokens=6))[0]


def test_export_command_writes_a_loadable_folder(tmp_path, capsys):
    from regap.models import save_model

    saved = save_model(tiny_random_lvlm(), tmp_path / "saved", include_backbones=True)
    out = tmp_path / "hf"
    assert main(["export", "--model", str(saved), "--out", str(out)]) == 0
    assert (out / "chat_template.jinja").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "regap_export.json").read_text())["model"] == str(saved)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert main(["export", "--model", str(saved), "--out", str(out)]) == 2  # not over an existing export
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("model, problem", [("tiny", "patch pooling"), ("tiny-qformer", "projector 'qformer'")])
def test_export_command_refuses_presets_before_loading(monkeypatch, tmp_path, capsys, model, problem):
    import regap.models

    monkeypatch.setattr(regap.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["export", "--model", model, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot export") and problem in err and "\n" not in err


def test_export_refuses_a_dinov2_encoder(tmp_path):
    from regap.errors import RegapError

    with pytest.raises(RegapError, match="vision encoder 'dinov2'"):
        export_llava_hf(tiny_random_lvlm(vision="dinov2"), tmp_path / "x")
