"""The LM head gets contiguous inputs (generate's last-position view hits a CPU bf16 slow path)."""

from __future__ import annotations

import torch
from torch import nn

from regap.models.lm_head import keep_lm_head_input_contiguous


def _seen_contiguity(head: nn.Module) -> list[bool]:
    seen: list[bool] = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    return seen


def test_an_lvlm_feeds_its_lm_head_contiguous_views(tiny_model):
    head = tiny_model.llm.get_output_embeddings()
    seen = _seen_contiguity(head)  # runs after the LVLM's own hook
    hidden = torch.randn(3, 7, head.in_features, dtype=head.weight.dtype)
    last = hidden[:, -1:, :]  # what generate projects: a strided view
    assert not last.is_contiguous()
    assert torch.equal(head(last), head(last.contiguous()))
    assert seen == [True, True]


def test_generate_passes_the_head_contiguous_inputs_and_is_unchanged(tiny_model):
    from regap.models.generation import DecodingSettings

    seen = _seen_contiguity(tiny_model.llm.get_output_embeddings())
    settings = DecodingSettings(max_new_tokens=3, batch_size=2)
    first = tiny_model.generate(["hello there", "a much longer prompt than the first"], None, settings)
    assert seen and all(seen)
    assert tiny_model.generate(["hello there", "a much longer prompt than the first"], None, settings) == first


def test_hooked_once_and_models_without_a_head_are_left_alone():
    class NoHead(nn.Module):
        def get_output_embeddings(self):
            return None

    head = nn.Linear(4, 5)

    class WithHead(nn.Module):
        def get_output_embeddings(self):
            return head

    assert keep_lm_head_input_contiguous(WithHead()) and keep_lm_head_input_contiguous(WithHead())
    assert len(head._forward_pre_hooks) == 1
    assert keep_lm_head_input_contiguous(WithHead(), enabled=False) and len(head._forward_pre_hooks) == 0
    assert not keep_lm_head_input_contiguous(NoHead()) and not keep_lm_head_input_contiguous(nn.Linear(2, 2))
