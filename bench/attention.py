"""The LLM's attention kernel: `eager` against transformers' default `sdpa` (tiny preset, CPU).

`attn_implementation` (training configs, `regap.models.attention`) picks the kernel. This times one
training step of each stage as the study runs it (stage 1: projector on captions; stage 2: LoRA r8 on
q/k/v/o, every question of a scene in one conversation), in float32 and in bfloat16, with sdpa and
with eager: the two kernels in one process, alternating sdpa/eager/eager/sdpa so drifting machine
load hits both alike. It also checks that the two compute the same loss on one batch (forward only).

    python bench/attention.py [--pairs 3] [--batch 4] [--dtypes float32 bfloat16] [--json OUT]
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
    from regap.models.attention import set_llm_attention
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternated sdpa / eager steps per stage and dtype")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (the study's per-device batch)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=(1, 2))
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    from regap.data.synth import generate_synthetic
    from regap.precision import cpu_capability

    report: dict = {"command": "python bench/attention.py " + " ".join(sys.argv[1:]),
                    "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_start": os.getloadavg(), "pairs": args.pairs}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth"
        generate_synthetic(data, 16, seed=0, image_size=224, conversations="all")
        report["losses"] = [same_loss(dtype, data, args.batch) for dtype in args.dtypes]
        report["steps"] = [alternate(stage, dtype, data, args.batch, args.pairs)
                           for dtype in args.dtypes for stage in args.stages]
    report["load_average_end"] = os.getloadavg()
    for row in report["losses"]:
        print(f"loss {row['dtype']:8s}: sdpa {row['loss']['sdpa']:.5f}, eager {row['loss']['eager']:.5f} "
              f"(|difference| {row['abs_difference']:.2e})")
    for row in report["steps"]:
        print(f"stage {row['stage']} {row['dtype']:8s}: sdpa {row['median_sdpa_s']:.2f} s, eager "
              f"{row['median_eager_s']:.2f} s per step: sdpa / eager = {row['sdpa_over_eager']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
