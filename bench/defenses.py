"""Cost of each defense relative to no defense on the `tiny` preset (CPU), plus its effect.

Per defense: batched generate() calls, wall time and the time ratio to no defense, the unsafe
rate (keyword judge) on starter harmful requests under a blank image, and the over-refusal
rate on starter benign requests, all on the same items in one process.

    python bench/defenses.py [--n 32] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from PIL import Image

from regap.defenses import build_generate, get_defense
from regap.models import DecodingSettings, load_model
from regap.safety.judges import JudgeInput, get_judge
from regap.safety.sources import load_requests

STACKS = {"none": [], "adashield-s": ["adashield-s"], "ecso": ["ecso"], "coca": ["coca"],
          "adashield-s+coca": ["adashield-s", "coca"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    harmful = load_requests("starter-harmful", limit=args.n)
    benign = load_requests("starter-benign", limit=args.n)
    requests = harmful + benign
    image = Image.new("RGB", (336, 336), "white")
    model = load_model("tiny", dtype=args.dtype)
    judge = get_judge("keyword")
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens, batch_size=16)
    report = {"n_harmful": len(harmful), "n_benign": len(benign), "max_new_tokens": args.max_new_tokens,
              "dtype": args.dtype, "load_average_start": os.getloadavg(), "defenses": {}}
    for label, names in STACKS.items():
        generate = build_generate(model, [get_defense(n) for n in names])
        calls, start = 0, time.perf_counter()
        texts = []
        for offset in range(0, len(requests), settings.batch_size):
            chunk = requests[offset : offset + settings.batch_size]
            result = generate([r.prompt for r in chunk], [image] * len(chunk), settings)
            texts += result.texts
            calls += result.generation_calls
        seconds = time.perf_counter() - start
        verdicts = judge.judge_batch([JudgeInput(r.prompt, t, r.category) for r, t in zip(requests, texts)])
        unsafe = [v.unsafe for v, r in zip(verdicts, requests) if r.label == "harmful"]
        refused = [v.refused for v, r in zip(verdicts, requests) if r.label == "benign"]
        report["defenses"][label] = {"generate_calls": calls, "seconds": seconds,
                                     "unsafe_rate_blank": sum(unsafe) / len(unsafe),
                                     "over_refusal_blank": sum(refused) / len(refused)}
    base = report["defenses"]["none"]
    for entry in report["defenses"].values():
        entry["time_ratio"] = entry["seconds"] / base["seconds"]
        entry["calls_ratio"] = entry["generate_calls"] / base["generate_calls"]
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    print("| defense | generate calls (x) | wall time (x) | unsafe rate, blank image | over-refusal, blank image |")
    print("|---|---|---|---|---|")
    for label, entry in report["defenses"].items():
        print(f"| {label} | {entry['generate_calls']} ({entry['calls_ratio']:.2f}x) | {entry['seconds']:.1f} s "
              f"({entry['time_ratio']:.2f}x) | {entry['unsafe_rate_blank']:.2f} | {entry['over_refusal_blank']:.2f} |")


if __name__ == "__main__":
    main()
