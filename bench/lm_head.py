"""Generation with and without the contiguous LM-head input (`regap.models.lm_head`), CPU.

The workload is one batch of the study's safety phase: 16 starter harmful requests, each with a
blank image, greedy, 16 new tokens, on the shipped `tiny-llava` preset. Each dtype is timed with
the hook and without it in one process, alternating round by round so drifting machine load hits
both alike; the ratio is the median time without over the median with. The responses must be
identical both ways. A micro-benchmark of the projection itself comes first.

The second part times a hidden-state pass as `regap gap` runs it (8 scene / benign-text pairs, 5 texts
per pair as in the study, reference protocol) projecting every position onto the vocabulary, as it did,
against one position (`logits_to_keep=1`); the hidden states must be identical.

    python bench/lm_head.py [--rounds 2] [--dtypes bfloat16 float32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from PIL import Image

from regap.models import DecodingSettings, load_model
from regap.models.lm_head import keep_lm_head_input_contiguous
from regap.safety.sources import load_requests


def projection_seconds(dtype: torch.dtype, contiguous: bool) -> float:
    """`[16, 1, 896] @ [896, 151936]` (Qwen2.5-0.5B's LM head, frozen), as generate's view or contiguous."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(151936, 896, generator=generator).to(dtype)
    hidden = torch.randn(16, 105, 896, generator=generator).to(dtype)[:, -1:, :]
    hidden = hidden.contiguous() if contiguous else hidden
    start = time.perf_counter()
    with torch.no_grad():
        torch.nn.functional.linear(hidden, weight)
    return time.perf_counter() - start


def hidden_state_pass(model, rounds: int) -> dict:
    """A gap collection batch with all logits against one position, alternating."""
    from regap.models.gap_pair import conversation
    from regap.safety.pairs import make_pairs

    pairs = make_pairs(8, texts_per_pair=5)
    batch = model.build_inputs([conversation(p, "reference") for p in pairs], [[p.image] for p in pairs],
                               padding_side="right")
    times: dict[int | None, list[float]] = {None: [], 1: []}
    states = {}
    with torch.no_grad():
        model(batch, output_hidden_states=True, use_labels=False, logits_to_keep=1)  # warm-up
        for _ in range(rounds):
            for keep in (None, 1):
                start = time.perf_counter()
                out = model(batch, output_hidden_states=True, use_labels=False, logits_to_keep=keep)
                times[keep].append(time.perf_counter() - start)
                states[keep] = out.hidden_states
    identical = all(torch.equal(a, b) for a, b in zip(states[None], states[1]))
    every, one = statistics.median(times[None]), statistics.median(times[1])
    print(f"{model.dtype} hidden-state pass ({tuple(batch.attention_mask.shape)} tokens): all logits {every:.2f} s, "
          f"one position {one:.2f} s -> {every / one:.2f}x; identical hidden states: {identical}")
    return {"tokens": list(batch.attention_mask.shape), "all_logits_s": [round(t, 2) for t in times[None]],
            "one_position_s": [round(t, 2) for t in times[1]], "speedup": round(every / one, 2),
            "identical_hidden_states": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    prompts = [r.prompt for r in load_requests("starter-harmful", limit=16)]
    images = [Image.new("RGB", (224, 224), "white")] * len(prompts)
    settings = DecodingSettings(max_new_tokens=16, batch_size=16)
    report: dict = {"machine": platform.processor() or platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
                    "workload": "16 starter harmful requests + blank image, greedy, 16 new tokens, batch 16",
                    "load_average_start": os.getloadavg(), "projection": {}, "generate": {}}
    for name in args.dtypes:
        dtype = getattr(torch, name)
        view, contiguous = projection_seconds(dtype, False), projection_seconds(dtype, True)
        report["projection"][name] = {"view_s": round(view, 3), "contiguous_s": round(contiguous, 3),
                                      "ratio": round(view / contiguous, 1)}
        print(f"{name} projection: view {view:.3f} s, contiguous {contiguous:.3f} s ({view / contiguous:.0f}x)")
    for name in args.dtypes:
        model = load_model(args.model, dtype=name)
        model.generate(prompts[:2], images[:2], DecodingSettings(max_new_tokens=2, batch_size=2))  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        texts: dict[bool, list[str]] = {}
        for _ in range(args.rounds):
            for hooked in (False, True):
                keep_lm_head_input_contiguous(model.llm, enabled=hooked)
                start = time.perf_counter()
                texts[hooked] = model.generate(prompts, images, settings)
                times[hooked].append(time.perf_counter() - start)
        keep_lm_head_input_contiguous(model.llm)
        without, with_hook = statistics.median(times[False]), statistics.median(times[True])
        report["generate"][name] = {"without_s": [round(t, 2) for t in times[False]],
                                    "with_s": [round(t, 2) for t in times[True]],
                                    "speedup": round(without / with_hook, 2),
                                    "identical_responses": texts[True] == texts[False]}
        print(f"{name} generate (batch of 16): without {without:.1f} s, with {with_hook:.1f} s "
              f"-> {without / with_hook:.2f}x; identical responses: {texts[True] == texts[False]}")
        del model
    report["hidden_state_pass"] = {}
    for name in args.dtypes:
        model = load_model(args.model, dtype=name)
        report["hidden_state_pass"][name] = hidden_state_pass(model, args.rounds)
        del model
    report["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
