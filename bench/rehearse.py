"""regap's 7B path rehearsed at real shapes on a CPU: the faults a GPU rental would find first.

Builds the LLaVA-1.5-7B-shaped model of `gpu.py` (`llava_shape.py`: CLIP ViT-L/14-336 -> 576
image tokens, `mlp2x_gelu`, a Vicuna-7B-shaped LM of width 4,096, 32 layers, 32 heads, MLP 11,008,
vocabulary 32,000, 4,096 positions, the `vicuna_v1` template) with random weights, in bfloat16
where this CPU computes it natively (regap.precision's probe), else in float32 where memory
allows (else it says so and stops), and runs regap's own code on it:

* **stage1**: the shipped `llava-1.5-7b-stage1.yaml`, loaded with regap's config loader and
  overridden only where a CPU forces it (`CPU_STAGE1`: batch 1, 2 steps, no DeepSpeed or worker
  processes, a probe of 2 samples instead of 32), ReGap on as shipped, through `regap.train.train`
  on the random model; loss, ReGap gap, step times, peak RSS, and the step's model FLOP/s as a
  fraction of this CPU's matmul peak measured in the same process (`cpu_peak.py`);
* **gap**: `regap gap`'s collection and exact analysis (its defaults) for 8 pairs at d = 4,096;
* **generate**: `LVLM.generate_detailed` with the `transformers` and `static` engines, 2 prompts of
  617 tokens (576 image tokens) x 8 new tokens (the end token suppressed);
* **stage2**: the shipped `llava-1.5-7b-stage2.yaml` with `tune=lora` (its own LoRA settings),
  from the stage-1 projector, 1 step at batch 1.

Every step records `status` (ok / failed, with the one-line reason and what a user needs
instead); nothing is skipped silently. Before each training stage the memory estimate of
`--dry-run` (`regap.train.estimate`) is computed for the real sample length and compared with
the stage's measured peak. Peak RSS is read from /proc/self/status (VmHWM, reset before each
step; `getrusage`'s ru_maxrss follows the same mark); the process's peak is the steps' largest.

    python bench/rehearse.py --out bench/rehearse.json             # full depth: ~15-20 GB RAM
    python bench/rehearse.py --layers 4 --out /tmp/r.json          # half-depth LM, real width
    python bench/rehearse.py --layers 2 --vision-layers 4          # what tests/test_rehearse.py runs

Model FLOPs follow `gpu.py`: 4 N T per sample (N = the LM's parameters, T = tokens per sample)
for stage 1 and for LoRA stage 2 (the frozen base does its forward and the backward to its inputs;
recomputation under checkpointing, the vision tower and attention scores are not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # the shared builders beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_peak import machine, matmul_peak_flops, reset_peak_rss, rss_gib  # noqa: E402
from step_profile import hardware_flops, model_flops, profile_step, timed_step  # noqa: E402
from llava_shape import (  # noqa: E402
    SEVEN_B,
    NoEnd,
    build_model,
    for_inference,
    prompt_of_length,
    write_captions,
    write_conversations,
)

#: What a CPU forces on the shipped stage-1 config, and why (recorded in the report).
CPU_STAGE1 = {
    "cpu": (True, "no GPU"),
    "global_batch_size": (1, "one 617-token sample is ~17 TFLOP of LM work, minutes on 2 cores"),
    "per_device_batch_size": (1, "one process"),
    "gradient_accumulation_steps": (None, "derived"),
    "max_steps": (2, "two steps: the first pays one-off costs, the second is timed"),
    "save_every": (2, "one checkpoint, at the end"),
    "data.num_workers": (0, "forked loader workers compete with the step for 2 cores"),
    "gradient_checkpointing": (True, "as shipped; stated because a CPU needs it"),
    "observe.probe_size": (2, "the probe's forward passes (32 x 617 tokens) would take longer than training"),
    "observe.mir_every": (0, "MIR on a 2-sample probe has fewer tokens than 4,096 dimensions on both sides, so "
                             "every layer takes the eigh route; the gap step measures MIR at d = 4,096 on 8 pairs"),
    "observe.progress": (False, "a log, not a terminal"),
}
CPU_STAGE2 = {**CPU_STAGE1, "max_steps": (1, "one step"), "save_every": (1, "one checkpoint, at the end"),
              "tune": ("lora", "the config's own LoRA option (full tuning of 7B needs ~110 GB for AdamW)")}
STEPS = ("build", "peak", "stage1", "gap", "generate", "stage2")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=SEVEN_B.layers, help="LM decoder layers (width stays 4,096)")
    p.add_argument("--vision-layers", type=int, default=SEVEN_B.vision_layers,
                   help="CLIP encoder layers (width stays 1,024); fewer only to fit a test machine")
    p.add_argument("--out", type=Path, default=None, help="JSON report (default bench/rehearse.json)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="auto: bfloat16 where this CPU computes it natively (regap.precision), else float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    p.add_argument("--only", default=",".join(STEPS[2:]),
                   help="comma-separated subset of stage1, gap, generate, stage2 (stage2 needs stage1); the others "
                        "are recorded as not run")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    bad = [s for s in args.only if s not in STEPS[2:]]
    if bad:
        p.error(f"--only: unknown {', '.join(bad)} (valid: {', '.join(STEPS[2:])})")
    if "stage2" in args.only and "stage1" not in args.only:
        p.error("--only: stage2 starts from stage 1's projector; add stage1")
    if args.layers < 1 or args.vision_layers < 2:
        p.error("--layers must be >= 1 and --vision-layers >= 2 (features come from layer -2)")
    return args


# ---------------------------------------------------------------------- recording


def failed(exc: BaseException, need: str) -> dict[str, Any]:
    """A failed step: the one-line reason and what a user needs instead."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"status": "failed", "reason": f"{type(exc).__name__}: {first}", "need": need,
            "traceback": traceback.format_exc(limit=-6).splitlines()[-12:]}


def run_step(name: str, run: Callable[[], dict[str, Any]], need: str) -> dict[str, Any]:
    """`run()`'s record with status ok, its wall time and its peak RSS (VmHWM reset before it);
    any failure becomes status failed with its reason (the rehearsal goes on)."""
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        record = {"status": "ok", **run()}
    except MemoryError as exc:
        record = failed(exc, "more memory: " + need)
    except Exception as exc:  # every step is recorded, whatever stops it
        record = failed(exc, need)
    record["wall_s"] = time.perf_counter() - start
    record["cpu_s"] = time.process_time() - cpu_start  # below wall_s x threads when other jobs share the CPUs
    record.update({f"peak_{k}": v for k, v in rss_gib().items()})
    gc.collect()
    line = record["status"] if record["status"] == "ok" else f"FAILED {record['reason']}"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {line} ({record['wall_s']:.0f} s, peak RSS "
          f"{record['peak_vm_hwm_gib'] or 0:.2f} GiB)", flush=True)
    return record


@contextlib.contextmanager
def environment(**values: str) -> Any:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------- the steps


def choose_dtype(requested: str, shape: Any, vision_layers: int) -> tuple[Any, dict[str, Any]]:
    """bfloat16 where native (regap.precision), else float32 where the weights fit in memory;
    raises MemoryError (with the numbers) where neither holds."""
    import torch

    from regap.precision import resolve_dtype

    choice = resolve_dtype(requested, "cpu")
    dtype = choice.torch_dtype
    record = {"requested": requested, "dtype": choice.dtype, "reason": choice.reason}
    if dtype == torch.float32:
        meta = build_model(shape, "meta", torch.float32, vision_layers=vision_layers)
        need = sum(p.numel() for p in meta.parameters()) * 4 / 2**30
        available = machine()["memory_available_gib"] or 0.0
        record.update(float32_weights_gib=need, memory_available_gib=available)
        if need * 1.3 > available:
            raise MemoryError(f"this CPU has no native bfloat16, and the float32 weights alone take {need:.1f} GiB "
                              f"of the {available:.1f} GiB available; a CPU with native bf16 (AVX512-BF16 or AMX) "
                              f"and ~20 GB, or a machine with {need * 1.3:.0f} GB, is needed")
    return dtype, record


#: Resident memory of this process before the model is built: the libraries (the estimate's runtime).
RUNTIME: dict[str, int] = {}


def preflight(shape: Any, vision_layers: int, dtype: Any, cfg: Any, tokens: int) -> dict[str, Any]:
    """`--dry-run`'s estimate (`regap.train.estimate`) for this stage, on a meta-device twin of the
    model set up as training sets it up, at the real sample length; a MemoryError, before any
    work, when its peak exceeds the memory this process can have."""
    import dataclasses as dc

    from regap.train.estimate import estimate_memory
    from regap.train.setup import setup_model

    twin = build_model(shape, "meta", dtype, vision_layers=vision_layers)
    setup_model(twin, dc.replace(cfg, projector=None), log=lambda message: None)
    estimate = estimate_memory(twin, cfg, batch=1, sequence=tokens, image_tokens=twin.tokens_per_image, device="cpu",
                               load_extra=0, runtime=RUNTIME.get("bytes", 0))
    record = {k: (v / 2**30 if type(v) is int and k not in ("parameters", "trainable", "batch", "sequence") else v)
              for k, v in estimate.to_dict().items() if k != "breakdown"}
    here = (rss_gib()["rss_gib"] or 0.0) + (machine()["memory_available_gib"] or float("inf"))
    record["memory_for_this_process_gib"] = here
    if estimate.peak() / 2**30 > 0.95 * here:
        raise MemoryError(f"estimated peak {estimate.peak() / 2**30:.1f} GiB (weights {estimate.weights / 2**30:.1f}, "
                          f"gradients + AdamW {(estimate.gradients + estimate.optimizer) / 2**30:.1f}, activations "
                          f"{estimate.activations_checkpointing / 2**30:.1f}) exceeds the {here:.1f} GiB this process "
                          f"can have")
    return record


def stage_config(name: str, stage: int, forced: dict[str, tuple[Any, str]], extra: list[str]) -> Any:
    from regap.train import load_config

    overrides = [f"{key}={'null' if value is None else json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value}"
                 for key, (value, _) in forced.items()]
    return load_config(name, [*overrides, *extra], stage=stage)


def estimate_error(estimate: dict[str, Any], measured: float | None) -> dict[str, Any]:
    """The training run's measured peak RSS (`train()` alone) against the estimate's peak."""
    if not measured:
        return {"train_peak_rss_gib": None}
    return {"train_peak_rss_gib": measured, "estimate_error": estimate["peak"] / measured - 1}


def step_efficiency(model: Any, cfg: Any, data: Path, peak: dict[str, Any]) -> dict[str, Any]:
    """One more stage-1 step (regap's `TrainStep`, outside the loop) timed by wall and CPU
    time, its model FLOP/s as fractions of the matmul peak on the same basis, and, under 0.75,
    a profile of a further step (`step_profile.profile_step`)."""
    run, batch = timed_step(model, cfg, data, 1)
    timing = run()
    flops = model_flops(model, batch)
    work = hardware_flops(model, batch, cfg.gradient_checkpointing)
    out: dict[str, Any] = {"step": timing, "model_flops": flops, "hardware_flops": work, "threads": peak.get("threads"),
                           "fraction_of_peak_wall": flops / timing["wall_s"] / peak["flops"],
                           "fraction_of_peak_cpu": flops / timing["cpu_s"] / peak["flops_per_cpu_s"],
                           "hardware_fraction_of_peak_cpu": work / timing["cpu_s"] / peak["flops_per_cpu_s"]}
    if min(out["fraction_of_peak_cpu"], out["hardware_fraction_of_peak_cpu"]) < 0.75:
        out["profile"] = profile_step(run, model)
    return out


def data_overrides(model: Any, data: Path) -> list[str]:
    """The rehearsal's data and model in place of LLaVA's (not CPU-forced: the run's inputs)."""
    return [f"data.json={data}", f"data.image_root={data.parent}", f"model={model.config.name}",
            "dtype=" + str(model.dtype).removeprefix("torch.")]


def flops_record(model: Any, tokens: int, step_s: float, peak: dict[str, Any]) -> dict[str, Any]:
    """The step's model FLOP/s (4 N T, `gpu.py`'s convention) and its fraction of the matmul peak."""
    flops = 4 * llm_base_parameters(model) * tokens
    return {"model_flops_per_step": flops, "model_tflops_per_s": flops / step_s / 1e12,
            "fraction_of_peak": flops / step_s / peak["flops"] if peak else None}


def llm_base_parameters(model: Any) -> int:
    """The LM's own parameters (a LoRA wrapper's adapters left out)."""
    return sum(p.numel() for name, p in model.llm.named_parameters() if "lora_" not in name)


def stage1(model: Any, shape: Any, vision_layers: int, workdir: Path, peak: dict[str, Any]) -> dict[str, Any]:
    from regap.train import read_metrics, train

    data, tokens = write_captions(workdir / "stage1-data", model, shape, 2)
    cfg = stage_config("llava-1.5-7b-stage1", 1, CPU_STAGE1, data_overrides(model, data))
    resolved = cfg.resolved()
    estimate = preflight(shape, vision_layers, model.dtype, resolved, tokens)
    out = workdir / "stage1"
    reset_peak_rss()
    result = train(cfg, out, model=model, command="bench/rehearse.py")
    train_peak = rss_gib()["vm_hwm_gib"]
    rows = read_metrics(out / "metrics.jsonl")
    step_s = [rows[0]["elapsed_s"]] + [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    efficiency = step_efficiency(model, resolved, data, peak)
    record = {"config": "llava-1.5-7b-stage1", "overrides": {k: {"value": v, "why": why} for k, (v, why) in CPU_STAGE1.items()},
              "steps": result.step, "tokens_per_sample": tokens, "image_tokens": model.tokens_per_image,
              "hidden": model.hidden_size, "regap_lam": resolved.regap.lam,
              "loss": [r.get("loss") for r in rows], "caption_loss": [r.get("caption_loss") for r in rows],
              "gap": [r.get("gap") for r in rows], "probe": {k: v for k, v in rows[-1].items() if k.startswith("probe")},
              "step_s": step_s, "out": str(out), "estimate_gib": estimate, **estimate_error(estimate, train_peak),
              **flops_record(model, tokens, step_s[-1], peak), "efficiency": efficiency}
    print(f"  stage 1: loss {record['loss']}, gap {record['gap']}, step {step_s[-1]:.1f} s; one more step outside "
          f"the loop: {efficiency['fraction_of_peak_cpu']:.2f} of the matmul peak by CPU time "
          f"({efficiency['fraction_of_peak_wall']:.2f} by wall time)", flush=True)
    return record


def gap(model: Any, workdir: Path) -> dict[str, Any]:
    """`regap gap`'s collection and exact analysis, with the command's defaults, for 8 pairs."""
    from regap.gap.collect import collect_hidden_states
    from regap.gap.measure import analyse
    from regap.safety.pairs import make_pairs

    for_inference(model)
    pairs = make_pairs(8, images="scenes", texts="starter-benign", seed=0)
    start = time.perf_counter()
    store = collect_hidden_states(model, pairs, workdir / "hidden", protocol="reference", batch_size=8, progress=False)
    collect_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        result = analyse(store, mode="exact", n_boot=1000, ci="linear")
        analyse_s = time.perf_counter() - start
        record = {"pairs": 8, "layers": store.n_layers, "width": store.width, "spill_dtype": store.dtype,
                  "image_tokens": int(len(store.image_pairs)), "text_tokens": int(len(store.text_pairs)),
                  "collect_s": collect_s, "analyse_s": analyse_s, "analyse_s_per_layer": analyse_s / store.n_layers,
                  "mir": result["mir"], "mir_ci": result.get("mir_ci"), "layer0_gap": result.get("layer0_gap"),
                  "intervals": result.get("intervals") or result.get("ci_note")}
    finally:
        store.remove()
    print(f"  gap: collect {collect_s:.0f} s, analyse {analyse_s:.0f} s, MIR {record['mir']}", flush=True)
    return record


def generate(model: Any, shape: Any) -> dict[str, Any]:
    from PIL import Image

    from regap.models import DecodingSettings

    for_inference(model)
    text, tokens = prompt_of_length(model, shape.sample_tokens)
    image = Image.new("RGB", (shape.image_size, shape.image_size), "gray")
    rows = {}
    for engine in ("transformers", "static"):
        def call() -> dict[str, Any]:
            settings = DecodingSettings(max_new_tokens=8, batch_size=2, engine=engine)
            start = time.perf_counter()
            result = model.generate_detailed([text, text], [image, image], settings,
                                             logits_processor_factory=lambda _: [NoEnd(model.tokenizer.eos_token_id)])
            seconds = time.perf_counter() - start
            return {"new_tokens": result.new_tokens, "seconds": seconds,
                    "tokens_per_s": sum(result.new_tokens) / seconds}

        try:
            rows[engine] = {"status": "ok", **call()}
        except Exception as exc:  # each engine is recorded; the other still runs
            rows[engine] = failed(exc, "the other engine (generate_detailed's engine setting)")
        print(f"  generate ({engine}): {rows[engine]['status']}", flush=True)
    bad = [r for r in rows.values() if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"an engine failed: {bad[0]['reason']}")
    return {"prompt_tokens": tokens, "prompts": 2, "engines": rows}


def stage2(model: Any, shape: Any, vision_layers: int, workdir: Path, stage1_out: Path,
           peak: dict[str, Any]) -> dict[str, Any]:
    from regap.train import read_metrics, train

    data, tokens = write_conversations(workdir / "stage2-data", model, shape, 1)
    cfg = stage_config("llava-1.5-7b-stage2", 2, CPU_STAGE2, [*data_overrides(model, data), f"projector={stage1_out}"])
    resolved = cfg.resolved()
    estimate = preflight(shape, vision_layers, model.dtype, resolved, tokens)
    out = workdir / "stage2"
    reset_peak_rss()
    result = train(cfg, out, model=model, command="bench/rehearse.py")
    train_peak = rss_gib()["vm_hwm_gib"]
    rows = read_metrics(out / "metrics.jsonl")
    step_s = rows[-1]["elapsed_s"]
    record = {"config": "llava-1.5-7b-stage2", "overrides": {k: {"value": v, "why": why} for k, (v, why) in CPU_STAGE2.items()},
              "lora": dataclasses.asdict(resolved.lora), "steps": result.step, "tokens_per_sample": tokens,
              "loss": [r.get("loss") for r in rows], "step_s": [step_s],
              "trainable_parameters": estimate["trainable"], "estimate_gib": estimate,
              **estimate_error(estimate, train_peak),
              **flops_record(model, tokens, step_s, peak)}
    print(f"  stage 2: loss {record['loss']}, step {step_s:.1f} s", flush=True)
    return record


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from regap.precision import use_usable_cpus

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        use_usable_cpus()
    RUNTIME["bytes"] = int((rss_gib()["rss_gib"] or 0.0) * 2**30)
    shape = dataclasses.replace(SEVEN_B, layers=args.layers)
    out = args.out or ROOT / "bench" / "rehearse.json"
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python bench/rehearse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "torch": torch.__version__, "shape": dataclasses.asdict(shape),
        "vision_layers": args.vision_layers, "full_depth": args.layers == SEVEN_B.layers
        and args.vision_layers == SEVEN_B.vision_layers, "steps": {}}

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        # the steps reset the high-water mark (ru_maxrss included): the process's peak is the steps' largest
        report["process_peak_rss_gib"] = max((step.get("peak_vm_hwm_gib") or 0.0 for step in steps.values()),
                                             default=None)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))

    steps = report["steps"]
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regap-rehearse-")))
        workdir.mkdir(parents=True, exist_ok=True)
        # the random model's vision features go to a scratch cache, not the user's
        stack.enter_context(environment(REGAP_CACHE=str(workdir / "cache")))
        try:
            dtype, report["precision"] = choose_dtype(args.dtype, shape, args.vision_layers)
        except MemoryError as exc:
            for name in STEPS:
                steps[name] = {"status": "failed", "reason": str(exc), "need": "see reason"}
            save()
            print(f"bench/rehearse.py: {exc}", file=sys.stderr)
            return 2
        holder: dict[str, Any] = {}

        def build() -> dict[str, Any]:
            model = holder["model"] = build_model(shape, "cpu", dtype, vision_layers=args.vision_layers)
            return {"dtype": str(dtype), "llm_parameters": llm_base_parameters(model),
                    "vision_parameters": sum(p.numel() for p in model.vision.parameters()),
                    "projector_parameters": sum(p.numel() for p in model.projector.parameters()),
                    "image_tokens": model.tokens_per_image, "hidden": model.hidden_size,
                    "template": model.config.template, "attn_implementation": model.llm.config._attn_implementation}

        steps["build"] = run_step("build", build, f"~{14 * args.layers / 32 + 1:.0f} GB of memory for bf16 weights")
        save()
        model = holder.get("model")
        if model is None:
            for name in STEPS[1:]:
                steps[name] = {"status": "failed", "reason": "the model was not built", "need": steps["build"]["need"]}
            save()
            return 1
        steps["peak"] = run_step("matmul peak", lambda: matmul_peak_flops(dtype), "nothing: a plain torch.mm")
        peak = steps["peak"] if steps["peak"]["status"] == "ok" else {}
        save()
        runs = {
            "stage1": ("stage 1 (llava-1.5-7b-stage1.yaml)", lambda: stage1(model, shape, args.vision_layers, workdir, peak),
                       "see reason; stage 1 at batch 1 needs the bf16 weights plus ~1 GB"),
            "gap": ("gap (8 pairs, exact)", lambda: gap(model, workdir), "see reason"),
            "generate": ("generate (transformers, static)", lambda: generate(model, shape), "see reason"),
            "stage2": ("stage 2 (llava-1.5-7b-stage2.yaml, tune=lora)",
                       lambda: stage2(model, shape, args.vision_layers, workdir,
                                      Path(steps["stage1"].get("out", workdir / "stage1")), peak),
                       "see reason; LoRA r=128 on all linear layers adds ~5 GB of AdamW state at 7B"),
        }
        for name, (title, run, need) in runs.items():
            if name not in args.only:
                steps[name] = {"status": "not run (--only)"}
            elif name == "stage2" and steps["stage1"]["status"] != "ok":
                steps[name] = {"status": "failed", "reason": "stage 1 failed, so there is no projector to start from",
                               "need": "stage 1 to run first"}
            else:
                steps[name] = run_step(title, run, need)
            save()
    print(json.dumps({name: step["status"] for name, step in steps.items()}))
    print(f"wrote {out} ({report['wall_s']:.0f} s, process peak RSS {report['process_peak_rss_gib']:.2f} GiB)")
    return 0 if all(step["status"] in ("ok", "not run (--only)") for step in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
