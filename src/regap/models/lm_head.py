"""Feed the LM head contiguous hidden states: a CPU bfloat16 slow path, avoided.

Why: on CPU, torch's bfloat16 `linear` runs far slower on a 3-D input that is a strided view
when the weight does not require grad (a frozen LLM, or one wrapped by peft) than on the same
values made contiguous (akin to pytorch/pytorch#151934, open). transformers' `generate` projects
only the prompt's last position onto the vocabulary, as the view `hidden_states[:, -1:, :]`.
Measured here (torch 2.13, one thread, AVX512 with native bf16), `[16, 1, 896] @ [896, 151936]`
(Qwen2.5-0.5B's LM head) under `no_grad` took 20.6 s as that view with a frozen weight, 0.05 s
with a weight that requires grad, and 0.03 s contiguous. On a trained `tiny-llava` that one
projection was two thirds of a safety batch's time (`bench/lm_head.py`, `bench/RESULTS.md`). The
hook copies such a view (batch x hidden values) and leaves contiguous inputs untouched, so the
outputs are the same.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

_handles: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def keep_lm_head_input_contiguous(llm: nn.Module, enabled: bool = True) -> bool:
    """Register the hook on `llm`'s output embeddings (once per module), or remove it with
    `enabled=False` (`bench/lm_head.py` times both); False when the model has no output
    embeddings to hook."""
    get_head = getattr(llm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        return False
    if enabled and head not in _handles:
        _handles[head] = head.register_forward_pre_hook(_contiguous_input)
    elif not enabled and head in _handles:
        _handles.pop(head).remove()
    return True
