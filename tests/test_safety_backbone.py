"""The `backbone` condition generates with the LLM as it was before stage 2, never a copy of `text`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from regap.errors import RegapError
from regap.models import DecodingSettings
from regap.safety.runner import SafetyRun, run_safety
from regap.safety.sources import load_requests

SETTINGS = DecodingSettings(max_new_tokens=6, batch_size=4)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one torch thread (conftest.one_thread)."""


def _prompts() -> list[str]:
    return [r.prompt for r in load_requests("starter-harmful", limit=3)]


def _responses(out: Path, condition: str) -> list[str]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r["response"] for r in rows if r["condition"] == condition}
    return [by_prompt[p] for p in _prompts()]


def _run(model, out: Path) -> None:
    run = SafetyRun(model="in-memory", out=out, prompts=["starter-harmful"], conditions=["text", "backbone"],
                    judges=["keyword"], limit=3, max_new_tokens=SETTINGS.max_new_tokens,
                    batch_size=SETTINGS.batch_size)
    run_safety(run, progress=False, model=model)


def test_lora_backbone_is_the_llm_without_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    base = model.generate(_prompts(), settings=SETTINGS)
    torch.manual_seed(1)
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                                                     target_modules="all-linear"))
    adapted = model.generate(_prompts(), settings=SETTINGS)
    assert adapted != base  # the adapter changes the outputs
    _run(model, tmp_path / "run")
    assert _responses(tmp_path / "run", "backbone") == base
    assert _responses(tmp_path / "run", "text") == adapted
    assert model.generate(_prompts(), settings=SETTINGS) == adapted  # the adapter is enabled again
    row = next(json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()
               if '"backbone"' in line)
    assert row["condition_details"]["backbone"]["how"] == "adapter disabled"


def test_fully_tuned_backbone_reloads_the_original_llm(tmp_path):
    from regap.models import load_model, save_model
    from regap.models.random_tiny import tiny_random_lvlm

    model = tiny_random_lvlm(seed=0)
    model.llm.save_pretrained(tmp_path / "base-llm")
    model.tokenizer.save_pretrained(tmp_path / "base-llm")
    model.config = dataclasses.replace(model.config, llm_source=str(tmp_path / "base-llm"))
    base = model.generate(_prompts(), settings=SETTINGS)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for stage-2 full tuning
        for parameter in model.llm.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    save_model(model, tmp_path / "tuned", include_backbones=True)
    tuned = load_model(str(tmp_path / "tuned"))
    assert tuned.llm_origin == str(tmp_path / "tuned" / "llm")
    tuned_texts = tuned.generate(_prompts(), settings=SETTINGS)
    assert tuned_texts != base
    _run(tuned, tmp_path / "run")
    assert _responses(tmp_path / "run", "backbone") == base
    assert _responses(tmp_path / "run", "text") == tuned_texts


def test_unavailable_backbone_is_an_error_not_a_copy_of_text(tmp_path):
    from regap.models import load_model, save_model
    from regap.models.backbone import backbone_kind
    from regap.models.random_tiny import tiny_random_lvlm

    save_model(tiny_random_lvlm(seed=0), tmp_path / "saved", include_backbones=True)
    saved = load_model(str(tmp_path / "saved"))  # its LLM folder may be tuned; random:llama cannot be reloaded
    with pytest.raises(RegapError, match="LLM before stage 2 is unavailable"):
        _run(saved, tmp_path / "run")
    assert not (tmp_path / "run" / "generations.jsonl").exists() or \
        not (tmp_path / "run" / "generations.jsonl").read_text().strip()
    llava = tiny_random_lvlm(seed=0)
    llava.config = dataclasses.replace(llava.config, extra={"llava_hf": "llava-hf/llava-1.5-7b-hf"})
    with pytest.raises(RegapError, match="HF LLaVA checkpoint.*not recorded"):
        backbone_kind(llava)
    assert backbone_kind(tiny_random_lvlm(seed=0)) == "unchanged (not tuned after stage 1)"
