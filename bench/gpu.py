"""regap's 7B path on one GPU: the training step, `regap gap`, and safety generation, in one command.

Builds a LLaVA-1.5-7B-shaped model with random weights from transformers' config classes
(CLIP ViT-L/14-336 -> 576 image tokens, `mlp2x_gelu`, a Llama-2-7B-shaped LM, bf16) as a
regap `LVLM` (the `clip-vicuna-7b` preset's feature selection, projector and `vicuna_v1`
template; no model hub; built by `llava_shape.py`, shared with `rehearse.py`), then runs
regap's own code on it:

* **train**: `regap.train.train` (the real loop: data loader, collator, caption loss, ReGap,
  AdamW, logging) for stage 1 (projector only) at batch 32 with gradient checkpointing and
  batch 16 without, each with ReGap off and on (lam 1, layer 0, centroid, batch pooling);
  samples/s over the steps after the warm-up ones, from the run's own metrics.jsonl;
* **gap**: `regap gap`'s collection (`collect_hidden_states`) and exact analysis
  (`analyse`, fitted on the GPU) for 100 pairs (scenes + starter-benign texts, reference
  protocol); "MIR protocol" = collection + analysis without intervals; the default 1000
  linearised bootstrap replicates are timed separately;
* **generate**: `LVLM.generate_detailed` (what `regap safety` calls) with the `transformers`
  and `static` engines, and `vllm` when it is importable, at batch 16 and 64, 617-token
  prompts (576 image tokens), exactly 128 new tokens (the end token is suppressed, except
  under vLLM, which takes no logits processor: there tokens/s counts what it generated);
* **syncs**: the ReGap loss forward, backward and step under `torch.cuda.set_sync_debug_mode`
  (count of host synchronisations; 0 expected).

Model FLOPs (the "% of peak" column): stage 1 trains only the projector, so the frozen LM
does its forward (2 N T) and the backward to its inputs (2 N T) but no weight gradients:
4 N T per step, N = the LM's parameters (6.74e9 with embeddings and head), T = attended
tokens. Recomputation under gradient checkpointing, attention scores, the vision tower
and the projector are not counted. This is the convention that reproduces the reference
plain-transformers figures (18.9 samples/s x 617 tokens x 4 x 6.74e9 = 31.8 % of 989 TFLOP/s).
Peak: 989 TFLOP/s (dense bf16) on H100/H200; other GPUs need `--peak-tflops`.

A setting that runs out of GPU memory (or fails otherwise) is recorded in the JSON with its
status and the script carries on. Sections are skipped, and recorded as skipped, when the
time budget (`--budget-s`, default 420 s after the model is built) would be exceeded.

    python bench/gpu.py                       # one GPU: writes bench/gpu.json, prints a table
    python bench/gpu.py --sections train      # only some sections (train, gap, generate, syncs)
    python bench/gpu.py --smoke --out X.json  # the same code at tiny shapes on the CPU (tests)

Without CUDA (and without --smoke) it exits with a one-line message and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # the shared builders beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from llava_shape import (  # noqa: E402
    SEVEN_B,
    TINY,
    NoEnd,
    Shape,
    build_model,
    checkpointing_off,
    for_inference,
    prompt_of_length,
    write_captions,
)

# The reference: plain transformers, random weights, one H200, LLaVA-1.5-7B shapes.
REFERENCE = {
    "train_b32_gc": {"samples_per_s": 18.9, "pct_of_peak": 31.8},
    "regap_overhead_pct": 1.8,
    "train_b16": {"samples_per_s": 24.4, "pct_of_peak": 41.0},
    "frechet_d4096_s": 0.30,
    "mir_protocol_s": 11.5,
    "generate_b64_tokens_per_s": 1618.0,
    "generate_static_b64_tokens_per_s": 2910.0,
}
GOALS = {"train_regap_samples_per_s": 24.0, "train_regap_pct_of_peak": 40.0, "regap_overhead_pct": 2.0,
         "mir_protocol_s": 15.0, "generate_b64_tokens_per_s": 4000.0}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16
ENGINES = ("transformers", "static", "vllm")
SECTIONS = ("train", "generate", "gap", "syncs")


@dataclasses.dataclass(frozen=True)
class Plan:
    train: tuple[tuple[int, bool], ...]  # (batch, gradient checkpointing); each with ReGap off and on
    warmup_steps: int
    measure_steps: int
    num_workers: int
    gap_pairs: int
    gap_batch: int
    gap_boot: int
    gen_batches: tuple[int, ...]
    new_tokens: int
    gen_repeats: int
    # rough seconds each piece needs on one H200 (the budget check); generous on purpose
    need_s: dict[str, float] = dataclasses.field(default_factory=dict)


FULL = Plan(train=((32, True), (16, False)), warmup_steps=2, measure_steps=6, num_workers=4, gap_pairs=100,
            gap_batch=8, gap_boot=1000, gen_batches=(64, 16), new_tokens=128, gen_repeats=2,
            need_s={"train": 45, "gap": 90, "gap_boot": 120, "transformers": 30, "static": 150, "vllm": 240,
                    "syncs": 5})
SMOKE = Plan(train=((4, True), (2, False)), warmup_steps=1, measure_steps=2, num_workers=0, gap_pairs=8,
             gap_batch=4, gap_boot=20, gen_batches=(4, 2), new_tokens=4, gen_repeats=1, need_s={})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    p.add_argument("--out", type=Path, default=None, help="JSON report (default bench/gpu.json; --smoke: a temp file)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--engines", default=",".join(ENGINES), help="generation engines (vllm only when importable)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for the sections after the model is built; later sections are skipped past it")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU (H100/H200: 989)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.engines = [e for e in args.engines.split(",") if e]
    for name, values, valid in (("--sections", args.sections, SECTIONS), ("--engines", args.engines, ENGINES)):
        bad = [v for v in values if v not in valid]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)} (valid: {', '.join(valid)})")
    return args


# ---------------------------------------------------------------------- helpers


class Budget:
    """Seconds left for the sections; `allows(need)` says whether a piece still fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, need: float) -> bool:
        return self.left() >= need


def skipped(reason: str) -> dict[str, Any]:
    return {"status": f"skipped: {reason}"}


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s record; out of memory or any other failure becomes the record's status."""
    import torch

    try:
        record = run()
        record.setdefault("status", "ok")
    except torch.cuda.OutOfMemoryError as exc:
        record = {"status": "oom", "error": str(exc).splitlines()[0]}
    except Exception as exc:  # a failing setting is recorded; the others still run
        record = {"status": f"error: {type(exc).__name__}", "error": str(exc).splitlines()[0] if str(exc) else "",
                  "traceback": traceback.format_exc(limit=-6).splitlines()[-12:]}
        print(f"  {record['status']}: {record['error']}", file=sys.stderr, flush=True)
    free_memory()
    return record


def peak_memory_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for a block (only those not set already), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            os.environ.setdefault(key, value)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def versions(device: Any) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    import regap

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                           "regap": getattr(regap, "__version__", None), "platform": platform.platform()}
    if importlib.util.find_spec("vllm") is not None:
        from importlib.metadata import version

        out["vllm"] = version("vllm")
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        out.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    return out


def peak_flops(args: argparse.Namespace, device: Any) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


# ---------------------------------------------------------------------- train


def train_setting(model: Any, data: Path, workdir: Path, batch: int, checkpointing: bool, regap_on: bool,
                  plan: Plan, smoke: bool, device: Any, tokens_per_sample: int, peak: float | None) -> dict[str, Any]:
    """One `regap.train.train` run; samples/s over the steps after the warm-up."""
    from regap.train import TrainConfig, read_metrics, train

    if not checkpointing:
        checkpointing_off(model.llm)
    steps = plan.warmup_steps + plan.measure_steps
    config = TrainConfig.from_dict({
        "stage": 1, "model": model.config.name, "dtype": "bfloat16", "mixed_precision": "bf16", "cpu": smoke,
        # the vision tower runs every step (no feature cache), as on a GPU and in the reference
        "template": "plain", "data": {"json": str(data), "num_workers": plan.num_workers, "feature_cache": "off"},
        "global_batch_size": batch, "per_device_batch_size": batch, "max_steps": steps, "save_every": steps,
        "keep_checkpoints": 1, "gradient_checkpointing": checkpointing, "lr": 1e-3, "seed": 0,
        "regap": {"lam": 1.0 if regap_on else 0.0, "layer": 0, "distance": "centroid", "pooling": "batch",
                  "warmup_steps": 20},
        "observe": {"progress": False, "log_every": 1, "gap_every": 0, "mir_every": 0},
    })
    out = workdir / f"train-b{batch}-{'gc' if checkpointing else 'nogc'}-{'regap' if regap_on else 'plain'}"
    reset_peak(device)
    start = time.perf_counter()
    train(config, out, model=model, command="bench/gpu.py")
    wall = time.perf_counter() - start
    rows = read_metrics(out / "metrics.jsonl")
    timed = rows[plan.warmup_steps:]
    seconds = timed[-1]["elapsed_s"] - rows[plan.warmup_steps - 1]["elapsed_s"]
    samples_per_s = batch * len(timed) / seconds
    flops_per_sample = 4 * sum(p.numel() for p in model.llm.parameters()) * tokens_per_sample
    record = {"batch": batch, "gradient_checkpointing": checkpointing, "regap": regap_on,
              "steps": len(rows), "measured_steps": len(timed), "samples_per_s": samples_per_s,
              "step_s": seconds / len(timed), "tokens_per_sample": tokens_per_sample,
              "model_tflops_per_s": samples_per_s * flops_per_sample / 1e12,
              "pct_of_peak": 100 * samples_per_s * flops_per_sample / peak if peak else None,
              "peak_memory_gib": peak_memory_gib(device), "wall_s_including_setup_and_saves": wall,
              "final_loss": rows[-1].get("loss"), "final_gap": rows[-1].get("gap")}
    print(f"  train b{batch} {'gc' if checkpointing else 'no-gc'} regap={'on' if regap_on else 'off'}: "
          f"{samples_per_s:.2f} samples/s", flush=True)
    return record


def train_section(model: Any, plan: Plan, shape: Shape, smoke: bool, device: Any, workdir: Path,
                  budget: Budget, peak: float | None) -> dict[str, Any]:
    biggest = max(batch for batch, _ in plan.train)
    data, tokens = write_captions(workdir / "train-data", model, shape,
                                  biggest * (plan.warmup_steps + plan.measure_steps))
    settings = []
    for batch, checkpointing in plan.train:
        for regap_on in (False, True):
            if not budget.allows(plan.need_s.get("train", 0)):
                record = skipped(f"time budget ({budget.left():.0f} s left)")
            else:
                record = guarded(lambda: train_setting(model, data, workdir, batch, checkpointing, regap_on, plan,
                                                       smoke, device, tokens, peak))
            settings.append({"batch": batch, "gradient_checkpointing": checkpointing, "regap": regap_on, **record})
    overheads = {}
    for batch, checkpointing in plan.train:
        pair = {s["regap"]: s for s in settings if s["batch"] == batch and s["gradient_checkpointing"] == checkpointing
                and s["status"] == "ok"}
        if len(pair) == 2:
            overheads[f"b{batch}_{'gc' if checkpointing else 'nogc'}"] = \
                100 * (pair[False]["samples_per_s"] / pair[True]["samples_per_s"] - 1)
    return {"tokens_per_sample": tokens, "flops_formula": "4 * N_llm * tokens per sample (forward + backward to "
            "the inputs of the frozen LM; no recomputation, attention scores or vision tower)",
            "settings": settings, "regap_overhead_pct": overheads}


# ---------------------------------------------------------------------- gap


def gap_protocol(model: Any, plan: Plan, device: Any, workdir: Path, budget: Budget) -> tuple[dict[str, Any], Any]:
    """`regap gap`'s collection and exact analysis without intervals (the MIR protocol); the
    collected hidden states are returned too, for the bootstrap (the caller removes them)."""
    from regap.gap.collect import collect_hidden_states
    from regap.gap.measure import analyse
    from regap.safety.pairs import make_pairs

    kept: dict[str, Any] = {}

    def run() -> dict[str, Any]:
        pairs = make_pairs(plan.gap_pairs, images="scenes", texts="starter-benign", seed=0)
        sync(device)
        start = time.perf_counter()
        store = kept["store"] = collect_hidden_states(model, pairs, workdir / "hidden", protocol="reference",
                                                      batch_size=plan.gap_batch, progress=False)
        collect_s = time.perf_counter() - start
        start = time.perf_counter()
        result = analyse(store, mode="exact", n_boot=0, device=device)
        sync(device)
        analyse_s = time.perf_counter() - start
        print(f"  gap: collect {collect_s:.1f} s + analyse {analyse_s:.1f} s (MIR {result['mir']})", flush=True)
        return {"pairs": plan.gap_pairs, "layers": store.n_layers, "width": store.width, "spill_dtype": store.dtype,
                "image_tokens": int(len(store.image_pairs)), "text_tokens": int(len(store.text_pairs)),
                "collect_s": collect_s, "analyse_s": analyse_s, "mir_protocol_s": collect_s + analyse_s,
                "analyse_s_per_layer": analyse_s / store.n_layers, "mir": result["mir"],
                "analysis_device": str(device)}

    if not budget.allows(plan.need_s.get("gap", 0)):
        return skipped(f"time budget ({budget.left():.0f} s left)"), None
    return guarded(run), kept.get("store")


def gap_bootstrap(store: Any, plan: Plan, device: Any, budget: Budget) -> dict[str, Any]:
    """`regap gap`'s default analysis: the same with 1000 linearised bootstrap replicates."""
    from regap.gap.measure import analyse

    def run() -> dict[str, Any]:
        start = time.perf_counter()
        result = analyse(store, mode="exact", n_boot=plan.gap_boot, ci="linear", device=device)
        sync(device)
        seconds = time.perf_counter() - start
        print(f"  gap analysis with {plan.gap_boot} replicates: {seconds:.1f} s", flush=True)
        return {"replicates": plan.gap_boot, "analyse_s": seconds, "mir_ci": result["mir_ci"]}

    if store is None:
        return skipped("no hidden states were collected")
    if not budget.allows(plan.need_s.get("gap_boot", 0)):
        return skipped(f"time budget ({budget.left():.0f} s left)")
    return guarded(run)


# ---------------------------------------------------------------------- generate


def generate_setting(model: Any, engine: str, batch: int, text: str, image: Any, plan: Plan,
                     device: Any) -> dict[str, Any]:
    from regap.models import DecodingSettings

    settings = DecodingSettings(max_new_tokens=plan.new_tokens, batch_size=batch, engine=engine)
    processors = None if engine == "vllm" else (lambda indices: [NoEnd(model.tokenizer.eos_token_id)])

    def call() -> tuple[int, float]:
        sync(device)
        start = time.perf_counter()
        result = model.generate_detailed([text] * batch, [image] * batch, settings,
                                         logits_processor_factory=processors)
        sync(device)
        return sum(result.new_tokens), time.perf_counter() - start

    reset_peak(device)
    _, first = call()  # includes compilation (static) or engine start-up (vllm)
    warm = [call() for _ in range(plan.gen_repeats)]
    tokens, seconds = min(warm, key=lambda w: w[1])
    record = {"engine": engine, "batch": batch, "new_tokens": plan.new_tokens, "first_call_s": first,
              "warm_call_s": seconds, "warm_calls": len(warm), "generated_tokens": tokens,
              "expected_tokens": batch * plan.new_tokens, "tokens_per_s": tokens / seconds,
              "peak_memory_gib": peak_memory_gib(device)}
    print(f"  generate {engine} b{batch}: {tokens / seconds:.0f} tokens/s (first call {first:.1f} s)", flush=True)
    return record


def generate_section(model: Any, plan: Plan, shape: Shape, engines: list[str], device: Any, workdir: Path,
                     budget: Budget) -> dict[str, Any]:
    from PIL import Image

    text, tokens = prompt_of_length(model, shape.sample_tokens)
    image = Image.new("RGB", (shape.image_size, shape.image_size), "gray")
    rows = []
    for engine in engines:
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            rows.append({"engine": engine, **skipped("vllm is not installed")})
            continue
        # vLLM shares the GPU with the LVLM's own copy of the LM; its export goes to the scratch folder.
        env = ({"REGAP_VLLM_ARGS": json.dumps({"gpu_memory_utilization": 0.5, "max_model_len": 2048}),
                "REGAP_CACHE": str(workdir / "cache")} if engine == "vllm" else {})
        with environment(**env):
            for batch in plan.gen_batches:
                if not budget.allows(plan.need_s.get(engine, 0)):
                    rows.append({"engine": engine, "batch": batch, **skipped(f"time budget ({budget.left():.0f} s left)")})
                    continue
                rows.append({"engine": engine, "batch": batch,
                             **guarded(lambda: generate_setting(model, engine, batch, text, image, plan, device))})
    return {"prompt_tokens": tokens, "rows": rows}


# ---------------------------------------------------------------------- host synchronisations


def syncs_section(model: Any, device: Any) -> dict[str, Any]:
    """Host synchronisations in the ReGap loss (forward, backward, step) on this device."""
    import torch

    from regap.train.regap_loss import ReGapLoss

    if torch.device(device).type != "cuda":
        return skipped("needs CUDA (torch.cuda.set_sync_debug_mode)")

    def run() -> dict[str, Any]:
        regap = ReGapLoss(1.0, warmup_steps=2).to(device)
        features = torch.randn(8, 617, model.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        image_mask = torch.zeros(8, 617, dtype=torch.bool, device=device)
        image_mask[:, 1:577] = True
        attention = torch.ones(8, 617, dtype=torch.long, device=device)
        regap(features, image_mask, attention).loss.backward()  # first call: allocations, kernels
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    regap(features, image_mask, attention).loss.backward()
                    regap.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        return {"regap_loss_syncs_in_3_steps": len(messages), "examples": messages[:3]}

    return guarded(run)


# ---------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def table(report: dict[str, Any]) -> str:
    """The measured figures next to the plain-transformers reference, as a Markdown table."""
    lines = ["| workload | regap | plain transformers (reference) | goal |", "|---|---|---|---|"]
    full = not report["smoke"]  # the reference figures and goals are for the 7B shapes only
    train = report.get("train", {})
    overheads = train.get("regap_overhead_pct", {})
    for s in train.get("settings", []):
        name = f"stage-1 step, batch {s['batch']}, {'checkpointing' if s['gradient_checkpointing'] else 'no checkpointing'}" \
               f", ReGap {'on' if s['regap'] else 'off'}"
        if s["status"] != "ok":
            lines.append(f"| {name} | {s['status']} | | |")
            continue
        measured = f"{s['samples_per_s']:.1f} samples/s ({_fmt(s['pct_of_peak'], '.1f', ' %')} of peak)"
        key = f"b{s['batch']}_{'gc' if s['gradient_checkpointing'] else 'nogc'}"
        if s["regap"] and key in overheads:
            measured += f", overhead {overheads[key]:+.1f} %"
        ref = {(32, True, False): "18.9 samples/s (31.8 %)", (32, True, True): "+1.8 %",
               (16, False, False): "24.4 samples/s (41 %)"}.get((s["batch"], s["gradient_checkpointing"], s["regap"]), "")
        goal = "≥ 24 samples/s (≥ 40 %), overhead ≤ 2 %" if s["regap"] and full else ""
        lines.append(f"| {name} | {measured} | {ref} | {goal} |")
    gap = report.get("gap")
    if gap is not None:
        if gap.get("status") == "ok":
            lines.append(f"| MIR protocol, {gap['pairs']} pairs (collect + exact analysis) | {gap['mir_protocol_s']:.1f} s "
                         f"({gap['collect_s']:.1f} + {gap['analyse_s']:.1f}) | {'11.5 s' if full else ''} | "
                         f"{'≤ 15 s' if full else ''} |")
            lines.append(f"| exact analysis per layer (d = {gap['width']}, FD + outliers + 2 covariances) | "
                         f"{gap['analyse_s_per_layer']:.2f} s | {'exact FD 0.30 s (GPU eigh)' if full else ''} | |")
            boot = gap.get("bootstrap") or {}
            if boot.get("status") == "ok":
                lines.append(f"| `regap gap` analysis with {boot['replicates']} bootstrap replicates | "
                             f"{boot['analyse_s']:.1f} s | | |")
            elif boot:
                lines.append(f"| `regap gap` analysis with bootstrap replicates | {boot['status']} | | |")
        else:
            lines.append(f"| MIR protocol | {gap.get('status')} | 11.5 s | ≤ 15 s |")
    for row in report.get("generate", {}).get("rows", []):
        batch = f", batch {row['batch']}" if "batch" in row else ""
        name = f"generate, {row['engine']}{batch}, {report['plan']['new_tokens']} new tokens"
        if row.get("status") != "ok":
            lines.append(f"| {name} | {row.get('status')} | | |")
            continue
        ref = {("transformers", 64): "1,618 tokens/s", ("static", 64): "2,910 tokens/s"}.get((row["engine"], row["batch"]), "")
        goal = "≥ 4,000 tokens/s" if row["batch"] == 64 and full else ""
        lines.append(f"| {name} | {row['tokens_per_s']:,.0f} tokens/s (first call {row['first_call_s']:.1f} s) | {ref} | {goal} |")
    syncs = report.get("syncs")
    if syncs and syncs.get("status") == "ok":
        lines.append(f"| host syncs in 3 ReGap loss steps | {syncs['regap_loss_syncs_in_3_steps']} | | 0 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: CUDA is not available; run it on a GPU machine (or --smoke for the CPU check)",
              file=sys.stderr)
        return 2
    shape, plan = (TINY, SMOKE) if args.smoke else (SEVEN_B, FULL)
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    dtype = torch.bfloat16
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke, "versions": versions(device), "shape": dataclasses.asdict(shape),
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "need_s"},
        "reference_plain_transformers_h200": REFERENCE, "goals_h200": GOALS}
    peak = peak_flops(args, device)
    report["peak_tflops"] = peak / 1e12 if peak else None
    out = args.out or (ROOT / "bench" / "gpu.json" if not args.smoke else
                       Path(tempfile.gettempdir()) / "regap-gpu-smoke.json")

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regap-gpu-")))
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = build_model(shape, device, dtype)
        sync(device)
        report["build_s"] = time.perf_counter() - start
        report["llm_parameters"] = sum(p.numel() for p in model.llm.parameters())
        report["vision_parameters"] = sum(p.numel() for p in model.vision.parameters())
        report["attn_implementation"] = getattr(model.llm.config, "_attn_implementation", None)
        print(f"built the model in {report['build_s']:.1f} s ({report['llm_parameters'] / 1e9:.2f} B LM parameters)",
              flush=True)
        budget = Budget(args.budget_s)

        def save() -> None:  # after every section: a run cut short still leaves its numbers
            report["wall_s"] = time.perf_counter() - started
            report["budget_left_s"] = budget.left()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1, default=str))

        def generate(engines: list[str]) -> None:
            engines = [e for e in engines if e in args.engines]
            if "generate" in args.sections and engines:
                part = generate_section(for_inference(model), plan, shape, engines, device, workdir, budget)
                report.setdefault("generate", {"prompt_tokens": part["prompt_tokens"], "rows": []})["rows"] += part["rows"]
                save()

        if "train" in args.sections:
            report["train"] = train_section(model, plan, shape, args.smoke, device, workdir, budget, peak)
            save()
        if "syncs" in args.sections:
            report["syncs"] = syncs_section(for_inference(model), device)
        # In order of what the goals need most, so that a spent budget skips the least useful:
        # plain generation, the MIR protocol, compiled generation, the bootstrap, vLLM.
        generate(["transformers"])
        store = None
        try:
            if "gap" in args.sections:
                report["gap"], store = gap_protocol(for_inference(model), plan, device, workdir, budget)
                save()
            generate(["static"])
            if "gap" in args.sections:
                report["gap"]["bootstrap"] = gap_bootstrap(store, plan, device, budget)
                save()
        finally:
            if store is not None:
                store.remove()
        generate(["vllm"])
        save()
    print()
    print(table(report))
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
