"""Save/load round trips, HF LLaVA round trip and batched generation parity."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from regap.errors import RegapError
from regap.models import DecodingSettings, export_llava_hf, load_llava_hf, load_projector, save_projector

IMAGES = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "white", "black")]


def _logits(model, batch):
    with torch.no_grad():
        return model(batch, use_labels=False).logits


def test_projector_round_trip(tiny_model, tmp_path):
    path = save_projector(tiny_model, tmp_path / "proj.safetensors")
    original = {k: v.clone() for k, v in tiny_model.projector.state_dict().items()}
    for p in tiny_model.projector.parameters():
        torch.nn.init.zeros_(p)
    load_projector(tiny_model, path)
    for key, value in tiny_model.projector.state_dict().items():
        assert torch.equal(value, original[key])


def test_projector_shape_mismatch_is_a_clear_error(tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm

    path = save_projector(tiny_random_lvlm(projector="linear"), tmp_path / "p.safetensors")
    with pytest.raises(RegapError, match="do not fit"):
        load_projector(tiny_random_lvlm(projector="mlp2x_gelu"), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RegapError, match="cannot read projector"):
        load_projector(tiny_random_lvlm(), tmp_path / "bad.safetensors")


def test_whole_model_round_trip(tiny_model, tmp_path):
    from regap.models import load_model, save_model

    save_model(tiny_model, tmp_path / "m", include_backbones=True)
    assert (tmp_path / "m" / "llm" / "model.safetensors").exists()
    reloaded = load_model(str(tmp_path / "m"))
    batch = tiny_model.build_inputs([[{"role": "user", "content": "<image>\nWhat?"}]], [[IMAGES[0]]])
    assert torch.allclose(_logits(tiny_model, batch), _logits(reloaded, batch), atol=1e-6)


def test_hf_llava_round_trip(tiny_model, tmp_path):
    """Export to LlavaForConditionalGeneration; HF's own processor+model give our logits, and
    loading the folder back gives the same greedy text."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    out = export_llava_hf(tiny_model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = LlavaProcessor.from_pretrained(out)
    prompt = tiny_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is this?"}], tokenize=False, add_generation_prompt=True)
    hf_inputs = processor(images=IMAGES[0], text=prompt, return_tensors="pt")
    ours = tiny_model.build_inputs([[{"role": "user", "content": "<image>\nWhat is this?"}]], [[IMAGES[0]]],
                                   add_generation_prompt=True)
    assert hf_inputs["input_ids"].shape == ours.input_ids.shape
    with torch.no_grad():
        hf_logits = llava(**hf_inputs).logits
    ours_logits = _logits(tiny_model, ours)
    assert hf_logits.shape[-1] == ours_logits.shape[-1] + 1  # the added <image> token
    assert torch.allclose(hf_logits[..., :-1], ours_logits, atol=1e-5)

    back = load_llava_hf(str(out))
    settings = DecodingSettings(max_new_tokens=6)
    prompts = ["What is this?", "Describe it."]
    assert back.generate(prompts, IMAGES[:2], settings, template="chat") == tiny_model.generate(prompts, IMAGES[:2], settings)


def test_export_refuses_what_llava_cannot_express(tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm

    with pytest.raises(RegapError, match="patch pooling"):
        export_llava_hf(tiny_random_lvlm(vision="clip", pool_grid=2), tmp_path / "x")


def test_batched_greedy_equals_one_at_a_time_fp32(tiny_model):
    prompts = ["Hi", "What is in this image? Describe it in detail.", "Red or blue?", "Count the shapes please."]
    images = [IMAGES[0], None, IMAGES[1], IMAGES[2]]
    batched = tiny_model.generate(prompts, images, DecodingSettings(max_new_tokens=8, batch_size=4))
    single = [tiny_model.generate([p], [i], DecodingSettings(max_new_tokens=8, batch_size=1))[0] for p, i in zip(prompts, images)]
    assert batched == single
    assert any(batched)  # random weights still emit tokens


def test_decoding_settings_validate():
    with pytest.raises(RegapError, match="max_new_tokens"):
        DecodingSettings(max_new_tokens=0)
