"""Input building: shapes, the image-token mask, labels and templates."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from regap.errors import InternalError, RegapError
from regap.models import IGNORE_INDEX
from regap.models.inputs import with_image_marker
from regap.models.templates import VICUNA_SYSTEM

RED = Image.new("RGB", (60, 40), "red")


def _conv(question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def test_image_mask_marks_exactly_the_image_slots(tiny_model):
    batch = tiny_model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    mask = batch.image_mask[0]
    assert int(mask.sum()) == tiny_model.tokens_per_image == 16
    positions = mask.nonzero().flatten()
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + 16))  # one contiguous block
    assert batch.pixel_values.shape == (1, 3, 56, 56)
    assert (batch.labels[0][mask] == IGNORE_INDEX).all()


def test_labels_cover_only_the_assistant_answer(tiny_model):
    tok = tiny_model.tokenizer
    batch = tiny_model.build_inputs([_conv("<image>\nWhat is this?", "A red circle.")], [[RED]])
    targets = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    assert tok.decode(targets) == "A red circle.<|im_end|>\n"


def test_two_turns_label_both_answers(tiny_model):
    conv = _conv("<image>\nWhat colour?", "Red.") + [{"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "A circle."}]
    batch = tiny_model.build_inputs([conv], [[RED]])
    targets = tiny_model.tokenizer.decode(batch.labels[0][batch.labels[0] != IGNORE_INDEX])
    assert targets == "Red.<|im_end|>\nA circle.<|im_end|>\n"


def test_plain_template_targets_only_the_caption(tiny_model):
    batch = tiny_model.build_inputs([_conv("<image>\nDescribe.", "A red circle.")], [[RED]], template="plain")
    ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert batch.image_mask[0][:16].all()  # the prompt is the image alone
    assert tiny_model.tokenizer.decode(ids[16:]) == "A red circle.\n"
    assert tiny_model.tokenizer.decode(batch.labels[0][batch.labels[0] != IGNORE_INDEX]) == "A red circle.\n"


def test_vicuna_template_renders_llava_format(tiny_model):
    from regap.models.templates import get_template

    rendered = get_template("vicuna_v1", tiny_model.tokenizer).render(_conv("<image>\nHi?", "Hello."), False)
    eos = tiny_model.tokenizer.eos_token
    assert rendered.text == f"{VICUNA_SYSTEM} USER: <image>\nHi? ASSISTANT: Hello.{eos}"
    start, end = rendered.target_spans[0]
    assert rendered.text[start:end] == f" Hello.{eos}"


def test_padding_sides_and_attention(tiny_model):
    convs = [_conv("<image>\nShort?"), _conv("<image>\nA much longer question about the picture?")]
    left = tiny_model.build_inputs(convs, [[RED], [RED]], add_generation_prompt=True, padding_side="left")
    right = tiny_model.build_inputs(convs, [[RED], [RED]], add_generation_prompt=True, padding_side="right")
    assert left.attention_mask[0, 0] == 0 and left.attention_mask[0, -1] == 1
    assert right.attention_mask[0, 0] == 1 and right.attention_mask[0, -1] == 0
    assert left.image_mask.sum() == right.image_mask.sum() == 32


def test_embed_writes_projected_image_tokens_into_slots(tiny_model):
    batch = tiny_model.build_inputs([_conv("<image>\nWhat?")], [[RED]], add_generation_prompt=True)
    embeds = tiny_model.embed(batch)
    expected = tiny_model.encode_images(batch.pixel_values)[0]
    assert torch.allclose(embeds[0][batch.image_mask[0]], expected)
    text = tiny_model.llm.get_input_embeddings()(batch.input_ids)
    assert torch.allclose(embeds[0][~batch.image_mask[0]], text[0][~batch.image_mask[0]])


def test_a_batch_breaking_the_image_slot_invariant_is_an_internal_error(tiny_model):
    """`build_inputs` never makes such a batch: a bug, so not a `RegapError` (one line, "fix your input")."""
    batch = tiny_model.build_inputs([_conv("<image>\nWhat?")], [[RED]])
    with pytest.raises(InternalError, match="image slots but no pixel values"):
        tiny_model.embed(dataclasses.replace(batch, pixel_values=None))
    doubled = dataclasses.replace(batch, pixel_values=batch.pixel_values.repeat(2, 1, 1, 1))
    with pytest.raises(InternalError, match="image slots but 2 image"):
        tiny_model.embed(doubled)


def test_a_model_built_from_parts_records_no_llm_origin(tiny_model):
    """`llm_origin` exists on every LVLM (None: the LLM is `llm_source` as published)."""
    assert tiny_model.llm_origin is None


def test_marker_count_must_match_images(tiny_model):
    with pytest.raises(RegapError, match="2 <image> marker"):
        tiny_model.build_inputs([_conv("<image><image> two?")], [[RED]])
    with pytest.raises(RegapError, match="0 <image> marker"):
        tiny_model.build_inputs([_conv("no marker")], [[RED]])


def test_image_without_marker_goes_first():
    messages = with_image_marker([{"role": "user", "content": "What?"}], 1)
    assert messages[0]["content"] == "<image>\nWhat?"


def test_pooling_reduces_image_tokens():
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(vision="dinov2", pool_grid=2, feature_layer="final")
    assert model.tokens_per_image == 4
    batch = model.build_inputs([_conv("<image>\nWhat?")], [[RED]])
    assert model.encode_images(batch.pixel_values).shape == (1, 4, model.hidden_size)


def test_truncation_warns_and_never_cuts_an_image(tiny_model):
    long_answer = "one two three four five six seven eight nine ten " * 5
    with pytest.warns(UserWarning, match="truncated"):
        batch = tiny_model.build_inputs([_conv("<image>\nCount.", long_answer)], [[RED]], max_length=40)
    assert batch.input_ids.shape[1] == 40
    with pytest.raises(RegapError, match="max_length"):
        tiny_model.build_inputs([_conv("a b c d e f g h i j k l <image>", "x")], [[RED]], max_length=12)


def test_unknown_template_and_projector_errors(tiny_model):
    from regap.models import build_projector

    with pytest.raises(RegapError, match="unknown template"):
        tiny_model.build_inputs([_conv("hi")], template="alpaca")
    with pytest.raises(RegapError, match="unknown projector"):
        build_projector("mlp2x_relu", 4, 4)
    assert len(build_projector("mlp3x_gelu", 4, 8)) == 5


# ---------------------------------------------------------------------- text tokens, one builder


def test_text_mask_modes_on_padded_rows_with_and_without_an_image():
    from regap.models.inputs import TEXT_TOKEN_MODES, ModelInputs

    # row 0: 2 tokens, 3 image slots, 2 tokens, 1 pad (right); row 1: left pad, no image at all
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    image = torch.zeros(2, 8, dtype=torch.bool)
    image[0, 2:5] = True
    batch = ModelInputs(torch.zeros(2, 8, dtype=torch.long), attention, torch.full((2, 8), IGNORE_INDEX), image,
                        None, [1, 0])
    assert TEXT_TOKEN_MODES == ("after-image", "all-non-image")
    assert batch.text_mask("all-non-image").int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]]
    assert batch.text_mask("after-image").int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]]
    with pytest.raises(RegapError, match="text-token mode"):
        batch.text_mask("before-image")


def test_build_batch_returns_what_it_truncated_without_warning(tiny_model, recwarn):
    from regap.models.inputs import build_batch
    from regap.models.templates import get_template

    long_answer = "one two three four five six seven eight nine ten " * 5
    built = build_batch([_conv("<image>\nCount.", long_answer), _conv("<image>\nHi.", "ok")], [1, 1],
                        tokenizer=tiny_model.tokenizer, template=get_template("chat", tiny_model.tokenizer),
                        tokens_per_image=tiny_model.tokens_per_image, add_generation_prompt=False, max_length=40)
    assert built.n_truncated == 1 and list(built.truncated) == [0] and built.truncated[0] > 40
    assert [len(s.ids) for s in built.samples][0] == 40 and built.inputs.input_ids.shape[1] == 40
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_the_collator_and_build_inputs_build_the_same_batch(tiny_model, recwarn):
    from types import SimpleNamespace

    from regap.train.collate import Collator, LoadedSample

    long_answer = "one two three four five six seven eight nine ten " * 5
    conversations = [_conv("<image>\nWhat is this?", "A red circle."), _conv("<image>\nCount.", long_answer)]
    items = [LoadedSample(i, SimpleNamespace(id=str(i), messages=c, image=RED)) for i, c in enumerate(conversations)]
    batch = Collator(tiny_model, "chat", 60)(items)
    assert batch.truncated == 1 and not [w for w in recwarn if "truncated" in str(w.message)]
    with pytest.warns(UserWarning, match="conversation 1 truncated"):
        direct = tiny_model.build_inputs(conversations, [[RED], [RED]], template="chat", max_length=60)
    for name in ("input_ids", "attention_mask", "labels", "image_mask", "pixel_values"):
        assert torch.equal(getattr(batch.inputs, name), getattr(direct, name)), name
    assert batch.inputs.images_per_sample == direct.images_per_sample == [1, 1]
