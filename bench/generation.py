"""Batched (16) vs one-at-a-time greedy generation on the `tiny` preset, CPU.

Reports tokens/s for both in bfloat16 and their ratio (target >= 4x), the fraction of identical
responses in bfloat16, and checks that float32 responses are identical.

    python bench/generation.py [--n 32] [--max-new-tokens 32] [--fp32-n 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from PIL import Image

from regap.models import DecodingSettings, load_model
from regap.safety.sources import load_requests


def workload(n: int) -> tuple[list[str], list[Image.Image | None]]:
    """Half harmful, half benign starter prompts; every other one with a white image."""
    harmful = load_requests("starter-harmful", limit=n // 2)
    benign = load_requests("starter-benign", limit=n - n // 2)
    prompts = [r.prompt for pair in zip(harmful, benign) for r in pair]
    images = [Image.new("RGB", (224, 224), "white") if i % 2 else None for i in range(len(prompts))]
    return prompts, images


def timed(model, prompts, images, batch_size: int, max_new_tokens: int):
    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    start = time.perf_counter()
    if batch_size == 1:
        results = [model.generate_detailed([p], [i], settings) for p, i in zip(prompts, images)]
        texts = [r.texts[0] for r in results]
        tokens = sum(r.new_tokens[0] for r in results)
    else:
        result = model.generate_detailed(prompts, images, settings)
        texts, tokens = result.texts, sum(result.new_tokens)
    seconds = time.perf_counter() - start
    return texts, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--fp32-n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    prompts, images = workload(args.n)
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "n": args.n, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}

    report["load_average_start"] = os.getloadavg()
    model = load_model("tiny", dtype="bfloat16")
    timed(model, prompts[:2], images[:2], 2, 4)  # warm-up
    # Interleave the two modes group by group, so load from other processes hits both alike.
    single, batched = [], []
    single_tokens = batched_tokens = 0
    single_s = batched_s = 0.0
    for start in range(0, len(prompts), args.batch_size):
        group_p, group_i = prompts[start : start + args.batch_size], images[start : start + args.batch_size]
        texts, tokens, seconds = timed(model, group_p, group_i, 1, args.max_new_tokens)
        single, single_tokens, single_s = single + texts, single_tokens + tokens, single_s + seconds
        texts, tokens, seconds = timed(model, group_p, group_i, args.batch_size, args.max_new_tokens)
        batched, batched_tokens, batched_s = batched + texts, batched_tokens + tokens, batched_s + seconds
    report["bf16"] = {
        "unbatched_tokens_per_s": single_tokens / single_s, "batched_tokens_per_s": batched_tokens / batched_s,
        "speedup": (batched_tokens / batched_s) / (single_tokens / single_s),
        "identical_fraction": sum(a == b for a, b in zip(single, batched)) / len(prompts),
        "unbatched_s": single_s, "batched_s": batched_s,
    }
    del model
    model = load_model("tiny", dtype="float32")
    k = args.fp32_n
    single32, _, s32 = timed(model, prompts[:k], images[:k], 1, args.max_new_tokens)
    batched32, _, b32 = timed(model, prompts[:k], images[:k], args.batch_size, args.max_new_tokens)
    report["fp32"] = {"n": k, "identical_fraction": sum(a == b for a, b in zip(single32, batched32)) / k,
                      "unbatched_s": s32, "batched_s": b32, "speedup_time": s32 / b32}
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    bf = report["bf16"]
    print(f"| bf16 tokens/s unbatched {bf['unbatched_tokens_per_s']:.1f} | batched(16) {bf['batched_tokens_per_s']:.1f} "
          f"| ratio {bf['speedup']:.2f}x | identical {bf['identical_fraction']:.0%} | fp32 identical "
          f"{report['fp32']['identical_fraction']:.0%} |")


if __name__ == "__main__":
    main()
