"""Which attention kernel the LLM runs: a run setting, like the dtype, not part of a saved model.

transformers picks `sdpa` by default. That is the right choice on most GPUs, but not everywhere:
on a CPU in bfloat16 the SDPA backward is slow at the tiny model's shapes (bench/attention.py
measures eager against it), and a GPU user training a 7B LLaVA wants `flash_attention_2`. The
kernels compute the same attention, so the choice changes speed and rounding, not the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regap.errors import RegapError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

#: How errors name the run setting (the Python argument and its command-line flag).
RUN_SETTING = "attn_implementation (--attn-implementation)"

#: The implementations transformers ships (flash-attention needs its package and a GPU).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_attention(name: str | None, setting: str = "config key 'attn_implementation'") -> None:
    """A clear error, naming the `setting` that gave it, for a name that is not an attention
    implementation (None = the library's default)."""
    if name is not None and name not in ATTENTION_IMPLEMENTATIONS:
        raise RegapError(f"{setting} is {name!r}; valid: null (the library's default), "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")


def llm_attention(model: LVLM) -> str | None:
    """The attention implementation the model's LLM runs now (for logs, provenance and the
    fingerprint); None for a model without an HF LLM."""
    return getattr(getattr(getattr(model, "llm", None), "config", None), "_attn_implementation", None)


def set_llm_attention(model: LVLM, name: str | None) -> LVLM:
    """Switch the LLM's attention to `name`, in place; None leaves it as loaded.

    Set it before LoRA wraps the LLM. A kernel the machine cannot run (flash-attention without
    its package or a GPU) is a one-line error naming the setting, not a deep library trace."""
    check_attention(name)
    if name is None or llm_attention(model) == name:
        return model
    try:
        model.llm.set_attn_implementation(name)
    except (ImportError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegapError(f"attn_implementation {name!r} cannot run here: {first_line}") from exc
    return model


__all__ = ["ATTENTION_IMPLEMENTATIONS", "RUN_SETTING", "check_attention", "llm_attention", "set_llm_attention"]
