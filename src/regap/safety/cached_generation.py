"""The cached generation engine the safety runner and the utility suite share.

A run lists its items: each has a cache key, the fields of its cached row known before
generation, and a function that builds what the model gets (text, image, per-item facts).
`generate_missing` then

* skips an item whose cached row is current: not an error row (those are retried on every
  run) and, for an item that reads a file (a benchmark image), made from the same file;
* works through the others in groups of `BATCHES_PER_GROUP` batches. It builds each item's
  input, and a `RegapError` there (an unreadable image, say) becomes that item's error row
  instead of stopping the run. It measures every prompt in tokens (image slots and template
  included) and records a prompt that cannot be answered within the model's context as an
  error row too (`too_long`), never sending it: its prefill alone would run for minutes.
  It sorts the group longest first, as the model orders one call, so a batch pads little;
* generates batch by batch, appending each batch to the cache (`JsonlStore`) as soon as it
  is done, so Ctrl-C or SIGTERM (`regap.signals`) stops the run between batches and loses at
  most the batch in flight; the bounded prompts keep each batch short. The vLLM engine
  schedules a whole group itself and gets it in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from regap.errors import RegapError

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM
    from regap.safety.store import JsonlStore

#: Prompts are sorted by token length, longest first, within groups of this many batches (the
#: model's own order, applied across the group), so a batch pads little; each batch is still
#: generated and appended to the cache on its own, so an interrupted run loses at most one batch.
BATCHES_PER_GROUP = 8


@dataclass
class ItemInput:
    """What one item sends: the text (or chat messages), the image (None: text only), facts
    stored with the response, and whether the LLM as it was before stage 2 answers it."""

    text: Any
    image: Any = None
    details: dict[str, Any] = field(default_factory=dict)
    backbone: bool = False


@dataclass
class CacheItem:
    """One item to generate: its cache key, its row's fields known before generation (an
    `input_sha256` among them when it reads a file) and the function that builds its input."""

    key: str
    row: dict[str, Any]
    build: Callable[[], ItemInput]


#: Generates one batch of built items and returns their complete cache rows (any order).
RespondFn = Callable[[list[tuple[CacheItem, ItemInput]]], list[dict[str, Any]]]


@dataclass
class GenerationReport:
    """What one `generate_missing` call did: responses generated, items recorded as errors
    (of which `too_long` had a prompt longer than the model's context), items already cached."""

    generated: int = 0
    failed: int = 0
    too_long: int = 0
    reused: int = 0


def is_current(item: CacheItem, cached: dict[str, Any] | None) -> bool:
    """A cached row is reused unless it is an error (retried) or its input file changed since.
    Rows written before inputs were hashed carry no hash and are kept."""
    if cached is None or cached.get("error") is not None:
        return False
    cached_hash = cached.get("input_sha256")
    return cached_hash is None or cached_hash == item.row.get("input_sha256")


def error_row(item: CacheItem, reason: str, **extra: Any) -> dict[str, Any]:
    """The cache row of an item that got no response."""
    return {**item.row, "response": None, "error": reason, **extra}


def _lengths(model: LVLM, built: list[tuple[CacheItem, ItemInput]]) -> list[int] | None:
    """Each prompt's token length as the model builds it; None for a model that cannot say."""
    if not built or not hasattr(model, "prompt_lengths"):
        return None
    conversations, image_lists = model.prepare_conversations([b[1].text for b in built], [b[1].image for b in built])
    return model.prompt_lengths(conversations, image_lists)


def _build_group(model: LVLM, group: list[CacheItem], max_new_tokens: int, report: GenerationReport,
                 ) -> tuple[list[tuple[CacheItem, ItemInput]], list[int] | None, list[dict[str, Any]]]:
    """The group's items that can be sent (with their token lengths) and the error rows of the others."""
    built, failed = [], []
    for item in group:
        try:
            built.append((item, item.build()))
        except RegapError as exc:  # one bad item (e.g. a missing image) is recorded (retried on rerun)
            failed.append(error_row(item, str(exc)))
    lengths = _lengths(model, built)
    if lengths is not None and hasattr(model, "context_overflow"):
        kept, kept_lengths = [], []
        for entry, length in zip(built, lengths):
            reason = model.context_overflow(length, max_new_tokens)
            if reason is None:
                kept.append(entry)
                kept_lengths.append(length)
            else:
                failed.append(error_row(entry[0], reason, too_long=True))
                report.too_long += 1
        built, lengths = kept, kept_lengths
    report.failed += len(failed)
    return built, lengths, failed


def length_batches(built: list[Any], lengths: list[int] | None, batch_size: int) -> list[list[Any]]:
    """`built` split into batches in the model's token-length order (longest first, stable), so
    each batch matches one the model would form from the whole group."""
    if lengths is not None and len(built) > batch_size:
        built = [built[i] for i in sorted(range(len(built)), key=lambda i: -lengths[i])]
    return [built[start : start + batch_size] for start in range(0, len(built), batch_size)]


def generate_missing(items: list[CacheItem], store: JsonlStore, model: LVLM, respond: RespondFn, *,
                     batch_size: int, max_new_tokens: int, one_call_per_group: bool = False,
                     progress: bool = True, desc: str = "generate") -> GenerationReport:
    """Generate every item whose cached row is not current, batch by batch (see the module
    docstring); `respond` turns one batch into its cache rows. `one_call_per_group`: the
    engine batches a whole group itself (vLLM)."""
    todo = [item for item in items if not is_current(item, store.get(item.key))]
    report = GenerationReport(reused=len(items) - len(todo))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        # per batch, with tqdm's rate and remaining-time estimate
        bar = tqdm(total=len(todo), desc=desc, unit="item", dynamic_ncols=True)
    group_size = batch_size * BATCHES_PER_GROUP
    try:
        for start in range(0, len(todo), group_size):
            built, lengths, failed = _build_group(model, todo[start : start + group_size], max_new_tokens, report)
            store.add(failed)
            if bar is not None and failed:
                bar.update(len(failed))
            batches = [built] if one_call_per_group else length_batches(built, lengths, batch_size)
            for batch in batches:
                if not batch:
                    continue
                store.add(respond(batch))
                report.generated += len(batch)
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return report
