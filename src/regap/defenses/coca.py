"""CoCA (constitutional calibration): amplify what a safety principle changes in the logits.

At every decoding step the model is run twice: on the request with a safety principle in
the prompt (HF's own generation loop) and without it (a second, batched KV-cached pass in
a logits processor). The calibrated logits are

    l = l_with + alpha * (l_with - l_without),

i.e. classifier-free guidance towards the principle with scale 1 + alpha. It costs a second
forward pass per generated token. CoCA must be the innermost (last) defense in a stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor

from regap.defenses.base import DefendedResult, Defense, GenerateFn, float_option, register_defense

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

PRINCIPLE = (
    "Safety principle: do not provide content that could help anyone cause harm, break the law or hurt "
    "people, whether the request is written in the text or shown in the image; refuse such requests politely."
)


class CalibrationProcessor(LogitsProcessor):
    """Runs the no-principle context alongside generation and returns calibrated scores."""

    def __init__(self, model: LVLM, prompts: list[Any], images: list[Any], alpha: float) -> None:
        self.model, self.alpha = model, alpha
        conversations, image_lists = model.prepare_conversations(prompts, images)
        batch = model.build_inputs(conversations, image_lists, add_generation_prompt=True, padding_side="left")
        self.embeds = model.embed(batch)
        self.attention = batch.attention_mask.to(model.device)
        self.image_mask = batch.image_mask
        self.cache = None
        self.last_logits: torch.Tensor | None = None  # the unconditional logits of the last step (for tests)

    @torch.no_grad()
    def _step(self, input_ids: torch.Tensor) -> torch.Tensor:
        llm = self.model.llm
        if self.cache is None:
            positions = (self.attention.cumsum(-1) - 1).clamp_min(0)
            with self.model.image_positions(self.image_mask):  # this context's own image positions (MoCa)
                out = llm(inputs_embeds=self.embeds, attention_mask=self.attention, position_ids=positions,
                          use_cache=True)
        else:
            self.attention = torch.cat([self.attention, self.attention.new_ones(self.attention.shape[0], 1)], dim=1)
            positions = self.attention.sum(-1, keepdim=True) - 1
            out = llm(input_ids=input_ids[:, -1:], attention_mask=self.attention, position_ids=positions,
                      cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        unconditional = self._step(input_ids)
        self.last_logits = unconditional
        calibrated = scores.float() + self.alpha * (scores.float() - unconditional)
        return calibrated.to(scores.dtype)


@register_defense("coca")
class CoCA(Defense):
    strength_option = "alpha"  # no documented range: any real scale of the guidance

    def __init__(self, alpha: float = 1.0, principle: str = PRINCIPLE) -> None:
        self.alpha, self.principle = float_option("coca", "alpha", alpha), principle

    def prompts(self) -> dict[str, str]:
        return {"principle": self.principle}

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def with_principle(self, prompt: str) -> str:
        return f"{self.principle}\n\n{prompt}"

    def wrap(self, next_fn: GenerateFn, model: LVLM) -> GenerateFn:
        from regap.defenses.base import plain_generate

        if getattr(next_fn, "__qualname__", "") != plain_generate(model).__qualname__:
            from regap.errors import RegapError

            raise RegapError("coca decodes by itself and must be the last defense in --defense")

        def generate(prompts, images, settings) -> DefendedResult:
            result = model.generate_detailed(
                [self.with_principle(p) for p in prompts], images, settings,
                logits_processor_factory=lambda idx: [CalibrationProcessor(model, [prompts[i] for i in idx],
                                                                           [images[i] for i in idx], self.alpha)],
            )
            details = [{"coca": {"alpha": self.alpha}} for _ in prompts]
            return DefendedResult(result.texts, result.new_tokens, details, 1, forward_passes_factor=2.0)

        return generate
