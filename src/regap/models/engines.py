"""The optional vLLM generation engine: the LVLM embeds, vLLM decodes.

vLLM knows nothing of regap's vision tower and projector, so the LVLM computes each prompt's
input embeddings itself (text embeddings with the projected image tokens scattered in, exactly
what the transformers engines feed to `generate`) and hands them to vLLM as prompt embeddings
(`LLM(..., enable_prompt_embeds=True)`, prompts `{"prompt_embeds": tensor[seq, hidden]}`).
vLLM loads the language model's weights itself, from a folder:

1. `REGAP_VLLM_MODEL` (or `vllm_model=` to `get_vllm_engine`), when given;
2. else the model config's `llm_source` when it resolves to a plain causal-LM folder
   (the `tiny` preset's LLM is such a folder in the regap cache);
3. else (random LLMs, HF LLaVA checkpoints, hub ids) the LLM in memory is written once to
   `$REGAP_CACHE/vllm/<model fingerprint>` with `save_pretrained`.

A language model fine-tuned in memory but still pointing at its original `llm_source` would be
decoded with the original weights: give `REGAP_VLLM_MODEL` (a `save_pretrained` folder) then.
Extra `vllm.LLM` arguments (e.g. `{"gpu_memory_utilization": 0.5}`, since the LVLM's own copy
of the LLM shares the GPU) come from `REGAP_VLLM_ARGS` as a JSON object.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from regap.errors import InternalError, MissingDependencyError, RegapError
from regap.models.generation import DecodingSettings, count_until_eos, eos_token_ids
from regap.models.loading.sources import resolve_source

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

VLLM_INSTALL = "pip install vllm"
# Prompts embedded and handed to vLLM per `LLM.generate` call: vLLM batches internally, this only
# bounds the host memory the embeddings take.
VLLM_CALL_SIZE = 256
_PLAIN_LLM_TYPES_EXCLUDED = {"llava", "blip-2", "instructblip", "llava_next"}
_ENGINES: weakref.WeakKeyDictionary[LVLM, VLLMEngine] = weakref.WeakKeyDictionary()


def import_vllm() -> Any:
    """The `vllm` module, or a MissingDependencyError naming the install command."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise MissingDependencyError(f"the vllm engine needs vLLM, which is not installed: {VLLM_INSTALL}") from exc


def check_engine_available(name: str) -> None:
    """Fail before any model is loaded when the chosen engine's package is missing."""
    if name == "vllm":
        import_vllm()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")


def _is_plain_llm_folder(location: str) -> bool:
    config = Path(location) / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return False
    return model_type is not None and model_type not in _PLAIN_LLM_TYPES_EXCLUDED


def export_llm(model: LVLM) -> Path:
    """Write the LVLM's language model and tokenizer once to the cache (keyed by the model's
    fingerprint, which samples every LLM weight), so vLLM decodes the weights in memory."""
    from regap.cache import cache_dir
    from regap.files import apply_umask
    from regap.models.fingerprint import model_fingerprint

    folder = cache_dir("vllm") / model_fingerprint(model)
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.llm.save_pretrained(partial)
    model.tokenizer.save_pretrained(partial)
    apply_umask(partial)
    partial.rename(folder)  # config.json appears only with a complete folder
    return folder


def vllm_model_path(model: LVLM, explicit: str | None = None) -> str:
    """Where vLLM loads the language model from (see the module docstring for the order)."""
    explicit = explicit or os.environ.get("REGAP_VLLM_MODEL")
    if explicit:
        return explicit
    source = model.config.llm_source
    if not source.startswith("random:"):
        location = resolve_source(source)
        if _is_plain_llm_folder(location):
            return location
    return str(export_llm(model))


def _env_llm_kwargs() -> dict[str, Any]:
    raw = os.environ.get("REGAP_VLLM_ARGS")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RegapError(f"REGAP_VLLM_ARGS is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RegapError("REGAP_VLLM_ARGS must be a JSON object of vllm.LLM arguments")
    return value


class VLLMEngine:
    """One `vllm.LLM` for one LVLM; created on first use and kept while the LVLM lives."""

    def __init__(self, model: LVLM, vllm_model: str | None = None, **llm_kwargs: Any) -> None:
        vllm = import_vllm()
        self.path = vllm_model_path(model, vllm_model)
        options = {"dtype": _dtype_name(model.dtype), **_env_llm_kwargs(), **llm_kwargs}
        self.llm = vllm.LLM(model=self.path, tokenizer=self.path, enable_prompt_embeds=True, **options)
        self.options = options

    def sampling_params(self, settings: DecodingSettings, eos_ids: set[int]) -> Any:
        """Greedy (temperature 0) unless sampling; stop on the same end tokens as transformers."""
        vllm = import_vllm()
        options: dict[str, Any] = {
            "max_tokens": settings.max_new_tokens, "repetition_penalty": settings.repetition_penalty,
            "stop_token_ids": sorted(eos_ids), "skip_special_tokens": True,
        }
        if settings.do_sample:
            options.update(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
        else:
            options.update(temperature=0.0)
        return vllm.SamplingParams(**options)

    def generate(self, prompt_embeds: Sequence[torch.Tensor], params: Any) -> list[list[int]]:
        """Generated token ids per prompt, in the prompts' order (vLLM returns them so)."""
        outputs = self.llm.generate([{"prompt_embeds": e} for e in prompt_embeds], params, use_tqdm=False)
        if len(outputs) != len(prompt_embeds):
            raise InternalError(f"vLLM returned {len(outputs)} outputs for {len(prompt_embeds)} prompts")
        return [list(output.outputs[0].token_ids) for output in outputs]


def get_vllm_engine(model: LVLM, vllm_model: str | None = None, **llm_kwargs: Any) -> VLLMEngine:
    """The LVLM's vLLM engine, created once (arguments apply only to that first creation)."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = VLLMEngine(model, vllm_model, **llm_kwargs)
        _ENGINES[model] = engine
    return engine


def prompt_embeddings(model: LVLM, conversations: Sequence[Any], image_lists: Sequence[Any],
                      template: str | None = None) -> list[torch.Tensor]:
    """Each prompt's unpadded input embeddings [tokens, hidden] on the CPU, in the LVLM's dtype."""
    batch = model.build_inputs(list(conversations), list(image_lists), template=template,
                               add_generation_prompt=True, padding_side="left")
    embeds = model.embed(batch)
    mask = batch.attention_mask.bool()
    return [embeds[row][mask[row].to(embeds.device)].detach().cpu() for row in range(embeds.shape[0])]


def generate_vllm(model: LVLM, conversations: Sequence[Any], image_lists: Sequence[Any], order: Sequence[int],
                  settings: DecodingSettings, template: str | None = None,
                  progress: bool = False) -> tuple[list[str], list[int]]:
    """Texts and generated-token counts (up to and including the first end token), in the
    original prompt order; `order` is the length order the prompts are embedded in."""
    engine = get_vllm_engine(model)
    eos_ids = eos_token_ids(model.tokenizer, settings.generation_config(model.tokenizer))
    params = engine.sampling_params(settings, eos_ids)
    texts: list[str] = [""] * len(order)
    counts: list[int] = [0] * len(order)
    starts = range(0, len(order), VLLM_CALL_SIZE)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate (vllm)", unit="call")
    for start in starts:
        call = list(order[start : start + VLLM_CALL_SIZE])
        embeds: list[torch.Tensor] = []
        for offset in range(0, len(call), settings.batch_size):  # vision tower + projector in batches
            part = call[offset : offset + settings.batch_size]
            embeds.extend(prompt_embeddings(model, [conversations[i] for i in part], [image_lists[i] for i in part],
                                            template))
        for index, token_ids in zip(call, engine.generate(embeds, params)):
            texts[index] = model.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
            counts[index] = count_until_eos(token_ids, eos_ids)
    return texts, counts
