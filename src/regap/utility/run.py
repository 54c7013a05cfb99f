"""One utility run: resolve -> generate -> score, the same shape as a safety run.

`UtilityRun` says what to evaluate; `resolve_utility` checks every name and option before any
model loads; generation is the engine the safety runner uses (`regap.safety.cached_generation`:
length-sorted batches, each appended to `OUT/utility_cache.jsonl` when done, a bad item or a
prompt longer than the model's context recorded as an error row and retried on the next run
instead of stopping this one); scoring reads the cache and writes `OUT/utility.json` and
`OUT/utility_responses.jsonl`. `run_utility(run)` does all three and holds `OUT/.regap.lock`.
See docs/utility.md.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from regap.errors import RegapError, RunInterrupted
from regap.files import file_sha256
from regap.models.attention import RUN_SETTING, check_attention, llm_attention, set_llm_attention
from regap.safety.cached_generation import CacheItem, GenerationReport, ItemInput
from regap.utility import scoring
from regap.utility.suite import (
    CACHE_FILE,
    CAPTION_PROMPT,
    DATA_DIR,
    HELDOUT_SPLIT,
    QA_SUFFIX,
    RESPONSES_FILE,
    RESULTS_FILE,
    SYNTHETIC_TASKS,
    UtilityItem,
    cache_key,
    over_refusal_items,
    parse_tasks,
    score_captions,
    score_over_refusal,
    score_qa,
    supports_images,
    synthetic_items,
    utility_fingerprint,
)

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

logger = logging.getLogger(__name__)


@dataclass
class UtilityRun:
    """What to evaluate. `model` is a preset name, a regap model folder or an HF LLaVA checkpoint
    (or the name recorded for an already loaded model passed to `run_utility`); `n` held-out
    scenes (about 5 questions each for `synthetic-qa`); `refusal_limit` keeps the first N prompts
    of each over-refusal group (default: all); `defenses` are inference-time defense specs
    stacked the first outermost, as in `regap safety`. Greedy decoding."""

    model: str
    out: Path
    tasks: str | Sequence[str] | None = None  # None: every task in `TASKS`
    n: int = 100
    seed: int = 0
    xstest: str | Path | None = None
    projector: str | Path | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    dtype: str = "auto"
    attn_implementation: str | None = None  # the LLM's attention kernel (None: as loaded)
    image_size: int = 224
    split_name: str = HELDOUT_SPLIT
    refusal_limit: int | None = None
    judge: str = "keyword"
    defenses: list[str] = field(default_factory=list)


@dataclass
class ResolvedUtility:
    """A `UtilityRun` with every name turned into its object, once (`resolve_utility`)."""

    run: UtilityRun
    tasks: list[str]
    settings: Any  # DecodingSettings
    defenses: list[Any]  # Defense objects, the first outermost
    judge: Any  # the over-refusal judge; None without that task
    xstest: Path | None

    @property
    def decoding_hash(self) -> str:
        from regap.provenance import json_hash

        return json_hash({k: v for k, v in self.settings.cache_key().items() if k != "batch_size"})

    @property
    def described_defenses(self) -> list[dict[str, Any]]:
        return [defense.describe() for defense in self.defenses]


def resolve_utility(run: UtilityRun) -> ResolvedUtility:
    """Check the tasks, sizes, files, defenses and judge of `run` before any model loads."""
    from regap.defenses import get_defense
    from regap.models import DecodingSettings
    from regap.safety.judges import get_judge

    names = parse_tasks(run.tasks)
    check_attention(run.attn_implementation, RUN_SETTING)
    if isinstance(run.n, bool) or not isinstance(run.n, int) or run.n < 1:
        raise RegapError(f"--n must be a positive integer, got {run.n!r}")
    if run.refusal_limit is not None and run.refusal_limit < 1:
        raise RegapError(f"--refusal-limit must be at least 1, got {run.refusal_limit}")
    if run.split_name == "train":
        raise RegapError("the utility suite must use held-out scenes: choose a split name other than 'train'")
    xstest = Path(run.xstest).expanduser() if run.xstest is not None else None
    if xstest is not None and not xstest.is_file():
        raise RegapError(f"--xstest: XSTest file not found: {xstest}")
    if run.projector is not None and not Path(run.projector).is_file():
        raise RegapError(f"--projector: projector checkpoint not found: {run.projector}")
    settings = DecodingSettings(max_new_tokens=run.max_new_tokens, batch_size=run.batch_size)  # greedy
    defenses = [get_defense(spec) for spec in run.defenses]  # unknown names fail before any model loads
    for defense in defenses:
        defense.check_engine(settings.engine)
    judge = get_judge(run.judge) if "over-refusal" in names else None
    return ResolvedUtility(run, names, settings, defenses, judge, xstest)


def run_utility(run: UtilityRun | str | Path | LVLM, out_dir: str | Path | None = None, *, progress: bool = False,
                model: LVLM | None = None, **options: Any) -> dict[str, Any]:
    """Run the offline utility suite; returns the `utility.json` content. `model`, when given, is
    an already loaded LVLM used instead of loading `run.model` (its projector as it is).

    Holds `OUT/.regap.lock` while it runs; Ctrl-C keeps every finished batch in the cache and
    raises `RunInterrupted`. The older form `run_utility(model, out_dir, **options)` (the model a
    name or an LVLM, the options `UtilityRun`'s fields) still works for one minor version, with
    a `DeprecationWarning`."""
    if not isinstance(run, UtilityRun):
        run, model = _from_old_arguments(run, out_dir, model, options)
    elif out_dir is not None or options:
        raise TypeError("run_utility(run: UtilityRun) takes no out_dir or options; set them on the UtilityRun")
    from regap.run_lock import exclusive_out

    resolved = resolve_utility(run)  # bad names fail before the folder is made
    with exclusive_out(run.out):
        try:
            return _run_locked(resolved, progress, model)
        except KeyboardInterrupt:
            raise RunInterrupted(f"utility run stopped; the responses generated so far are cached in "
                                 f"{run.out / CACHE_FILE}") from None


def _from_old_arguments(model: Any, out_dir: Any, loaded: Any, options: dict[str, Any]) -> tuple[UtilityRun, Any]:
    warnings.warn("run_utility(model, out_dir, **options) is deprecated; pass a UtilityRun: "
                  "run_utility(UtilityRun(model=..., out=..., ...), model=LVLM)", DeprecationWarning, stacklevel=3)
    if out_dir is None:
        raise TypeError("run_utility(model, out_dir, ...) needs out_dir")
    defenses = options.pop("defenses", None)
    if isinstance(model, (str, Path)):
        name = str(model)
    else:
        name, loaded = getattr(getattr(model, "config", None), "name", type(model).__name__), model
    return UtilityRun(model=name, out=Path(out_dir), defenses=list(defenses or []), **options), loaded


def _run_locked(resolved: ResolvedUtility, progress: bool, model: LVLM | None) -> dict[str, Any]:
    run = resolved.run
    out = Path(run.out)
    lvlm = _load(run, model)
    skipped: dict[str, str] = {}
    items: dict[str, list[UtilityItem]] = {}
    synthetic = [t for t in resolved.tasks if t in SYNTHETIC_TASKS]
    if synthetic and not supports_images(lvlm):
        for task in synthetic:
            skipped[task] = "the model takes no images"
            logger.warning("skipping %s: the model takes no images", task)
        synthetic = []
    if synthetic:
        items.update(synthetic_items(out, run.n, run.seed, run.image_size, run.split_name, synthetic))
    if "over-refusal" in resolved.tasks:
        items["over-refusal"] = over_refusal_items(resolved.xstest, run.refusal_limit)
    fingerprint = utility_fingerprint(lvlm)
    report = generate_utility(resolved, lvlm, items, fingerprint, progress)
    return score_utility(resolved, lvlm, items, skipped, fingerprint, report, bool(synthetic))


def _load(run: UtilityRun, model: LVLM | None) -> LVLM:
    """The model to evaluate: `model` as given (its attention kernel switched when asked), else `run.model`
    loaded; then `run.projector` loaded into it."""
    if model is None:
        from regap.models import load_model

        model = load_model(run.model, dtype=run.dtype, attn_implementation=run.attn_implementation)
    elif run.attn_implementation is not None:
        if not hasattr(model, "llm"):
            raise RegapError(f"{RUN_SETTING} {run.attn_implementation!r}: the model {run.model} has no HF LLM to set it on")
        set_llm_attention(model, run.attn_implementation)
    if run.projector is not None:
        from regap.models import load_projector

        load_projector(model, run.projector)
    return model


def _cache_items(items: list[UtilityItem], out: Path, fingerprint: str, decoding_hash: str,
                 defenses: list[dict[str, Any]]) -> list[CacheItem]:
    from regap.images import load_image

    def build(item: UtilityItem) -> ItemInput:
        return ItemInput(item.prompt, load_image(out / item.image) if item.image else None)

    cached = []
    for item in items:
        key = cache_key(fingerprint, decoding_hash, item, defenses)
        row = {"key": key, "task": item.task, "item_id": item.item_id, "prompt": item.prompt, "image": item.image}
        cached.append(CacheItem(key, row, lambda item=item: build(item)))
    return cached


def generate_utility(resolved: ResolvedUtility, model: LVLM, items: dict[str, list[UtilityItem]], fingerprint: str,
                     progress: bool = False) -> GenerationReport:
    """Generate every item whose response is not cached, task by task, through the defenses;
    returns what was done (all tasks together)."""
    from regap.defenses import build_generate
    from regap.safety.cached_generation import generate_missing
    from regap.safety.pairs import make_pairs
    from regap.safety.store import JsonlStore

    run, settings, described = resolved.run, resolved.settings, resolved.described_defenses
    out = Path(run.out)
    generate = build_generate(model, resolved.defenses, workdir=out, engine=settings.engine,  # calibrations under OUT
                              make_pairs=make_pairs)
    decoding_hash = resolved.decoding_hash
    store = JsonlStore(out / CACHE_FILE)

    def respond(batch: list[tuple[CacheItem, ItemInput]]) -> list[dict[str, Any]]:
        result = generate([built.text for _, built in batch], [built.image for _, built in batch], settings)
        return [{**item.row, "response": text, "new_tokens": tokens, "model_fingerprint": fingerprint,
                 "decoding_hash": decoding_hash, "batch_size": settings.batch_size,
                 **({"defenses": [d["name"] for d in described], "defense_details": detail} if described else {})}
                for (item, _), text, tokens, detail in zip(batch, result.texts, result.new_tokens, result.details)]

    total = GenerationReport()
    for task in resolved.tasks:
        if task not in items:
            continue
        done = generate_missing(_cache_items(items[task], out, fingerprint, decoding_hash, described), store, model,
                                respond, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                                progress=progress, desc="utility")
        for name in ("generated", "failed", "too_long", "reused"):
            setattr(total, name, getattr(total, name) + getattr(done, name))
    return total


def score_utility(resolved: ResolvedUtility, model: LVLM, items: dict[str, list[UtilityItem]], skipped: dict[str, str],
                  fingerprint: str, report: GenerationReport, synthetic: bool) -> dict[str, Any]:
    """Score every task from the cache and write `utility.json` and `utility_responses.jsonl`.
    Items without a response (error rows) are left out of the scores, counted in their task's
    `failed` (and `too_long`), and listed in the responses file with their reason."""
    from regap.files import write_json_atomic, write_jsonl_atomic
    from regap.safety.store import JsonlStore

    run = resolved.run
    out = Path(run.out)
    store = JsonlStore(out / CACHE_FILE)
    described, decoding_hash = resolved.described_defenses, resolved.decoding_hash
    results: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    for task in resolved.tasks:
        if task in skipped:
            results[task] = {"skipped": skipped[task], "score": None, "ci": [0.0, 1.0], "n": 0}
            continue
        cached = {item.item_id: store.get(cache_key(fingerprint, decoding_hash, item, described)) or {}
                  for item in items[task]}
        answered = [item for item in items[task] if cached[item.item_id].get("response") is not None]
        responses = {item.item_id: cached[item.item_id]["response"] for item in answered}
        if task == "synthetic-qa":
            entry, rows = score_qa(answered, responses)
        elif task == "synthetic-caption":
            entry, rows = score_captions(answered, responses, run.seed)
        else:
            entry, rows = score_over_refusal(answered, responses, resolved.judge)
        failed = [item for item in items[task] if cached[item.item_id].get("response") is None]
        if failed:
            entry["failed"] = len(failed)
            too_long = sum(1 for item in failed if cached[item.item_id].get("too_long"))
            if too_long:
                entry["too_long"] = too_long
            rows += [{"task": task, "item_id": item.item_id, "prompt": item.prompt, "image": item.image,
                      "response": None, "gold": item.gold, "correct": None,
                      "error": cached[item.item_id].get("error", "not generated"),
                      **({"too_long": True} if cached[item.item_id].get("too_long") else {})} for item in failed]
        results[task] = entry
        all_rows.extend(rows)
    summary = {"tasks": results, "provenance": _provenance(resolved, model, fingerprint, report, items, synthetic)}
    write_jsonl_atomic(out / RESPONSES_FILE, all_rows)
    write_json_atomic(out / RESULTS_FILE, summary)
    return summary


def _provenance(resolved: ResolvedUtility, model: LVLM, fingerprint: str, report: GenerationReport,
                items: dict[str, list[UtilityItem]], synthetic: bool) -> dict[str, Any]:
    from regap.data.synth import GENERATOR_VERSION
    from regap.provenance import provenance

    run, xstest = resolved.run, resolved.xstest
    attempted = report.generated + report.failed
    return provenance(
        model=run.model, model_config=model.config.to_dict(), model_fingerprint=fingerprint,
        projector=str(run.projector) if run.projector is not None else None,
        dtype=str(model.dtype).replace("torch.", ""), attn_implementation=llm_attention(model),
        tasks=resolved.tasks, n=run.n, seed=run.seed, refusal_limit=run.refusal_limit,
        data={"split_name": run.split_name, "image_size": run.image_size, "generator_version": GENERATOR_VERSION,
              "folder": DATA_DIR if synthetic else None},
        prompts={"qa_suffix": QA_SUFFIX, "caption": CAPTION_PROMPT},
        decoding={**resolved.settings.to_dict(), "greedy": True}, decoding_hash=resolved.decoding_hash,
        defenses=resolved.described_defenses, scoring_version=scoring.SCORING_VERSION,
        xstest={"path": str(xstest), "sha256": file_sha256(xstest)[:16]} if xstest is not None else None,
        cache={"file": CACHE_FILE, "generated_this_run": attempted,
               "reused": sum(len(v) for v in items.values()) - attempted},
    )
