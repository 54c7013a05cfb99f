"""Generation engines on the CPU: dynamic vs static KV cache (transformers).

CPU section: the `tiny` preset (or `--model tiny-random`) at batch 16, both engines in one process,
repeats interleaved A-B / B-A so load from other processes hits both alike; reports generated
tokens/s of each, the static/dynamic ratio, and the fraction of identical outputs (float32 by default:
they should all be identical).

The same comparison at LLaVA-1.5-7B shapes on a GPU (batch 16 and 64, 617-token prompts, 128 new
tokens, first and warm calls apart) is part of `bench/gpu.py`, the one GPU script.

    python bench/engines.py [--model tiny] [--n 16] [--max-new-tokens 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import torch
from PIL import Image

from regap.models import DecodingSettings

ENGINES = ("transformers", "static")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: Any, prompts: list[str], images: list[Any], settings: DecodingSettings,
          processors: Any = None) -> tuple[list[str], int, float]:
    """Texts, generated tokens (up to the end token) and seconds for one `generate_detailed` call."""
    _sync(model.device)
    start = time.perf_counter()
    result = model.generate_detailed(prompts, images, settings, logits_processor_factory=processors)
    _sync(model.device)
    return result.texts, sum(result.new_tokens), time.perf_counter() - start


# ---- CPU ---------------------------------------------------------------------------------------

def cpu_workload(n: int) -> tuple[list[str], list[Image.Image | None]]:
    """Starter harmful and benign prompts alternating; every other one with a white image."""
    from regap.safety.sources import load_requests

    harmful = load_requests("starter-harmful", limit=n // 2 + 1)
    benign = load_requests("starter-benign", limit=n // 2 + 1)
    prompts = [r.prompt for pair in zip(harmful, benign) for r in pair][:n]
    images = [Image.new("RGB", (224, 224), "white") if i % 2 else None for i in range(len(prompts))]
    return prompts, images


def cpu_section(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "tiny-random":
        from regap.models.random_tiny import tiny_random_lvlm

        model = tiny_random_lvlm().to(dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16)
    else:
        from regap.models import load_model

        model = load_model(args.model, dtype=args.dtype)
    prompts, images = cpu_workload(args.n)
    settings = {e: DecodingSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, engine=e)
                for e in ENGINES}
    for engine in ENGINES:  # warm-up (allocations, first-call costs)
        timed(model, prompts[:2], images[:2], DecodingSettings(max_new_tokens=2, batch_size=2, engine=engine))
    totals = {e: {"tokens": 0, "seconds": 0.0} for e in ENGINES}
    texts: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
            out, tokens, seconds = timed(model, prompts, images, settings[engine])
            totals[engine]["tokens"] += tokens
            totals[engine]["seconds"] += seconds
            texts.setdefault(engine, out)
            print(json.dumps({"repeat": repeat, "engine": engine, "tokens": tokens, "seconds": seconds,
                              "load_average": os.getloadavg()}), flush=True)
    rate = {e: totals[e]["tokens"] / totals[e]["seconds"] for e in ENGINES}
    same = sum(a == b for a, b in zip(texts["transformers"], texts["static"]))
    return {
        "model": args.model, "dtype": args.dtype, "n": len(prompts), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "tokens_per_s": rate, "seconds": {e: totals[e]["seconds"] for e in ENGINES},
        "static_over_dynamic": rate["static"] / rate["transformers"],
        "identical_outputs": f"{same}/{len(prompts)}", "identical_fraction": same / len(prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (real offline preset) or tiny-random")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed CPU calls per engine (interleaved)")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "load_average_start": os.getloadavg()}
    report["cpu"] = cpu_section(args)
    print(json.dumps(report["cpu"]), flush=True)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
