"""lmms-eval adapter: run standard benchmarks on a regap checkpoint.

    lmms-eval --model regap --model_args path=RUN_DIR --tasks mme,pope --batch_size 8

lmms-eval finds this model through the Python entry-point group `lmms_eval.models`
(registered in regap's pyproject as `regap = "regap.utility.lmms_eval_plugin:lmms_eval_manifest"`).
The entry point returns a `ModelManifest` naming `RegapLMMS`; lmms-eval imports that class
only when `--model regap` is asked for.

The request handling lives in `RegapLmmsAdapter`, a plain class that needs no lmms-eval:
it reads requests shaped like lmms-eval's `Instance` (anything with `.args`), so it is
tested without lmms-eval installed. `RegapLMMS` (defined only when lmms-eval imports)
is the thin `lmms` subclass that delegates to it. Importing this module never fails
because lmms-eval is missing.

`path` (alias `pretrained`) is anything `regap.models.load_model` accepts: a preset name,
a regap model folder (`regap_config.json` + `projector.safetensors`, e.g. a `regap
pretrain` run folder), or an HF LLaVA checkpoint. `projector=FILE` loads a projector
checkpoint on top.

Under `accelerate launch --num_processes N -m lmms_eval ...` (or torchrun) each process puts
its model on its local rank's GPU (`cuda:LOCAL_RANK`, as lmms-eval's own `llava_hf` does) and
reports its rank and the world size, so lmms-eval gives each process its share of the
documents instead of every process evaluating everything on `cuda:0`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from regap.errors import RegapError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
MODEL_ID = "regap"
DEFAULT_MAX_NEW_TOKENS = 256


# --------------------------------------------------------------------------- helpers


def _flatten(values: Any) -> list[Any]:
    if values is None:
        return []
    if isinstance(values, (list, tuple)):
        out: list[Any] = []
        for value in values:
            out.extend(_flatten(value))
        return out
    return [values]


def _to_image(visual: Any) -> Any:
    """A PIL image (RGB) from a PIL image or an image file path; anything else is refused."""
    from PIL import Image

    from regap.images import load_image, to_rgb

    if isinstance(visual, Image.Image):
        return to_rgb(visual)
    if isinstance(visual, (str, Path)) and Path(visual).is_file():
        return load_image(visual)
    kind = type(visual).__name__
    shown = str(visual)[:80] if isinstance(visual, (str, Path)) else kind
    raise RegapError(f"regap models take images only; got a {kind} visual ({shown}) - video and audio tasks are not supported")


def with_image_markers(context: str, n_images: int) -> str:
    """Put one `<image>` marker per visual at the start when the context has none.

    A context whose marker count already matches is kept; one with the wrong count has
    its markers removed and the right number put at the start (with a warning).
    """
    count = context.count(IMAGE_MARKER)
    if count == n_images:
        return context
    if count:
        logger.warning("context has %d %s marker(s) but %d image(s); moving them to the start",
                       count, IMAGE_MARKER, n_images)
        context = context.replace(IMAGE_MARKER, "").lstrip()
    return (IMAGE_MARKER + "\n") * n_images + context


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cut = len(text)
    for stop in until:
        if stop:
            position = text.find(stop)
            if 0 <= position < cut:
                cut = position
    return text[:cut]


def process_device(device: str | None = None) -> str:
    """This process's device. Under a multi-process launcher (`WORLD_SIZE` > 1, `LOCAL_RANK` set
    by `accelerate launch` and torchrun) an unspecified or bare `cuda` device becomes the local
    rank's GPU; an explicit `cuda:K` or `cpu` is kept. Without CUDA: `cpu`."""
    import torch

    if device not in (None, "", "cuda"):
        return str(device)
    if not torch.cuda.is_available():
        return "cpu" if device in (None, "") else "cuda"  # an explicit cuda fails loudly in torch
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return "cuda"


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RegapError(f"{name} must be an integer, got {value!r}") from None


# --------------------------------------------------------------------------- the adapter


class RegapLmmsAdapter:
    """lmms-eval's request protocol on top of a regap `LVLM`.

    * `generate_until(requests)`: each request's `.args` is `(context, gen_kwargs,
      doc_to_visual, doc_id, task, split)`; visuals are `doc_to_visual(task_dict[task][split][doc_id])`.
      `gen_kwargs` may hold `until` (str or list), `max_new_tokens` (or `max_gen_toks`),
      `temperature` (0 = greedy, > 0 samples), `top_p`, `num_beams`. Returns one string
      per request, cut before the first stop string.
    * `loglikelihood(requests)`: `.args` is `(context, continuation, doc_to_visual, doc_id,
      task, split)`; `continuation` may be a string or a function of the document. Returns
      `(logprob, is_greedy)` of the continuation as the assistant's reply to the context.

    Requests with equal generation settings are batched `batch_size` at a time; results
    come back in request order.
    """

    def __init__(
        self,
        path: str = "tiny",
        batch_size: int | str = 1,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        device: str | None = None,
        dtype: str = "auto",
        projector: str | None = None,
        template: str | None = None,
        model: LVLM | None = None,
    ) -> None:
        self.path = str(path)
        self.batch_size = 1 if str(batch_size).startswith("auto") else max(1, _as_int(batch_size, "batch_size"))
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        self.device = process_device(device)
        dtype = dtype or "auto"  # resolved by load_model for the device (regap.precision)
        self.template = template
        self.task_dict: dict[str, Any] = {}
        if model is None:
            from regap.models import load_model

            model = load_model(self.path, dtype=dtype, device=self.device)
        if projector:
            from regap.models import load_projector

            load_projector(model, projector)
        self.model = model.eval()

    # ---- shared ----------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise RegapError(f"no document {doc_id!r} in task_dict[{task!r}][{split!r}]") from None

    def _visuals(self, doc_to_visual: Callable[[Any], Any] | None, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        return [_to_image(v) for v in _flatten(doc_to_visual(self._doc(task, split, doc_id)))]

    def _settings(self, gen_kwargs: dict[str, Any] | None) -> tuple[Any, list[str]]:
        from regap.models import DecodingSettings

        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        max_new = kwargs.get("max_new_tokens", kwargs.get("max_gen_toks", self.max_new_tokens))
        temperature = float(kwargs.get("temperature") or 0.0)
        do_sample = temperature > 0 and kwargs.get("do_sample", True) is not False
        top_p = kwargs.get("top_p")
        settings = DecodingSettings(
            max_new_tokens=_as_int(max_new, "max_new_tokens"), do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=float(top_p) if (do_sample and top_p is not None) else 1.0,
            num_beams=_as_int(kwargs.get("num_beams") or 1, "num_beams"), batch_size=self.batch_size,
        )
        return settings, until

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: OrderedDict[str, list[int]] = OrderedDict()
        parsed = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            settings, until = self._settings(gen_kwargs)
            parsed.append((context, doc_to_visual, doc_id, task, split, settings, until))
            key = json.dumps(settings.to_dict(), sort_keys=True)
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            settings = parsed[indices[0]][5]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, images = [], []
                for index in chunk:
                    context, doc_to_visual, doc_id, task, split, _, _ = parsed[index]
                    visuals = self._visuals(doc_to_visual, doc_id, task, split)
                    prompts.append(with_image_markers(context, len(visuals)))
                    images.append(visuals or None)
                texts = self.model.generate(prompts, images, settings, template=self.template)
                for index, text in zip(chunk, texts):
                    outputs[index] = cut_at_stop(text, parsed[index][6]).strip()
        return [o if o is not None else "" for o in outputs]

    # ---- log-likelihood --------------------------------------------------------------------
    def _scored_sample(self, context: str, continuation: str, n_images: int) -> Any:
        from regap.models.inputs import tokenize_rendered
        from regap.models.templates import get_template

        template = get_template(self.template or self.model.config.template, self.model.tokenizer)
        rendered = template.render([{"role": "user", "content": context}], add_generation_prompt=True)
        if rendered.text.count(IMAGE_MARKER) != n_images:
            raise RegapError(f"the {self.template or self.model.config.template} template dropped image markers")
        full = rendered.text + continuation
        return tokenize_rendered(self.model.tokenizer, full, [(len(rendered.text), len(full))], self.model.tokens_per_image)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        import torch

        from regap.models.inputs import IGNORE_INDEX, pad_samples, pad_token_id

        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            samples, image_lists = [], []
            for request in chunk:
                context, continuation, doc_to_visual, doc_id, task, split = request.args[:6]
                if callable(continuation):
                    continuation = continuation(self._doc(task, split, doc_id))
                if isinstance(continuation, (list, tuple)):
                    continuation = continuation[0]
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                prompt = with_image_markers(str(context), len(visuals))
                samples.append(self._scored_sample(prompt, str(continuation), len(visuals)))
                image_lists.append(visuals)
            batch = pad_samples(samples, pad_token_id(self.model.tokenizer), "right")
            flat = [image for images in image_lists for image in images]
            batch.pixel_values = self.model.vision.preprocess(flat) if flat else None
            batch.images_per_sample = [len(images) for images in image_lists]
            with torch.no_grad():
                logits = self.model.forward(batch, use_labels=False).logits
            targets = batch.labels[:, 1:].to(logits.device)  # token t is predicted at position t - 1
            for row in range(len(chunk)):
                mask = targets[row] != IGNORE_INDEX
                if not bool(mask.any()):
                    results.append((0.0, True))  # an empty continuation: probability 1
                    continue
                wanted = targets[row][mask]
                log_probs = torch.log_softmax(logits[row, :-1][mask].float(), dim=-1)
                token_log_probs = log_probs.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
                greedy = bool((log_probs.argmax(dim=-1) == wanted).all())
                results.append((float(token_log_probs.sum()), greedy))
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("regap: multi-round generation is not supported; use single-turn tasks")


# --------------------------------------------------------------------------- lmms-eval glue


def lmms_eval_manifest() -> Any:
    """The entry point lmms-eval's model registry (v2) loads from group `lmms_eval.models`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.RegapLMMS")


try:  # lmms-eval is optional: without it this module only offers the adapter
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = None


if _LmmsBase is not None:

    class RegapLMMS(_LmmsBase):  # type: ignore[misc, valid-type]
        """lmms-eval model `regap`: `--model_args path=RUN_DIR[,projector=FILE,dtype=bfloat16,max_new_tokens=N]`."""

        is_simple = True

        def __init__(
            self,
            path: str | None = None,
            pretrained: str | None = None,
            batch_size: int | str = 1,
            max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
            device: str | None = None,
            dtype: str = "auto",
            projector: str | None = None,
            template: str | None = None,
            **kwargs: Any,
        ) -> None:
            location = path or pretrained or "tiny"
            self.model_name = f"regap:{location}"  # read by lmms.__init__ to name its cache folder
            super().__init__()
            ignored = {k: v for k, v in kwargs.items() if v is not None}
            if ignored:
                logger.warning("regap lmms-eval model ignores unknown arguments: %s", ", ".join(sorted(ignored)))
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Data parallel under accelerate launch: lmms-eval splits the documents by rank and
                # gathers through `self.accelerator` on `self.device` (as its llava_hf model does).
                from accelerate import Accelerator

                self.accelerator = Accelerator()
                self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            self._adapter = RegapLmmsAdapter(location, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                             device=device, dtype=dtype, projector=projector, template=template)

        @property
        def device(self) -> Any:
            import torch

            return torch.device(self._adapter.device)

        @property
        def batch_size(self) -> int:
            return self._adapter.batch_size

        @property
        def model(self) -> LVLM:
            return self._adapter.model

        @property
        def tokenizer(self) -> Any:
            return self._adapter.model.tokenizer

        def generate_until(self, requests: list[Any]) -> list[str]:
            self._adapter.task_dict = self.task_dict
            outputs = self._adapter.generate_until(requests)
            for request, output in zip(requests, outputs):
                self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), output)
            return outputs

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            self._adapter.task_dict = self.task_dict
            outputs = self._adapter.loglikelihood(requests)
            for request, output in zip(requests, outputs):
                if isinstance(request.args[1], str):  # a callable continuation cannot be hashed
                    self.cache_hook.add_partial("loglikelihood", (request.args[0], request.args[1]), output)
            return outputs

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            return self._adapter.generate_until_multi_round(requests)

    try:  # older lmms-eval versions look models up in a decorator-filled registry
        from lmms_eval.api.registry import register_model as _register_model
    except Exception:  # noqa: BLE001 - the registry module pulls optional packages; v2 needs no decorator
        _register_model = None
    if _register_model is not None:
        try:
            RegapLMMS = _register_model(MODEL_ID)(RegapLMMS)
        except Exception as exc:  # noqa: BLE001 - e.g. an old registry refusing a second registration
            logger.warning("could not register %r with lmms-eval's model registry: %s", MODEL_ID, exc)
