"""The LLM's attention kernel (`regap.models.attention`): switching it keeps the model's outputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from regap.errors import RegapError
from regap.models.attention import ATTENTION_IMPLEMENTATIONS, check_attention, llm_attention, set_llm_attention
from regap.models.random_tiny import tiny_random_lvlm


def _batch(model):
    conversation = [{"role": "user", "content": "What is in the picture?"}, {"role": "assistant", "content": "a cat"}]
    return model.build_inputs([conversation, conversation[:1] + [{"role": "assistant", "content": "no"}]],
                              template="chat")


def test_eager_and_sdpa_compute_the_same_outputs_in_float32():
    model = tiny_random_lvlm(seed=0).eval()
    batch = _batch(model)  # two rows of different lengths: the padding mask takes part
    with torch.no_grad():
        sdpa = model(batch)
        set_llm_attention(model, "eager")
        assert llm_attention(model) == "eager"
        eager = model(batch)
    assert torch.allclose(sdpa.logits, eager.logits, atol=1e-5)
    assert float(sdpa.loss) == pytest.approx(float(eager.loss), abs=1e-5)
    set_llm_attention(model, None)  # None leaves it as it is
    assert llm_attention(model) == "eager"


def test_unknown_or_unavailable_kernels_are_one_line_errors():
    with pytest.raises(RegapError, match="'attn_implementation' is 'flash'; valid: null"):
        check_attention("flash")
    assert "flash_attention_2" in ATTENTION_IMPLEMENTATIONS
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    model = tiny_random_lvlm(seed=0)
    with pytest.raises(RegapError, match="attn_implementation 'flash_attention_2' cannot run here"):
        set_llm_attention(model, "flash_attention_2")
    assert llm_attention(model) == "sdpa"  # a failed switch leaves the model as it was
