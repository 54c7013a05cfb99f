"""Q-Former connectors: BLIP-2 / InstructBLIP checkpoints through our loader, and the from-parts path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from regap.errors import RegapError
from regap.models import DecodingSettings, IGNORE_INDEX, build_projector, load_model, load_projector, save_projector
from regap.models.qformer import QFormerProjector

RED = Image.new("RGB", (60, 40), "red")
BLUE = Image.new("RGB", (50, 50), "blue")
N_QUERIES = 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


def _tokenizer(chat_template: bool) -> object:
    from regap.models.random_tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    # As HF's BLIP-2 processors do: an `<image>` special token for the query positions.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>"]})
    if not chat_template:
        tokenizer.chat_template = None  # like OPT's tokenizer: the loader installs BLIP-2's prompt format
    return tokenizer


def _sub_configs(tokenizer, text: str):
    from transformers import Blip2VisionConfig, LlamaConfig, OPTConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   encoder_hidden_size=32, cross_attention_frequency=1)
    common = dict(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if text == "opt":  # BLIP-2's own decoder family (tied embeddings, learned positions)
        text_config = OPTConfig(ffn_dim=96, word_embed_proj_dim=48, bos_token_id=tokenizer.eos_token_id,
                                **common)
    else:  # Vicuna / LLaMA (InstructBLIP, MiniGPT-4)
        text_config = LlamaConfig(intermediate_size=96, num_key_value_heads=2, bos_token_id=None,
                                  tie_word_embeddings=False, **common)
    return Blip2VisionConfig(**vision).to_dict(), qformer, text_config


def _save(model, tokenizer, folder: Path, processor_cls) -> Path:
    from transformers import BlipImageProcessorPil

    torch.nn.init.normal_(model.query_tokens, std=0.02)  # HF initialises them to zeros
    model.save_pretrained(folder)
    image_processor = BlipImageProcessorPil(size={"height": 56, "width": 56})
    if processor_cls is None:
        image_processor.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    else:
        processor_cls(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=N_QUERIES).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A tiny random BLIP-2 (OPT decoder) saved as a standard HF folder with its processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    tokenizer = _tokenizer(chat_template=False)
    vision, qformer, text = _sub_configs(tokenizer, "opt")
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=N_QUERIES,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    folder = _save(hf, tokenizer, tmp_path_factory.mktemp("blip2"), Blip2Processor)
    return folder, hf


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory):
    """A tiny random InstructBLIP (LLaMA decoder, tokenizer with a chat template)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    tokenizer = _tokenizer(chat_template=True)
    vision, qformer, text = _sub_configs(tokenizer, "llama")
    qformer = {**qformer, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                                num_query_tokens=N_QUERIES, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(1)
    hf = InstructBlipForConditionalGeneration(config).eval()
    folder = _save(hf, tokenizer, tmp_path_factory.mktemp("instructblip"), None)
    return folder, hf


def _conv(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _hf_input_ids(model, batch, image_token_id: int) -> torch.Tensor:
    """Our sequence with HF's image token at our image slots: HF scatters the queries there."""
    ids = batch.input_ids.clone()
    ids[batch.image_mask] = image_token_id
    return ids


# ---------------------------------------------------------------------- BLIP-2 checkpoints


def test_blip2_loads_with_shared_modules_and_query_mask(blip2):
    folder, hf = blip2
    model = load_model(str(folder))
    assert isinstance(model.projector, QFormerProjector) and model.config.projector_type == "qformer"
    assert model.tokens_per_image == N_QUERIES and model.vision.num_tokens == 17  # 16 patches + CLS in
    # One module tree, nothing duplicated or missing: as many parameters as the HF model.
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    assert model.projector.qformer.__class__.__name__ == "Blip2QFormerModel"

    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle."),
                                _conv("<image>\n<image>\nTwo?", "Yes.")], [[RED], [RED, BLUE]])
    assert batch.image_mask[0].sum() == N_QUERIES and batch.image_mask[1].sum() == 2 * N_QUERIES
    positions = batch.image_mask[0].nonzero().flatten()
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + N_QUERIES))  # one contiguous block
    assert (batch.labels[batch.image_mask] == IGNORE_INDEX).all()
    # No chat template in the checkpoint: BLIP-2's own VQA prompt, answer + eos as the target.
    text = model.tokenizer.decode(batch.input_ids[0][~batch.image_mask[0] & batch.attention_mask[0].bool()])
    assert text == f"Question: What is this? Answer: A red circle.{model.tokenizer.eos_token}\n"
    targets = model.tokenizer.decode(batch.labels[0][batch.labels[0] != IGNORE_INDEX])
    assert targets == f" A red circle.{model.tokenizer.eos_token}\n"


def test_blip2_logits_match_hf(blip2):
    folder, hf = blip2
    model = load_model(str(folder))
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle."), _conv("<image>\nHi", "Hello there.")],
                               [[RED], [BLUE]])
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(pixel_values=batch.pixel_values, input_ids=_hf_input_ids(model, batch, hf.config.image_token_id),
                    attention_mask=batch.attention_mask).logits
        attended = batch.attention_mask.bool()
        assert torch.allclose(ours[attended], theirs[attended], atol=1e-5)
        tokens = model.encode_images(batch.pixel_values)
        assert tokens.shape == (2, N_QUERIES, 48)
        assert torch.allclose(tokens, hf.get_image_features(pixel_values=batch.pixel_values).pooler_output, atol=1e-6)
    # HF's processor makes the same pixels.
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(folder)
    assert torch.allclose(processor(images=[RED, BLUE], return_tensors="pt")["pixel_values"], batch.pixel_values)


def test_blip2_half_precision_keeps_the_qformer_in_float32_like_hf(blip2):
    from transformers import Blip2ForConditionalGeneration

    folder, _ = blip2
    model = load_model(str(folder), dtype=torch.float16)  # a torch dtype: the string is refused on a CPU
    hf = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    assert model.projector.qformer.dtype == hf.qformer.dtype == torch.float32
    assert model.projector.query_tokens.dtype == torch.float32 and model.dtype == torch.float16
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(pixel_values=batch.pixel_values.half(), input_ids=_hf_input_ids(model, batch, hf.config.image_token_id),
                    attention_mask=batch.attention_mask).logits
    assert torch.equal(ours, theirs)


def test_blip2_batched_generation_equals_one_at_a_time(blip2):
    folder, _ = blip2
    model = load_model(str(folder))
    prompts = ["What is this?", "Describe the picture in detail.", "<image>"]
    images = [RED, BLUE, RED]
    settings = DecodingSettings(max_new_tokens=6)
    batched = model.generate_detailed(prompts, images, settings)
    single = model.generate_detailed(prompts, images, DecodingSettings(max_new_tokens=6, batch_size=1))
    assert batched.texts == single.texts and batched.new_tokens == single.new_tokens
    assert all(n >= 1 for n in batched.new_tokens)


def test_blip2_training_step_updates_the_connector_only(blip2):
    folder, _ = blip2
    model = load_model(str(folder))
    model.freeze_backbones()
    model.projector.train()
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(batch).loss
    loss.backward()
    assert model.projector.query_tokens.grad is not None and model.projector.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.llm.parameters()) and all(p.grad is None for p in model.vision.parameters())
    optimizer.step()
    after = model.projector.state_dict()
    assert not torch.equal(before["query_tokens"], after["query_tokens"])
    assert not torch.equal(before["language_projection.weight"], after["language_projection.weight"])

    # MiniGPT-4 style: only the linear layer trains.
    model.zero_grad(set_to_none=True)
    model.projector.set_trainable("linear")
    model(batch).loss.backward()
    assert model.projector.query_tokens.grad is None
    assert all(p.grad is None for p in model.projector.qformer.parameters())
    assert model.projector.language_projection.weight.grad is not None


def test_blip2_projector_checkpoint_round_trips(blip2, tmp_path):
    folder, _ = blip2
    model = load_model(str(folder))
    path = save_projector(model, tmp_path / "p.safetensors")
    other = load_model(str(folder))
    with torch.no_grad():
        for parameter in other.projector.parameters():
            parameter.add_(1.0)
    load_projector(other, path)
    for key, value in model.projector.state_dict().items():
        assert torch.equal(other.projector.state_dict()[key], value), key


def test_t5_variants_are_refused_by_name(tmp_path):
    from transformers import Blip2Config, T5Config

    text = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    Blip2Config(text_config=text.to_dict(), num_query_tokens=4).save_pretrained(tmp_path)
    with pytest.raises(RegapError, match=r"blip-2 with an encoder-decoder language model \('t5'.*not supported"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------------- InstructBLIP checkpoints


def test_instructblip_matches_hf_without_and_with_an_instruction(instructblip):
    folder, hf = instructblip
    model = load_model(str(folder))
    assert model.tokens_per_image == N_QUERIES and model.projector.takes_text
    assert model.config.template == "chat"  # the checkpoint's tokenizer has one
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    assert batch.image_mask.sum() == N_QUERIES
    empty = torch.zeros((1, 0), dtype=torch.long)
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(pixel_values=batch.pixel_values, qformer_input_ids=empty,
                    input_ids=_hf_input_ids(model, batch, hf.config.image_token_id),
                    attention_mask=batch.attention_mask).logits
        assert torch.allclose(ours, theirs, atol=1e-5)
        # The instruction-aware path, when the caller has the Q-Former's instruction ids.
        instruction = torch.tensor([[5, 17, 42, 9]])
        features = model.vision(batch.pixel_values)
        aware = model.projector(features, qformer_input_ids=instruction)
        expected = hf.get_image_features(pixel_values=batch.pixel_values, qformer_input_ids=instruction).pooler_output
        assert torch.allclose(aware, expected, atol=1e-6)
        assert not torch.allclose(aware, model.encode_images(batch.pixel_values), atol=1e-4)
    single = model.generate(["What is this?", "Hi"], [RED, BLUE], DecodingSettings(max_new_tokens=5, batch_size=1))
    assert model.generate(["What is this?", "Hi"], [RED, BLUE], DecodingSettings(max_new_tokens=5)) == single


# ---------------------------------------------------------------------- the from-parts path


def test_build_projector_qformer_and_its_options():
    projector = build_projector("qformer", 32, 48, seed=3, num_query_tokens=4, hidden_size=64, num_attention_heads=4)
    again = build_projector("qformer", 32, 48, seed=3, num_query_tokens=4, hidden_size=64, num_attention_heads=4)
    assert isinstance(projector, QFormerProjector) and projector.num_tokens == 4
    assert projector.qformer.config.encoder_hidden_size == 32 and projector.qformer.config.hidden_size == 64
    for key, value in projector.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key  # seeded
    assert projector(torch.randn(3, 17, 32)).shape == (3, 4, 48)
    default = build_projector("qformer", 32, 48)
    assert default.num_tokens == 32 and default.qformer.config.num_hidden_layers == 2
    assert default.qformer.config.cross_attention_frequency == 1
    with pytest.raises(RegapError, match="unknown Q-Former option"):
        build_projector("qformer", 32, 48, layers=3)
    with pytest.raises(RegapError, match="takes no options"):
        build_projector("linear", 32, 48, hidden_size=3)
    with pytest.raises(RegapError, match="trainable mode"):
        default.set_trainable("lora")
    linear = build_projector("qformer", 32, 48, trainable="linear", hidden_size=64)
    assert [n for n, p in linear.named_parameters() if p.requires_grad] == ["language_projection.weight",
                                                                           "language_projection.bias"]


def test_tiny_random_qformer_lvlm_and_projector_checkpoint(tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.models.lvlm import LVLMConfig

    model = tiny_random_lvlm(projector="qformer", seed=0)
    assert model.tokens_per_image == 32 and model.vision.num_tokens == 16
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    assert batch.image_mask.sum() == 32
    with torch.no_grad():
        logits = model(batch).logits
    small = tiny_random_lvlm(projector="qformer", projector_options={"num_query_tokens": 4, "hidden_size": 64})
    assert small.tokens_per_image == 4
    assert LVLMConfig.from_dict(small.config.to_dict()).extra["projector_options"]["num_query_tokens"] == 4

    path = save_projector(model, tmp_path / "q.safetensors")
    other = tiny_random_lvlm(projector="qformer", seed=0)
    with torch.no_grad():
        for parameter in other.projector.parameters():
            parameter.mul_(0.5)
    load_projector(other, path)
    assert torch.equal(other.projector.query_tokens, model.projector.query_tokens)
    with torch.no_grad():
        assert torch.allclose(other(batch).logits, logits, atol=0)
    with pytest.raises(RegapError, match="do not fit"):
        load_projector(small, path)
    with pytest.raises(RegapError, match="do not fit"):
        load_projector(tiny_random_lvlm(), path)


def test_tiny_qformer_preset_is_listed():
    from regap.models.loading.presets import get_preset

    preset = get_preset("tiny-qformer")
    assert preset.config.projector_type == "qformer" and not preset.needs_hub
    assert preset.config.vision.pool_grid is None and preset.config.vision.drop_cls is False


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from regap.data import generate_synthetic

    folder = tmp_path_factory.mktemp("synth")
    generate_synthetic(folder, 24, seed=0, image_size=56)
    return folder


def test_regap_closes_the_layer0_gap_for_a_qformer(synth, tmp_path):
    """test_train_loop's property, with a Q-Former connector (a prebuilt model, same seed each time)."""
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.train import TrainConfig, train

    gaps = {}
    for lam in (0.0, 1.0):
        config = TrainConfig.from_dict({
            "model": "tiny-random", "seed": 0, "data": {"json": str(synth / "captions.json")},
            "global_batch_size": 4, "per_device_batch_size": 2, "lr": 1e-3, "max_steps": 10, "save_every": 100,
            "max_length": 128, "regap": {"lam": lam, "warmup_steps": 2},
            "observe": {"progress": False, "gap_every": 10, "mir_every": 0, "probe_size": 8},
        })
        model = tiny_random_lvlm(projector="qformer", seed=0)
        result = train(config, tmp_path / f"lam{lam}", model=model)
        gaps[lam] = result.last_metrics["probe_gap0"]
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps


# ---------------------------------------------------------------------- save_model / load_model of checkpoints


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits


@pytest.mark.parametrize("fixture", ["blip2", "instructblip"])
@pytest.mark.parametrize("include_backbones", [False, True])
def test_hf_checkpoint_saves_and_reloads_to_identical_logits(fixture, include_backbones, request, tmp_path):
    from regap.models import load_blip2_hf, save_model

    folder, _ = request.getfixturevalue(fixture)
    model = load_blip2_hf(str(folder))
    with torch.no_grad():  # a "trained" connector: differs from the checkpoint's own weights
        model.projector.query_tokens.mul_(1.5)
        model.projector.language_projection.bias.add_(0.25)
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    expected = _logits(model, batch)
    out = save_model(model, tmp_path / "saved", include_backbones=include_backbones)
    assert (out / "projector.safetensors").is_file() and (out / "regap_config.json").is_file()
    assert (out / "qformer" / "config.json").is_file() == include_backbones
    if include_backbones:  # rebuilds without the original checkpoint
        folder.rename(folder.with_name(folder.name + "-gone"))
    try:
        reloaded = load_model(str(out))
    finally:
        if include_backbones:
            folder.with_name(folder.name + "-gone").rename(folder)
    assert isinstance(reloaded.projector, QFormerProjector) and reloaded.tokens_per_image == N_QUERIES
    assert type(reloaded.projector.qformer) is type(model.projector.qformer)
    assert reloaded.projector.qformer.dtype == torch.float32
    assert torch.equal(_logits(reloaded, batch), expected)
    # The projector-only artefact onto a fresh load of the checkpoint gives the same model too.
    fresh = load_blip2_hf(str(folder))
    load_projector(fresh, out / "projector.safetensors")
    assert torch.equal(_logits(fresh, batch), expected)


def test_hf_checkpoint_saved_in_half_precision_keeps_dtypes(blip2, tmp_path):
    from regap.models import load_blip2_hf, load_saved, save_model

    folder, _ = blip2
    model = load_blip2_hf(str(folder), dtype=torch.float16)
    batch = model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    reloaded = load_saved(save_model(model, tmp_path / "half", include_backbones=True))  # the saved dtype
    assert reloaded.dtype == torch.float16 and reloaded.projector.query_tokens.dtype == torch.float32
    assert reloaded.projector.language_projection.weight.dtype == model.projector.language_projection.weight.dtype
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))


# ---------------------------------------------------------------------- choosing the connector in a training config


def test_training_config_selects_a_qformer_and_what_trains(synth, tmp_path):
    """`projector_type: qformer` + `qformer.*` from the config alone (no prebuilt model)."""
    from safetensors.torch import load_file

    from regap.train import load_config, train
    from regap.train.setup import build_model

    overrides = ["model=tiny-random", f"data.json={synth / 'captions.json'}", "projector_type=qformer",
                 "qformer.num_query_tokens=4", "qformer.hidden_size=64",
                 "global_batch_size=4", "per_device_batch_size=4", "max_steps=1", "warmup_ratio=0", "save_every=100", "max_length=128",
                 "dtype=float32", "mixed_precision='no'", "observe.progress=false", "observe.gap_every=0",
                 "observe.mir_every=0"]
    config = load_config("tiny-qformer-stage1", overrides + ["qformer.trainable=linear"], stage=1)
    assert (config.projector_type, config.qformer.trainable, config.qformer.options()) == \
        ("qformer", "linear", {"num_query_tokens": 4, "hidden_size": 64})
    fresh = build_model(config)
    assert isinstance(fresh.projector, QFormerProjector) and fresh.tokens_per_image == 4
    train(config, tmp_path / "linear")
    after = load_file(str(tmp_path / "linear" / "projector.safetensors"))
    before = fresh.projector.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed == {"language_projection.weight", "language_projection.bias"}, changed  # MiniGPT-4 style

    train(load_config("tiny-qformer-stage1", overrides + ["qformer.trainable=all"], stage=1), tmp_path / "all")
    after = load_file(str(tmp_path / "all" / "projector.safetensors"))
    assert not torch.equal(after["query_tokens"], before["query_tokens"])
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("qformer."))


def test_training_config_bad_connector_values_fail_naming_the_key(tmp_path):
    from regap.train import load_config, train

    for override, key in (("projector_type=transformer", "'projector_type'"),
                          ("qformer.trainable=lora", "'qformer.trainable'"),
                          ("qformer.num_query_tokens=0", "'qformer.num_query_tokens'"),
                          ("qformer.querys=4", "'qformer.querys'")):
        with pytest.raises(RegapError, match=key):
            load_config("tiny-qformer-stage1", ["projector_type=qformer", override] if override.startswith("qformer.n")
                        else [override])
    with pytest.raises(RegapError, match=r"'qformer.hidden_size' sizes a fresh Q-Former: it needs projector_type: qformer"):
        load_config("tiny-qformer-stage1", ["qformer.hidden_size=64"])
    with pytest.raises(RegapError, match=r"'qformer.trainable' is 'linear' but projector_type is 'mlp2x_gelu'"):
        load_config("tiny-stage1", ["projector_type=mlp2x_gelu", "qformer.trainable=linear"])
    with pytest.raises(RegapError, match="divisible"):
        load_config("tiny-stage1", ["projector_type=qformer", "qformer.hidden_size=30"])
    # A model known to have an MLP projector fails before any data or weights are read.
    config = load_config("tiny-stage1", ["qformer.trainable=linear", f"data.json={tmp_path / 'absent.json'}"], stage=1)
    with pytest.raises(RegapError, match=r"'qformer.trainable' is 'linear' but model 'tiny' has a 'mlp2x_gelu' projector"):
        train(config, tmp_path / "out")


def test_replace_projector_records_the_connector_without_touching_shared_configs():
    from regap.models import replace_projector
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm()
    original = model.config
    replace_projector(model, "qformer", num_query_tokens=4, hidden_size=64)
    assert original.projector_type == "mlp2x_gelu" and "projector_options" not in original.extra
    assert model.config.projector_type == "qformer" and model.config.extra["projector_options"]["num_query_tokens"] == 4
    assert model.tokens_per_image == 4 and model.projector.query_tokens.dtype == model.dtype


def test_resuming_a_run_saved_before_the_connector_keys_existed_sees_no_difference():
    from regap.train.config import config_differences, load_config

    new = load_config("tiny-stage1").to_dict()
    old = {k: v for k, v in new.items() if k not in ("projector_type", "qformer")}
    assert config_differences(old, new) == []
    changed = load_config("tiny-stage1", ["qformer.trainable=linear"]).to_dict()
    assert config_differences(old, changed) == ["qformer.trainable"]
