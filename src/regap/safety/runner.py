"""The resumable safety evaluation: requests x attack conditions -> responses -> verdicts.

Generations are cached in `OUT/generations.jsonl`, keyed by (model fingerprint, condition,
request, decoding settings), and verdicts in `OUT/verdicts.jsonl`, keyed by (generation,
judge, judge prompt hash, the judge's options when it was given any). An interrupted run
therefore resumes without redoing or duplicating items, and adding a judge later judges
the cached responses only. Items that failed (an unreadable image, say) are cached as error
rows and retried on every rerun, and a benchmark image's row records the file's sha256, so a
replaced image is generated anew. A request whose prompt does not fit in the model's context
is never sent: it is an error row marked `too_long`, counted in the summary (`too_long`).
Generation itself is `regap.safety.cached_generation`, shared with the utility suite.
`OUT/results.jsonl` and `OUT/summary.json` are rebuilt from the caches at the end, and on
Ctrl-C from what is done so far (the summary then marked "interrupted").
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regap.errors import RegapError, RunInterrupted
from regap.files import file_sha256, write_json_atomic, write_jsonl_atomic
from regap.models.attention import RUN_SETTING, check_attention, llm_attention, set_llm_attention
from regap.models.fingerprint import model_fingerprint
from regap.provenance import json_hash, provenance
from regap.safety.cached_generation import CacheItem, GenerationReport, ItemInput
from regap.safety.store import JsonlStore

if TYPE_CHECKING:
    from regap.models.lvlm import LVLM

logger = logging.getLogger(__name__)


@dataclass
class SafetyRun:
    """What to evaluate. `prompts` are request-source specs (`starter-harmful`, `advbench:PATH`, ...)."""

    model: str
    out: Path
    prompts: list[str] = field(default_factory=lambda: ["starter-harmful"])
    conditions: list[str] = field(default_factory=lambda: ["text", "blank", "noise", "natural", "typo"])
    judges: list[str] = field(default_factory=lambda: ["keyword"])
    limit: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    dtype: str = "auto"
    attn_implementation: str | None = None  # the LLM's attention kernel (None: as loaded; regap.models.attention)
    projector: str | None = None
    seed: int = 0
    defenses: list[str] = field(default_factory=list)
    engine: str = "transformers"  # generation engine: transformers, static or vllm (regap.models.generation.ENGINES)
    source_limits: dict[str, int] = field(default_factory=dict)  # per-spec limits, overriding `limit`
    judge_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # judge name -> its options
    source_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # source name -> loader options
    condition_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # condition name -> its options
    sample: int | None = None  # N random requests of each source (numpy, `seed`) instead of the first N


@dataclass
class ResolvedRun:
    """A `SafetyRun` with every name turned into its object, once (`resolve_run`).

    A bad name, option or engine fails while resolving, before any model loads, and
    generation, judging and the summary then share these objects instead of rebuilding them:
    the cache keys and the provenance are computed from the very same conditions, defenses
    and decoding settings, and the model is fingerprinted once."""

    run: SafetyRun
    conditions: list[tuple[str, Any]]  # (name as given, ImageCondition), in --conditions order
    defenses: list[Any]  # Defense objects, the first outermost
    settings: Any  # DecodingSettings
    judges: dict[str, Any]  # name -> Judge; None for one that loads weights, until judging builds it
    fingerprint: str | None = None  # the model's, once it is loaded (`fingerprint_of`)

    @property
    def decoding_hash(self) -> str:
        return json_hash(self.settings.cache_key())  # the default engine is left out: older caches stay valid

    def fingerprint_of(self, model: LVLM) -> str:
        """The model's fingerprint, computed on first use (after its projector is loaded)."""
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(model)
        return self.fingerprint

    def judge(self, name: str) -> Any:
        """The judge `name`; one that loads weights is built on first use."""
        if self.judges[name] is None:
            from regap.safety.judges import get_judge

            self.judges[name] = get_judge(name, **self.run.judge_options.get(name, {}))
        return self.judges[name]

    def judge_tag(self, name: str) -> dict[str, str]:
        """`options_hash` of a judge given options (`-o`), which keys its verdicts; empty without
        options, so older caches stay valid."""
        from regap.redact import redact

        options = self.run.judge_options.get(name, {})
        return {"options_hash": json_hash(redact(options))} if options else {}

    def describe_judge(self, name: str) -> dict[str, Any]:
        return {**self.judge(name).describe(), **self.judge_tag(name)}


def resolve_run(run: SafetyRun) -> ResolvedRun:
    """Build `run`'s conditions, judges (those that load no weights; the others' names and option
    keys are checked), defenses and decoding settings, and check the engine, before any model loads."""
    from regap.defenses import get_defense
    from regap.models.engines import check_engine_available
    from regap.safety.conditions import get_condition
    from regap.safety.judges import get_judge, judge_class

    conditions = [(name, get_condition(name, **run.condition_options.get(name, {}))) for name in run.conditions]
    judges: dict[str, Any] = {}
    for name in run.judges:  # judges that load weights are built when judging
        options = run.judge_options.get(name, {})
        judges[name] = None if judge_class(name, options).loads_weights else get_judge(name, **options)
    defenses = [get_defense(name) for name in run.defenses]
    settings = _decoding_settings(run)  # bad engine names and settings fail here, before any model is loaded
    for defense in defenses:  # e.g. hook-based defenses cannot run with vLLM
        defense.check_engine(run.engine)
    check_attention(run.attn_implementation, RUN_SETTING)
    if run.attn_implementation is not None and run.engine == "vllm":
        raise RegapError("--attn-implementation sets the transformers LLM's kernel; the vllm engine picks its own "
                         "attention backend (leave --attn-implementation out, or use --engine transformers/static)")
    check_engine_available(run.engine)
    return ResolvedRun(run, conditions, defenses, settings, judges)


def _load_all_requests(specs: list[str], limit: int | None, out: Path,
                       source_limits: dict[str, int] | None = None,
                       source_options: dict[str, dict[str, Any]] | None = None,
                       sample: int | None = None, seed: int = 0) -> list[Any]:
    from regap.safety.sources import load_requests_with_report, parse_spec

    requests, reports = [], {}
    for spec in specs:
        options = (source_options or {}).get(parse_spec(spec)[0].strip().lower(), {})
        if sample is not None:
            items, report = load_requests_with_report(spec, sample=sample, seed=seed, **options)
        else:
            items, report = load_requests_with_report(spec, limit=(source_limits or {}).get(spec, limit), **options)
        requests.extend(items)
        reports[spec] = report.summary() if hasattr(report, "summary") else str(report)
        _say_what_was_left_out(spec, report, sample)
    seen: set[tuple[str, str]] = set()
    for request in requests:
        key = (request.source, request.id)
        if key in seen:
            raise RegapError(f"request {request.id!r} of source {request.source!r} appears twice in --prompts")
        seen.add(key)
    write_json_atomic(out / "data_report.json", reports)
    if not requests:
        raise RegapError(f"no requests loaded from {', '.join(specs)} ({'; '.join(reports.values())})")
    return requests


def _say_what_was_left_out(spec: str, report: Any, sample: int | None) -> None:
    """One console line for a source that dropped rows (malformed, duplicate ids, missing
    images) or had fewer requests than `--sample` asked for; `data_report.json` lists them all."""
    if not getattr(report, "clean", True):
        logger.warning("%s (listed in data_report.json)", report.summary())
    drawn_from = getattr(report, "sampled_from", None)
    if sample is not None and drawn_from is not None and sample > drawn_from:
        logger.warning("%s: --sample %d is more than its %d request(s); all of them are used", spec, sample, drawn_from)


def _input_sha256(condition: Any, request: Any) -> str | None:
    """sha256 of the file an item reads as its input (a benchmark's image), None for generated inputs."""
    path = condition.input_file(request)
    return file_sha256(path) if path is not None and path.is_file() else None


def _responder(generate: Any, backbone: Any, defenses: list[Any], settings: Any) -> Any:
    """The engine's `respond`: a batch's rows, generated through the defense stack; `backbone`
    items go to the LLM as it was before stage 2."""
    from regap.defenses import build_generate

    def respond(batch: list[tuple[CacheItem, ItemInput]]) -> list[dict[str, Any]]:
        rows = []
        for use_backbone in (False, True):
            part = [entry for entry in batch if entry[1].backbone == use_backbone]
            if not part:
                continue
            texts, images = [entry[1].text for entry in part], [entry[1].image for entry in part]
            if use_backbone:
                with backbone.active() as base:
                    result = build_generate(base, defenses)(texts, images, settings)
            else:
                result = generate(texts, images, settings)
            for (item, built), response, tokens, defended in zip(part, result.texts, result.new_tokens, result.details):
                details = {**built.details, "backbone": backbone.describe()} if use_backbone else built.details
                rows.append({**item.row, "prompt_sent": built.text, "condition_details": details,
                             "response": response, "new_tokens": tokens, "defense_details": defended,
                             "generation_calls": result.generation_calls, "error": None})
        return rows

    return respond


def _cache_items(resolved: ResolvedRun, fingerprint: str, requests: list[Any]) -> list[CacheItem]:
    """Every (condition, request) of the run as an engine item, keyed by model fingerprint,
    condition, request, decoding settings and defenses."""
    decoding_hash = resolved.decoding_hash
    described_defenses = [d.describe() for d in resolved.defenses]
    items = []
    for name, condition in resolved.conditions:
        condition_hash = json_hash(condition.describe())
        for request in requests:
            key = json_hash([fingerprint, condition_hash, request.source, request.id, decoding_hash,
                             described_defenses])
            row = {"key": key, "model_fingerprint": fingerprint, "condition": name, "request_id": request.id,
                   "source": request.source, "category": request.category, "label": request.label,
                   "prompt": request.prompt, "decoding_hash": decoding_hash}
            input_hash = _input_sha256(condition, request)
            if input_hash is not None:
                row["input_sha256"] = input_hash

            def build(condition: Any = condition, request: Any = request) -> ItemInput:
                text, image, details = condition.inputs(request)
                return ItemInput(text, image, details, condition.use_backbone)

            items.append(CacheItem(key, row, build))
    return items


def generate_missing(resolved: ResolvedRun, model: LVLM, requests: list[Any], store: JsonlStore,
                     progress: bool = True) -> GenerationReport:
    """Generate every (condition, request) response not yet in the cache, batch by batch
    (`regap.safety.cached_generation`)."""
    from regap.defenses import build_generate
    from regap.safety.cached_generation import generate_missing as generate_cached
    from regap.safety.cached_generation import is_current
    from regap.safety.pairs import make_pairs

    run, settings, defenses = resolved.run, resolved.settings, resolved.defenses
    generate = build_generate(model, defenses, workdir=run.out, engine=run.engine,  # calibrations: OUT/defenses/
                              make_pairs=make_pairs)
    items = _cache_items(resolved, resolved.fingerprint_of(model), requests)
    backbone = None
    backbone_conditions = {name for name, condition in resolved.conditions if condition.use_backbone}
    if any(item.row["condition"] in backbone_conditions and not is_current(item, store.get(item.key))
           for item in items):
        from regap.models.backbone import Backbone

        backbone = Backbone(model)  # an unavailable backbone fails here, before any generation
        backbone.prepare()
    return generate_cached(items, store, model, _responder(generate, backbone, defenses, settings),
                           batch_size=run.batch_size, max_new_tokens=run.max_new_tokens,
                           one_call_per_group=run.engine == "vllm", progress=progress)


def _decoding_settings(run: SafetyRun) -> Any:
    from regap.models import DecodingSettings

    return DecodingSettings(max_new_tokens=run.max_new_tokens, batch_size=run.batch_size, seed=run.seed,
                            engine=run.engine)


def judge_missing(resolved: ResolvedRun, generations: JsonlStore, verdicts: JsonlStore) -> dict[str, Any]:
    """Judge every cached response each judge has not judged yet; returns the judges' descriptions.

    A judge given options (`-o`) keys its verdicts by them too (`options_hash`, of the masked
    options): an API judge's prompt hash is its rubric, so `model=a` and `model=b` would
    otherwise share verdicts. Judges without options keep their keys, so older caches stay valid."""
    from regap.safety.judges import JudgeInput

    described = {}
    for name in resolved.judges:
        judge, tag = resolved.judge(name), resolved.judge_tag(name)
        described[name] = {**judge.describe(), **tag}
        todo = []
        for row in generations.rows():
            if row.get("response") is None:
                continue
            key = json_hash([row["key"], name, judge.prompt_hash, *tag.values()])
            if key not in verdicts:
                todo.append((key, row))
        for start in range(0, len(todo), 64):
            chunk = todo[start : start + 64]
            items = [JudgeInput(prompt=row["prompt"], response=row["response"], category=row["category"]) for _, row in chunk]
            results = judge.judge_batch(items)
            verdicts.add({"key": key, "generation": row["key"], "judge": name, "prompt_hash": judge.prompt_hash,
                          **tag, **{f"verdict_{k}": v for k, v in verdict.to_dict().items()}}
                         for (key, row), verdict in zip(chunk, results))
    return described


def assemble_results(generations: JsonlStore, verdicts: JsonlStore, judges: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per request x condition with every judge's verdict."""
    by_generation: dict[str, dict[str, Any]] = {}
    for verdict in verdicts.rows():
        name = verdict["judge"]
        if (name in judges and verdict["prompt_hash"] == judges[name]["prompt_hash"]
                and verdict.get("options_hash") == judges[name].get("options_hash")):
            by_generation.setdefault(verdict["generation"], {})[name] = {
                k[len("verdict_"):]: v for k, v in verdict.items() if k.startswith("verdict_")}
    rows = []
    for row in generations.rows():
        rows.append({**row, "verdicts": by_generation.get(row["key"], {})})
    rows.sort(key=lambda r: (r["condition"], r["source"], r["request_id"]))
    return rows


def run_safety(run: SafetyRun, progress: bool = True, model: LVLM | None = None) -> dict[str, Any]:
    """Generate, judge and summarise; safe to interrupt and rerun. `model`, when given, is an
    already loaded LVLM used instead of loading `run.model` (its projector as it is).

    Holds `OUT/.regap.lock` while it runs (a second run on the same folder fails at once).
    Ctrl-C keeps every finished batch in the caches, writes `results.jsonl` and a
    `summary.json` marked "interrupted" over the items judged so far, and raises
    `RunInterrupted` saying how far the run got."""
    from regap.run_lock import exclusive_out

    with exclusive_out(run.out):
        return _run_safety_locked(run, progress, model)


def _run_safety_locked(run: SafetyRun, progress: bool, model: LVLM | None) -> dict[str, Any]:
    from regap.models import load_model, load_projector

    from regap.checks import check_names, prepare_out_dir

    check_names(run.prompts, "--prompts")
    check_names(run.conditions, "--conditions")
    check_names(run.judges, "--judge")
    prepare_out_dir(run.out)
    resolved = resolve_run(run)  # every name, option and the engine checked before any work
    requests = _load_all_requests(run.prompts, run.limit, run.out, run.source_limits, run.source_options,
                                  run.sample, run.seed)
    generations = JsonlStore(run.out / "generations.jsonl")
    verdicts = JsonlStore(run.out / "verdicts.jsonl")
    damaged = {store.path.name: store.skipped for store in (generations, verdicts) if store.skipped}
    for file_name, lines in damaged.items():
        warnings.warn(f"{run.out / file_name}: skipped {len(lines)} unreadable line(s) (first: line {lines[0]['line']}, "
                      f"{lines[0]['reason']}); their items are redone", stacklevel=2)
    try:
        if model is None:
            model = load_model(run.model, dtype=run.dtype, attn_implementation=run.attn_implementation)
        else:
            set_llm_attention(model, run.attn_implementation)
        if run.projector:
            load_projector(model, run.projector)
        generate_missing(resolved, model, requests, generations, progress=progress)
        judges = judge_missing(resolved, generations, verdicts)
    except KeyboardInterrupt:
        raise _interrupted(resolved, model, requests, generations, verdicts) from None
    summary = _write_outputs(resolved, model, requests, generations, verdicts, judges, status="completed")
    from regap.safety.summary import plot_unsafe_rates

    plot_unsafe_rates(summary, run.out / "unsafe_rate.png")
    return summary


def _write_outputs(resolved: ResolvedRun, model: LVLM, requests: list[Any], generations: JsonlStore,
                   verdicts: JsonlStore, judges: dict[str, Any], status: str) -> dict[str, Any]:
    """`results.jsonl` (every cached row of this run) and `summary.json` (the rows every judge has
    judged, and failed generations: all rows when completed); returns the summary."""
    from regap.safety.summary import summarise

    run, settings = resolved.run, resolved.settings
    wanted = {(r.source, r.id) for r in requests}
    fingerprint = resolved.fingerprint_of(model)
    rows = [r for r in assemble_results(generations, verdicts, judges)
            if (r["source"], r["request_id"]) in wanted and r["condition"] in run.conditions
            and r["model_fingerprint"] == fingerprint]
    record = provenance(
        model=run.model, model_config=model.config.to_dict(), model_fingerprint=fingerprint,
        projector=run.projector, prompts=run.prompts, limit=run.limit, source_limits=run.source_limits,
        sample=run.sample, source_options=run.source_options,
        conditions={name: condition.describe() for name, condition in resolved.conditions},
        judges=judges, decoding={**settings.to_dict(), "greedy": not settings.do_sample},
        dtype=str(model.dtype).removeprefix("torch."), dtype_requested=run.dtype,
        attn_implementation=llm_attention(model),
        defenses=[d.describe() for d in resolved.defenses], status=status,
    )
    write_jsonl_atomic(run.out / "results.jsonl", ({**r, "provenance": "summary.json#provenance"} for r in rows))
    judged = [r for r in rows if r.get("response") is not None and all(name in r["verdicts"] for name in judges)]
    failed = [r for r in rows if r.get("response") is None]
    summary = summarise(rows if status == "completed" else judged + failed, list(judges), record)
    summary["status"] = status
    if status != "completed":
        summary["progress"] = {"expected": len(requests) * len(run.conditions), "generated": len(rows),
                               "judged": len(judged), "failed": len(failed)}
    too_long = sum(1 for r in rows if r.get("too_long"))
    if too_long:  # counted among the generation errors; named apart since a rerun cannot fix them
        summary["too_long"] = too_long
    damaged = {store.path.name: store.skipped for store in (generations, verdicts) if store.skipped}
    if damaged:
        summary["cache_skipped_lines"] = damaged
    write_json_atomic(run.out / "summary.json", summary)
    return summary


def _interrupted(resolved: ResolvedRun, model: LVLM, requests: list[Any], generations: JsonlStore,
                 verdicts: JsonlStore) -> RunInterrupted:
    """After Ctrl-C: write what the caches hold and say how far the run got."""
    run = resolved.run
    expected = len(requests) * len(run.conditions)
    if model is None:
        return RunInterrupted(f"safety run stopped while loading {run.model}; nothing generated in this run")
    # as judge_missing describes them; judges that load weights are left out
    judges = {name: resolved.describe_judge(name) for name, judge in resolved.judges.items()
              if judge is not None and not judge.loads_weights}
    summary = _write_outputs(resolved, model, requests, generations, verdicts, judges, status="interrupted")
    done = summary["progress"]
    return RunInterrupted(
        f"safety run stopped after {done['generated']}/{expected} responses ({done['judged']} judged), kept in "
        f"{run.out / 'generations.jsonl'}; partial {run.out / 'summary.json'} marked \"interrupted\"")
