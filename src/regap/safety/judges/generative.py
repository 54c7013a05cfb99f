"""`GenerativeJudge`: the shared machinery for judges that read a causal LM's short generation.

Batched left-padded greedy decoding, per-item error verdicts, and the probability of a
verdict word from the first generated token's logits. Llama Guard (`llamaguard`) and the
HarmBench classifier (`harmbench`) build on it; BeaverDam reuses its loading helpers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from regap.errors import RegapError
from regap.safety.judges.base import Judge, JudgeInput, Verdict, judge_in_batches


@dataclass
class Generation:
    """A causal LM's answer to one prompt: decoded text, the probability of the positive
    verdict word (None when it cannot be computed) and the step it was read at."""

    text: str
    p_positive: float | None
    score_step: int | None
    score_token_matched: bool | None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str, device: str) -> Any:
    """A judge's dtype on its device; `auto` follows regap.precision (bf16 only where it is fast)."""
    from regap.precision import resolve_torch_dtype

    return resolve_torch_dtype(dtype, device)


def load_tokenizer(source: Any) -> Any:
    """A tokenizer object as is, or `AutoTokenizer` from a folder or hub id."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    from regap.models.loading.sources import hub_call

    return hub_call(str(source), AutoTokenizer.from_pretrained, str(source))


def describe_source(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__} object>"


def first_token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise RegapError(f"the judge tokenizer encodes {word!r} to no tokens")
    return int(ids[0])


class GenerativeJudge(Judge):
    """Base for judges that prompt a causal LM and read its short greedy answer.

    Prompts are tokenized with the tokenizer's special tokens (`add_bos=True`: the BOS
    of Llama tokenizers), as Meta's and HarmBench's reference code do.

    Subclasses give `build_prompt(item)`, `parse(text)` (raise ValueError on garbage),
    `verdict(parsed, generation)` and `score_words = (negative, positive)`: the verdict
    words whose first tokens' logits give the judge's probability (softmax over the two,
    at the first generated step whose token is not whitespace, so a model that starts
    its answer with a newline is read at the word).
    """

    loads_weights = True

    score_words: tuple[str, str] = ("safe", "unsafe")
    default_max_new_tokens: int = 16

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        max_input_tokens: int | None = None,
        add_bos: bool = True,
    ):
        if model is None or (isinstance(model, str) and not model.strip()):
            raise RegapError(f"{self.name} judge needs model=PATH_OR_HUB_ID (a local folder or a hub id)")
        if int(batch_size) < 1:
            raise RegapError(f"{self.name} judge: batch_size must be >= 1, got {batch_size!r}")
        self.model_source = model
        self.tokenizer_source = tokenizer if tokenizer is not None else model
        self.batch_size = int(batch_size)
        self.add_bos = bool(add_bos)
        self.max_new_tokens = int(max_new_tokens or self.default_max_new_tokens)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(self.tokenizer_source)
        self.model = self._load_model(model)
        self._prepare_tokenizer()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_input_tokens = int(max_input_tokens) if max_input_tokens else (
            int(limit) - self.max_new_tokens if limit else None
        )
        self.score_token_ids = tuple(first_token_id(self.tokenizer, w) for w in self.score_words)
        if self.score_token_ids[0] == self.score_token_ids[1]:
            raise RegapError(
                f"{self.name} judge: {self.score_words[0]!r} and {self.score_words[1]!r} start with the same token "
                "in this tokenizer, so their probabilities cannot be told apart"
            )
        self._prompt_hash = super().prompt_hash

    # -- loading
    def _load_model(self, source: Any) -> Any:
        if isinstance(source, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            from regap.models.loading.sources import hub_call

            model = hub_call(str(source), AutoModelForCausalLM.from_pretrained, str(source), dtype=self.dtype)
        else:
            model = source
        from regap.models.lm_head import keep_lm_head_input_contiguous

        keep_lm_head_input_contiguous(model)  # its generate's last-position logits (a CPU bf16 slow path)
        return model.to(self.device).eval()

    def _prepare_tokenizer(self) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise RegapError(f"{self.name} judge: the tokenizer has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"

    @property
    def prompt_hash(self) -> str:
        return self._prompt_hash

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (configured if isinstance(configured, (list, tuple)) else [configured]) + [self.tokenizer.eos_token_id]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        return ids

    def options(self) -> dict[str, Any]:
        return {
            "model": describe_source(self.model_source),
            "tokenizer": describe_source(self.tokenizer_source),
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "max_input_tokens": self.max_input_tokens,
            "add_bos": self.add_bos,
            "decoding": "greedy",
            "score_words": list(self.score_words),
        }

    # -- subclass hooks
    def build_prompt(self, item: JudgeInput) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def verdict(self, parsed: dict[str, Any], generation: Generation) -> Verdict:
        raise NotImplementedError

    # -- running
    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        """Greedy answers to `prompts` (one padded batch)."""
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=self.add_bos)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        eos = self._eos_ids()
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tok.pad_token_id, eos_token_id=eos or None,
            output_logits=True, return_dict_in_generate=True,
        )
        with torch.no_grad():
            out = self.model.generate(**enc, generation_config=config)
        start = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, start:].cpu()
        logits = [step.float().cpu() for step in (out.logits or ())]
        neg_id, pos_id = self.score_token_ids
        special = set(tok.all_special_ids)
        results = []
        for row in range(new_tokens.shape[0]):
            ids = [int(t) for t in new_tokens[row]]
            text = tok.decode(ids, skip_special_tokens=True)
            p = step_found = matched = None
            for step, token in enumerate(ids[: len(logits)]):
                if token in special:
                    break
                if tok.decode([token], skip_special_tokens=True).strip():
                    pair = torch.stack([logits[step][row, neg_id], logits[step][row, pos_id]])
                    p = float(torch.softmax(pair, dim=0)[1])
                    step_found, matched = step, token in (neg_id, pos_id)
                    break
            results.append(Generation(text, p, step_found, matched))
        return results

    def judge_batch(self, items: list[JudgeInput]) -> list[Verdict]:
        return judge_in_batches(self, items, self._checked_prompt, self.generate, self._finish, self.batch_size)

    def _checked_prompt(self, item: JudgeInput) -> str:
        prompt = self.build_prompt(item)
        if self.max_input_tokens is not None:
            n = len(self.tokenizer(prompt, add_special_tokens=self.add_bos)["input_ids"])
            if n > self.max_input_tokens:
                raise ValueError(f"judge prompt has {n} tokens, over the limit of {self.max_input_tokens}")
        return prompt

    def _finish(self, _index: int, gen: Generation) -> Verdict:
        """The verdict for one generation; a parse failure keeps the raw answer in its detail."""
        try:
            return self.verdict(self.parse(gen.text), gen)
        except Exception as exc:
            return Verdict.error(self.name, self.prompt_hash, exc, raw=gen.text, p_positive=gen.p_positive)

    def judge_one(self, item: JudgeInput) -> Verdict:
        return self.judge_batch([item])[0]


__all__ = [
    "Generation",
    "GenerativeJudge",
    "describe_source",
    "first_token_id",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]
