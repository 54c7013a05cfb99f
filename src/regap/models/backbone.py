"""The language backbone as it was before stage 2, for the `backbone` safety condition.

The condition asks how safe the LLM was before visual instruction tuning changed it, so it
must not silently reuse the tuned LLM (that is the `text` condition):

* LoRA-tuned (the LLM is a peft model): the same weights with the adapter disabled
  (peft's `disable_adapter` context), so no second copy is loaded;
* fully tuned (`LVLM.llm_origin` is set: the LLM was read from a saved folder's `llm/` or
  trained in memory): the original weights, loaded from `config.llm_source`;
* untouched (a preset, a stage-1 model): the LLM itself; then `backbone` equals `text`;
* HF LLaVA / BLIP-2 checkpoints: their LLM was tuned with the vision side and the LLM they
  started from is not recorded, so this is an error rather than a copy of `text`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from regap.errors import RegapError
from regap.models.loading.build import load_llm
from regap.models.lvlm import LVLM

ADAPTER_DISABLED = "adapter disabled"
RELOADED = "reloaded from llm_source"
UNCHANGED = "unchanged (not tuned after stage 1)"


def _is_peft(llm: Any) -> bool:
    from peft import PeftModel

    return isinstance(llm, PeftModel)


def backbone_kind(model: LVLM) -> str:
    """How the backbone is obtained for `model`, or a `RegapError` saying why it cannot be."""
    config = model.config
    if _is_peft(model.llm):
        return ADAPTER_DISABLED
    for key, what in (("llava_hf", "an HF LLaVA"), ("blip2_hf", "a BLIP-2/InstructBLIP")):
        if config.extra.get(key):
            raise RegapError(f"backbone condition: {config.name} is {what} checkpoint, whose LLM was tuned together "
                             "with the vision side; the LLM it started from is not recorded, so it cannot be "
                             "evaluated alone (drop 'backbone' from --conditions, or evaluate the base LLM itself)")
    if getattr(model, "llm_origin", None) is None:
        return UNCHANGED
    if config.llm_source.startswith("random:"):
        raise RegapError(f"backbone condition: the LLM before stage 2 is unavailable: {model.llm_origin} may hold "
                         f"tuned weights and its source {config.llm_source!r} is a random initialisation that cannot "
                         "be reloaded")
    return RELOADED


class Backbone:
    """The model with its LLM as before stage 2; `active()` yields an LVLM that generates with it."""

    def __init__(self, model: LVLM) -> None:
        self.model = model
        self.kind = backbone_kind(model)
        self._reloaded: LVLM | None = None

    def describe(self) -> dict[str, Any]:
        return {"llm": self.model.config.llm_source, "how": self.kind}

    def prepare(self) -> None:
        """Load what `active()` needs now, so an unavailable LLM fails before any generation."""
        if self.kind == RELOADED:
            self._load_base()

    def _load_base(self) -> LVLM:
        if self._reloaded is None:
            source = self.model.config.llm_source
            try:
                llm, tokenizer = load_llm(source, self.model.dtype)
            except (RegapError, OSError, ValueError) as exc:
                raise RegapError(f"backbone condition: cannot load the LLM before stage 2 from {source!r}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            base = LVLM(self.model.config, self.model.vision, llm.to(self.model.device), tokenizer,
                        projector=self.model.projector)
            self._reloaded = base.eval()
        return self._reloaded

    @contextmanager
    def active(self) -> Iterator[LVLM]:
        """The LVLM to generate with (text only) while inside the block."""
        if self.kind == ADAPTER_DISABLED:
            with self.model.llm.disable_adapter():
                yield self.model
        elif self.kind == RELOADED:
            yield self._load_base()
        else:
            yield self.model
