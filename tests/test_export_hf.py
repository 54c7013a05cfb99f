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


# ---------------------------------------------------------------------- what `regap export` writes


@pytest.fixture(scope="module")
def lora_output(tmp_path_factory):
    """A finished stage-2 training output of the tiny random model with a LoRA adapter."""
    from regap.data import generate_synthetic
    from regap.train import TrainConfig, train

    root = tmp_path_factory.mktemp("lora")
    generate_synthetic(root / "data", 8, seed=0, image_size=56)
    config = TrainConfig.from_dict({
        "stage": 2, "tune": "lora", "template": "chat", "model": "tiny-random", "seed": 0,
        "data": {"json": str(root / "data" / "instructions.json"), "feature_cache": "off"},
        "global_batch_size": 2, "per_device_batch_size": 2, "lr": 5e-2, "max_steps": 2, "save_every": 100,
        "max_length": 128, "dtype": "float32", "lora": {"r": 4, "alpha": 8},
        "observe": {"progress": False, "gap_every": 0, "mir_every": 0},
    })
    train(config, root / "s2")
    return root / "s2"


def _answer_hf(folder, prompt: str) -> str:
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(folder))
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": prompt}]}]
    return pipe(text=messages, generate_kwargs={"max_new_tokens": 6}, return_full_text=False)[0]["generated_text"]


def test_a_stage2_lora_output_exports_with_the_adapter_merged(lora_output, tmp_path, capsys):
    from regap.models import load_model

    out = tmp_path / "hf"
    assert main(["export", "--model", str(lora_output), "--out", str(out)]) == 0
    assert "LoRA adapter merged" in capsys.readouterr().out
    record = json.loads((out / "regap_export.json").read_text())
    assert record["lora_merged"] is True and record["dtype"] == "float32"
    ours = load_model(str(lora_output), dtype="float32")
    assert hasattr(ours.llm, "peft_config")  # the adapter is live in regap's model, merged in HF's
    expected = ours.generate(["What is this?"], [IMAGE], DecodingSettings(max_new_tokens=6))[0]
    assert _answer_hf(out, "What is this?").strip() == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_is_applied_to_a_training_output_and_recorded(lora_output, tmp_path, dtype):
    from safetensors import safe_open

    out = tmp_path / "hf"
    assert main(["export", "--model", str(lora_output), "--out", str(out), "--dtype", dtype]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"BF16" if dtype == "bfloat16" else "F16"}
    assert json.loads((out / "regap_export.json").read_text())["dtype"] == dtype
    assert json.loads((out / "config.json").read_text()).get("dtype") == dtype


@pytest.mark.parametrize("dtype", ["int8", "banana", "auto"])
def test_a_dtype_that_cannot_be_exported_is_refused_before_loading(monkeypatch, tmp_path, capsys, dtype):
    import regap.models.export

    monkeypatch.setattr(regap.models.export, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["export", "--model", "tiny", "--out", str(tmp_path / "hf"), "--dtype", dtype]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--dtype {dtype!r} cannot be exported; valid: float32, bfloat16, float16" in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_a_second_export_into_the_same_folder_is_refused_while_the_first_runs(monkeypatch, tmp_path, capsys):
    import regap.models.export
    from regap.run_lock import exclusive_out

    monkeypatch.setattr(regap.models.export, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "hf"
    with exclusive_out(out):  # another export holds the folder
        assert main(["export", "--model", "tiny-random-saved", "--out", str(out)]) == 2
    assert "is in use by another regap run" in capsys.readouterr().err


def test_an_exported_folder_keeps_its_chat_template_on_load_and_re_export(tmp_path):
    from regap.models import load_model
    from regap.models.export import export_model

    model = tiny_random_lvlm(template="plain")
    first = export_llava_hf(model, tmp_path / "first")
    (first / "regap_export.json").write_text(json.dumps({"chat_template": "plain"}))
    loaded = load_model(str(first))
    assert loaded.config.template == "plain"
    assert loaded.generate(["What is this?"], [IMAGE], DecodingSettings(max_new_tokens=6)) == \
        model.generate(["What is this?"], [IMAGE], DecodingSettings(max_new_tokens=6))
    assert export_model(str(first), tmp_path / "second")["chat_template"] == "plain"
    (first / "regap_export.json").unlink()  # without the record: recognised by the chat template itself
    assert load_model(str(first)).config.template == "plain"


def test_a_model_with_moca_is_refused(tmp_path):
    from regap.errors import RegapError
    from regap.models.moca import MoCa

    model = tiny_random_lvlm()
    model.set_moca(MoCa(model.hidden_size, [1]))
    with pytest.raises(RegapError, match="MoCa"):
        export_llava_hf(model, tmp_path / "x")


@pytest.mark.integration
@pytest.mark.slow
def test_the_tiny_clip_preset_exports_and_loads_back_in_transformers(tmp_path):
    """The offline model `regap export` can write: exported, then loaded by transformers' own class."""
    import gc
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("offline extra not installed (pip install 'regap[offline]')")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from regap.models import load_model
    from regap.models.export import export_model

    out = tmp_path / "hf"
    record = export_model("tiny-clip", out)  # float32: the tiny LM's weights are float32 (a bf16 load peaks higher)
    assert record["chat_template"] == "chat" and record["dtype"] == "float32"
    gc.collect()
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Say hello."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[IMAGE], text=[text], return_tensors="pt")
    with torch.no_grad():
        generated = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    theirs = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    del llava
    gc.collect()
    ours = load_model("tiny-clip", dtype="float32")
    assert ours.generate(["Say hello."], [IMAGE], DecodingSettings(max_new_tokens=4))[0] == theirs.strip()
