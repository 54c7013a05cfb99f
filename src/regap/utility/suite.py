"""The built-in offline utility suite: does a (safety-tuned) model still see and still answer?

Three tasks, all offline:

* `synthetic-qa`: short-answer accuracy on held-out synthetic scenes (split
  `utility-heldout`, never the training split), per question type.
* `synthetic-caption`: which of a held-out scene's (colour, shape) objects a one-sentence
  description mentions: precision, recall and F1 averaged over images.
* `over-refusal`: how often the model refuses benign requests (keyword judge), for the
  starter set's `scary-but-safe` prompts, its ordinary ones, and XSTest's safe prompts.

Responses are cached in `OUT/utility_cache.jsonl`, one line per (task, item), keyed by
(model fingerprint, decoding settings, task, item id, prompt, image hash, and the inference-time
defenses' descriptions when `defenses` are given); a rerun only generates what is missing, and an
interrupted run loses at most the batch in flight. With `defenses` (`regap.defenses`, stacked as
in `regap safety`), every response comes from the defended generation.
`OUT/utility.json` and `OUT/utility_responses.jsonl` are rebuilt from the cache at the end.
See docs/utility.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from regap.errors import RegapError
from regap.files import file_sha256
from regap.models.attention import RUN_SETTING, check_attention, llm_attention, set_llm_attention
from regap.utility import scoring

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("synthetic-qa", "synthetic-caption", "over-refusal")
SYNTHETIC_TASKS = ("synthetic-qa", "synthetic-caption")

#: LLaVA-1.5's short-answer instruction (its VQAv2 / GQA prompt), appended to each question.
QA_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image in one sentence."
HELDOUT_SPLIT = "utility-heldout"

CACHE_FILE = "utility_cache.jsonl"
RESULTS_FILE = "utility.json"
RESPONSES_FILE = "utility_responses.jsonl"
DATA_DIR = "heldout_data"

#: Over-refusal groups, in report order.
SCARY = "scary-but-safe"
ORDINARY = "ordinary"
XSTEST = "xstest-safe"


@dataclass
class UtilityItem:
    """One prompt of one task, with what its response is scored against."""

    task: str
    item_id: str
    prompt: str
    gold: Any
    image: str | None = None  # path relative to the output folder
    image_hash: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names (a comma-separated string or a list) checked against `TASKS`; None = all."""
    if tasks is None:
        return list(TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise RegapError(f"no utility task given; valid tasks: {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise RegapError(f"unknown utility task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def ensure_heldout_data(out_dir: Path, n: int, seed: int, image_size: int, split_name: str) -> Path:
    """Write (or reuse) the held-out synthetic set under `OUT/heldout_data`."""
    from regap.data.synth import GENERATOR_VERSION, generate_synthetic

    folder = out_dir / DATA_DIR
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        wanted = {"n": n, "seed": seed, "image_size": image_size, "split_name": split_name,
                  "generator_version": GENERATOR_VERSION}
        if all(manifest.get(k) == v for k, v in wanted.items()) and (folder / "qa_eval.json").is_file():
            return folder
    generate_synthetic(folder, n, seed=seed, image_size=image_size, split_name=split_name, overwrite=True)
    return folder


def synthetic_items(out_dir: Path, n: int, seed: int, image_size: int, split_name: str,
                    tasks: Sequence[str]) -> dict[str, list[UtilityItem]]:
    folder = ensure_heldout_data(out_dir, n, seed, image_size, split_name)
    relative = folder.relative_to(out_dir)
    image_hashes: dict[str, str] = {}

    def image_hash(image: str) -> str:
        if image not in image_hashes:
            image_hashes[image] = file_sha256(folder / image)[:16]
        return image_hashes[image]

    items: dict[str, list[UtilityItem]] = {}
    if "synthetic-qa" in tasks:
        rows = json.loads((folder / "qa_eval.json").read_text())
        items["synthetic-qa"] = [
            UtilityItem(
                task="synthetic-qa", item_id=row["id"], prompt=f"{row['question']}\n{QA_SUFFIX}", gold=row["answer"],
                image=str(relative / row["image"]), image_hash=image_hash(row["image"]),
                meta={"question_type": row["question_type"], "question": row["question"],
                      "choices": row.get("choices")},
            )
            for row in rows
        ]
    if "synthetic-caption" in tasks:
        scenes = [json.loads(line) for line in (folder / "scenes.jsonl").read_text().splitlines() if line.strip()]
        items["synthetic-caption"] = [
            UtilityItem(
                task="synthetic-caption", item_id=scene["id"], prompt=CAPTION_PROMPT,
                gold=sorted(scoring.scene_objects(scene)),
                image=str(relative / scene["image"]), image_hash=image_hash(scene["image"]),
                meta={"n_objects": scene.get("n_objects")},
            )
            for scene in scenes
        ]
    return items


def over_refusal_items(xstest: str | Path | None, limit: int | None) -> list[UtilityItem]:
    """Starter benign prompts (scary-but-safe / ordinary) and XSTest's safe prompts; the
    first `limit` of each group in file order when `limit` is given."""
    from regap.safety.sources import load_requests_with_report

    specs = ["starter-benign"] + ([f"xstest:{xstest}"] if xstest is not None else [])
    groups: dict[str, list[UtilityItem]] = {SCARY: [], ORDINARY: [], XSTEST: []}
    for spec in specs:
        requests, report = load_requests_with_report(spec)
        if not report.clean:
            logger.warning(report.summary())
        for request in requests:
            if request.label != "benign":
                continue  # XSTest's unsafe contrast prompts measure safety, not over-refusal
            if request.source == "xstest":
                group = XSTEST
            else:
                group = SCARY if request.category == SCARY else ORDINARY
            groups[group].append(UtilityItem(
                task="over-refusal", item_id=f"{request.source}:{request.id}", prompt=request.prompt,
                gold="answer (no refusal)", meta={"group": group, "category": request.category,
                                                  "source": request.source},
            ))
    items: list[UtilityItem] = []
    for members in groups.values():
        items.extend(members if limit is None else members[:limit])
    return items


def utility_fingerprint(model: LVLM) -> str:
    """The shared model fingerprint (config, dtype, projector, backbone weight samples)."""
    from regap.models.fingerprint import model_fingerprint

    return model_fingerprint(model)


def supports_images(model: Any) -> bool:
    """Whether the model can take images (every regap LVLM can; a text-only wrapper cannot)."""
    return getattr(model, "vision", None) is not None and hasattr(model, "encode_images")


# --------------------------------------------------------------------------- generation


def _cache_key(fingerprint: str, decoding_hash: str, item: UtilityItem,
               defenses: list[dict[str, Any]] | None = None) -> str:
    """The item's cache key; the defenses' descriptions join it only when there are any, so
    caches written before defenses existed stay valid, and defended responses never mix with them."""
    from regap.provenance import json_hash

    parts: list[Any] = [fingerprint, decoding_hash, item.task, item.item_id, item.prompt, item.image_hash]
    return json_hash(parts + [defenses] if defenses else parts)


def generate_missing(model: LVLM, items: list[UtilityItem], store: Any, out_dir: Path, settings: Any,
                     fingerprint: str, decoding_hash: str, progress: bool = False, generate: Any = None,
                     defenses: list[dict[str, Any]] | None = None) -> int:
    """Generate every item whose response is not cached, one batch at a time; returns how many.
    `generate` is a `regap.defenses` GenerateFn (default: the model's own generation) and
    `defenses` its defenses' descriptions (part of the cache key)."""
    from regap.defenses import plain_generate
    from regap.images import load_image

    generate = generate or plain_generate(model)
    todo = [(item, key) for item in items
            if (key := _cache_key(fingerprint, decoding_hash, item, defenses)) not in store]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="utility", unit="item")
    for start in range(0, len(todo), settings.batch_size):
        chunk = todo[start : start + settings.batch_size]
        images = [load_image(out_dir / item.image) if item.image else None for item, _ in chunk]
        result = generate([item.prompt for item, _ in chunk], images, settings)
        store.add({
            "key": key, "task": item.task, "item_id": item.item_id, "prompt": item.prompt, "image": item.image,
            "response": text, "new_tokens": tokens, "model_fingerprint": fingerprint,
            "decoding_hash": decoding_hash, "batch_size": settings.batch_size,
            **({"defenses": [d["name"] for d in defenses], "defense_details": detail} if defenses else {}),
        } for (item, key), text, tokens, detail in zip(chunk, result.texts, result.new_tokens, result.details))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return len(todo)


# --------------------------------------------------------------------------- scoring


def _with_meta(entry: dict[str, Any], metric: str, higher_is_better: bool) -> dict[str, Any]:
    return {**entry, "metric": metric, "higher_is_better": higher_is_better}


def score_qa(items: list[UtilityItem], responses: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows, by_type = [], {}
    for item in items:
        response = responses[item.item_id]
        result = scoring.score_short_answer(response, item.gold, item.meta.get("choices"))
        kind = item.meta["question_type"]
        by_type.setdefault(kind, []).append(result.correct)
        rows.append({"task": item.task, "item_id": item.item_id, "prompt": item.prompt, "image": item.image,
                     "response": response, "gold": item.gold, "correct": result.correct,
                     "question_type": kind, "choices": item.meta.get("choices"), "rule": result.rule,
                     "mentioned": list(result.mentioned)})
    correct = [r["correct"] for r in rows]
    from regap.data.synth import QUESTION_TYPES

    order = [t for t in QUESTION_TYPES if t in by_type] + sorted(set(by_type) - set(QUESTION_TYPES))
    entry = _with_meta(scoring.proportion(sum(correct), len(correct)), "accuracy", True)
    entry["per_type"] = {t: scoring.proportion(sum(by_type[t]), len(by_type[t])) for t in order}
    return entry, rows


def score_captions(items: list[UtilityItem], responses: dict[str, str], seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows, f1s, precisions, recalls = [], [], [], []
    for item in items:
        response = responses[item.item_id]
        result = scoring.caption_scores(response, [tuple(p) for p in item.gold])
        f1s.append(result.f1)
        precisions.append(result.precision)
        recalls.append(result.recall)
        rows.append({"task": item.task, "item_id": item.item_id, "prompt": item.prompt, "image": item.image,
                     "response": response, "gold": [list(p) for p in item.gold], "correct": result.f1 == 1.0,
                     "precision": result.precision, "recall": result.recall, "f1": result.f1,
                     "mentioned": [list(p) for p in result.mentioned]})
    entry = _with_meta(scoring.mean_with_ci(f1s, seed=seed), "object F1 (mean over images)", True)
    entry["ci_method"] = "percentile bootstrap over images (2000 resamples)"
    entry["precision"] = scoring.mean_with_ci(precisions, seed=seed)
    entry["recall"] = scoring.mean_with_ci(recalls, seed=seed)
    return entry, rows


def score_over_refusal(items: list[UtilityItem], responses: dict[str, str], judge: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from regap.safety.judges import JudgeInput

    verdicts = judge.judge_batch([JudgeInput(prompt=item.prompt, response=responses[item.item_id] or "",
                                             category=item.meta["category"]) for item in items])
    rows = []
    for item, verdict in zip(items, verdicts):
        rows.append({"task": item.task, "item_id": item.item_id, "prompt": item.prompt, "image": None,
                     "response": responses[item.item_id], "gold": item.gold,
                     "correct": None if verdict.refused is None else not verdict.refused,
                     "refused": verdict.refused, "verdict": verdict.label, "group": item.meta["group"],
                     "category": item.meta["category"], "source": item.meta["source"]})

    def rate(selected: list[dict[str, Any]]) -> dict[str, Any]:
        judged = [r for r in selected if r["refused"] is not None]
        entry = scoring.proportion(sum(bool(r["refused"]) for r in judged), len(judged))
        entry["errors"] = len(selected) - len(judged)
        return entry

    entry = _with_meta(rate(rows), "refusal rate on benign prompts", False)
    entry["per_category"] = {g: rate([r for r in rows if r["group"] == g]) for g in (SCARY, ORDINARY, XSTEST)
                             if any(r["group"] == g for r in rows)}
    categories = sorted({(r["source"], r["category"]) for r in rows})
    entry["per_source_category"] = {f"{s}/{c}": rate([r for r in rows if (r["source"], r["category"]) == (s, c)])
                                    for s, c in categories}
    entry["judge"] = judge.describe()
    return entry, rows


# --------------------------------------------------------------------------- the run


def run_utility(
    model: LVLM,
    out_dir: str | Path,
    *,
    tasks: str | Sequence[str] | None = None,
    n: int = 100,
    seed: int = 0,
    xstest: str | Path | None = None,
    projector: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    image_size: int = 224,
    split_name: str = HELDOUT_SPLIT,
    refusal_limit: int | None = None,
    judge: str = "keyword",
    defenses: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the offline utility suite and write `utility.json` + `utility_responses.jsonl`.

    `model` is a preset name, a regap model folder, an HF LLaVA checkpoint, or an `LVLM`.
    `n` is the number of held-out scenes (about 5 questions each for `synthetic-qa`);
    `refusal_limit` keeps the first N prompts of each over-refusal group (default: all).
    `defenses` are inference-time defense specs (`cmrm`, `layer0-align:strength=0.5`, ...), stacked
    the first outermost as in `regap safety`; their calibration files go under `out_dir`.
    `attn_implementation` switches the LLM's attention kernel (None: as loaded). Greedy decoding.
    Returns the `utility.json` content.
    """
    from regap.defenses import build_generate, get_defense
    from regap.models import DecodingSettings
    from regap.provenance import json_hash, provenance
    from regap.safety.judges import get_judge
    from regap.files import write_json_atomic, write_jsonl_atomic
    from regap.safety.store import JsonlStore

    names = parse_tasks(tasks)
    check_attention(attn_implementation, RUN_SETTING)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RegapError(f"--n must be a positive integer, got {n!r}")
    if refusal_limit is not None and refusal_limit < 1:
        raise RegapError(f"--refusal-limit must be at least 1, got {refusal_limit}")
    if split_name == "train":
        raise RegapError("the utility suite must use held-out scenes: choose a split name other than 'train'")
    xstest_path = Path(xstest).expanduser() if xstest is not None else None
    if xstest_path is not None and not xstest_path.is_file():
        raise RegapError(f"--xstest: XSTest file not found: {xstest_path}")
    if projector is not None and not Path(projector).is_file():
        raise RegapError(f"--projector: projector checkpoint not found: {projector}")
    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)  # greedy
    defense_objs = [get_defense(spec) for spec in defenses or []]  # unknown names fail before any model loads
    for defense in defense_objs:
        defense.check_engine(settings.engine)
    judge_obj = get_judge(judge) if "over-refusal" in names else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if isinstance(model, (str, Path)):
        from regap.models import load_model

        model_name = str(model)
        lvlm = load_model(model_name, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model_name, lvlm = getattr(getattr(model, "config", None), "name", type(model).__name__), model
        if attn_implementation is not None:
            if not hasattr(lvlm, "llm"):
                raise RegapError(f"{RUN_SETTING} {attn_implementation!r}: the model {model_name} has no HF LLM to set it on")
            set_llm_attention(lvlm, attn_implementation)
    if projector is not None:
        from regap.models import load_projector

        load_projector(lvlm, projector)

    skipped: dict[str, str] = {}
    items: dict[str, list[UtilityItem]] = {}
    synthetic = [t for t in names if t in SYNTHETIC_TASKS]
    if synthetic and not supports_images(lvlm):
        for task in synthetic:
            skipped[task] = "the model takes no images"
            logger.warning("skipping %s: the model takes no images", task)
        synthetic = []
    if synthetic:
        items.update(synthetic_items(out, n, seed, image_size, split_name, synthetic))
    if "over-refusal" in names:
        items["over-refusal"] = over_refusal_items(xstest_path, refusal_limit)

    fingerprint = utility_fingerprint(lvlm)
    decoding = {k: v for k, v in settings.cache_key().items() if k != "batch_size"}  # batch size: not part of the key
    decoding_hash = json_hash(decoding)
    from regap.safety.pairs import make_pairs

    generate = build_generate(lvlm, defense_objs, workdir=out, engine=settings.engine,  # calibrations under OUT
                              make_pairs=make_pairs)
    described = [defense.describe() for defense in defense_objs]
    store = JsonlStore(out / CACHE_FILE)
    generated = 0
    for task in names:
        if task in items:
            generated += generate_missing(lvlm, items[task], store, out, settings, fingerprint, decoding_hash,
                                          progress=progress, generate=generate, defenses=described)

    results: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    for task in names:
        if task in skipped:
            results[task] = {"skipped": skipped[task], "score": None, "ci": [0.0, 1.0], "n": 0}
            continue
        responses = {item.item_id: store.get(_cache_key(fingerprint, decoding_hash, item, described))["response"]
                     for item in items[task]}
        if task == "synthetic-qa":
            entry, rows = score_qa(items[task], responses)
        elif task == "synthetic-caption":
            entry, rows = score_captions(items[task], responses, seed)
        else:
            entry, rows = score_over_refusal(items[task], responses, judge_obj)
        results[task] = entry
        all_rows.extend(rows)

    from regap.data.synth import GENERATOR_VERSION

    record = provenance(
        model=model_name, model_config=lvlm.config.to_dict(), model_fingerprint=fingerprint,
        projector=str(projector) if projector is not None else None, dtype=str(lvlm.dtype).replace("torch.", ""),
        attn_implementation=llm_attention(lvlm),
        tasks=names, n=n, seed=seed, refusal_limit=refusal_limit,
        data={"split_name": split_name, "image_size": image_size, "generator_version": GENERATOR_VERSION,
              "folder": DATA_DIR if synthetic else None},
        prompts={"qa_suffix": QA_SUFFIX, "caption": CAPTION_PROMPT},
        decoding={**settings.to_dict(), "greedy": True}, decoding_hash=decoding_hash, defenses=described,
        scoring_version=scoring.SCORING_VERSION,
        xstest={"path": str(xstest_path), "sha256": file_sha256(xstest_path)[:16]} if xstest_path is not None else None,
        cache={"file": CACHE_FILE, "generated_this_run": generated,
               "reused": sum(len(v) for v in items.values()) - generated},
    )
    summary = {"tasks": results, "provenance": record}
    write_jsonl_atomic(out / RESPONSES_FILE, all_rows)
    write_json_atomic(out / RESULTS_FILE, summary)
    return summary
