"""A study unit in float32 against bfloat16 (tiny preset, CPU): per-phase time ratios, and the
float32 unit time they project from a unit measured in bfloat16.

The time per unit is wanted both with native bf16 and in float32. A float32 unit takes hours on
a CPU, so it is projected, not run: each phase of the study's unit is timed both ways in one
process, alternating float32 and bfloat16 so drifting machine load hits both alike, and the
measured bf16 unit's phases are scaled by their ratio.

* stage 1: a training step of `tiny-stage1` (projector on captions, batch 4);
* stage 2: a training step of `tiny-stage2` as the study runs it (LoRA r8 on q/k/v/o, batch 4,
  every question of a scene in one conversation: `data.conversations=all`);
* generation: greedy decoding of 16 tokens for a batch of 16 starter harmful requests, each with a
  blank image (the safety, utility and learning-curve phases are this).

The gap phases (forward passes only) are scaled by the generation ratio, which is prefill-bound too.

    python bench/unit_time.py [--pairs 3] [--unit results/tiny-study-blind/units/plain-s0.json] [--json OUT]
    python bench/unit_time.py --parts OUT --unit results/tiny-study/units/plain-s0.json   # reuse measured ratios
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

PHASE_PART = {"stage1": "stage1", "stage2": "stage2", "curve": "generation", "gap": "generation",
              "gap_attack": "generation", "gap_stage1": "generation", "safety": "generation",
              "utility": "generation"}


def training_step(stage: int, dtype: str, data: Path, batch_size: int,
                  extra: tuple[str, ...] = ()) -> Callable[[], float]:
    """One timed training step of the shipped tiny config of `stage` (frozen parts in `dtype`;
    `extra`: more `key=value` overrides, such as `attn_implementation=eager`)."""
    from regap.data import LlavaJsonDataset
    from regap.models import load_model
    from regap.train import load_config
    from regap.train.collate import Collator, TrainSamples
    from regap.train.setup import make_optimizer, setup_model
    from regap.train.step import TrainStep

    if stage == 1:
        overrides, json_file = [], data / "captions.json"
    else:  # the study's stage 2 (tiny-study.yaml: stage2.lora_*)
        overrides, json_file = ["lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"], \
            data / "instructions.json"
    config = load_config(f"tiny-stage{stage}",
                         overrides + [f"dtype={dtype}", f"data.json={json_file}", *extra]).resolved()
    lvlm = load_model("tiny", dtype=dtype)
    module, _ = setup_model(lvlm, config, log=lambda m: None)
    optimizer = make_optimizer(module, config)
    dataset = TrainSamples(LlavaJsonDataset(json_file))
    batch = Collator(lvlm, config.template, config.max_length)([dataset[i] for i in range(batch_size)]).inputs
    # No Accelerator: its state is a per-process singleton and the two set-ups need different mixed
    # precision; bf16 autocast is what Accelerate's mixed_precision=bf16 does on a CPU.
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else None
    step = TrainStep(module, optimizer, autocast=autocast)

    def timed() -> float:
        start = time.perf_counter()
        step(batch)
        return time.perf_counter() - start

    timed()  # warm-up (allocations, oneDNN kernels)
    return timed


def generation(dtype: str, n: int, max_new_tokens: int) -> Callable[[], float]:
    from PIL import Image

    from regap.models import DecodingSettings, load_model
    from regap.safety.sources import load_requests

    model = load_model("tiny", dtype=dtype)
    prompts = [r.prompt for r in load_requests("starter-harmful", limit=n)]
    images = [Image.new("RGB", (224, 224), "white")] * len(prompts)
    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=n)

    def timed() -> float:
        start = time.perf_counter()
        model.generate_detailed(prompts, images, settings)
        return time.perf_counter() - start

    timed()
    return timed


def alternate(make: Callable[[str], Callable[[], float]], pairs: int, label: str) -> dict:
    """Median float32 and bfloat16 times of one part, the two timed in turn."""
    runs = {dtype: make(dtype) for dtype in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for k in range(pairs):
        for dtype in (("float32", "bfloat16") if k % 2 == 0 else ("bfloat16", "float32")):
            times[dtype].append(runs[dtype]())
        print(f"  {label} pair {k + 1}: float32 {times['float32'][-1]:.2f} s, bfloat16 {times['bfloat16'][-1]:.2f} s",
              flush=True)
    del runs
    fp32, bf16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    return {"float32_s": times["float32"], "bfloat16_s": times["bfloat16"], "median_float32_s": fp32,
            "median_bfloat16_s": bf16, "fp32_over_bf16": fp32 / bf16}


def project(unit_path: Path, parts: dict[str, dict]) -> dict:
    """The float32 time of a unit measured in bfloat16: each phase times its part's ratio."""
    unit = json.loads(unit_path.read_text())
    if unit.get("dtype") != "bfloat16":
        raise SystemExit(f"{unit_path}: field 'dtype' is {unit.get('dtype')!r}; the projection starts from a bf16 unit")
    phases = {}
    for phase, seconds in unit["timings_seconds"].items():
        part = PHASE_PART.get(phase)
        if part is None:
            raise SystemExit(f"{unit_path}: phase {phase!r} has no measured part here")
        phases[phase] = {"bfloat16_s": seconds, "ratio": parts[part]["fp32_over_bf16"],
                         "float32_s": seconds * parts[part]["fp32_over_bf16"]}
    return {"unit": unit["unit"], "phases": phases,
            "bfloat16_min": sum(p["bfloat16_s"] for p in phases.values()) / 60,
            "float32_min": sum(p["float32_s"] for p in phases.values()) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternated float32 / bfloat16 runs per part")
    parser.add_argument("--batch", type=int, default=4, help="samples per training step (the study's per-device batch)")
    parser.add_argument("--requests", type=int, default=16, help="requests per generation batch (the study's batch)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--unit", type=Path, default=Path("results/tiny-study-blind/units/plain-s0.json"),
                        help="a unit summary measured in bfloat16, to project")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--parts", type=Path, help="an earlier --json report: project --unit with its measured "
                        "ratios instead of timing the parts again")
    args = parser.parse_args()
    if args.parts is not None:
        earlier = json.loads(args.parts.read_text())
        if "parts" not in earlier:
            raise SystemExit(f"{args.parts}: no field 'parts'; pass a report written by --json")
        projection = project(args.unit, earlier["parts"])
        print(f"unit {projection['unit']}: measured {projection['bfloat16_min']:.0f} min in bfloat16, projected "
              f"{projection['float32_min']:.0f} min in float32 (ratios measured {args.parts})")
        if args.json:
            args.json.write_text(json.dumps({"parts_from": str(args.parts), "parts": earlier["parts"],
                                             "projection": projection}, indent=1))
        return

    from regap.data.synth import generate_synthetic
    from regap.precision import cpu_capability

    report: dict = {"machine": platform.processor() or platform.machine(), "cpu_capability": cpu_capability(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_start": os.getloadavg(), "pairs": args.pairs}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth"
        generate_synthetic(data, 16, seed=0, image_size=224, conversations="all")
        parts = {
            "stage1": alternate(lambda d: training_step(1, d, data, args.batch), args.pairs, "stage 1"),
            "stage2": alternate(lambda d: training_step(2, d, data, args.batch), args.pairs, "stage 2"),
            "generation": alternate(lambda d: generation(d, args.requests, args.max_new_tokens), args.pairs,
                                    "generation"),
        }
    report["parts"] = parts
    report["load_average_end"] = os.getloadavg()
    if args.unit.is_file():
        report["projection"] = project(args.unit, parts)
    for name, part in parts.items():
        print(f"{name:10s} float32 {part['median_float32_s']:.2f} s, bfloat16 {part['median_bfloat16_s']:.2f} s: "
              f"float32 / bf16 = {part['fp32_over_bf16']:.2f}x")
    if "projection" in report:
        p = report["projection"]
        print(f"unit {p['unit']}: measured {p['bfloat16_min']:.0f} min in bfloat16, projected {p['float32_min']:.0f} min "
              "in float32")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
