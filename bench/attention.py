"""The LLM's attention kernel: `eager` against transformers' default `sdpa` (tiny preset, CPU).

`attn_implementation` (training configs) and `--attn-implementation` (the commands that run a model;
`regap.models.attention`) pick the kernel. `--part training` times one training step of each stage as
the study runs it (stage 1: projector on captions; stage 2: LoRA r8 on q/k/v/o, every question of a
scene in one conversation), and checks that the two kernels compute the same loss on one batch
(forward only). `--part generation` times batched greedy generation as the study's safety runs do it
(16 requests per batch, half with a blank image, at most 16 new tokens) on the trained `tiny-llava`
preset, and counts the answers the two kernels give alike. Both run in float32 and in bfloat16, the
two kernels in one process, alternating sdpa/eager/eager/sdpa so drifting machine load hits both alike.

    python bench/attention.py [--part training generation] [--pairs 3] [--batch 4]
                              [--dtypes float32 bfloat16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unit_time import training_step  # noqa: E402  (bench/unit_time.py: one step of the shipped tiny config)

from regap.models.attention import set_llm_attention  # noqa: E402

KERNELS = ("sdpa", "eager")


def alternate(stage: int, dtype: str, data: Path, batch: int, pairs: int) -> dict:
    """Median step time of each kernel, the two timed in turn."""
    runs = {k: training_step(stage, dtype, data, batch, (f"attn_implementation={k}",)) for k in KERNELS}
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for p in range(pairs):
        for kernel in (KERNELS if p % 2 == 0 else KERNELS[::-1]):
            times[kernel].append(runs[kernel]())
        print(f"  stage {stage} {dtype} pair {p + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in KERNELS),
              flush=True)
    sdpa, eager = statistics.median(times["sdpa"]), statistics.median(times["eager"])
    return {"stage": stage, "dtype": dtype, "sdpa_s": times["sdpa"], "eager_s": times["eager"],
            "median_sdpa_s": sdpa, "median_eager_s": eager, "sdpa_over_eager": sdpa / eager}


def same_loss(dtype: str, data: Path, batch: int) -> dict:
    """The stage-2 caption loss of one batch under each kernel (forward only, same weights)."""
    from regap.data import LlavaJsonDataset
    from regap.models import load_model
    from regap.train.collate import Collator, TrainSamples

    model = load_model("tiny", dtype=dtype)
    samples = TrainSamples(LlavaJsonDataset(data / "instructions.json"))
    inputs = Collator(model, "chat", 2048)([samples[i] for i in range(batch)]).inputs
    losses = {}
    for kernel in KERNELS:
        set_llm_attention(model, kernel)
        with torch.no_grad():
            losses[kernel] = float(model(inputs).loss)
    return {"dtype": dtype, "loss": losses, "abs_difference": abs(losses["sdpa"] - losses["eager"])}


def generation_pair(dtype: str, pairs: int, n: int, batch: int, max_new_tokens: int) -> dict:
    """Greedy generation of the same requests under each kernel on one loaded model, timed in turn."""
    import time

    from generation import workload  # bench/generation.py: half harmful, half benign, every other with an image

    from regap.models import DecodingSettings, load_model

    model = load_model("tiny-llava", dtype=dtype)
    prompts, images = workload(n)
    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=batch)
    model.generate_detailed(prompts[:2], images[:2], DecodingSettings(max_new_tokens=2, batch_size=2))  # warm-up
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    answers: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    for p in range(pairs):
        for kernel in (KERNELS if p % 2 == 0 else KERNELS[::-1]):
            set_llm_attention(model, kernel)
            start = time.perf_counter()
            result = model.generate_detailed(prompts, images, settings)
            times[kernel].append(time.perf_counter() - start)
            answers[kernel], tokens[kernel] = result.texts, sum(result.new_tokens)
        print(f"  generation {dtype} pair {p + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in KERNELS),
              flush=True)
    sdpa, eager = statistics.median(times["sdpa"]), statistics.median(times["eager"])
    same = sum(a == b for a, b in zip(answers["sdpa"], answers["eager"]))
    return {"dtype": dtype, "requests": len(prompts), "batch": batch, "max_new_tokens": max_new_tokens,
            "sdpa_s": times["sdpa"], "eager_s": times["eager"], "median_sdpa_s": sdpa, "median_eager_s": eager,
            "sdpa_over_eager": sdpa / eager, "new_tokens": tokens, "identical_answers": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternated sdpa / eager steps per stage and dtype")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (the study's per-device batch)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=(1, 2))
    parser.add_argument("--part", nargs="+", default=["training"], choices=("training", "generation"))
    parser.add_argument("--requests", type=int, default=32, help="generation: requests per timed run")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    from regap.data.synth import generate_synthetic
    from regap.precision import cpu_capability

    report: dict = {"command": "python bench/attention.py " + " ".join(sys.argv[1:]),
                    "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_start": os.getloadavg(), "pairs": args.pairs}
    if "training" in args.part:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "synth"
            generate_synthetic(data, 16, seed=0, image_size=224, conversations="all")
            report["losses"] = [same_loss(dtype, data, args.batch) for dtype in args.dtypes]
            report["steps"] = [alternate(stage, dtype, data, args.batch, args.pairs)
                               for dtype in args.dtypes for stage in args.stages]
    if "generation" in args.part:
        report["generation"] = [generation_pair(dtype, args.pairs, args.requests, 16, 16) for dtype in args.dtypes]
    report["load_average_end"] = os.getloadavg()
    for row in report.get("generation", []):
        print(f"generation {row['dtype']:8s}: sdpa {row['median_sdpa_s']:.2f} s, eager {row['median_eager_s']:.2f} s "
              f"for {row['requests']} requests: sdpa / eager = {row['sdpa_over_eager']:.2f}x; identical answers "
              f"{row['identical_answers']}/{row['requests']}")
    for row in report.get("losses", []):
        print(f"loss {row['dtype']:8s}: sdpa {row['loss']['sdpa']:.5f}, eager {row['loss']['eager']:.5f} "
              f"(|difference| {row['abs_difference']:.2e})")
    for row in report.get("steps", []):
        print(f"stage {row['stage']} {row['dtype']:8s}: sdpa {row['median_sdpa_s']:.2f} s, eager "
              f"{row['median_eager_s']:.2f} s per step: sdpa / eager = {row['sdpa_over_eager']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
