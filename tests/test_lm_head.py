"""The LM head: contiguous inputs (generate's last-position view hits a CPU bf16 slow path), and only
the positions a pass needs (passes that read hidden states project one)."""

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


def _projected_lengths(model) -> list[int]:
    lengths: list[int] = []
    model.llm.get_output_embeddings().register_forward_hook(lambda m, a, out: lengths.append(out.shape[1]))
    return lengths


def test_forward_can_keep_one_position_with_the_same_hidden_states(tiny_model):
    from PIL import Image

    conversations = [[{"role": "user", "content": "<image>\nwhat is this?"}]] * 2
    batch = tiny_model.build_inputs(conversations, [[Image.new("RGB", (56, 56))]] * 2,
                                    padding_side="right")
    with torch.no_grad():
        full = tiny_model(batch, output_hidden_states=True, use_labels=False)
        kept = tiny_model(batch, output_hidden_states=True, use_labels=False, logits_to_keep=1)
    assert full.logits.shape[1] == batch.attention_mask.shape[1] and kept.logits.shape[1] == 1
    assert all(torch.equal(a, b) for a, b in zip(full.hidden_states, kept.hidden_states))


def test_gap_collection_and_cmrm_calibration_project_one_position(tiny_model, tmp_path):
    from PIL import Image

    from regap.defenses.cmrm import last_token_states
    from regap.gap.collect import collect_hidden_states
    from regap.safety.pairs import make_pairs

    lengths = _projected_lengths(tiny_model)
    collect_hidden_states(tiny_model, make_pairs(4, images="blank"), tmp_path / "h", batch_size=2, progress=False)
    last_token_states(tiny_model, [[{"role": "user", "content": "<image>\nhi"}]] * 2,
                      [[Image.new("RGB", (56, 56))]] * 2)
    assert lengths and set(lengths) == {1}
