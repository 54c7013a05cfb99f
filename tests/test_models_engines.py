"""Generation engines: dynamic vs static cache parity, the vLLM adapter (against a fake `vllm`),
the missing-vLLM error, the cache key and the `--engine` flag."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image

from regap.errors import MissingDependencyError, RegapError
from regap.models import DecodingSettings

PROMPTS = [
    "Hi",
    "What is in this image? Describe the picture in detail, every shape and colour.",
    "Red or blue?",
    "Count the shapes please, left to right, then top to bottom.",
    "one two three",
    "Is the background white?",
    "A",
]
IMAGES = [None, Image.new("RGB", (56, 56), "white"), Image.new("RGB", (56, 56), "red"), None,
          Image.new("RGB", (64, 48), "blue"), None, Image.new("RGB", (56, 56), "black")]


def _generate(model, engine: str, batch_size: int):
    return model.generate_detailed(PROMPTS, IMAGES, DecodingSettings(max_new_tokens=12, batch_size=batch_size,
                                                                     engine=engine))


@pytest.mark.parametrize("batch_size", [4, 7])
def test_static_engine_matches_dynamic_fp32(tiny_model, batch_size):
    dynamic = _generate(tiny_model, "transformers", batch_size)
    static = _generate(tiny_model, "static", batch_size)
    assert static.texts == dynamic.texts
    assert static.new_tokens == dynamic.new_tokens
    assert all(dynamic.texts)  # random weights still emit text
    assert static.settings.engine == "static"


def test_filled_short_batch_keeps_outputs(tiny_model, monkeypatch):
    """The compiled-decoding path fills a short last batch with copies; outputs must not change."""
    from regap.models import lvlm

    assert lvlm.fill_short_batches("static", "cuda", has_processors=False)
    assert not lvlm.fill_short_batches("static", "cpu", has_processors=False)
    assert not lvlm.fill_short_batches("transformers", "cuda", has_processors=False)
    assert not lvlm.fill_short_batches("static", "cuda", has_processors=True)
    reference = _generate(tiny_model, "transformers", 4)
    monkeypatch.setattr(lvlm, "fill_short_batches", lambda *args, **kwargs: True)
    filled = _generate(tiny_model, "static", 4)  # 7 prompts: the second batch of 3 is filled to 4
    assert filled.texts == reference.texts and filled.new_tokens == reference.new_tokens


def test_prompts_are_ordered_by_token_length(tiny_model):
    conversations, image_lists = tiny_model.prepare_conversations(PROMPTS, IMAGES)
    lengths = tiny_model.prompt_lengths(conversations, image_lists)
    for conversation, images, length in zip(conversations, image_lists, lengths):
        single = tiny_model.build_inputs([conversation], [images], add_generation_prompt=True)
        assert single.input_ids.shape[1] == length  # image slots included
    assert lengths[1] > lengths[3]  # an image (16 slots) outweighs a longer text


def test_unknown_engine_lists_valid_names():
    with pytest.raises(RegapError, match="transformers, static, vllm"):
        DecodingSettings(engine="fast")
    with pytest.raises(RegapError, match="beam"):
        DecodingSettings(engine="vllm", num_beams=2)


def test_cache_key_keeps_default_engine_out():
    default = DecodingSettings()
    assert "engine" not in default.cache_key()
    assert default.to_dict()["engine"] == "transformers"  # provenance records it
    assert {k: v for k, v in default.to_dict().items() if k != "engine"} == default.cache_key()
    assert DecodingSettings(engine="static").cache_key()["engine"] == "static"
    assert DecodingSettings(engine="vllm").cache_key() != default.cache_key()


def test_static_cache_length_is_bucketed():
    from regap.models.generation import STATIC_CACHE_BUCKET

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    config = DecodingSettings(max_new_tokens=128, engine="static").generation_config(Tok(), prompt_length=617)
    assert config.cache_implementation == "static"
    assert config.max_cache_len % STATIC_CACHE_BUCKET == 0 and config.max_cache_len >= 617 + 128
    plain = DecodingSettings(max_new_tokens=128).generation_config(Tok(), prompt_length=617)
    assert plain.cache_implementation is None


# ---- vLLM, against a fake module --------------------------------------------------------------

class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _FakeLLM:
    instances: ClassVar[list[_FakeLLM]] = []
    eos = 0

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list[dict], _FakeSamplingParams, dict]] = []
        _FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, **kwargs):
        self.calls.append((prompts, sampling_params, kwargs))
        outputs = []
        for prompt in prompts:
            length = prompt["prompt_embeds"].shape[0]
            # the answer encodes the prompt's length: one token id = length, then the end token
            completion = types.SimpleNamespace(token_ids=[length, self.eos], text="", finish_reason="stop")
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("REGAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("REGAP_VLLM_MODEL", raising=False)
    monkeypatch.setenv("REGAP_VLLM_ARGS", json.dumps({"gpu_memory_utilization": 0.4}))
    _FakeLLM.instances.clear()
    return module


def test_vllm_engine_builds_embedding_prompts(tiny_model, fake_vllm):
    _FakeLLM.eos = tiny_model.tokenizer.eos_token_id
    result = tiny_model.generate_detailed(PROMPTS, IMAGES, DecodingSettings(max_new_tokens=9, batch_size=3,
                                                                            engine="vllm"))
    (llm,) = _FakeLLM.instances
    assert llm.kwargs["enable_prompt_embeds"] is True and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["gpu_memory_utilization"] == 0.4  # REGAP_VLLM_ARGS
    exported = json.loads((Path(llm.kwargs["model"]) / "config.json").read_text())
    assert exported["model_type"] == "llama"  # a random LLM has no folder: the one in memory is exported
    (prompts, params, options) = llm.calls[0]
    assert options == {"use_tqdm": False}
    assert params.kwargs["temperature"] == 0.0 and params.kwargs["max_tokens"] == 9
    assert params.kwargs["stop_token_ids"] == [tiny_model.tokenizer.eos_token_id]
    assert "seed" not in params.kwargs and "top_p" not in params.kwargs
    conversations, image_lists = tiny_model.prepare_conversations(PROMPTS, IMAGES)
    lengths = tiny_model.prompt_lengths(conversations, image_lists)
    assert [p["prompt_embeds"].shape for p in prompts] == sorted(
        [torch.Size([n, tiny_model.hidden_size]) for n in lengths], key=lambda s: -s[0])
    # each prompt's embeddings are exactly that prompt embedded alone (no padding rows)
    for prompt in prompts:
        index = next(i for i, n in enumerate(lengths) if n == prompt["prompt_embeds"].shape[0])
        alone = tiny_model.embed(tiny_model.build_inputs([conversations[index]], [image_lists[index]],
                                                         add_generation_prompt=True))[0]
        torch.testing.assert_close(prompt["prompt_embeds"], alone, rtol=1e-5, atol=1e-6)
    # outputs come back in the original order
    decode = tiny_model.tokenizer.decode
    assert result.texts == [decode([n], skip_special_tokens=True).strip() for n in lengths]
    assert result.new_tokens == [2] * len(PROMPTS)


def test_vllm_engine_sampling_and_explicit_model(tiny_model, fake_vllm, monkeypatch, tmp_path):
    _FakeLLM.eos = tiny_model.tokenizer.eos_token_id
    monkeypatch.setenv("REGAP_VLLM_MODEL", str(tmp_path / "my-llm"))
    settings = DecodingSettings(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=3, engine="vllm")
    tiny_model.generate_detailed(["Hi"], None, settings)
    (llm,) = _FakeLLM.instances
    assert llm.kwargs["model"] == str(tmp_path / "my-llm")
    params = llm.calls[0][1].kwargs
    assert (params["temperature"], params["top_p"], params["seed"]) == (0.7, 0.9, 3)
    tiny_model.generate_detailed(["Hello"], None, settings)
    assert len(_FakeLLM.instances) == 1  # one engine per model, reused


def test_vllm_engine_refuses_logits_processors(tiny_model, fake_vllm):
    with pytest.raises(RegapError, match="logits processors"):
        tiny_model.generate_detailed(["Hi"], None, DecodingSettings(engine="vllm"),
                                     logits_processor_factory=lambda indices: [])


def test_missing_vllm_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install vllm"):
        tiny_model.generate_detailed(["Hi"], None, DecodingSettings(engine="vllm"))


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_engine_flag_reaches_settings(monkeypatch, tmp_path):
    from regap.cli import main
    from regap.safety import runner

    seen = {}

    def fake_run_safety(run, *args, **kwargs):
        seen["settings"] = runner._decoding_settings(run)
        return {"judges": {}}

    monkeypatch.setattr(runner, "run_safety", fake_run_safety)
    assert main(["safety", "--model", "tiny", "--out", str(tmp_path / "o"), "--engine", "static"]) == 0
    assert seen["settings"].engine == "static"
    assert seen["settings"].cache_key()["engine"] == "static"


def test_cli_bad_engine_and_missing_vllm_fail_before_loading(monkeypatch, tmp_path, capsys):
    from regap.cli import main

    assert main(["safety", "--model", "no-such-model", "--out", str(tmp_path / "a"), "--engine", "fast"]) == 2
    assert "transformers, static, vllm" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["safety", "--model", "no-such-model", "--out", str(tmp_path / "b"), "--engine", "vllm"]) == 2
    assert "pip install vllm" in capsys.readouterr().err


def test_safety_run_records_engine_and_keys_cache(tmp_path):
    from regap.models.random_tiny import tiny_random_lvlm
    from regap.safety.runner import SafetyRun, run_safety

    model = tiny_random_lvlm()
    runs = {}
    for engine in ("transformers", "static"):
        run = SafetyRun(model="tiny-random", out=tmp_path / "run", prompts=["starter-harmful"], limit=3,
                        conditions=["text", "blank"], max_new_tokens=4, batch_size=4, engine=engine)
        runs[engine] = run_safety(run, progress=False, model=model)
    assert runs["static"]["provenance"]["decoding"]["engine"] == "static"
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 6  # same folder: the static engine's rows are keyed apart, not reused
    by_hash: dict[str, list[str]] = {}
    for row in rows:
        by_hash.setdefault(row["decoding_hash"], []).append(row["response"])
    assert len(by_hash) == 2
    first, second = by_hash.values()
    assert sorted(first) == sorted(second)  # fp32: identical responses
