"""Generation engines: dynamic vs static KV cache (transformers), CPU and, where CUDA is available, GPU.

CPU section: the `tiny` preset (or `--model tiny-random`) at batch 16, both engines in one process,
repeats interleaved A-B / B-A so load from other processes hits both alike; reports generated
tokens/s of each, the static/dynamic ratio, and the fraction of identical outputs (float32 by default:
they should all be identical).

GPU section (only with CUDA, or on the CPU at toy size with `--gpu-dry-run` to check the code):
a 7B-shaped LLaVA with random weights (CLIP ViT-L/14-336 -> 576 image tokens, mlp2x_gelu, a
Llama-2-7B-shaped LM), bf16, 617-token prompts (576 image tokens), exactly 128 new tokens (the end
token is suppressed), batch 1/16/64. Per engine and batch: the first call (which includes
compilation for the static engine) and warm calls are timed separately; tokens/s is from the warm
calls. Output agreement on random weights means little (argmax ties), so it is reported only as a
sanity number.

    python bench/engines.py [--model tiny] [--n 16] [--max-new-tokens 16] [--repeats 2]
    python bench/engines.py --skip-cpu                     # GPU section only (needs CUDA)
    python bench/engines.py --skip-cpu --gpu-dry-run       # GPU code path at toy size on the CPU
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


# ---- GPU ---------------------------------------------------------------------------------------

SEVEN_B = {"vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16, "vision_intermediate": 4096,
           "image_size": 336, "patch": 14, "hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008,
           "vocab": 32000, "prompt_tokens": 617, "new_tokens": 128, "batches": (1, 16, 64)}
TOY = {"vision_hidden": 32, "vision_layers": 2, "vision_heads": 2, "vision_intermediate": 64,
       "image_size": 56, "patch": 14, "hidden": 64, "layers": 2, "heads": 4, "intermediate": 128,
       "vocab": 1000, "prompt_tokens": 40, "new_tokens": 8, "batches": (1, 4)}


def seven_b_llava(shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A LLaVA-1.5-7B-shaped LVLM with random weights, initialised directly on `device`."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from regap.models import LVLM, LVLMConfig, VisionConfig, VisionTower
    from regap.models.random_tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # ids the LM emits beyond its 400 entries decode to nothing; fine here
    size = shape["image_size"]
    vision_config = CLIPVisionConfig(hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_intermediate"],
                                     num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
                                     image_size=size, patch_size=shape["patch"])
    llm_config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                             intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                             num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                             max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            encoder = CLIPVisionModel(vision_config).eval()
            llm = LlamaForCausalLM(llm_config).eval()
    finally:
        torch.set_default_dtype(default)
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    config = LVLMConfig(vision=VisionConfig(source="random:clip-l-336", feature_layer=-2, drop_cls=True),
                        llm_source="random:llama-7b-shape", projector_type="mlp2x_gelu", name="llava-7b-shape-random")
    return LVLM(config, VisionTower(encoder, processor, config.vision), llm, tokenizer).to(device=device, dtype=dtype)


def prompt_of_length(model: Any, target: int) -> str:
    """A text prompt that, with one image, renders to `target` tokens (or as close as words allow)."""
    words = ["describe", "the", "picture", "in", "detail", "left", "right", "top", "bottom", "one", "two"]
    image = [Image.new("RGB", (8, 8))]
    text = ""
    for i in range(4 * target):
        candidate = (text + " " + words[i % len(words)]).strip()
        conversations, images = model.prepare_conversations([candidate], [image])
        if model.prompt_lengths(conversations, images)[0] > target:
            break
        text = candidate
    return text


class _NoEnd:
    """Suppresses the end token so every row generates exactly max_new_tokens."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.eos] = float("-inf")
        return scores


def gpu_section(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    model = seven_b_llava(shape, device, dtype)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                              "dtype": str(dtype), "build_s": time.perf_counter() - start,
                              "llm_parameters": sum(p.numel() for p in model.llm.parameters())}
    text = prompt_of_length(model, shape["prompt_tokens"])
    image = Image.new("RGB", (shape["image_size"], shape["image_size"]), "gray")
    conversations, images = model.prepare_conversations([text], [[image]])
    report["prompt_tokens"] = model.prompt_lengths(conversations, images)[0]
    report["image_tokens"] = model.tokens_per_image
    report["new_tokens"] = shape["new_tokens"]

    def no_end(indices: list[int]) -> list[_NoEnd]:
        return [_NoEnd(model.tokenizer.eos_token_id)]

    rows = []
    for batch in shape["batches"]:
        prompts, batch_images = [text] * batch, [image] * batch
        outputs = {}
        for engine in ENGINES:
            settings = DecodingSettings(max_new_tokens=shape["new_tokens"], batch_size=batch, engine=engine)
            texts, _, first = timed(model, prompts, batch_images, settings, no_end)
            warm = [timed(model, prompts, batch_images, settings, no_end) for _ in range(repeats)]
            seconds = min(w[2] for w in warm)
            generated = warm[0][1]
            rows.append({"batch": batch, "engine": engine, "first_call_s": first, "warm_call_s": seconds,
                         "compile_and_first_call_overhead_s": first - seconds,
                         "tokens_per_s": generated / seconds, "generated_tokens": generated,
                         "expected_tokens": batch * shape["new_tokens"]})
            outputs[engine] = texts
            print(json.dumps(rows[-1]), flush=True)
        rows[-1]["agreement_with_dynamic_random_weights"] = sum(
            a == b for a, b in zip(outputs["transformers"], outputs["static"])) / batch
    report["rows"] = rows
    if device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (real offline preset) or tiny-random")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed CPU calls per engine (interleaved)")
    parser.add_argument("--gpu-repeats", type=int, default=2, help="warm GPU calls per engine and batch")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--gpu-dry-run", action="store_true", help="run the GPU section at toy size on the CPU")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "load_average_start": os.getloadavg()}
    if not args.skip_cpu:
        report["cpu"] = cpu_section(args)
        print(json.dumps(report["cpu"]), flush=True)
    if args.gpu_dry_run:
        report["gpu_dry_run"] = gpu_section(TOY, torch.device("cpu"), torch.float32, 1)
    elif not args.skip_gpu:
        if torch.cuda.is_available():
            report["gpu"] = gpu_section(SEVEN_B, torch.device("cuda"), torch.bfloat16, args.gpu_repeats)
        else:
            report["gpu"] = "skipped: CUDA is not available"
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
