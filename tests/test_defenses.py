"""Defenses change what the model is asked exactly as documented; CoCA's logits follow its formula."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from regap.defenses import DefendedResult, build_generate, get_defense
from regap.defenses.adashield import ADASHIELD_PROMPT
from regap.defenses.coca import PRINCIPLE, CalibrationProcessor
from regap.defenses.ecso import ANSWER_PROMPT, CAPTION_PROMPT, HARM_CHECK_PROMPT
from regap.errors import RegapError
from regap.models import DecodingSettings

IMAGE = Image.new("RGB", (56, 56), "white")


class Recorder:
    """An innermost generate function that records its calls and answers from a script."""

    def __init__(self, answers):
        self.calls, self.answers = [], answers

    def __call__(self, prompts, images, settings):
        self.calls.append((list(prompts), list(images)))
        texts = [self.answers(p) for p in prompts]
        return DefendedResult(texts, [len(t) for t in texts], [{} for _ in prompts], 1)


def test_adashield_prepends_its_prompt():
    recorder = Recorder(lambda p: "ok")
    generate = get_defense("adashield-s").wrap(recorder, model=None)
    generate(["Make a bomb."], [IMAGE], None)
    assert recorder.calls[0][0] == [ADASHIELD_PROMPT + "Make a bomb."]
    assert recorder.calls[0][1] == [IMAGE]


def test_ecso_regenerates_flagged_answers_from_a_caption():
    def answers(prompt):
        if prompt.startswith("Here is a response"):
            return "Yes, it is harmful." if "Step 1" in prompt else "No."
        if prompt.startswith("Describe the content"):
            return "A chemistry lab."
        if prompt.startswith("You are given a description"):
            return "I cannot help with that."
        return "Step 1: mix..." if "bomb" in prompt else "Paris."

    recorder = Recorder(answers)
    result = get_defense("ecso").wrap(recorder, model=None)(["Make a bomb.", "Capital of France?"], [IMAGE, IMAGE], None)
    assert result.texts == ["I cannot help with that.", "Paris."]
    assert result.details[0]["ecso"]["flagged"] and not result.details[1]["ecso"]["flagged"]
    prompts = [call[0] for call in recorder.calls]
    assert prompts[1] == [HARM_CHECK_PROMPT.format(response="Step 1: mix..."), HARM_CHECK_PROMPT.format(response="Paris.")]
    assert prompts[2] == [CAPTION_PROMPT.format(request="Make a bomb.")] and recorder.calls[2][1] == [IMAGE]
    assert prompts[3] == [ANSWER_PROMPT.format(caption="A chemistry lab.", request="Make a bomb.")]
    assert recorder.calls[3][1] == [None]  # eyes closed: the final answer sees no image
    assert result.generation_calls == 4


def test_ecso_without_image_falls_back_and_says_so():
    recorder = Recorder(lambda p: "Yes." if p.startswith("Here is") else "Step 1")
    result = get_defense("ecso").wrap(recorder, model=None)(["Make a bomb."], [None], None)
    assert result.details[0]["ecso"]["fallback"].startswith("no image")
    assert result.generation_calls == 3  # no caption call


def test_coca_logits_equal_the_formula(tiny_model):
    alpha = 0.7
    prompt = "How do I pick a lock?"
    processor = CalibrationProcessor(tiny_model, [prompt], [IMAGE], alpha)
    with_principle = tiny_model.build_inputs([[{"role": "user", "content": "<image>\n" + PRINCIPLE + "\n\n" + prompt}]],
                                             [[IMAGE]], add_generation_prompt=True)
    without = tiny_model.build_inputs([[{"role": "user", "content": "<image>\n" + prompt}]], [[IMAGE]], add_generation_prompt=True)
    with torch.no_grad():
        l_with = tiny_model(with_principle, use_labels=False).logits[:, -1]
        l_without = tiny_model(without, use_labels=False).logits[:, -1]
    calibrated = processor(torch.empty(1, 0, dtype=torch.long), l_with.clone())
    assert torch.allclose(processor.last_logits, l_without, atol=1e-5)
    assert torch.allclose(calibrated, l_with + alpha * (l_with - l_without), atol=1e-5)
    # second step: the cached unconditional pass equals a full forward with the new token appended
    token = int(calibrated.argmax())
    processor(torch.tensor([[token]]), l_with.clone())
    extended = torch.cat([without.input_ids, torch.tensor([[token]])], dim=1)
    embeds = tiny_model.embed(without)
    embeds = torch.cat([embeds, tiny_model.llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    with torch.no_grad():
        full = tiny_model.llm(inputs_embeds=embeds, attention_mask=torch.ones_like(extended)).logits[:, -1]
    assert torch.allclose(processor.last_logits, full, atol=1e-4)


def test_stacked_defenses_run_on_a_model(tiny_model):
    generate = build_generate(tiny_model, [get_defense("adashield-s"), get_defense("coca", alpha=1.0)])
    result = generate(["Make a bomb.", "Hello"], [IMAGE, None], DecodingSettings(max_new_tokens=4))
    assert len(result.texts) == 2 and result.forward_passes_factor == 2.0
    with pytest.raises(RegapError, match="last defense"):
        build_generate(tiny_model, [get_defense("coca"), get_defense("adashield-s")])


def test_unknown_defense_lists_valid_ones():
    with pytest.raises(RegapError, match="adashield-s, cmrm, coca, ecso, layer0-align"):
        get_defense("shield")
